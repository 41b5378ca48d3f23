"""Binds one casproto.Connection to one trio stream; used by both daemon and client.

All protocol decisions live in casproto. This layer moves bytes, coalesces small frames
into large writes (trio costs ~35 us per send_all; 64 KiB sends halve loopback
throughput), counts bytes on the wire, and translates trio's errors into casd's.
"""

from __future__ import annotations

from collections.abc import Sequence

import casproto
import trio

from casd.errors import PeerGone

# One receive may return up to this much. 256 KiB keeps per-call overhead small at
# GB/s rates while bounding what a connection holds in its receive buffer.
RECV_SIZE = 256 * 1024

# A write that makes no progress for this long means the peer stopped reading.
SEND_TIMEOUT_S = 120.0

# Frames are gathered into writes of at least this size before send_all.
COALESCE_BYTES = 1024 * 1024


class RequestEnded(Exception):
    """The peer ended a request while we still had frames to send for it."""


class PeerConnection:
    """One protocol connection over one stream."""

    def __init__(self, stream: trio.abc.Stream, role: casproto.Role, ident: str = "?") -> None:
        self.stream = stream
        self.conn = casproto.Connection(role)
        self.ident = ident
        self.bytes_sent = 0
        self.bytes_received = 0
        #: trio.current_time() of the latest bytes received (a delta choice times the
        #: link by it: when the last byte came, not when the chunks were taken).
        self.received_at = 0.0
        self._send_lock = trio.Lock()  # frames of concurrent tasks must not interleave

    @property
    def wire_bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    async def send(self, message: casproto.Message, *, within: int | None = None) -> None:
        await self.send_many((message,), within=within)

    async def send_many(
        self, messages: Sequence[casproto.Message], *, within: int | None = None
    ) -> None:
        """Send frames in order, as few writes as possible.

        ``within`` names a request these frames continue (a push): if the peer has ended
        it meanwhile (its ERROR crossed our frames), RequestEnded is raised instead of
        sending out of turn, and the caller reads the peer's answer.

        Raises:
            RequestEnded: the request ``within`` names is no longer open.
            PeerGone: the stream broke or was closed.
            casproto.LocalProtocolError: we tried to send something out of turn (a bug).
        """
        async with self._send_lock:
            if self.conn.our_state is casproto.ConnState.ERROR:  # another task's write failed
                raise PeerGone(f"connection to {self.ident} broke in an earlier write")
            out: list[bytes] = []
            size = 0
            for m in messages:
                if within is not None and within not in self.conn.open_requests:
                    if out:
                        await self._write(out, size)
                    raise RequestEnded(within)
                frame = self.conn.send(m)
                out.append(frame)
                size += len(frame)
                if size >= COALESCE_BYTES:
                    await self._write(out, size)
                    out, size = [], 0
            if out:
                await self._write(out, size)

    async def _write(self, frames: list[bytes], size: int) -> None:
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            # Not cancellable: these frames are already recorded as sent, and cancelling one
            # request (CANCEL) must not tear a frame and break the stream for every other
            # request. SEND_TIMEOUT_S bounds the write instead.
            with trio.CancelScope(shield=True), trio.fail_after(SEND_TIMEOUT_S):
                await self.stream.send_all(data)
        except BaseException as exc:  # the stream may hold part of a frame: it is unusable
            self.conn.send_failed()
            if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
                raise PeerGone(f"connection to {self.ident} broke while sending") from exc
            if isinstance(exc, trio.TooSlowError):
                raise PeerGone(
                    f"{self.ident} read nothing for {SEND_TIMEOUT_S:.0f} s; giving up on it"
                ) from exc
            raise
        self.bytes_sent += size

    async def next_event(self) -> casproto.Event:
        """The next message from the peer, or ``casproto.CLOSED`` at a clean end.

        Raises:
            casproto.RemoteProtocolError: the peer sent garbage or broke the rules.
            PeerGone: the connection broke.
        """
        while True:
            event = self.conn.next_event()
            if event is not casproto.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerGone(f"connection to {self.ident} broke") from exc
            self.bytes_received += len(data)
            self.received_at = trio.current_time()
            self.conn.receive_data(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
