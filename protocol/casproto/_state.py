"""Every rule about *when* a message may be sent (SPEC §3, §5, §7), in one place.

Both peers run the same machine over the same conversation: a Connection feeds it the
messages it sends and the messages it receives, each tagged with the role that sent it.
A violation raises LocalProtocolError; Connection re-raises those about received
messages as RemoteProtocolError.

The machine has two levels. The connection level is the handshake table below. Once
READY, each open request lives in `ConversationState.requests` under its rid, and
_FOLLOW_UPS says which messages may follow its opening frame; the request classes
add the counting and ordering rules a table cannot express.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from itertools import compress
from typing import Final

from ._bitmap import check_bitmap, unpack_bitmap
from ._constants import MAX_FRAME, PROTOCOL_VERSION
from ._errors import ErrorCode, LocalProtocolError
from ._messages import (
    BlobInfo,
    Call,
    CallData,
    CallDone,
    CallProgress,
    Cancel,
    Chunk,
    ChunkDelta,
    ChunkPack,
    Codec,
    Error,
    Fsck,
    FsckDone,
    Has,
    Have,
    Hello,
    ListNames,
    Message,
    Names,
    Ok,
    Pull,
    PullDelta,
    PullInline,
    PushBegin,
    PushDone,
    PushEnd,
    PushRecipe,
    PushWant,
    Recipe,
    RecipeDelta,
    RecipeInline,
    Stat,
    Stats,
    StatsResult,
    Sync,
    SyncDone,
    SyncProgress,
    Tag,
    Untag,
    Want,
    WantAt,
    WantDelta,
    Welcome,
)

#: The feature that allows CHUNK codec ZSTD (SPEC §3).
ZSTD_FEATURE: Final = "zstd"
#: The feature that allows WANT_DELTA and CHUNK codec ZSTD_PREFIX (SPEC §4.3).
PREFIX_FEATURE: Final = "zstd-prefix"
#: The feature that allows CHUNK_PACK answers to WANT and WANT_DELTA (SPEC §4.1).
PACK_FEATURE: Final = "chunk-packs"
#: Feature: PULL_DELTA and RECIPE_DELTA (a recipe encoded against an older one).
RECIPE_FEATURE: Final = "recipe-delta"
#: Feature: PULL_INLINE and RECIPE_INLINE (small new chunks' bytes instead of their ids).
INLINE_FEATURE: Final = "recipe-inline"
#: Feature: WANT_AT (chunks named by their places in a recipe, SPEC §4.1).
WANT_AT_FEATURE: Final = "want-at"


class Role(Enum):
    """Which end of the connection a Connection speaks for."""

    CLIENT = "client"
    SERVER = "server"


class ConnState(Enum):
    """Connection states (SPEC §7)."""

    #: Nothing sent yet; the client must send HELLO.
    AWAIT_HELLO = "AWAIT_HELLO"
    #: HELLO sent; the server must answer WELCOME (or a fatal ERROR).
    AWAIT_WELCOME = "AWAIT_WELCOME"
    #: Handshake done; requests flow.
    READY = "READY"
    #: Ended cleanly: end of stream, or a fatal ERROR with rid 0 was sent or received.
    CLOSED = "CLOSED"
    #: A side broke the protocol, or a send failed halfway through a frame.
    ERROR = "ERROR"


# Connection level: (sender, state) -> {message: next state}. ERROR with rid 0 is allowed
# from either side in every state and ends the connection; ConversationState.process
# handles it before consulting this table.
_HANDSHAKE: Final[dict[tuple[Role, ConnState], dict[type[Message], ConnState]]] = {
    (Role.CLIENT, ConnState.AWAIT_HELLO): {Hello: ConnState.AWAIT_WELCOME},
    (Role.SERVER, ConnState.AWAIT_WELCOME): {Welcome: ConnState.READY},
}


# Request level (SPEC §7): opening frame -> (what the client may send on its rid
# afterwards, what the server may send). CANCEL from the client and ERROR from the
# server may follow every one of them.
_FOLLOW_UPS: Final[
    dict[type[Message], tuple[frozenset[type[Message]], frozenset[type[Message]]]]
] = {
    Has: (frozenset(), frozenset({Have})),
    Stat: (frozenset(), frozenset({BlobInfo})),
    ListNames: (frozenset(), frozenset({Names})),
    Tag: (frozenset(), frozenset({Ok})),
    Untag: (frozenset(), frozenset({Ok})),
    Stats: (frozenset(), frozenset({StatsResult})),
    Pull: (frozenset(), frozenset({Recipe})),
    PullDelta: (frozenset(), frozenset({Recipe, RecipeDelta})),
    PullInline: (frozenset(), frozenset({Recipe, RecipeDelta, RecipeInline})),
    Want: (frozenset(), frozenset({Chunk, ChunkPack})),
    WantDelta: (frozenset(), frozenset({Chunk, ChunkPack})),
    WantAt: (frozenset(), frozenset({Chunk, ChunkPack})),
    PushBegin: (
        frozenset({PushRecipe, Chunk, ChunkDelta, PushEnd}),
        frozenset({PushWant, PushDone}),
    ),
    Sync: (frozenset(), frozenset({SyncProgress, SyncDone})),
    Fsck: (frozenset(), frozenset({FsckDone})),
    Call: (frozenset(), frozenset({CallProgress, CallData, CallDone})),
}


def _unexpected(text: str) -> LocalProtocolError:
    return LocalProtocolError(text, ErrorCode.UNEXPECTED)


class _Request:
    """One open request. Subclasses check the details of the follow-ups _FOLLOW_UPS allows."""

    __slots__ = ("cancelled", "client_then", "server_then")

    def __init__(self, opener: Message) -> None:
        self.client_then, self.server_then = _FOLLOW_UPS[type(opener)]
        self.cancelled = False

    def from_client(self, message: Message) -> None:
        """Check a follow-up the client sends; only pushes have any."""
        raise AssertionError("_FOLLOW_UPS allows no client follow-up here")  # pragma: no cover

    def from_server(self, message: Message) -> bool:
        """Check a follow-up the server sends; return True if it ends the request."""
        return True  # the single answer of HAS, STAT, LIST, TAG, UNTAG and STATS

    def may_straggle(self) -> bool:
        """Whether the client may still have frames in flight for this request."""
        return False  # apart from CANCEL, which is always tolerated


class _HasRequest(_Request):
    __slots__ = ("entries",)

    def __init__(self, opener: Has) -> None:
        super().__init__(opener)
        self.entries = len(opener.ids)

    def from_server(self, message: Message) -> bool:
        assert isinstance(message, Have)
        check_bitmap(message.bitmap, self.entries)
        return True


class _PullRequest(_Request):
    __slots__ = ()

    def from_server(self, message: Message) -> bool:
        if isinstance(message, RecipeDelta | RecipeInline):
            return True
        assert isinstance(message, Recipe)
        return message.last


class _WantRequest(_Request):
    """WANT: len(ids) chunks in the order asked, as CHUNKs or CHUNK_PACKs (SPEC §4.1)."""

    __slots__ = ("delta", "ids", "sent")

    def __init__(self, opener: Want | WantDelta) -> None:
        super().__init__(opener)
        self.ids = opener.ids
        self.sent = 0
        self.delta = isinstance(opener, WantDelta)

    def from_server(self, message: Message) -> bool:
        if isinstance(message, ChunkPack):
            left = len(self.ids) - self.sent
            if len(message.lengths) > left:
                raise _unexpected(
                    f"CHUNK_PACK of {len(message.lengths)} chunks for WANT {message.rid}, "
                    f"which has {left} left"
                )
            self.sent += len(message.lengths)
            return self.sent == len(self.ids)
        assert isinstance(message, Chunk)
        if message.codec == Codec.ZSTD_PREFIX and not self.delta:
            raise _unexpected(f"CHUNK with codec ZSTD_PREFIX answers WANT {message.rid}")
        if message.id != self.ids[self.sent]:
            raise _unexpected(
                f"CHUNK {message.id.hex()} for WANT {message.rid}, "
                f"which asked for {self.ids[self.sent].hex()} next"
            )
        self.sent += 1
        return self.sent == len(self.ids)


class _WantAtRequest(_Request):
    """WANT_AT: one chunk per set bit, in position order, as CHUNKs or CHUNK_PACKs. The
    ids are the server's to look up, so only their number is checked here."""

    __slots__ = ("sent", "wanted")

    def __init__(self, opener: WantAt) -> None:
        super().__init__(opener)
        self.wanted = sum(bin(byte).count("1") for byte in opener.bitmap)
        self.sent = 0

    def from_server(self, message: Message) -> bool:
        n = len(message.lengths) if isinstance(message, ChunkPack) else 1
        if n > self.wanted - self.sent:
            raise _unexpected(
                f"{type(message).__name__} of {n} chunks for WANT_AT {message.rid}, "
                f"which has {self.wanted - self.sent} left"
            )
        if isinstance(message, Chunk) and message.codec == Codec.ZSTD_PREFIX:
            raise _unexpected(f"CHUNK with codec ZSTD_PREFIX answers WANT_AT {message.rid}")
        self.sent += n
        return self.sent == self.wanted


