"""Error codes (SPEC §6) and the exceptions that say who broke the protocol."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """The `code` of an ERROR frame (SPEC §6). Programs act on it; humans read the message."""

    MALFORMED = 1
    UNEXPECTED = 2
    UNSUPPORTED_VERSION = 3
    UNAUTHORIZED = 4
    FORBIDDEN = 5
    NOT_FOUND = 6
    INVALID = 7
    CHUNK_CORRUPT = 8
    DIGEST_MISMATCH = 9
    TOO_LARGE = 10
    NO_SPACE = 11
    INTERNAL = 12
    CANCELLED = 13
    BUSY = 14
    SHUTTING_DOWN = 15
    UNREACHABLE = 16
    UNSUPPORTED = 17


class ProtocolError(Exception):
    """Something broke the wire protocol. Never raised itself; see the two subclasses.

    Attributes:
        code: The ErrorCode to put into the ERROR frame that reports the problem.
    """

    code: ErrorCode

    def __init__(self, msg: str, code: ErrorCode) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(msg)
        self.code = code

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str, ErrorCode]]:
        # Exception pickles only .args; keep the code across process boundaries.
        return (type(self), (str(self), self.code))


class LocalProtocolError(ProtocolError):
    """We broke the protocol: our code asked to send something it forbids.

    The standalone codec functions (decode_body, FrameDecoder) raise this too, because
    they cannot know where the bytes came from; Connection.next_event re-raises their
    errors as RemoteProtocolError.
    """


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: it sent bytes that do not decode or are not allowed now.

    Every RemoteProtocolError ends the connection; report it with `Error(0, exc.code, ...)`.
    """
