"""Names and digests as casd accepts them (the rules live in casproto, SPEC §1)."""

from __future__ import annotations

import casproto

from casd.errors import InvalidRef


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid blob name, else raise InvalidRef."""
    if not casproto.is_valid_name(name):
        raise InvalidRef(
            f"invalid name {name!r}: use 1-255 bytes of printable UTF-8 text "
            "that does not start with 'sha256:'"
        )
    return name


def check_digest(digest: str) -> str:
    """Return ``digest`` if it reads ``sha256:<64 lowercase hex>``, else raise InvalidRef."""
    if not casproto.is_valid_digest(digest):
        raise InvalidRef(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex digits>")
    return digest


def is_digest(ref: str) -> bool:
    """Whether a reference names a blob by digest (else it is a name)."""
    return ref.startswith("sha256:")