class _SyncRequest(_Request):
    """SYNC: any number of SYNC_PROGRESS, then SYNC_DONE."""

    __slots__ = ()

    def __init__(self, opener: Sync) -> None:
        super().__init__(opener)
        if opener.all and opener.names:
            raise LocalProtocolError("SYNC with all=true must name no blobs", ErrorCode.INVALID)

    def from_server(self, message: Message) -> bool:
        return isinstance(message, SyncDone)


class _PushRequest(_Request):
    """PUSH (SPEC §5): recipes out, one PUSH_WANT back per recipe, wanted CHUNKs, PUSH_END."""

    __slots__ = ("ended", "unanswered", "wanted")

    def __init__(self, opener: PushBegin) -> None:
        super().__init__(opener)
        self.unanswered: deque[tuple[bytes, ...]] = deque()  # recipe batches awaiting PUSH_WANT
        self.wanted: deque[bytes] = deque()  # ids asked for and not yet sent, in recipe order
        self.ended = False  # PUSH_END sent

    def from_client(self, message: Message) -> None:
        if self.ended:
            raise _unexpected(f"{type(message).__name__} after PUSH_END on push {message.rid}")
        if isinstance(message, PushRecipe):
            self.unanswered.append(message.ids)
        elif isinstance(message, Chunk | ChunkDelta):
            if not self.wanted:
                raise _unexpected(f"CHUNK on push {message.rid}, which wants no chunk now")
            if message.id != self.wanted[0]:
                raise _unexpected(
                    f"CHUNK {message.id.hex()} on push {message.rid}, "
                    f"whose next wanted chunk is {self.wanted[0].hex()}"
                )
            self.wanted.popleft()
        else:
            assert isinstance(message, PushEnd)
            if self.unanswered:
                raise _unexpected(
                    f"PUSH_END on push {message.rid} while {len(self.unanswered)} "
                    "PUSH_RECIPE batches await their PUSH_WANT"
                )
            if self.wanted:
                raise _unexpected(
                    f"PUSH_END on push {message.rid} before {len(self.wanted)} wanted chunks"
                )
            self.ended = True

    def from_server(self, message: Message) -> bool:
        if isinstance(message, PushWant):
            if not self.unanswered:
                raise _unexpected(f"PUSH_WANT on push {message.rid} without a PUSH_RECIPE")
            ids = self.unanswered[0]
            wants = unpack_bitmap(message.bitmap, len(ids))  # raises before any change
            self.unanswered.popleft()
            self.wanted.extend(compress(ids, wants))
            return False
        assert isinstance(message, PushDone)
        if not self.ended:
            raise _unexpected(f"PUSH_DONE on push {message.rid} before PUSH_END")
        return True

    def may_straggle(self) -> bool:
        return not (self.ended or self.cancelled)


