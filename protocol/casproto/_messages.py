"""The messages of SPEC §3 and §4 as frozen dataclasses.

Every message has `rid` first, then the spec's fields in spec order, so the wire form is
simply `[TYPE, rid, *fields]`. The classes only hold data; _codec.py checks field types
and _state.py checks whether a message may be sent now.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from ._errors import ErrorCode


class Codec(IntEnum):
    """How CHUNK data is encoded (SPEC §4)."""

    RAW = 0
    #: One zstd frame whose content is the chunk; only after "zstd" was negotiated.
    ZSTD = 1
    #: One zstd frame compressed with the chunk's base chunks (concatenated, in the order
    #: WANT_DELTA listed them) as a raw prefix; only in answer to WANT_DELTA, and only
    #: after "zstd-prefix" was negotiated (SPEC §4.3).
    ZSTD_PREFIX = 2


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages. `rid` names the request; 0 names the connection itself."""

    TYPE: ClassVar[int] = 0
    rid: int


# --- connection setup (SPEC §3) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """C→S, first frame of a connection."""

    TYPE: ClassVar[int] = 1
    version: int
    features: tuple[str, ...]
    token: str | None
    agent: str


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """S→C answer to HELLO. `features` is the negotiated subset of the client's."""

    TYPE: ClassVar[int] = 2
    version: int
    features: tuple[str, ...]
    agent: str
    chunker: dict[str, str | int]
    max_frame: int


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Ends request `rid`, or the whole connection when `rid` is 0."""

    TYPE: ClassVar[int] = 3
    code: ErrorCode
    message: str


# --- single-answer requests (SPEC §4) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Has(Message):
    """C→S: which of these chunk ids does the server have? Answered by HAVE."""

    TYPE: ClassVar[int] = 10
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Have(Message):
    """S→C: bit i set ⇔ the server has `ids[i]` of the HAS. Terminal."""

    TYPE: ClassVar[int] = 11
    bitmap: bytes


@dataclass(frozen=True, slots=True)
class Stat(Message):
    """C→S: describe the blob named by `ref` (a name or a digest). Answered by BLOB_INFO."""

    TYPE: ClassVar[int] = 12
    ref: str


@dataclass(frozen=True, slots=True)
class BlobInfo(Message):
    """S→C answer to STAT. Terminal."""

    TYPE: ClassVar[int] = 13
    digest: str
    size: int
    chunks: int
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListNames(Message):
    """C→S: LIST the names starting with `prefix`. Answered by NAMES."""

    TYPE: ClassVar[int] = 14
    prefix: str


@dataclass(frozen=True, slots=True)
class Names(Message):
    """S→C answer to LIST: `(name, digest)` pairs sorted by name. Terminal."""

    TYPE: ClassVar[int] = 15
    entries: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Tag(Message):
    """C→S: point `name` at the blob `digest`. Answered by OK."""

    TYPE: ClassVar[int] = 16
    name: str
    digest: str


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """S→C answer to TAG and UNTAG. Terminal."""

    TYPE: ClassVar[int] = 17


@dataclass(frozen=True, slots=True)
class Untag(Message):
    """C→S: remove `name`. Answered by OK."""

    TYPE: ClassVar[int] = 18
    name: str


@dataclass(frozen=True, slots=True)
class Stats(Message):
    """C→S: ask for server statistics. Answered by STATS_RESULT."""

    TYPE: ClassVar[int] = 19


@dataclass(frozen=True, slots=True)
class StatsResult(Message):
    """S→C answer to STATS. Terminal."""

    TYPE: ClassVar[int] = 20
    stats: dict[str, int | float | str]


# --- push (SPEC §5) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushBegin(Message):
    """C→S: open a push, optionally naming the blob."""

    TYPE: ClassVar[int] = 30
    name: str | None


@dataclass(frozen=True, slots=True)
class PushRecipe(Message):
    """C→S: the next batch of the blob's recipe. Answered by one PUSH_WANT."""

    TYPE: ClassVar[int] = 31
    ids: tuple[bytes, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PushWant(Message):
    """S→C: bit i set ⇔ the client must send entry i of the matching PUSH_RECIPE."""

    TYPE: ClassVar[int] = 32
    bitmap: bytes


def _data_repr(data: object) -> str:
    # Chunk data runs to hundreds of KiB: show its size, not its bytes. Never raise, even
    # for a message built with wrong types (its repr ends up in error messages).
    try:
        return f"<{memoryview(data).nbytes} bytes>"  # type: ignore[arg-type]
    except TypeError:
        return repr(data)


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """Chunk bytes: C→S within a push, S→C answering a WANT.

    `data` may be any bytes-like object when sending; it is `bytes` when received.
    """

    TYPE: ClassVar[int] = 33
    id: bytes
    codec: Codec
    data: bytes | bytearray | memoryview

    def __repr__(self) -> str:
        ident = self.id.hex() if isinstance(self.id, bytes) else repr(self.id)
        data = _data_repr(self.data)
        return f"Chunk(rid={self.rid!r}, id={ident}, codec={self.codec!r}, data={data})"


@dataclass(frozen=True, slots=True)
class ChunkDelta(Message):
    """C→S, inside a push: a wanted chunk as a zstd frame whose raw prefix is the listed
    chunks (which the server holds), concatenated (SPEC §5.1). Needs "zstd-prefix"."""

    TYPE: ClassVar[int] = 37
    id: bytes
    bases: tuple[bytes, ...]
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ChunkPack(Message):
    """S→C, answering WANT or WANT_DELTA: the next ``len(lengths)`` chunks asked for, in
    the order asked, concatenated in ``data`` (codec RAW) or in one zstd frame of that
    concatenation (codec ZSTD) (SPEC §4.1). Needs "chunk-packs".

    Small chunks (a tar member's header, a small file) cost more as frames of their own
    than their bytes: an id each, and zstd without context. Packed, the receiver knows
    their ids from its WANT and verifies each against the bytes at its place.
    """

    TYPE: ClassVar[int] = 38
    codec: Codec
    lengths: tuple[int, ...]
    data: bytes | bytearray | memoryview

    def __repr__(self) -> str:
        n = len(self.lengths) if isinstance(self.lengths, tuple) else self.lengths
        data = _data_repr(self.data)
        return f"ChunkPack(rid={self.rid!r}, codec={self.codec!r}, chunks={n}, data={data})"


@dataclass(frozen=True, slots=True)
class PushEnd(Message):
    """C→S: every wanted chunk is sent; the blob has `size` bytes and `digest`."""

    TYPE: ClassVar[int] = 34
    size: int
    digest: str


@dataclass(frozen=True, slots=True)
class PushDone(Message):
    """S→C: the pushed blob is stored and visible. Terminal."""

    TYPE: ClassVar[int] = 35
    digest: str
    size: int
    chunks: int
    new_chunks: int
    new_bytes: int


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """C→S: stop request `rid`; it still ends with its terminal or an ERROR."""

    TYPE: ClassVar[int] = 36


# --- pull (SPEC §4.1) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pull(Message):
    """C→S: send the recipe of the blob named by `ref`. Answered by RECIPE frames."""

    TYPE: ClassVar[int] = 40
    ref: str


@dataclass(frozen=True, slots=True)
class Recipe(Message):
    """S→C: the next part of a blob's recipe; the request ends with `last=True`."""

    TYPE: ClassVar[int] = 41
    digest: str
    size: int
    ids: tuple[bytes, ...]
    sizes: tuple[int, ...]
    last: bool


@dataclass(frozen=True, slots=True)
class PullDelta(Message):
    """C→S: PULL from a client that holds ``base``, an older version of the blob: the
    recipe may come as one RECIPE_DELTA encoded against base's recipe, if the server's
    recipe of ``base`` has the checksum ``base_sum`` (xxh3-64 of its entries, SPEC §4.1);
    otherwise as RECIPE frames. Needs "recipe-delta"."""

    TYPE: ClassVar[int] = 44
    ref: str
    base: str
    base_sum: int


@dataclass(frozen=True, slots=True)
class RecipeDelta(Message):
    """S→C: a whole recipe of ``count`` entries as one zstd frame of its entries
    (:func:`pack_entries`) with base's entries as raw prefix. Terminal."""

    TYPE: ClassVar[int] = 45
    digest: str
    size: int
    count: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class PullInline(Message):
    """C→S: PULL_DELTA from a client that would rather take the bytes of the new recipe's
    small new chunks (at most ``inline`` bytes each, capped at MAX_INLINE) in the answer
    than their ids (SPEC §4.1). ``rate``: the link's rate as the client measured it
    (bytes/s), by which the server judges whether to encode them against base's chunks;
    0: never. Answered by one RECIPE_INLINE, or as PULL_DELTA is. Needs "recipe-inline"."""

    TYPE: ClassVar[int] = 47
    ref: str
    base: str
    base_sum: int
    inline: int
    rate: int


@dataclass(frozen=True, slots=True)
class RecipeInline(Message):
    """S→C: RECIPE_DELTA whose entries have 32 zero bytes for the id of each inlined
    chunk, and those chunks' bytes, in recipe order, as ``inline``: one zstd frame, with
    base's small chunks as raw prefix if ``against_base``; ``inline_sum`` is the xxh3-64
    of those bytes. Terminal."""

    TYPE: ClassVar[int] = 48
    digest: str
    size: int
    count: int
    data: bytes | bytearray | memoryview
    inline_sum: int
    inline: bytes | bytearray | memoryview
    against_base: bool


@dataclass(frozen=True, slots=True)
class Want(Message):
    """C→S: send these chunks. Answered by exactly `len(ids)` CHUNK frames, in order."""

    TYPE: ClassVar[int] = 42
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WantDelta(Message):
    """C→S: send these chunks, encoded against bases the client holds where that helps.

    ``bases[i]`` lists up to MAX_BASES chunk ids the client holds that resemble
    ``ids[i]`` (typically the same region of the previous version of the blob). Answered
    like WANT, by exactly ``len(ids)`` CHUNK frames in order.
    """

    TYPE: ClassVar[int] = 43
    ids: tuple[bytes, ...]
    bases: tuple[tuple[bytes, ...], ...]


@dataclass(frozen=True, slots=True)
class WantAt(Message):
    """C→S: WANT of the chunks at positions ``start + i`` of blob ``digest``'s recipe for
    which bit ``i`` of ``bitmap`` is set: the ids are not sent, the server reads them
    from its recipe. Answered like WANT, in position order. Needs "want-at"."""

    TYPE: ClassVar[int] = 46
    digest: str
    start: int
    bitmap: bytes


# --- sync (SPEC §4.2) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sync(Message):
    """C→S: replicate blobs from another server into this one. Answered by SYNC_DONE."""

    TYPE: ClassVar[int] = 50
    source: str
    token: str | None
    names: tuple[str, ...]
    all: bool
    dry_run: bool


@dataclass(frozen=True, slots=True)
class SyncProgress(Message):
    """S→C: counters of a running SYNC. Not terminal."""

    TYPE: ClassVar[int] = 51
    progress: dict[str, int | float | str]


@dataclass(frozen=True, slots=True)
class SyncDone(Message):
    """S→C answer to SYNC: totals, and per name (name, digest, action). Terminal."""

    TYPE: ClassVar[int] = 52
    report: dict[str, int | float | str]
    items: tuple[tuple[str, str, str], ...]


# --- fsck (SPEC §4.4) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fsck(Message):
    """C→S: check the store (and repair it from another server). Answered by FSCK_DONE."""

    TYPE: ClassVar[int] = 60
    deep: bool
    repair_from: str | None
    token: str | None


@dataclass(frozen=True, slots=True)
class FsckDone(Message):
    """S→C answer to FSCK: counts, and the chunk ids still damaged. Terminal."""

    TYPE: ClassVar[int] = 61
    report: dict[str, int | float | str]
    damaged: tuple[bytes, ...]


# --- extension calls (SPEC §4.5) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call(Message):
    """C→S: run a named operation (``gc``, ``oci.import``, ...) with arguments.

    Answered by any number of CALL_PROGRESS, then CALL_DONE. Operations are listed in
    SPEC §4.5; a server answers an unknown one with ERROR(UNSUPPORTED).
    """

    TYPE: ClassVar[int] = 70
    op: str
    args: dict[str, object]


@dataclass(frozen=True, slots=True)
class CallProgress(Message):
    """S→C: counters of a running CALL. Not terminal."""

    TYPE: ClassVar[int] = 71
    progress: dict[str, int | float | str]


@dataclass(frozen=True, slots=True)
class CallDone(Message):
    """S→C answer to CALL: the operation's result document. Terminal."""

    TYPE: ClassVar[int] = 72
    result: dict[str, object]


@dataclass(frozen=True, slots=True)
class CallData(Message):
    """S→C: the next piece of the byte stream a CALL produces, for operations that say
    they stream (``blob.delta.stream``). Not terminal; pieces arrive in order."""

    TYPE: ClassVar[int] = 73
    data: bytes | bytearray | memoryview


#: Every concrete message class, in type-code order.
MESSAGE_CLASSES: tuple[type[Message], ...] = (
    Hello,
    Welcome,
    Error,
    Has,
    Have,
    Stat,
    BlobInfo,
    ListNames,
    Names,
    Tag,
    Ok,
    Untag,
    Stats,
    StatsResult,
    PushBegin,
    PushRecipe,
    PushWant,
    Chunk,
    PushEnd,
    PushDone,
    Cancel,
    ChunkDelta,
    ChunkPack,
    Pull,
    Recipe,
    PullDelta,
    RecipeDelta,
    PullInline,
    RecipeInline,
    Want,
    WantDelta,
    WantAt,
    Sync,
    SyncProgress,
    SyncDone,
    Fsck,
    FsckDone,
    Call,
    CallProgress,
    CallDone,
    CallData,
)
