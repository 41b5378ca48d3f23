"""Property tests: whatever a client sends, a real Session ends cleanly and answers only
with well-formed frames.

In-process, like test_service.py: a real Session on one end of trio's in-memory streams,
a MemoryStore behind it. Store calls run inline instead of in worker threads, so every
example replays exactly (hypothesis can shrink a failure); "settle" steps let the server
answer before the client goes on, as a client that waits for PUSH_WANT would.
tests/stress/fuzz.py does the same against a live daemon over TCP.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import casproto
import msgpack
import trio
import trio.testing
from casproto import ErrorCode
from hypothesis import given
from hypothesis import strategies as st

from casd.chunking import chunk_id as cid_of
from casd.chunking import format_digest
from casd.peer import PeerConnection
from casd.server.service import ServerContext, Session
from casd.storage.interface import ChunkIn, Recipe
from casd.storage.memory import MemoryStore

SETTLE = None  # a step: wait until the server has nothing left to do
Step = bytes | Callable[[], object] | None  # bytes to send, SETTLE, or something to do

FEATURES = ("zstd", casproto.PREFIX_FEATURE)
HELLO = casproto.encode_message(casproto.Hello(0, 1, FEATURES, None, "prop"))

# A small blob the store holds, so requests also hit things that exist. One chunk is
# shorter than the 8 bytes zstd needs for a prefix (WANT_DELTA with it as a base).
KNOWN_CHUNKS = [b"tiny", b"known-a" * 300, b"known-b" * 900, random.Random(7).randbytes(420_000)]
KNOWN_IDS = [cid_of(c) for c in KNOWN_CHUNKS]
KNOWN_DATA = b"".join(KNOWN_CHUNKS)
KNOWN_DIGEST = format_digest(hashlib.sha256(KNOWN_DATA).digest())


def make_store() -> MemoryStore:
    store = MemoryStore()
    store.put_chunks([ChunkIn(i, c) for i, c in zip(KNOWN_IDS, KNOWN_CHUNKS, strict=True)])
    sizes = tuple(len(c) for c in KNOWN_CHUNKS)
    store.commit_blob(Recipe(KNOWN_DIGEST, len(KNOWN_DATA), tuple(KNOWN_IDS), sizes), "known")
    return store


class _InlineContext(ServerContext):
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def no_error_logged() -> Iterator[None]:
    """A crashed request is caught and logged, not raised: catch it in the log."""
    handler = _Tracebacks()
    logger = logging.getLogger("casd")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [handler.format(r) for r in handler.records]


class GatedPeer(PeerConnection):
    """Holds one write, as a slow network would, until the test opens `gate`: during the
    write (`after=False`) or right after it, before the writing task goes on."""

    def __init__(
        self, stream: trio.abc.Stream, when: Callable[[list[bytes]], bool], *, after: bool
    ) -> None:
        super().__init__(stream, casproto.Role.SERVER, "gated")
        self.gate = trio.Event()
        self.when = when
        self.after = after
        self.held = False

    async def _write(self, frames: list[bytes], size: int) -> None:
        hold = not self.held and self.when(frames)
        self.held |= hold
        if hold and not self.after:
            with trio.CancelScope(shield=True):  # a write under way is not cancelled
                await self.gate.wait()
        await super()._write(frames, size)
        if hold and self.after:
            with trio.CancelScope(shield=True):
                await self.gate.wait()


def _is(kind: type[casproto.Message]) -> Callable[[list[bytes]], bool]:
    return lambda frames: any(f[4] & 0xF0 == 0x90 and f[5] == kind.TYPE for f in frames)


async def converse(
    steps: list[Step], peer: Callable[[trio.abc.Stream], PeerConnection] | None = None
) -> list[casproto.Message]:
    """Send the steps to a fresh Session, then EOF; return what it answered.

    Fails if the Session raises (anything but a clean end), takes longer than a bound,
    logs an error, or sends anything but whole, decodable frames.
    """
    client, server = trio.testing.memory_stream_pair()
    ctx = _InlineContext(store=make_store())
    replies = bytearray()

    async def serve() -> None:
        try:
            conn = peer(server) if peer else PeerConnection(server, casproto.Role.SERVER)
            await Session(ctx, conn).run()
        finally:
            await server.aclose()

    async def read() -> None:
        while True:
            try:
                data = await client.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            replies.extend(data)

    with no_error_logged(), trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(read)
            for step in steps:
                if step is SETTLE:
                    await trio.testing.wait_all_tasks_blocked()
                    continue
                if callable(step):
                    step()
                    continue
                try:
                    await client.send_all(step)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break  # the server closed: it may
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send_stream.aclose()
    await client.aclose()
    return well_formed(bytes(replies))


def well_formed(replies: bytes) -> list[casproto.Message]:
    decoder = casproto.FrameDecoder()
    decoder.feed(replies)
    out = []
    while (m := decoder.next_message()) is not None:  # raises on a malformed frame
        out.append(m)
    assert decoder.buffered == 0, "the server closed inside a frame"
    fatal = [k for k, m in enumerate(out) if isinstance(m, casproto.Error) and m.rid == 0]
    assert fatal in ([], [len(out) - 1]), "nothing may follow a fatal ERROR"
    if out:
        assert isinstance(out[0], casproto.Welcome | casproto.Error)
    return out


# --- strategies -----------------------------------------------------------------------

rids = st.integers(0, 4) | st.integers(0, 2**64 - 1)
chunk_ids = st.sampled_from(KNOWN_IDS) | st.binary(min_size=32, max_size=32)
id_lists = st.lists(chunk_ids, min_size=1, max_size=6).map(tuple)
texts = st.sampled_from(["known", "", "a\tb", "sha256:" + "0" * 64, KNOWN_DIGEST]) | st.text(
    max_size=20
)
sizes = st.integers(0, 2**64 - 1) | st.integers(0, 5000)
small_data = st.binary(max_size=300)
stats = st.dictionaries(st.text(max_size=5), st.integers(0, 9) | st.text(max_size=5), max_size=3)


small_rids = st.integers(0, 4)


@st.composite
def recipes(draw: st.DrawFn) -> casproto.Message:
    ids = draw(id_lists)
    return casproto.PushRecipe(draw(small_rids), ids, tuple(draw(sizes) for _ in ids))


@st.composite
def want_deltas(draw: st.DrawFn) -> casproto.Message:
    ids = draw(id_lists)
    bases = tuple(tuple(draw(st.lists(chunk_ids, max_size=3))) for _ in ids)
    return casproto.WantDelta(draw(small_rids), ids, bases)


def _messages() -> st.SearchStrategy[casproto.Message]:
    """Every message type, either direction, with plausible and implausible fields.
    (No SYNC: it would dial out; tests/stress/fuzz.py covers it against a live daemon.)"""
    c = casproto
    r = small_rids
    return st.one_of(
        st.builds(c.Hello, st.just(0), st.integers(0, 3), st.just(FEATURES), st.none(), texts),
        st.builds(c.Welcome, st.just(0), st.just(1), st.just(()), texts, st.just({}), sizes),
        st.builds(c.Error, rids, st.sampled_from(list(ErrorCode)), texts),
        st.builds(c.Has, r, id_lists),
        st.builds(c.Have, r, st.binary(max_size=2)),
        st.builds(c.Stat, r, texts),
        st.builds(c.ListNames, r, texts),
        st.builds(c.Tag, r, texts, texts),
        st.builds(c.Untag, r, texts),
        st.builds(c.Stats, r),
        st.builds(c.StatsResult, r, stats),
        st.builds(c.PushBegin, r, st.none() | texts),
        recipes(),
        st.builds(c.PushWant, r, st.binary(max_size=2)),
        st.builds(c.Chunk, r, chunk_ids, st.sampled_from(list(c.Codec)), small_data),
        st.builds(c.PushEnd, r, sizes, texts),
        st.builds(c.Cancel, r),
        st.builds(c.Pull, r, texts),
        st.builds(c.Want, r, id_lists),
        want_deltas(),
        st.builds(c.Fsck, r, st.booleans(), st.none(), st.none()),
        st.builds(c.Ok, r),
    )


messages = _messages()


@st.composite
def mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    """One frame, damaged one way or another (or not at all)."""
    body = frame[4:]
    how = draw(st.sampled_from(["none", "flip", "cut", "cut-fixed", "length", "types", "junk"]))
    if how == "flip":
        b = bytearray(frame)
        for i in draw(st.lists(st.integers(0, len(b) * 8 - 1), min_size=1, max_size=4)):
            b[i // 8] ^= 1 << (i % 8)
        return bytes(b)
    if how == "cut":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if how == "cut-fixed":
        return _frame(body[: draw(st.integers(1, len(body)))])
    if how == "length":
        return draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") + body
    if how == "types":
        wire = list(msgpack.unpackb(body, raw=False))
        at = draw(st.integers(0, len(wire)))
        value = draw(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | texts)
        wire[at:at] = [value] if draw(st.booleans()) else []
        if at < len(wire) and draw(st.booleans()):
            wire[at] = value
        return _frame(msgpack.packb(wire, use_bin_type=True))
    if how == "junk":
        return frame + draw(st.binary(min_size=1, max_size=20))
    return frame


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[Step]:
    steps: list[Step] = []
    if draw(st.integers(0, 9)) > 0:
        steps += [HELLO, SETTLE]
    for _ in range(draw(st.integers(0, 10))):
        m = draw(messages)
        steps.append(draw(mutated(casproto.encode_message(m))))
        if draw(st.booleans()):
            steps.append(SETTLE)
    return steps


PUSH_LIES = [
    "none",
    "corrupt-chunk",
    "wrong-length",
    "zstd-garbage",
    "zstd-bomb",
    "lying-digest",
    "lying-size",
    "end-early",
    "unwanted-chunk",
    "stragglers",
    "cancel",
]


@st.composite
def pushes(draw: st.DrawFn) -> tuple[list[Step], str, bool]:
    """A push conversation with at most one lie in it, and maybe one damaged frame."""
    chunks = draw(
        st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=5, unique=True)
    )
    chunks = [c for c in chunks if c not in KNOWN_CHUNKS] or [b"fresh"]
    lie = draw(st.sampled_from(PUSH_LIES))
    ids = [cid_of(c) for c in chunks]
    sizes = [len(c) for c in chunks]
    data = b"".join(chunks)
    digest = format_digest(hashlib.sha256(data).digest())
    size = len(data)
    rid = draw(st.integers(1, 3))
    frames: list[casproto.Message] = [casproto.PushBegin(rid, draw(st.none() | texts))]
    if lie == "zstd-bomb":
        sizes[-1] = 1 << 30
    frames.append(casproto.PushRecipe(rid, tuple(ids), tuple(sizes)))
    steps: list[Step] = [HELLO, SETTLE, *map(casproto.encode_message, frames)]
    if lie != "end-early":
        steps.append(SETTLE)  # the PUSH_WANT goes out
    victim = draw(st.integers(0, len(chunks) - 1))
    for k, chunk in enumerate(chunks):
        codec, payload = casproto.Codec.RAW, chunk
        if k == victim:
            if lie in ("corrupt-chunk", "stragglers"):
                payload = bytes(len(chunk))
            elif lie == "wrong-length":
                payload = chunk + b"x"
            elif lie == "zstd-garbage":
                codec, payload = casproto.Codec.ZSTD, draw(st.binary(max_size=40))
            elif lie == "cancel":
                steps.append(casproto.encode_message(casproto.Cancel(rid)))
                break
        if lie == "zstd-bomb" and k == len(chunks) - 1:
            codec, payload = casproto.Codec.ZSTD, _zstd_zeros(1 << 30)
        if lie == "end-early":
            break
        steps.append(casproto.encode_message(casproto.Chunk(rid, ids[k], codec, payload)))
        if lie == "stragglers" and k == victim:
            steps.append(SETTLE)  # the server finds the damage while the rest is on its way
    if lie == "unwanted-chunk":
        steps.append(casproto.encode_message(casproto.Chunk(rid, ids[0], casproto.Codec.RAW, b"")))
    if lie == "lying-digest":
        digest = format_digest(hashlib.sha256(data + b"!").digest())
    if lie == "lying-size":
        size += 1
    if lie != "cancel":
        steps.append(casproto.encode_message(casproto.PushEnd(rid, size, digest)))
    steps += [SETTLE, casproto.encode_message(casproto.Stats(99)), SETTLE]
    damaged = False
    if draw(st.integers(0, 3)) == 0:  # and sometimes one frame damaged besides
        at = draw(st.integers(0, len(steps) - 1))
        frame = steps[at]
        if frame is not None:
            steps[at] = draw(mutated(frame))
            damaged = steps[at] != frame
    return steps, lie, damaged


def _zstd_zeros(n: int) -> bytes:
    """A ~4 bytes per 128 KiB zstd frame of n zeros that declares its size: a bomb."""
    out = bytearray(b"\x28\xb5\x2f\xfd\xc0\x38" + n.to_bytes(8, "little"))
    while n:
        k = min(n, 128 * 1024)
        n -= k
        out += (int(n == 0) | 2 | (k << 3)).to_bytes(3, "little") + b"\0"
    return bytes(out)


# What ends the push when nothing else went wrong.
PUSH_END_CODES = {
    "corrupt-chunk": ErrorCode.CHUNK_CORRUPT,
    "stragglers": ErrorCode.CHUNK_CORRUPT,
    "wrong-length": ErrorCode.CHUNK_CORRUPT,
    "zstd-garbage": ErrorCode.CHUNK_CORRUPT,
    "zstd-bomb": ErrorCode.INVALID,  # refused at the recipe: nothing is decoded
    "lying-digest": ErrorCode.DIGEST_MISMATCH,
    "lying-size": ErrorCode.DIGEST_MISMATCH,
    "cancel": ErrorCode.CANCELLED,
}


# --- properties -----------------------------------------------------------------------


@given(st.booleans(), st.lists(st.binary(max_size=400), max_size=4))
async def test_random_bytes_end_cleanly(hello: bool, pieces: list[bytes]) -> None:
    await converse([HELLO, SETTLE, *pieces] if hello else list(pieces))


@given(frame_sequences())
async def test_mutated_and_misordered_frames_end_cleanly(steps: list[Step]) -> None:
    await converse(steps)


@given(pushes())
async def test_lying_pushes_are_refused_and_the_connection_lives_on(
    push: tuple[list[Step], str, bool],
) -> None:
    steps, lie, damaged = push
    replies = await converse(steps)
    if damaged:
        return  # a damaged frame may end it anywhere; a clean end is all we ask
    fatal = next((m for m in replies if isinstance(m, casproto.Error) and m.rid == 0), None)
    if lie in ("end-early", "unwanted-chunk"):  # broke the state machine: fatal
        assert fatal is not None
        assert fatal.code == ErrorCode.UNEXPECTED
        return
    assert fatal is None, fatal
    rid = next(m.rid for m in replies if isinstance(m, casproto.PushWant | casproto.Error))
    end = [m for m in replies if m.rid == rid and not isinstance(m, casproto.PushWant)]
    assert len(end) == 1, end
    if lie == "none":
        assert isinstance(end[0], casproto.PushDone | casproto.Error), end
        if isinstance(end[0], casproto.Error):
            assert end[0].code == ErrorCode.INVALID  # a bad name, found at commit
    else:
        assert isinstance(end[0], casproto.Error), end
        assert end[0].code == PUSH_END_CODES[lie], end[0]
    assert isinstance(replies[-1], casproto.StatsResult)  # and the connection serves on


async def test_a_bomb_is_refused_before_anything_is_decoded() -> None:
    """A recipe entry over 16 MiB is refused at once, so its zstd frame (1 GiB of zeros
    in 32 KiB) is never decompressed."""
    cid = cid_of(b"x")
    steps: list[Step] = [
        HELLO,
        SETTLE,
        casproto.encode_message(casproto.PushBegin(1, None)),
        casproto.encode_message(casproto.PushRecipe(1, (cid,), (1 << 30,))),
        SETTLE,
        casproto.encode_message(casproto.Chunk(1, cid, casproto.Codec.ZSTD, _zstd_zeros(1 << 30))),
        casproto.encode_message(casproto.Stats(2)),
        SETTLE,
    ]
    replies = await converse(steps)
    assert [type(m) for m in replies] == [casproto.Welcome, casproto.Error, casproto.StatsResult]
    assert replies[1].rid == 1
    assert replies[1].code == ErrorCode.INVALID  # type: ignore[attr-defined]


async def test_error_before_hello_just_closes() -> None:
    assert await converse([casproto.encode_message(casproto.Error(0, ErrorCode.BUSY, "bye"))]) == []


async def test_a_rid_reused_the_moment_its_push_ended_is_served() -> None:
    """SPEC §7: a rid may be reused once the client saw its request end. The old request's
    task may still be finishing then; it must not take the new request with it."""
    data = b"reused"
    cid = cid_of(data)
    digest = format_digest(hashlib.sha256(data).digest())
    empty = format_digest(hashlib.sha256(b"").digest())
    gated: list[GatedPeer] = []

    def peer(stream: trio.abc.Stream) -> PeerConnection:
        gated.append(GatedPeer(stream, _is(casproto.PushDone), after=True))
        return gated[0]

    def frames(*ms: casproto.Message) -> bytes:
        return b"".join(map(casproto.encode_message, ms))

    steps: list[Step] = [
        HELLO,
        SETTLE,
        frames(casproto.PushBegin(1, None), casproto.PushEnd(1, 0, empty)),
        SETTLE,  # PUSH_DONE is out; the first push's task is held right after sending it
        frames(casproto.PushBegin(1, None), casproto.PushRecipe(1, (cid,), (len(data),))),
        SETTLE,  # the second push asked for its chunk
        lambda: gated[0].gate.set(),
        SETTLE,  # the first push's task ends
        frames(casproto.Chunk(1, cid, casproto.Codec.RAW, data), casproto.PushEnd(1, 6, digest)),
        SETTLE,
    ]
    replies = await converse(steps, peer)
    kinds = [type(m) for m in replies]
    assert kinds == [casproto.Welcome, casproto.PushDone, casproto.PushWant, casproto.PushDone]


async def test_a_cancel_that_crosses_the_last_chunk_gets_no_error() -> None:
    """A CANCEL that arrives while a WANT's last frames are being written: they go out
    whole, that ends the request, and no ERROR follows for the ended rid."""
    big = KNOWN_IDS[-1]  # 420 KB that do not compress: four take two writes of <= 1 MiB
    gated: list[GatedPeer] = []

    def peer(stream: trio.abc.Stream) -> PeerConnection:
        gated.append(GatedPeer(stream, _is(casproto.Chunk), after=False))
        return gated[0]

    steps: list[Step] = [
        HELLO,
        SETTLE,
        casproto.encode_message(casproto.Want(1, (big,) * 4)),
        SETTLE,  # the first write (three chunks) is under way; the fourth is not sent yet
        casproto.encode_message(casproto.Cancel(1)),
        SETTLE,
        lambda: gated[0].gate.set(),
        SETTLE,
        casproto.encode_message(casproto.Stats(2)),
        SETTLE,
    ]
    replies = await converse(steps, peer)
    kinds = [type(m) for m in replies]
    assert kinds == [casproto.Welcome, *[casproto.Chunk] * 4, casproto.StatsResult]


async def test_want_delta_with_a_base_too_short_for_zstd_sends_the_chunk_plainly() -> None:
    """zstd takes no prefix under 8 bytes; the chunk goes out as it is, not as a crash."""
    ask = casproto.WantDelta(1, (KNOWN_IDS[1],), ((KNOWN_IDS[0],),))  # base: b"tiny"
    replies = await converse([HELLO, SETTLE, casproto.encode_message(ask), SETTLE])
    assert [type(m) for m in replies] == [casproto.Welcome, casproto.Chunk]
    assert replies[1].codec != casproto.Codec.ZSTD_PREFIX  # type: ignore[attr-defined]
