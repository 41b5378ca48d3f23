"""A casd client on a blocking socket, for casctl commands that send one request and read
its answers: today ``casctl sync``, which the destination server carries out.

It needs no event loop. Without trio (0.2 s to import here) and the modules of the full
client, ``casctl sync`` starts in about 0.17 s instead of 0.45 s, which every sync a
script or a benchmark runs pays. The protocol is casproto's, as for the trio client
(:mod:`casd.client`): the sans-I/O core is what lets the two share it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import casproto

from casd import __version__
from casd.address import parse_hostport
from casd.errors import PeerError, PeerGone
from casd.refusal import hung_up, refused, tls_context, tls_failed, unreachable

#: Seconds to connect and handshake (as the trio client's CONNECT_TIMEOUT).
CONNECT_TIMEOUT = 10.0
#: One receive may return up to this much.
RECV_SIZE = 256 * 1024
#: What this client offers in its HELLO: it only sends SYNC and reads the reports.
FEATURES: tuple[str, ...] = ()


class BlockingClient:
    """One handshaken connection. Make one with :func:`connect`. Not thread-safe."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self._address = address
        self._conn = casproto.Connection(casproto.Role.CLIENT)
        self._rids = 0

    def _send(self, message: casproto.Message) -> None:
        try:
            self._sock.sendall(self._conn.send(message))
        except OSError as exc:
            self._conn.send_failed()
            raise PeerGone(f"connection to {self._address} broke while sending") from exc

    def _next(self) -> casproto.Event:
        while True:
            try:
                event = self._conn.next_event()
            except casproto.ProtocolError as exc:
                raise PeerError(f"{self._address} broke the casd protocol: {exc}") from exc
            if event is not casproto.NEED_DATA:
                if event is casproto.CLOSED:
                    raise PeerGone(f"{self._address} closed the connection")
                return event
            try:
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                raise PeerError(f"{self._address} did not answer the casd handshake") from None
            except OSError as exc:
                raise PeerGone(f"connection to {self._address} broke: {exc}") from exc
            self._conn.receive_data(data)  # b"" is the end, which next_event reports

    def _handshake(self, token: str | None) -> None:
        hello = casproto.Hello(
            0, casproto.PROTOCOL_VERSION, FEATURES, token, f"casctl/{__version__}"
        )
        self._send(hello)
        try:
            ev = self._next()
        except PeerGone:
            raise hung_up(self._address) from None
        if isinstance(ev, casproto.Error):
            raise refused(ev)
        if not isinstance(ev, casproto.Welcome):
            raise PeerError(f"{self._address} answered the handshake with {type(ev).__name__}")

    def sync_from(
        self,
        source: str,
        *,
        token: str | None = None,
        names: list[str] | tuple[str, ...] = (),
        all_names: bool = False,
        dry_run: bool = False,
        on_progress: Callable[[dict[str, int | float | str]], None] | None = None,
    ) -> casproto.SyncDone:
        """Ask this server to pull blobs from server ``source``, as
        :meth:`casd.client.Client.sync_from` does.

        Raises:
            PeerRefused: this server, or the source through it, refused or failed.
            PeerGone, PeerError: the connection broke.
        """
        self._rids += 1
        rid = self._rids
        self._send(casproto.Sync(rid, source, token, tuple(names), all_names, dry_run))
        while True:
            ev = self._next()
            if isinstance(ev, casproto.Error):
                raise refused(ev)
            if isinstance(ev, casproto.SyncDone) and ev.rid == rid:
                return ev
            if isinstance(ev, casproto.SyncProgress) and on_progress is not None:
                on_progress(dict(ev.progress))


@contextmanager
def connect(
    address: str, *, token: str | None = None, tls_ca: str | None = None
) -> Iterator[BlockingClient]:
    """Connect to a casd server and handshake; ``tls://HOST:PORT`` connects with TLS,
    checking the server's certificate against ``tls_ca`` (default: $CASD_TLS_CA, else
    the system's CAs).

    Raises:
        PeerError: the server cannot be reached, fails TLS, or speaks no casd protocol.
        PeerRefused: the server refused the connection (token, version).
        ConfigError: the address or the CA file is unusable.
    """
    use_tls = address.startswith("tls://")
    host, port = parse_hostport(address.removeprefix("tls://"))
    try:
        sock: Any = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except TimeoutError:
        raise unreachable(address, None) from None
    except OSError as exc:
        raise unreachable(address, exc) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if use_tls:
            sock = _tls(sock, host, address, tls_ca)
        client = BlockingClient(sock, address)
        client._handshake(token)
        sock.settimeout(None)  # a sync reports progress, but may take its time
        yield client
    finally:
        sock.close()


def _tls(sock: socket.socket, host: str, address: str, tls_ca: str | None) -> socket.socket:
    context = tls_context(tls_ca)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except OSError as exc:  # ssl.SSLError included
        raise tls_failed(address, exc) from exc
