"""Names and digests (SPEC §1)."""

from __future__ import annotations

import hashlib

import pytest
from casproto import is_valid_digest, is_valid_name

EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    "name", ["a", "release/v1.0", "ünïcode", "x" * 255, "é" * 127, "sha256", "SHA256:x"]
)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 256,
        "é" * 128,  # 256 bytes of UTF-8
        "a\x00b",
        "tab\there",
        "line\n",
        "\x7f",
        "\x85",  # C1 control
        "sha256:abc",
        EMPTY,
        "\ud800",  # a lone surrogate has no UTF-8 form
        b"bytes",
        None,
    ],
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)


def test_valid_digest() -> None:
    assert is_valid_digest(EMPTY)


@pytest.mark.parametrize(
    "digest",
    [
        EMPTY.upper(),
        EMPTY.replace("sha256", "SHA256"),
        EMPTY[:-1],
        EMPTY + "0",
        EMPTY + "\n",
        "sha512:" + "0" * 64,
        "0" * 64,
        EMPTY.encode(),
        None,
    ],
)
def test_invalid_digests(digest: str) -> None:
    assert not is_valid_digest(digest)
