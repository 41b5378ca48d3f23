"""Test helpers for casproto: a ConnectionPair joined by a fake wire, message strategies.

Imported by the test modules beside it (pytest puts this folder on sys.path); the
unusual name keeps it from colliding with helpers of other test folders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import casproto
from casproto import (
    CLOSED,
    MAX_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
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
    Connection,
    Error,
    ErrorCode,
    Event,
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
    Role,
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
from hypothesis import strategies as st

CHUNKER: dict[str, str | int] = {"algo": "fastcdc2020", "min": 16384, "avg": 65536, "max": 262144}
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


def chunk_id(label: str | bytes) -> bytes:
    """A stand-in 32-byte chunk id; the protocol treats ids as opaque."""
    data = label.encode() if isinstance(label, str) else label
    return hashlib.sha256(b"chunk:" + data).digest()


def digest_of(data: bytes) -> str:
    """The blob digest of `data`, as SPEC §1 writes it."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hello(features: Iterable[str] = ("zstd",)) -> Hello:
    return Hello(0, PROTOCOL_VERSION, tuple(features), None, "casproto-tests/1")


def welcome(features: Iterable[str] = ("zstd",), max_frame: int = MAX_FRAME) -> Welcome:
    return Welcome(0, PROTOCOL_VERSION, tuple(features), "casd-tests/1", CHUNKER, max_frame)


def drain(conn: Connection) -> list[Event]:
    """Every event `conn` can produce from the bytes it has, up to NEED_DATA or CLOSED."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if event is CLOSED:
            return events


class ConnectionPair:
    """A client and a server Connection joined by an in-memory wire.

    Whatever one side sends is delivered to the other at once, whole or (with
    `bytewise=True`) one byte at a time, exercising every NEED_DATA path.
    """

    def __init__(self, *, bytewise: bool = False) -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)
        self.bytewise = bytewise

    def peer_of(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def deliver(self, conn: Connection, data: bytes) -> list[Event]:
        """Feed `data` to `conn` and return the events it produces."""
        if self.bytewise:
            events: list[Event] = []
            for byte in data:
                conn.receive_data(bytes((byte,)))
                events += drain(conn)
            return events
        conn.receive_data(data)
        return drain(conn)

    def send(self, sender: Connection, *messages: Message) -> list[Event]:
        """Send `messages` from `sender`; return what the peer makes of them."""
        data = b"".join(sender.send(message) for message in messages)
        return self.deliver(self.peer_of(sender), data)

    def exchange(self, sender: Connection, *messages: Message) -> None:
        """Send `messages` and assert the peer receives exactly them."""
        assert self.send(sender, *messages) == list(messages)

    def handshake(self, features: Iterable[str] = ("zstd",)) -> None:
        features = tuple(features)
        self.exchange(self.client, hello(features))
        self.exchange(self.server, welcome(features))


# --- hypothesis strategies ------------------------------------------------------------

uints = st.integers(0, 2**64 - 1)
rids = uints
texts = st.text(max_size=20)
chunk_ids = st.binary(min_size=32, max_size=32)
bitmaps = st.binary(max_size=64)
error_codes = st.sampled_from(ErrorCode)
codecs = st.sampled_from(Codec)


def id_batches(min_size: int = 0) -> st.SearchStrategy[tuple[bytes, ...]]:
    return st.lists(chunk_ids, min_size=min_size, max_size=12).map(tuple)


def recipes(min_size: int = 0) -> st.SearchStrategy[tuple[tuple[bytes, ...], tuple[int, ...]]]:
    entries = st.lists(st.tuples(chunk_ids, uints), min_size=min_size, max_size=12)
    return entries.map(lambda pairs: (tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)))


text_tuples = st.lists(texts, max_size=5).map(tuple)
chunkers = st.dictionaries(texts, st.one_of(texts, uints), max_size=5)
stat_values = st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), texts)
name_entries = st.dictionaries(texts.filter(bool), texts, max_size=6).map(
    lambda names: tuple(sorted(names.items()))
)


def documents() -> st.SearchStrategy[dict[str, object]]:
    """CALL documents: string-keyed maps of plain values, arrays as tuples (as decoded)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=20)
        | st.binary(max_size=20)
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4).map(tuple)
            | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
    return st.dictionaries(st.text(max_size=8), values, max_size=5)


