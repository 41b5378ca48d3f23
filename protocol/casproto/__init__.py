"""casproto: the casd wire protocol (protocol/SPEC.md) as a sans-I/O state machine.

Bytes in, events out, no I/O and no dependencies beyond msgpack: a `Connection` turns
received bytes into checked `Message` objects and messages into bytes to write. The
codec (`encode_message`, `decode_body`, `FrameDecoder`) and the bitmap and name helpers
are public for tools and tests that need them on their own.
"""

from __future__ import annotations

from ._bitmap import pack_bitmap, unpack_bitmap
from ._codec import MAX_BASES, FrameDecoder, decode_body, encode_message
from ._connection import CLOSED, NEED_DATA, Connection, Event
from ._constants import ID_SIZE, MAX_BATCH, MAX_FRAME, PROTOCOL_VERSION
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._messages import (
    MESSAGE_CLASSES,
    BlobInfo,
    Cancel,
    Chunk,
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
    PushBegin,
    PushDone,
    PushEnd,
    PushRecipe,
    PushWant,
    Recipe,
    Stat,
    Stats,
    StatsResult,
    Sync,
    SyncDone,
    SyncProgress,
    Tag,
    Untag,
    Want,
    WantDelta,
    Welcome,
)
from ._names import is_valid_digest, is_valid_name
from ._state import PREFIX_FEATURE, ZSTD_FEATURE, ConnState, Role

__all__ = [
    "CLOSED",
    "ID_SIZE",
    "MAX_BASES",
    "MAX_BATCH",
    "MAX_FRAME",
    "MESSAGE_CLASSES",
    "NEED_DATA",
    "PREFIX_FEATURE",
    "PROTOCOL_VERSION",
    "ZSTD_FEATURE",
    "BlobInfo",
    "Cancel",
    "Chunk",
    "Codec",
    "ConnState",
    "Connection",
    "Error",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "Fsck",
    "FsckDone",
    "Has",
    "Have",
    "Hello",
    "ListNames",
    "LocalProtocolError",
    "Message",
    "Names",
    "Ok",
    "ProtocolError",
    "Pull",
    "PushBegin",
    "PushDone",
    "PushEnd",
    "PushRecipe",
    "PushWant",
    "Recipe",
    "RemoteProtocolError",
    "Role",
    "Stat",
    "Stats",
    "StatsResult",
    "Sync",
    "SyncDone",
    "SyncProgress",
    "Tag",
    "Untag",
    "Want",
    "WantDelta",
    "Welcome",
    "decode_body",
    "encode_message",
    "is_valid_digest",
    "is_valid_name",
    "pack_bitmap",
    "unpack_bitmap",
]
