"""Connection: one peer's side of a conversation, bytes in and events out, no I/O."""

from __future__ import annotations

from collections.abc import KeysView
from enum import Enum
from typing import Final, Literal

from ._codec import LENGTH_SIZE, FrameDecoder, encode_message
from ._constants import MAX_FRAME
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._messages import Error, Message, Welcome
from ._state import ConnState, ConversationState, Role


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


#: next_event() needs more bytes: call receive_data() first.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: next_event() has nothing more to give: the peer closed the stream, or sent a fatal
#: ERROR (rid 0) that was already returned.
CLOSED: Final = _Sentinel.CLOSED

#: What next_event() returns.
Event = Message | Literal[_Sentinel.NEED_DATA, _Sentinel.CLOSED]


class Connection:
    """The protocol state of one connection, for the side playing `our_role`.

    Feed received bytes to receive_data() and pull messages out of next_event(); turn
    messages into bytes to write with send(). Both directions are checked against the
    same state machine (SPEC §7), so a Connection raises before it writes anything the
    peer would have to reject, and as soon as the peer sends anything it may not.

    A Connection does not interpret requests: answering them, verifying chunk ids and
    digests, and judging names are the application's job.
    """

    __slots__ = ("_decoder", "_eof", "_machine", "_our_end", "_their_end", "_their_error")

    def __init__(self, our_role: Role) -> None:
        """Start a connection in AWAIT_HELLO.

        Args:
            our_role: Role.CLIENT to send HELLO and requests, Role.SERVER to answer them.
        """
        self._machine = ConversationState(our_role)
        self._decoder = FrameDecoder()
        # Each side's own end state, ERROR or CLOSED, once it can send no more.
        self._our_end: ConnState | None = None
        self._their_end: ConnState | None = None
        self._their_error: RemoteProtocolError | None = None
        self._eof = False

    # --- what the I/O layer may look at -----------------------------------------------

    @property
    def our_role(self) -> Role:
        """The role this Connection plays."""
        return self._machine.our_role

    @property
    def their_role(self) -> Role:
        """The role the peer plays."""
        return Role.SERVER if self._machine.our_role is Role.CLIENT else Role.CLIENT

    @property
    def our_state(self) -> ConnState:
        """Our side: ERROR after misuse or a failed send, CLOSED after we sent ERROR(0).

        Otherwise the shared phase: AWAIT_HELLO, AWAIT_WELCOME or READY.
        """
        return self._our_end or self._machine.phase

    @property
    def their_state(self) -> ConnState:
        """The peer's side: ERROR after it broke the protocol, CLOSED after EOF or its ERROR(0).

        Otherwise the shared phase: AWAIT_HELLO, AWAIT_WELCOME or READY.
        """
        return self._their_end or self._machine.phase

    @property
    def state(self) -> ConnState:
        """The connection as a whole: ERROR if either side is, else CLOSED if either is."""
        ends = (self._our_end, self._their_end)
        if ConnState.ERROR in ends:
            return ConnState.ERROR
        if ConnState.CLOSED in ends:
            return ConnState.CLOSED
        return self._machine.phase

    @property
    def features(self) -> frozenset[str]:
        """The features WELCOME negotiated; empty until then."""
        return self._machine.features

    @property
    def open_requests(self) -> KeysView[int]:
        """Rids of the requests that have not ended (a live, read-only view)."""
        return self._machine.requests.keys()

    @property
    def their_max_frame(self) -> int:
        """The largest frame body we may send: WELCOME.max_frame when we are the client."""
        if self._machine.our_role is Role.CLIENT:
            return self._machine.server_max_frame
        return MAX_FRAME

    # --- sending ----------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Check that we may send `message` now, record it, and encode it.

        Call it in the order the frames go onto the wire.

        Args:
            message: The message to send.

        Returns:
            The whole frame to write.

        Raises:
            LocalProtocolError: if the message is malformed, too large for the peer, or not
                allowed in the current state; or if our side is already ERROR or CLOSED.
                Our side is ERROR afterwards, and every later send() raises.
        """
        try:
            if self._our_end is not None:
                raise LocalProtocolError(
                    f"cannot send {type(message).__name__}: our side is {self._our_end.value}",
                    ErrorCode.UNEXPECTED,
                )
            frame = encode_message(message)
            limit = self.their_max_frame
            if len(frame) - LENGTH_SIZE > limit:
                raise LocalProtocolError(
                    f"{type(message).__name__} frame of {len(frame) - LENGTH_SIZE} bytes "
                    f"exceeds the peer's max_frame of {limit}",
                    ErrorCode.TOO_LARGE,
                )
            self._machine.process(self._machine.our_role, message)
        except LocalProtocolError:
            self._our_end = ConnState.ERROR
            raise
        if isinstance(message, Error) and message.rid == 0:
            self._our_end = ConnState.CLOSED  # SPEC §6: whoever sends it closes
        elif isinstance(message, Welcome):
            # A server accepts from now on only what it announced.
            self._decoder.max_frame = self._machine.server_max_frame
        return frame

    def send_failed(self) -> None:
        """Record that writing a frame from send() failed, possibly halfway.

        The peer may have received part of a frame, so our side is ERROR: every later
        send() raises LocalProtocolError. Receiving still works.
        """
        self._our_end = ConnState.ERROR

    # --- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer; `b""` means the peer closed the stream.

        Args:
            data: The next bytes of the stream, or b"" at its end.

        Raises:
            RuntimeError: if data follows the end of the stream (an I/O layer bug).
        """
        if self._eof:
            if data:
                raise RuntimeError("received data after the end of the stream")
            return
        if not data:
            self._eof = True
        elif self._their_end is None:
            self._decoder.feed(data)
        # else: after the peer's ERROR(0) or garbage nothing it sends matters any more.

    def next_event(self) -> Event:
        """Decode and check the next message from the peer.

        Returns:
            The next message; NEED_DATA if a whole frame has not arrived yet; CLOSED if the
            peer closed the stream at a frame boundary, and on every call after an ERROR
            with rid 0 was returned (the peer closes after sending one, SPEC §6).

        Raises:
            RemoteProtocolError: if the peer sent bytes that do not decode (MALFORMED,
                TOO_LARGE, INVALID), a message not allowed now (UNEXPECTED, or
                UNSUPPORTED_VERSION / INVALID for a bad handshake), or closed the stream
                mid-frame (MALFORMED). The peer side is ERROR afterwards and every later
                call raises again. Report it with `Error(0, exc.code, str(exc))` and close.
        """
        if self._their_error is not None:
            raise RemoteProtocolError(
                f"the peer already broke the protocol: {self._their_error}",
                self._their_error.code,
            )
        if self._their_end is ConnState.CLOSED:
            return CLOSED
        their_role = self.their_role
        try:
            while True:
                message = self._decoder.next_message()
                if message is None:
                    if not self._eof:
                        return NEED_DATA
                    if self._decoder.buffered:
                        raise LocalProtocolError(
                            f"stream ended inside a frame ({self._decoder.buffered} bytes)",
                            ErrorCode.MALFORMED,
                        )
                    self._their_end = ConnState.CLOSED
                    return CLOSED
                if self._machine.process(their_role, message):
                    break
        except LocalProtocolError as exc:
            self._their_end = ConnState.ERROR
            self._their_error = RemoteProtocolError(str(exc), exc.code)
            raise self._their_error from exc
        if isinstance(message, Error) and message.rid == 0:
            self._their_end = ConnState.CLOSED
        return message