class _CallRequest(_Request):
    """CALL: any number of CALL_PROGRESS and CALL_DATA, then CALL_DONE."""

    __slots__ = ()

    def from_server(self, message: Message) -> bool:
        return isinstance(message, CallDone)


_STARTS: Final[dict[type[Message], type[_Request]]] = {
    Has: _HasRequest,
    Stat: _Request,
    ListNames: _Request,
    Tag: _Request,
    Untag: _Request,
    Stats: _Request,
    Pull: _PullRequest,
    PullDelta: _PullRequest,
    PullInline: _PullRequest,
    Want: _WantRequest,
    WantDelta: _WantRequest,
    WantAt: _WantAtRequest,
    PushBegin: _PushRequest,
    Sync: _SyncRequest,
    Fsck: _Request,
    Call: _CallRequest,
}
assert _STARTS.keys() == _FOLLOW_UPS.keys()


class ConversationState:
    """The state of one conversation, as seen by the peer playing `our_role`.

    Attributes:
        phase: AWAIT_HELLO, AWAIT_WELCOME or READY; Connection adds CLOSED and ERROR.
        requests: Open requests by rid.
        features: The features WELCOME negotiated; empty before it.
        server_max_frame: The largest frame body the server accepts (WELCOME.max_frame,
            capped at MAX_FRAME).
    """

    __slots__ = (
        "_abandoned",
        "_offered",
        "features",
        "our_role",
        "phase",
        "requests",
        "server_max_frame",
    )

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self.phase = ConnState.AWAIT_HELLO
        self.requests: dict[int, _Request] = {}
        self.features: frozenset[str] = frozenset()
        self.server_max_frame = MAX_FRAME
        self._offered: frozenset[str] = frozenset()  # HELLO.features
        # Server side only: pushes the server ended with ERROR while the client may still
        # have frames for them in flight. They are dropped until the rid is reused.
        self._abandoned: set[int] = set()

    def process(self, sender: Role, message: Message) -> bool:
        """Apply one message that `sender` sends.

        Args:
            sender: The role that sends the message.
            message: A message that passed the codec's field checks.

        Returns:
            True if the message belongs to the conversation; False if it is a client
            frame the server ignores because it crossed the end of its request on the
            wire (a CANCEL of an ended request, or push frames after the server's ERROR).

        Raises:
            LocalProtocolError: if the message may not be sent now; the state is then
                unchanged.
        """
        kind = type(message)
        if kind is Error and message.rid == 0:
            return True  # always allowed; it ends the connection (Connection's business)
        if self.phase is not ConnState.READY:
            self._handshake(sender, message)
            return True
        if kind is Hello or kind is Welcome:
            raise _unexpected(f"{kind.__name__} after the handshake")
        if message.rid == 0:
            raise _unexpected(f"{kind.__name__} with rid 0, which names the connection")
        if isinstance(message, Chunk) and message.codec != Codec.RAW:
            needed = ZSTD_FEATURE if message.codec == Codec.ZSTD else PREFIX_FEATURE
            if needed not in self.features:
                raise _unexpected(
                    f"CHUNK with codec {message.codec!r} but {needed!r} was not negotiated"
                )
            if message.codec == Codec.ZSTD_PREFIX and sender is Role.CLIENT:
                raise _unexpected("only the server sends CHUNK with codec ZSTD_PREFIX")
        if isinstance(message, ChunkPack):
            if PACK_FEATURE not in self.features:
                raise _unexpected(f"CHUNK_PACK but {PACK_FEATURE!r} was not negotiated")
            if message.codec == Codec.ZSTD and ZSTD_FEATURE not in self.features:
                raise _unexpected(
                    f"CHUNK_PACK with codec ZSTD but {ZSTD_FEATURE!r} was not negotiated"
                )
        if isinstance(message, WantDelta) and PREFIX_FEATURE not in self.features:
            raise _unexpected(f"WANT_DELTA but {PREFIX_FEATURE!r} was not negotiated")
        if isinstance(message, WantAt) and WANT_AT_FEATURE not in self.features:
            raise _unexpected(f"WANT_AT but {WANT_AT_FEATURE!r} was not negotiated")
        if isinstance(message, PullDelta) and RECIPE_FEATURE not in self.features:
            raise _unexpected(f"PULL_DELTA but {RECIPE_FEATURE!r} was not negotiated")
        if isinstance(message, PullInline) and INLINE_FEATURE not in self.features:
            raise _unexpected(f"PULL_INLINE but {INLINE_FEATURE!r} was not negotiated")
        if isinstance(message, ChunkDelta) and PREFIX_FEATURE not in self.features:
            raise _unexpected(f"CHUNK_DELTA but {PREFIX_FEATURE!r} was not negotiated")
        if sender is Role.CLIENT:
            return self._from_client(message)
        self._from_server(message)
        return True

    def _handshake(self, sender: Role, message: Message) -> None:
        allowed = _HANDSHAKE.get((sender, self.phase), {})
        next_phase = allowed.get(type(message))
        if next_phase is None:
            raise _unexpected(
                f"the {sender.value} may not send {type(message).__name__} in {self.phase.value}"
            )
        assert isinstance(message, Hello | Welcome)
        if message.rid != 0:
            raise _unexpected(f"{type(message).__name__} must have rid 0, not {message.rid}")
        if message.version != PROTOCOL_VERSION:
            raise LocalProtocolError(
                f"protocol version {message.version} is not {PROTOCOL_VERSION}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        if isinstance(message, Hello):
            self._offered = frozenset(message.features)
        else:
            unoffered = set(message.features) - self._offered
            if unoffered:
                raise LocalProtocolError(
                    f"WELCOME enables features the client did not offer: {sorted(unoffered)}",
                    ErrorCode.INVALID,
                )
            if message.max_frame < 1:
                raise LocalProtocolError("WELCOME.max_frame must be at least 1", ErrorCode.INVALID)
            self.features = frozenset(message.features)
            self.server_max_frame = min(MAX_FRAME, message.max_frame)
        self.phase = next_phase

    def _from_client(self, message: Message) -> bool:
        rid = message.rid
        start = _STARTS.get(type(message))
        if start is not None:
            if rid in self.requests:
                raise _unexpected(f"rid {rid} already names an open request")
            self.requests[rid] = start(message)
            self._abandoned.discard(rid)
            return True
        if isinstance(message, Error):
            raise _unexpected("a client ERROR must have rid 0; requests end with CANCEL")
        request = self.requests.get(rid)
        if request is None:
            if self.our_role is Role.SERVER and (
                isinstance(message, Cancel) or rid in self._abandoned
            ):
                return False
            raise _unexpected(f"{type(message).__name__} for rid {rid}, which is not open")
        if request.cancelled:
            raise _unexpected(f"{type(message).__name__} for rid {rid} after its CANCEL")
        if isinstance(message, Cancel):
            request.cancelled = True
            return True
        if type(message) not in request.client_then:
            raise _unexpected(f"{type(message).__name__} on rid {rid}, which does not take it")
        request.from_client(message)
        return True

    def _from_server(self, message: Message) -> None:
        rid = message.rid
        request = self.requests.get(rid)
        if request is None:
            raise _unexpected(f"{type(message).__name__} for rid {rid}, which is not open")
        if isinstance(message, Error):
            del self.requests[rid]
            if self.our_role is Role.SERVER and request.may_straggle():
                self._abandoned.add(rid)
            return
        if type(message) not in request.server_then:
            raise _unexpected(f"{type(message).__name__} on rid {rid}, which does not take it")
        if request.from_server(message):
            del self.requests[rid]
