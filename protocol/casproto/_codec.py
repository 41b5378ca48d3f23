"""Frames (SPEC §2) and message bodies (SPEC §3, §4): bytes <-> Message.

A frame is a 4-byte big-endian body length and a msgpack array `[type, rid, *fields]`.
This module checks that every field has its wire type and that batches respect their
limits; whether a message may be sent *now* is _state.py's business, and whether a name
or digest is well formed is the application's (see _names.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from itertools import pairwise
from operator import attrgetter
from typing import Final, NamedTuple, cast

import msgpack  # type: ignore[import-untyped, unused-ignore]  # ships no type hints

from ._constants import ID_SIZE, MAX_BATCH, MAX_BITMAP, MAX_CHUNK_SIZE, MAX_FRAME, MAX_UINT
from ._errors import ErrorCode, LocalProtocolError
from ._messages import (
    MESSAGE_CLASSES,
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

# msgpack is untyped: pin down what its two entry points return.
_packb: Callable[..., bytes] = msgpack.packb
_unpackb: Callable[..., object] = msgpack.unpackb

_LENGTH: Final = struct.Struct(">I")
LENGTH_SIZE: Final = _LENGTH.size

# msgpack's signed range; stats values may be negative, every other integer is a uint.
_MIN_INT: Final = -(2**63)


class _FieldError(Exception):
    """A field failed its check; _checked adds which message and field it was."""

    def __init__(self, detail: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


def _describe(value: object) -> str:
    # Name the offending type without echoing up to 16 MiB of peer data into a message.
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{type(value).__name__} of {memoryview(value).nbytes} bytes"
    if isinstance(value, str | tuple | list | dict) and len(value) > 40:
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:37]}..."


# --- field checks ---------------------------------------------------------------------
# Each takes one field value (from msgpack when decoding, from the caller when encoding),
# raises _FieldError unless it has the field's wire type, and returns what the decoded
# message holds. Exact `type(...) is` tests keep bools out of integers; decoding only
# ever yields exact types, so the strictness only shows to odd callers of send().


def _uint(value: object) -> object:
    if type(value) is int and 0 <= value <= MAX_UINT:
        return value
    raise _FieldError(f"expected an unsigned integer, got {_describe(value)}")


def _text(value: object) -> object:
    if type(value) is str:
        return value
    raise _FieldError(f"expected a string, got {_describe(value)}")


def _text_or_nil(value: object) -> object:
    return None if value is None else _text(value)


def _flag(value: object) -> object:
    if type(value) is bool:
        return value
    raise _FieldError(f"expected a boolean, got {_describe(value)}")


def _array(value: object) -> tuple[object, ...]:
    # Callers may hand in lists; msgpack packs both the same way.
    if type(value) is tuple:
        return value
    if type(value) is list:
        return tuple(value)
    raise _FieldError(f"expected an array, got {_describe(value)}")


def _text_array(value: object) -> object:
    items = _array(value)
    if set(map(type, items)) <= {str}:
        return items
    raise _FieldError("expected an array of strings")


def _bitmap(value: object) -> object:
    if type(value) is not bytes:
        raise _FieldError(f"expected bin, got {_describe(value)}")
    if len(value) > MAX_BITMAP:
        raise _FieldError(
            f"bitmap of {len(value)} bytes exceeds {MAX_BITMAP} ({MAX_BATCH} entries)",
            ErrorCode.TOO_LARGE,
        )
    return value


def _chunk_id(value: object) -> object:
    if type(value) is bytes and len(value) == ID_SIZE:
        return value
    raise _FieldError(f"expected a {ID_SIZE}-byte chunk id, got {_describe(value)}")


def _data(value: object) -> object:
    # Senders may pass any contiguous bytes-like object; the decoder always yields bytes.
    if type(value) is bytes or (
        isinstance(value, bytearray | memoryview) and memoryview(value).contiguous
    ):
        return value
    raise _FieldError(f"expected bin (contiguous bytes-like), got {_describe(value)}")


_CODECS: Final = {int(codec): codec for codec in Codec}
_CODEC_LIST: Final = tuple(Codec)  # indexed by value: the enum is dense from 0
_ERROR_CODES: Final = {int(code): code for code in ErrorCode}


def _enum_value(value: object, known: dict[int, Codec] | dict[int, ErrorCode], what: str) -> object:
    # isinstance admits the enums themselves (int subclasses); bools are kept out by hand.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _FieldError(f"expected an unsigned integer {what}, got {_describe(value)}")
    if value not in known:
        raise _FieldError(f"unknown {what} {value}", ErrorCode.INVALID)
    return known[value]


def _codec(value: object) -> object:
    return _enum_value(value, _CODECS, "codec")


def _error_code(value: object) -> object:
    return _enum_value(value, _ERROR_CODES, "error code")


def _batch(value: object) -> tuple[object, ...]:
    items = _array(value)
    if len(items) > MAX_BATCH:
        raise _FieldError(f"batch of {len(items)} entries exceeds {MAX_BATCH}", ErrorCode.TOO_LARGE)
    return items


def _chunk_ids(value: object) -> object:
    ids = _batch(value)
    # Whole-batch checks run in C: a 16,384-id batch costs well under a millisecond.
    if set(map(type, ids)) <= {bytes} and set(map(len, cast(tuple[bytes, ...], ids))) <= {ID_SIZE}:
        return ids
    raise _FieldError(f"expected an array of {ID_SIZE}-byte chunk ids")


def _chunk_ids_nonempty(value: object) -> object:
    ids = _chunk_ids(value)
    if ids:
        return ids
    raise _FieldError(f"expected 1 to {MAX_BATCH} chunk ids, got none", ErrorCode.INVALID)


def _want_bitmap(value: object) -> object:
    # WANT_AT: 1..MAX_BITMAP bytes, at least one bit set.
    bitmap = cast(bytes, _bitmap(value))
    if any(bitmap):
        return bitmap
    raise _FieldError("WANT_AT must want at least one chunk", ErrorCode.INVALID)


def _lengths(value: object) -> object:
    # CHUNK_PACK: 1..MAX_BATCH chunk lengths, each 1..MAX_CHUNK_SIZE.
    lengths = _batch(value)
    if lengths and set(map(type, lengths)) <= {int}:
        ints = cast(tuple[int, ...], lengths)
        if min(ints) >= 1 and max(ints) <= MAX_CHUNK_SIZE:
            return ints
    raise _FieldError(
        f"expected 1 to {MAX_BATCH} chunk lengths of 1 to {MAX_CHUNK_SIZE} bytes",
        ErrorCode.INVALID,
    )


def _sizes(value: object) -> object:
    sizes = _batch(value)
    if set(map(type, sizes)) <= {int}:
        ints = cast(tuple[int, ...], sizes)
        if not ints or (min(ints) >= 0 and max(ints) <= MAX_UINT):
            return ints
    raise _FieldError("expected an array of unsigned integers")


def _entries(value: object) -> object:
    entries = []
    for entry in _array(value):
        pair = _array(entry)
        if len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
            raise _FieldError("expected an array of [name, digest] string pairs")
        entries.append((pair[0], pair[1]))
    # Strictly ascending: sorted (SPEC §4) and, names being keys, unique.
    if any(a[0] >= b[0] for a, b in pairwise(entries)):
        raise _FieldError("entries are not sorted by name", ErrorCode.INVALID)
    return tuple(entries)


def _text_map(value: object) -> dict[str, object]:
    # msgpack's strict_map_key still lets bytes keys through; SPEC §2 wants str keys.
    if type(value) is dict and set(map(type, value)) <= {str}:
        return value
    raise _FieldError(f"expected a map with string keys, got {_describe(value)}")


def _chunker(value: object) -> object:
    chunker = _text_map(value)
    for item in chunker.values():
        if type(item) is not str:
            _uint(item)
    return chunker


def _stats(value: object) -> object:
    stats = _text_map(value)
    for item in stats.values():
        if type(item) is int:
            if not _MIN_INT <= item <= MAX_UINT:
                raise _FieldError(f"stat {item} does not fit a msgpack integer")
        elif type(item) is not float and type(item) is not str:
            raise _FieldError(f"expected int, float or str stats, got {_describe(item)}")
    return stats


#: How deep CALL documents may nest: enough for a list of maps of lists, and a bound on
#: the recursion a hostile frame can cause.
MAX_DOC_DEPTH: Final = 8


def _doc_value(value: object, depth: int) -> object:
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is str or kind is bytes:
        return value
    if kind is int:
        if not _MIN_INT <= value <= MAX_UINT:  # type: ignore[operator]
            raise _FieldError(f"integer {value} does not fit a msgpack integer")
        return value
    if depth >= MAX_DOC_DEPTH:
        raise _FieldError(f"document nests deeper than {MAX_DOC_DEPTH} levels")
    if kind is tuple or kind is list:
        return tuple(_doc_value(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return {k: _doc_value(v, depth + 1) for k, v in _text_map(value).items()}
    raise _FieldError(f"unexpected {_describe(value)} in a document")


def _doc(value: object) -> object:
    """A CALL argument or result: a string-keyed map of plain msgpack values."""
    return {k: _doc_value(v, 1) for k, v in _text_map(value).items()}


#: Most base chunks one WANT_DELTA entry may name: 8 x 256 KiB = a 2 MiB prefix at most,
#: what zstd's level-3 window (2^21) still reaches.
MAX_BASES: Final = 8


def _base_ids(value: object) -> object:
    ids = _array(value)
    if not ids:
        raise _FieldError("a delta needs at least one base chunk")
    if len(ids) > MAX_BASES:
        raise _FieldError(f"more than {MAX_BASES} bases for one chunk", ErrorCode.TOO_LARGE)
    return _chunk_ids(ids)


def _bases(value: object) -> object:
    lists = _batch(value)
    out = []
    for entry in lists:
        ids = _array(entry)
        if len(ids) > MAX_BASES:
            raise _FieldError(f"more than {MAX_BASES} bases for one chunk", ErrorCode.TOO_LARGE)
        out.append(_chunk_ids(ids))
    return tuple(out)


def _items(value: object) -> object:
    items = []
    for entry in _array(value):
        triple = _array(entry)
        if len(triple) != 3 or not all(type(t) is str for t in triple):
            raise _FieldError("expected an array of [name, digest, action] string triples")
        items.append((triple[0], triple[1], triple[2]))
    return tuple(items)


# --- the layout table -----------------------------------------------------------------
# One row per message: its fields after rid, in wire order (which is also dataclass order;
# test_codec checks that against dataclasses.fields()).

_Check = Callable[[object], object]

_FIELDS: Final[dict[type[Message], tuple[tuple[str, _Check], ...]]] = {
    Hello: (
        ("version", _uint),
        ("features", _text_array),
        ("token", _text_or_nil),
        ("agent", _text),
    ),
    Welcome: (
        ("version", _uint),
        ("features", _text_array),
        ("agent", _text),
        ("chunker", _chunker),
        ("max_frame", _uint),
    ),
    Error: (("code", _error_code), ("message", _text)),
    Has: (("ids", _chunk_ids),),
    Have: (("bitmap", _bitmap),),
    Stat: (("ref", _text),),
    BlobInfo: (("digest", _text), ("size", _uint), ("chunks", _uint), ("names", _text_array)),
    ListNames: (("prefix", _text),),
    Names: (("entries", _entries),),
    Tag: (("name", _text), ("digest", _text)),
    Ok: (),
    Untag: (("name", _text),),
    Stats: (),
    StatsResult: (("stats", _stats),),
    PushBegin: (("name", _text_or_nil),),
    PushRecipe: (("ids", _chunk_ids_nonempty), ("sizes", _sizes)),
    PushWant: (("bitmap", _bitmap),),
    Chunk: (("id", _chunk_id), ("codec", _codec), ("data", _data)),
    PushEnd: (("size", _uint), ("digest", _text)),
    PushDone: (
        ("digest", _text),
        ("size", _uint),
        ("chunks", _uint),
        ("new_chunks", _uint),
        ("new_bytes", _uint),
    ),
    Cancel: (),
    Pull: (("ref", _text),),
    PullDelta: (("ref", _text), ("base", _text), ("base_sum", _uint)),
    RecipeDelta: (("digest", _text), ("size", _uint), ("count", _uint), ("data", _data)),
    PullInline: (
        ("ref", _text),
        ("base", _text),
        ("base_sum", _uint),
        ("inline", _uint),
        ("rate", _uint),
    ),
    RecipeInline: (
        ("digest", _text),
        ("size", _uint),
        ("count", _uint),
        ("data", _data),
        ("inline_sum", _uint),
        ("inline", _data),
        ("against_base", _flag),
    ),
    Recipe: (
        ("digest", _text),
        ("size", _uint),
        ("ids", _chunk_ids),
        ("sizes", _sizes),
        ("last", _flag),
    ),
    Want: (("ids", _chunk_ids_nonempty),),
    WantDelta: (("ids", _chunk_ids_nonempty), ("bases", _bases)),
    WantAt: (("digest", _text), ("start", _uint), ("bitmap", _want_bitmap)),
    Sync: (
        ("source", _text),
        ("token", _text_or_nil),
        ("names", _text_array),
        ("all", _flag),
        ("dry_run", _flag),
    ),
    SyncProgress: (("progress", _stats),),
    Fsck: (("deep", _flag), ("repair_from", _text_or_nil), ("token", _text_or_nil)),
    FsckDone: (("report", _stats), ("damaged", _chunk_ids)),
    SyncDone: (("report", _stats), ("items", _items)),
    Call: (("op", _text), ("args", _doc)),
    ChunkDelta: (("id", _chunk_id), ("bases", _base_ids), ("data", _data)),
    ChunkPack: (("codec", _codec), ("lengths", _lengths), ("data", _data)),
    CallProgress: (("progress", _stats),),
    CallDone: (("result", _doc),),
    CallData: (("data", _data),),
}


class _Layout(NamedTuple):
    type_code: int
    build: Callable[..., Message]
    name: str
    fields: tuple[tuple[str, _Check], ...]
    values: Callable[[Message], tuple[object, ...]]  # field values after rid, in order
    sizes_at: int  # index of `sizes`, which must be as long as `ids` right before it; or -1


def _values_getter(names: list[str]) -> Callable[[Message], tuple[object, ...]]:
    if not names:
        return lambda message: ()
    if len(names) == 1:
        get_one = attrgetter(names[0])
        return lambda message: (get_one(message),)
    return attrgetter(*names)


def _layout(cls: type[Message]) -> _Layout:
    fields = _FIELDS[cls]
    names = [name for name, _ in fields]
    sizes_at = names.index("sizes") if "sizes" in names else -1
    assert sizes_at == -1 or names[sizes_at - 1] == "ids"
    return _Layout(cls.TYPE, cls, cls.__name__, fields, _values_getter(names), sizes_at)


_BY_CLASS: Final = {cls: _layout(cls) for cls in MESSAGE_CLASSES}
_BY_CODE: Final = {layout.type_code: layout for layout in _BY_CLASS.values()}


def _checked(layout: _Layout, rid: object, raw: tuple[object, ...]) -> list[object]:
    """Check rid and the field values of one message; return the values to build it from."""
    where = "rid"
    try:
        values = [_uint(rid)]
        for (where, check), value in zip(layout.fields, raw, strict=False):  # noqa: B007
            values.append(check(value))
        if layout.sizes_at >= 0:
            where = "sizes"
            ids, sizes = values[layout.sizes_at], values[layout.sizes_at + 1]
            if len(cast(tuple[object, ...], ids)) != len(cast(tuple[object, ...], sizes)):
                raise _FieldError("must have one size per id", ErrorCode.INVALID)
        if layout.type_code == ChunkPack.TYPE:
            where = "data"
            codec, lengths, data = values[1:4]
            if codec == Codec.ZSTD_PREFIX:
                raise _FieldError("a pack is never delta-encoded", ErrorCode.INVALID)
            if codec == Codec.RAW and memoryview(cast(bytes, data)).nbytes != sum(
                cast(tuple[int, ...], lengths)
            ):
                raise _FieldError("raw pack data must be as long as its lengths", ErrorCode.INVALID)
        if layout.type_code == WantDelta.TYPE:
            where = "bases"
            ids, bases = values[1], values[2]
            if len(cast(tuple[object, ...], ids)) != len(cast(tuple[object, ...], bases)):
                raise _FieldError("must have one list of bases per id", ErrorCode.INVALID)
    except _FieldError as exc:
        raise LocalProtocolError(f"{layout.name}.{where}: {exc.detail}", exc.code) from None
    return values


# --- encoding -------------------------------------------------------------------------


def encode_message(message: Message) -> bytes:
    """Encode a message as one whole frame: length prefix and msgpack body.

    Args:
        message: Any concrete message. Its fields are checked against their wire types.

    Returns:
        The frame, ready to write.

    Raises:
        LocalProtocolError: MALFORMED, INVALID or TOO_LARGE if a field does not fit its
            wire type or limit (the same checks decode_body applies), or TOO_LARGE if the
            body would exceed MAX_FRAME.
    """
    if type(message) is Chunk:
        return _encode_chunk(message)
    layout = _BY_CLASS.get(type(message))
    if layout is None:
        raise LocalProtocolError(f"{message!r} is not a protocol message", ErrorCode.MALFORMED)
    raw = layout.values(message)
    _checked(layout, message.rid, raw)
    try:
        body = _packb([layout.type_code, message.rid, *raw], use_bin_type=True)
    except Exception as exc:  # msgpack documents no narrower base (e.g. lone surrogates)
        raise LocalProtocolError(
            f"cannot encode {layout.name}: {exc}", ErrorCode.MALFORMED
        ) from exc
    return _frame_prefix(len(body), layout.name) + body


def _frame_prefix(length: int, name: str) -> bytes:
    if length > MAX_FRAME:
        raise LocalProtocolError(
            f"{name} body of {length} bytes exceeds MAX_FRAME ({MAX_FRAME})", ErrorCode.TOO_LARGE
        )
    return _LENGTH.pack(length)


# CHUNK is the one message sent thousands of times a second, and the only large one.
# Writing its msgpack header by hand copies the data once, straight into the frame,
# instead of into a packb() body and again behind the prefix; checking its fields inline
# saves the generic loop. test_codec checks the bytes equal packb's.
_CHUNK_HEAD: Final = bytes((0x95, Chunk.TYPE))  # fixarray of 5, then the type fixint
_ID_HEAD: Final = bytes((0xC4, ID_SIZE))  # bin8 of 32 bytes
_CODEC_BYTE: Final = {c: bytes((int(c),)) for c in Codec}  # positive fixints
_FIXINTS: Final = tuple(bytes((value,)) for value in range(0x80))


def _uint_head(value: int) -> bytes:
    # msgpack's shortest form, as packb writes it.
    if value < 0x80:
        return _FIXINTS[value]
    if value < 0x100:
        return bytes((0xCC, value))
    if value < 0x10000:
        return b"\xcd" + value.to_bytes(2, "big")
    if value < 0x1_0000_0000:
        return b"\xce" + value.to_bytes(4, "big")
    return b"\xcf" + value.to_bytes(8, "big")


def _bin_head(size: int) -> bytes:
    if size < 0x100:
        return bytes((0xC4, size))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _encode_chunk(chunk: Chunk) -> bytes:
    rid, ident, codec, data = chunk.rid, chunk.id, chunk.codec, chunk.data
    if not (
        type(rid) is int
        and 0 <= rid <= MAX_UINT
        and type(ident) is bytes
        and len(ident) == ID_SIZE
        and codec in _CODEC_BYTE
        and type(data) is bytes
    ):
        # The generic checks raise, or admit an int codec and bytes-like data.
        codec = cast(Codec, _checked(_BY_CLASS[Chunk], rid, (ident, codec, data))[2])
    size = memoryview(data).nbytes
    head = b"".join(
        (_CHUNK_HEAD, _uint_head(rid), _ID_HEAD, ident, _CODEC_BYTE[codec], _bin_head(size))
    )
    return b"".join((_frame_prefix(len(head) + size, "Chunk") + head, data))


# --- decoding -------------------------------------------------------------------------


def decode_body(body: bytes | memoryview) -> Message:
    """Decode one frame body (without its length prefix) into a message.

    Unknown trailing fields are ignored (SPEC §2). Names and digests are not judged here;
    see is_valid_name and is_valid_digest.

    Args:
        body: The msgpack body.

    Returns:
        The message, with the exact field types its class declares.

    Raises:
        LocalProtocolError: MALFORMED if the body is not one msgpack array of a known
            type whose fields have their wire types; INVALID if a value is out of range
            (unknown codec or error code, empty batch, ids and sizes of different lengths,
            unsorted NAMES); TOO_LARGE if the body or a batch exceeds its limit.
    """
    if len(body) > MAX_FRAME:
        raise LocalProtocolError(
            f"body of {len(body)} bytes exceeds MAX_FRAME ({MAX_FRAME})", ErrorCode.TOO_LARGE
        )
    try:
        # Unset max_*_len limits default to len(body) <= MAX_FRAME, so no header can claim
        # more than the frame holds. No extension types exist in this protocol.
        decoded = _unpackb(body, raw=False, use_list=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # untrusted bytes: msgpack documents no narrower base class
        raise LocalProtocolError(f"body is not valid msgpack: {exc}", ErrorCode.MALFORMED) from exc
    if type(decoded) is not tuple or len(decoded) < 2:
        raise LocalProtocolError("body is not an array [type, rid, ...]", ErrorCode.MALFORMED)
    type_code = decoded[0]
    if type_code == Chunk.TYPE and len(decoded) == 5:
        # The common case checked inline (see _encode_chunk); anything odd, a float type
        # code included, takes the generic path below and its precise errors.
        _, rid, ident, codec, data = decoded
        if (
            type(type_code) is int
            and type(rid) is int
            and rid >= 0  # msgpack yields nothing above MAX_UINT
            and type(ident) is bytes
            and len(ident) == ID_SIZE
            and type(codec) is int
            and 0 <= codec < len(_CODEC_LIST)
            and type(data) is bytes
        ):
            return Chunk(rid, ident, _CODEC_LIST[codec], data)
    layout = _BY_CODE.get(type_code) if type(type_code) is int else None
    if layout is None:
        raise LocalProtocolError(
            f"unknown message type {_describe(type_code)}", ErrorCode.MALFORMED
        )
    if len(decoded) - 2 < len(layout.fields):
        raise LocalProtocolError(
            f"{layout.name} needs {len(layout.fields)} fields after rid, got {len(decoded) - 2}",
            ErrorCode.MALFORMED,
        )
    return layout.build(*_checked(layout, decoded[1], decoded[2:]))


class FrameDecoder:
    """Cuts a byte stream into frame bodies (SPEC §2).

    Bytes accumulate in one bytearray read from an offset; consumed bytes are dropped
    once they outweigh the unread ones, so each byte is copied a bounded number of times
    however the stream is split.

    Attributes:
        max_frame: Largest body length accepted; a longer length prefix is an error
            as soon as it is seen, before its body is buffered.
    """

    __slots__ = ("_buffer", "_start", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._start = 0
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes.

        Args:
            data: Any amount of the stream, including none.
        """
        if self._start and self._start * 2 >= len(self._buffer):
            # Moving the unread tail costs at most as much as was consumed since last time.
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def _next_span(self) -> tuple[int, int] | None:
        start = self._start
        if len(self._buffer) - start < LENGTH_SIZE:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer, start)
        if length == 0:
            raise LocalProtocolError("frame with an empty body", ErrorCode.MALFORMED)
        if length > self.max_frame:
            raise LocalProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.max_frame}",
                ErrorCode.TOO_LARGE,
            )
        end = start + LENGTH_SIZE + length
        if end > len(self._buffer):
            return None
        self._start = end
        return start + LENGTH_SIZE, end

    def next_frame(self) -> bytes | None:
        """Return the next complete frame body, or None until more bytes are fed.

        Returns:
            A copy of the body, without its length prefix.

        Raises:
            LocalProtocolError: MALFORMED for a zero length, TOO_LARGE for a length above
                max_frame. The offending prefix stays buffered, so the error repeats.
        """
        span = self._next_span()
        if span is None:
            return None
        with memoryview(self._buffer) as view:
            return bytes(view[span[0] : span[1]])

    def next_message(self) -> Message | None:
        """Decode the next complete frame, or return None until more bytes are fed.

        Decodes straight from the buffer, without copying the body first.

        Returns:
            The message.

        Raises:
            LocalProtocolError: as next_frame, and as decode_body. A frame that fails to
                decode is consumed.
        """
        span = self._next_span()
        if span is None:
            return None
        # Views must be released before the next feed() may resize the bytearray.
        with memoryview(self._buffer) as view, view[span[0] : span[1]] as body:
            return decode_body(body)