MESSAGES: dict[type[Message], st.SearchStrategy[Message]] = {
    Hello: st.builds(Hello, rids, uints, text_tuples, st.none() | texts, texts),
    Welcome: st.builds(Welcome, rids, uints, text_tuples, texts, chunkers, uints),
    Error: st.builds(Error, rids, error_codes, texts),
    Has: st.builds(Has, rids, id_batches()),
    Have: st.builds(Have, rids, bitmaps),
    Stat: st.builds(Stat, rids, texts),
    BlobInfo: st.builds(BlobInfo, rids, texts, uints, uints, text_tuples),
    ListNames: st.builds(ListNames, rids, texts),
    Names: st.builds(Names, rids, name_entries),
    Tag: st.builds(Tag, rids, texts, texts),
    Ok: st.builds(Ok, rids),
    Untag: st.builds(Untag, rids, texts),
    Stats: st.builds(Stats, rids),
    StatsResult: st.builds(StatsResult, rids, st.dictionaries(texts, stat_values, max_size=6)),
    PushBegin: st.builds(PushBegin, rids, st.none() | texts),
    PushRecipe: st.builds(lambda rid, r: PushRecipe(rid, r[0], r[1]), rids, recipes(min_size=1)),
    PushWant: st.builds(PushWant, rids, bitmaps),
    Chunk: st.builds(Chunk, rids, chunk_ids, codecs, st.binary(max_size=300)),
    PushEnd: st.builds(PushEnd, rids, uints, texts),
    PushDone: st.builds(PushDone, rids, texts, uints, uints, uints, uints),
    Cancel: st.builds(Cancel, rids),
    Pull: st.builds(Pull, rids, texts),
    PullDelta: st.builds(PullDelta, rids, texts, texts, uints),
    RecipeDelta: st.builds(RecipeDelta, rids, texts, uints, uints, st.binary(max_size=64)),
    PullInline: st.builds(PullInline, rids, texts, texts, uints, uints, uints),
    RecipeInline: st.builds(
        RecipeInline,
        rids,
        texts,
        uints,
        uints,
        st.binary(max_size=64),
        uints,
        st.binary(max_size=64),
        st.booleans(),
    ),
    Recipe: st.builds(
        lambda rid, digest, size, r, last: Recipe(rid, digest, size, r[0], r[1], last),
        rids,
        texts,
        uints,
        recipes(),
        st.booleans(),
    ),
    Want: st.builds(Want, rids, id_batches(min_size=1)),
    WantAt: st.builds(
        WantAt,
        rids,
        texts,
        uints,
        st.binary(min_size=1, max_size=64).filter(any),
    ),
    WantDelta: id_batches(min_size=1).flatmap(
        lambda ids: st.builds(
            WantDelta,
            rids,
            st.just(ids),
            st.lists(id_batches().map(lambda b: b[:8]), min_size=len(ids), max_size=len(ids)).map(
                tuple
            ),
        )
    ),
    Sync: st.builds(
        Sync, rids, texts, st.none() | texts, text_tuples, st.booleans(), st.booleans()
    ),
    Fsck: st.builds(Fsck, rids, st.booleans(), st.none() | texts, st.none() | texts),
    FsckDone: st.builds(
        FsckDone, rids, st.dictionaries(texts, stat_values, max_size=6), id_batches()
    ),
    SyncProgress: st.builds(SyncProgress, rids, st.dictionaries(texts, stat_values, max_size=6)),
    SyncDone: st.builds(
        SyncDone,
        rids,
        st.dictionaries(texts, stat_values, max_size=6),
        st.lists(st.tuples(texts, texts, texts), max_size=4).map(tuple),
    ),
    Call: st.builds(Call, rids, texts, documents()),
    ChunkDelta: st.builds(
        ChunkDelta,
        rids,
        st.binary(min_size=32, max_size=32),
        st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=8).map(tuple),
        st.binary(max_size=64),
    ),
    ChunkPack: st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6).flatmap(
        lambda chunks: (
            st.builds(
                ChunkPack,
                rids,
                st.just(Codec.RAW),
                st.just(tuple(map(len, chunks))),
                st.just(b"".join(chunks)),
            )
            | st.builds(
                ChunkPack,
                rids,
                st.just(Codec.ZSTD),
                st.just(tuple(map(len, chunks))),
                st.binary(max_size=64),
            )
        )
    ),
    CallProgress: st.builds(CallProgress, rids, st.dictionaries(texts, stat_values, max_size=6)),
    CallDone: st.builds(CallDone, rids, documents()),
    CallData: st.builds(CallData, rids, st.binary(max_size=64)),
}
assert MESSAGES.keys() == set(casproto.MESSAGE_CLASSES)

messages = st.one_of(*MESSAGES.values())
