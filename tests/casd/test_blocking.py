"""The blocking client `casctl sync` uses (casd.blocking): a server that is not casd, or
says nothing, or hangs up, gets a clear error and never a hang. Its happy path runs
against real daemons in tests/integration (test_sync, test_tls)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from casd import blocking
from casd.errors import PeerError, PeerGone


@contextmanager
def server(behave: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on loopback that treats its one connection with ``behave``."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def run() -> None:
        conn, _ = lsock.accept()
        with conn:
            behave(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        lsock.close()
        t.join(5)


def handshake(address: str) -> None:
    with blocking.connect(address):
        pass


def test_a_server_that_is_not_casd_is_named_as_such() -> None:
    def http(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n" * 20)

    with server(http) as address, pytest.raises(PeerError, match="casd protocol"):
        handshake(address)


def test_a_server_that_hangs_up_in_the_handshake_gets_a_hint_about_tls() -> None:
    def hang_up(conn: socket.socket) -> None:
        conn.recv(1024)

    with server(hang_up) as address, pytest.raises(PeerGone) as info:
        handshake(address)
    assert "during the handshake" in str(info.value)
    assert info.value.hint is not None
    assert "tls://" in info.value.hint


def test_a_silent_server_times_out_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocking, "CONNECT_TIMEOUT", 0.5)

    def silent(conn: socket.socket) -> None:
        while conn.recv(1024):  # reads the HELLO, answers nothing, until the client leaves
            pass

    with server(silent) as address, pytest.raises(PeerError, match="did not answer"):
        handshake(address)


def test_nothing_listening_is_a_clear_error_with_a_hint() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(PeerError, match="cannot connect to casd") as info:
        handshake(f"127.0.0.1:{port}")
    assert info.value.hint is not None
