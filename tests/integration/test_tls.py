"""TLS between casctl and casd, and between two casd daemons (sync)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Daemon, casctl, ok

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl (Debian package openssl) makes the test CA"
)
MakeDaemon = Callable[..., Daemon]


def make_cert(where: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made the way the README says."""
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "30",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def tls_daemon(make: MakeDaemon, name: str, cert: Path, key: Path) -> Daemon:
    d = make(name, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert))
    d.address = "tls://" + d.address
    return d


def test_put_get_and_sync_over_tls(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    a = tls_daemon(make_daemon, "a", cert, key)
    b = tls_daemon(make_daemon, "b", cert, key)
    ca = ["--tls-ca", str(cert)]
    data = b"over tls " * 50_000
    ok(casctl(a, "put", "-", "--name", "x", *ca, input=data))
    assert ok(casctl(a, "get", "x", *ca)).out == data
    ok(casctl(a, "sync", a.address, b.address, "x", *ca))  # b's daemon dials a over TLS
    assert ok(casctl(b, "get", "x", *ca)).out == data


def test_tls_failures_are_clear(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    other, _ = make_cert(tmp_path, "other")
    a = tls_daemon(make_daemon, "a", cert, key)
    r = casctl(a, "ls", "--tls-ca", str(other))  # a CA that did not sign the server
    assert r.code == 1
    assert "certificate verify failed" in r.err
    assert "--tls-ca" in r.err
    plain = a.address.removeprefix("tls://")
    r = casctl(plain, "ls")
    assert r.code == 1
    assert "connect to tls://HOST:PORT" in r.err
    # `casctl sync` talks to DST on a blocking socket (casd.blocking): the same errors.
    r = casctl(a, "sync", a.address, a.address, "x", "--tls-ca", str(other))
    assert r.code == 1
    assert "certificate verify failed" in r.err
    assert "--tls-ca" in r.err
    r = casctl(plain, "sync", a.address, plain, "x")
    assert r.code == 1
    assert "connect to tls://HOST:PORT" in r.err
