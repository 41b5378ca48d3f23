"""Missing chunks as zstd frames against the old version (casd.chunkdelta, issue #7).

The receiver names the chunks it lacks and, per window, the stretches of its old version
they most likely resemble; the source encodes those chunks in one frame per window with
the stretches as prefix, and the receiver decodes against its own copy, checking every
chunk against its id before storing it. Whatever goes wrong (the source lacks the base or
the operation, the receiver's base is damaged, the frame is cut short) the chunks still
come, as plain chunks, and nothing unverified is stored.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from casproto import Codec
from hypothesis import given
from hypothesis import strategies as st

from casd import chunkdelta, replicate
from casd.blobdelta import Link
from casd.chunking import chunk_id
from casd.errors import ChunkCorrupt
from casd.replicate import sync_into_store
from casd.server import ops
from casd.storage.interface import StoredChunk
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob, store_blob
from casd.zstd import compress
from tests.casd.server.test_service import client_for
from tests.casd.test_blobdelta import digest_of, next_version_on_source, run, versions

SLOW = Link(1e5, 0.5)  # 800 kbit/s: a frame pays whenever it saves a few per cent


def missing(new: Any, old: Any) -> list[tuple[bytes, int]]:
    have, seen, out = set(old.ids), set(), []
    for cid, size in zip(new.ids, new.sizes, strict=True):
        if cid not in have and cid not in seen:
            seen.add(cid)
            out.append((cid, size))
    return out


def request_for(
    old: bytes, new: bytes, limit: int | None = None
) -> tuple[MemoryStore, Any, Any, list[tuple[bytes, int]], list[chunkdelta.Window], dict[str, Any]]:
    """A source holding both versions, their recipes, what a receiver holding ``old``
    lacks, its windows, and the arguments of the chunks.delta that asks for it."""
    src = MemoryStore()
    o = src.get_recipe(store_blob(src, old).digest)
    n = src.get_recipe(store_blob(src, new).digest)
    need = missing(n, o)
    wins = chunkdelta.windows(n.ids, n.sizes, need, o.ids, o.sizes, limit=limit)
    places = [n.ids.index(cid) for cid, _ in need]
    req = chunkdelta.Request(n.digest, len(n.ids), places, o.digest, chunkdelta.recipe_sum(o), wins)
    return src, o, n, need, wins, req.as_args()


def frames_for(
    old: bytes, new: bytes, limit: int | None = None
) -> tuple[MemoryStore, Any, Any, list[tuple[bytes, int]], list[chunkdelta.Window], list[bytes]]:
    src, o, n, need, wins, args = request_for(old, new, limit)
    enc = chunkdelta.Encoder(src, *chunkdelta.parse_args(args))
    return src, o, n, need, wins, list(iter(enc.step, None))


# --- where the prefix comes from ----------------------------------------------------------


def test_a_change_in_the_middle_is_encoded_against_the_old_bytes_around_it_only() -> None:
    rnd = random.Random(1)
    old = rnd.randbytes(4_000_000)
    new = old[:2_000_000] + rnd.randbytes(300) + old[2_000_000:]
    src = MemoryStore()
    o = src.get_recipe(store_blob(src, old).digest)
    n = src.get_recipe(store_blob(src, new).digest)
    need = missing(n, o)
    assert 0 < len(need) <= 3
    wins = chunkdelta.windows(n.ids, n.sizes, need, o.ids, o.sizes)
    assert len(wins) == 1
    assert wins[0].count == len(need)
    # The old chunks between the anchors, and a chunk either side: not the whole blob.
    assert 0 < wins[0].prefix < len(old) // 5


def test_windows_cover_every_missing_chunk_in_order_and_keep_to_their_budget() -> None:
    old, new = versions(3_000_000)
    src = MemoryStore()
    o = src.get_recipe(store_blob(src, old).digest)
    n = src.get_recipe(store_blob(src, new).digest)
    need = missing(n, o)
    wins = chunkdelta.windows(n.ids, n.sizes, need, o.ids, o.sizes, limit=400_000)
    assert len(wins) > 3
    assert sum(w.count for w in wins) == len(need)
    biggest = max(o.sizes)
    for w in wins:
        assert all(lo < hi for lo, hi in w.ranges)
        assert all(a[1] < b[0] for a, b in zip(w.ranges, w.ranges[1:], strict=False))
        # A window closes before its prefix passes the budget (one chunk's range may
        # overshoot it by the chunks at its edges).
        assert w.prefix <= 400_000 + 3 * biggest


def test_a_chunk_repeated_in_the_old_version_is_no_anchor() -> None:
    # Zeros sit at the start of the old version and next to the change in the new one:
    # as an anchor, the run after them would reach back to the start.
    rnd = random.Random(2)
    zeros = bytes(300_000)
    body = rnd.randbytes(3_000_000)
    old = zeros + body[:1_500_000] + zeros + body[1_500_000:]
    new = zeros + body[:1_500_000] + zeros + rnd.randbytes(5000) + body[1_500_000:]
    src = MemoryStore()
    o = src.get_recipe(store_blob(src, old).digest)
    n = src.get_recipe(store_blob(src, new).digest)
    wins = chunkdelta.windows(n.ids, n.sizes, missing(n, o), o.ids, o.sizes)
    assert sum(w.prefix for w in wins) < len(old) // 4


# --- the frames ---------------------------------------------------------------------------


def test_the_missing_chunks_cross_as_a_fraction_of_their_size_and_decode_verified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chunkdelta, "STEP_BYTES", 128 * 1024)  # several pieces per frame
    monkeypatch.setattr(chunkdelta, "BATCH_BYTES", 256 * 1024)
    old, new = versions()
    src, o, _n, need, wins, pieces = frames_for(old, new, limit=500_000)
    assert len(wins) > 1
    assert len([p for p in pieces if p]) > len(wins)
    raw = sum(size for _, size in need)
    plain = sum(len(compress(src.get_chunk(cid), 3)) for cid, _ in need)
    frames = sum(map(len, pieces))
    assert frames < plain // 20  # random bytes: zstd alone saves nothing, the base all
    dst = MemoryStore()
    store_blob(dst, old)

    def prefix_of(ranges: Any) -> bytes:
        return chunkdelta.read_prefix(dst, o, ranges)

    batches = list(chunkdelta.decode(iter(pieces), wins, prefix_of, need))
    got = [c for b in batches for c in b]
    assert [cid for cid, _ in got] == [cid for cid, _ in need]
    assert all(chunk_id(data) == cid for cid, data in got)
    assert sum(len(d) for _, d in got) == raw
    assert len(batches) > 1


@pytest.mark.parametrize("damage", ["flipped-byte", "cut-short", "trailing", "other-base"])
def test_a_bad_frame_or_base_is_refused_before_any_chunk_of_it_is_taken(damage: str) -> None:
    old, new = versions(600_000)
    _src, o, _n, need, wins, pieces = frames_for(old, new)
    data = b"".join(pieces)
    prefix_of: Any = lambda ranges: chunkdelta.read_prefix(dst, o, ranges)  # noqa: E731
    dst = MemoryStore()
    store_blob(dst, old)
    if damage == "flipped-byte":
        data = (
            data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1 :]
        )
    elif damage == "cut-short":
        data = data[:-20]
    elif damage == "trailing":
        data += b"more"
    else:  # the receiver's "old version" reads as other bytes of the same size
        noise = os.urandom(len(old))
        prefix_of = lambda ranges: noise[: sum(sum(o.sizes[lo:hi]) for lo, hi in ranges)]  # noqa: E731
    handed: list[tuple[bytes, bytes]] = []

    def take_all() -> None:
        for batch in chunkdelta.decode(iter([data]), wins, prefix_of, need):
            handed.extend(batch)

    with pytest.raises(ChunkCorrupt):
        take_all()
    assert all(chunk_id(c) == cid for cid, c in handed)  # every chunk handed on was checked


def test_a_source_that_cut_the_base_otherwise_refuses() -> None:
    src, *_, args = request_for(*versions(300_000))
    with pytest.raises(chunkdelta.DeltaRefused, match="cut differently"):
        chunkdelta.Encoder(src, *chunkdelta.parse_args({**args, "base_sum": 12345}))


@pytest.mark.parametrize(
    "args",
    [
        {"windows": []},
        {"windows": [[0, 0, 1]]},
        {"windows": [[1, 0]]},
        {"windows": [[1, 5, 2]]},
        {"base_sum": -1},
        {"at": "text"},
    ],
)
def test_malformed_requests_get_an_error_naming_the_argument(args: dict[str, Any]) -> None:
    src, *_, good = request_for(*versions(300_000))
    with pytest.raises((chunkdelta.DeltaRefused, ops.UserError)):
        chunkdelta.Encoder(src, *chunkdelta.parse_args({**good, **args}))


def test_it_pays_on_a_slow_link_only() -> None:
    wins = [chunkdelta.Window(100, ((0, 10),), 30_000_000)] * 4  # 120 MB of prefix
    # 20 MB of chunks over 20 Mbit/s: 8 s; as frames 4 s, against ~1.3 s of CPU.
    assert chunkdelta.pays(20e6, wins, 60_000_000, 2.5e6)
    assert not chunkdelta.pays(20e6, wins, 60_000_000, 125e6)  # 1 Gbit/s: 0.16 s
    assert not chunkdelta.pays(200_000, wins, 1_000_000, 2.5e6)  # little would cross
    # 2 MB of chunks over 100 Mbit/s, 0.17 s: as frames 0.1 s. The call for them costs a
    # round trip, as the plain chunks' request would: it is no cost of theirs.
    small = [chunkdelta.Window(50, ((0, 10),), 1_000_000)]
    assert chunkdelta.pays(2e6, small, 5_000_000, 11.6e6)
    # Its prefix 30x the chunks: reading and indexing it takes longer than they cross.
    assert not chunkdelta.pays(
        2e6, [chunkdelta.Window(50, ((0, 10),), 60_000_000)], 5_000_000, 11.6e6
    )


# --- in a sync ----------------------------------------------------------------------------


async def test_a_sync_over_a_slow_link_moves_the_missing_chunks_as_frames() -> None:
    old, new = versions()
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=SLOW)
        stats = await c.stats()
    assert report.chunk_delta_frames == 1
    assert report.chunk_delta_fallbacks == 0
    assert read_blob(dst, dst.resolve("blob")) == new
    assert report.wire_bytes < len(new) // 10  # the chunks were nearly all new
    assert report.chunk_delta_raw > len(new) // 2
    assert "frames against" in report.delta_choice
    assert stats["chunk_deltas"] == 1
    assert stats["chunk_delta_bytes"] == report.chunk_delta_bytes > 0
    assert stats["chunk_delta_encode_s"] > 0
    assert report.as_dict()["chunk_delta_frames"] == 1


async def test_with_the_link_unknown_the_first_chunks_measure_it() -> None:
    # Over an in-memory stream the first chunks cross in no time (or all before the first
    # is taken, telling no rate): frames cannot pay.
    old, new = versions(12_000_000)
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))])
    assert report.chunk_delta_frames == 0
    assert "plain:" in report.delta_choice
    assert "too little missing" not in report.delta_choice  # it probed
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_what_a_probe_measured_is_where_the_next_sync_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An in-memory stream tells no rate: say the probe found 20 Mbit/s. Its chunks come
    # in small batches, no stream long enough to measure by, and the rest as frames; the
    # report hands on the probe's figure (the daemon keeps it per source), so the next
    # sync's small change still has a rate to choose by.
    monkeypatch.setattr(replicate, "_rate", lambda first, last: 2.5e6)
    rnd = random.Random(7)
    old = rnd.randbytes(16_000_000)
    # 10 MB that compress not at all: more than a probe's worth crosses.
    new = old[:3_000_000] + rnd.randbytes(10_000_000) + old[13_000_000:]
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))])
    assert "too little missing" not in report.delta_choice
    assert report.chunk_delta_frames == 1
    assert report.link is not None
    assert report.link.rate == 2.5e6
    assert report.as_dict()["link_mbit"] == 20.0


async def test_a_small_change_comes_plain_without_probing_the_link() -> None:
    old, new = versions(2_000_000)  # about 2 MB of chunks to fetch: frames could save little
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))])
    assert report.chunk_delta_frames == 0
    assert "too little missing" in report.delta_choice
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_without_deltas_allowed_no_frame_is_asked_for() -> None:
    old, new = versions()
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        c.allow_deltas = False  # casd serve --no-delta
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=SLOW)
    assert report.chunk_delta_frames == 0
    assert report.delta_choice == ""
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_when_the_source_lacks_the_base_the_chunks_come_plain() -> None:
    old, new = versions()
    src, dst = MemoryStore(), MemoryStore()
    store_blob(dst, old, "blob")  # the receiver's old version, which the source never had
    store_blob(src, new, "blob")
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=SLOW)
    assert report.chunk_delta_frames == 0
    assert report.chunk_delta_fallbacks == 1
    assert "failed" in report.delta_choice
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_an_older_source_without_the_operation_is_asked_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(ops.OPERATIONS, chunkdelta.OP)
    old, new = versions()
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=SLOW)
        assert chunkdelta.OP in c.unsupported_ops
    assert report.chunk_delta_fallbacks == 1
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_a_base_damaged_in_the_receivers_store_falls_back_and_stores_nothing_wrong() -> None:
    old, new = versions()
    src, dst = next_version_on_source(old, new)
    # The chunks of the receiver's old version that only it has (the new version shares
    # the rest) now read as other bytes, bitrot the store did not notice: the frames
    # decode against them to chunks that fail their ids.
    shared = set(src.get_recipe(digest_of(new)).ids)
    for cid in set(dst.get_recipe(digest_of(old)).ids) - shared:
        stored = dst.get_stored(cid)
        data = bytes(b ^ 0x5A for b in dst.get_chunk(cid))
        dst._chunks[cid] = StoredChunk(cid, Codec.RAW, data, stored.raw_size)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=SLOW)
    assert report.chunk_delta_fallbacks == 1
    target = dst.get_recipe(dst.resolve("blob"))
    for cid in set(target.ids) - set(dst.get_recipe(digest_of(old)).ids):
        assert chunk_id(dst.get_chunk(cid)) == cid  # what the sync stored is what it is
    assert read_blob(dst, target.digest) == new


async def test_a_base_larger_than_the_memory_budget_goes_in_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = 256 * 1024
    monkeypatch.setattr(chunkdelta, "WINDOW_PREFIX", budget)
    monkeypatch.setattr(chunkdelta, "MAX_PREFIX", 2 * budget)
    held: list[int] = []
    real = chunkdelta.read_prefix

    def recording(store: Any, base: Any, ranges: Any) -> bytes:
        data = real(store, base, ranges)
        held.append(len(data))
        return data

    monkeypatch.setattr(chunkdelta, "read_prefix", recording)
    old, new = versions(4_000_000)  # sixteen times the budget
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=SLOW)
    assert report.chunk_delta_frames == 1
    assert report.chunk_delta_fallbacks == 0
    assert len(held) > 8  # windows, at both ends
    assert max(held) <= 2 * budget  # neither end held more than its budget
    assert report.wire_bytes < len(new) // 5
    assert read_blob(dst, dst.resolve("blob")) == new


def test_the_link_is_timed_from_the_first_chunks_taken_to_the_last_byte() -> None:
    from casd.replicate import PROBE_WIRE, _rate

    # 2 MB came in the second after the first chunks were taken: the link's pace.
    assert _rate((10.0, 100_000), (11.0, 2_100_000)) == pytest.approx(2e6)
    # Nearly all of it had come before the first chunks were taken: this host set the
    # pace, and the figure would be its own, not the link's.
    assert _rate((10.0, 2_000_000), (12.0, 2_000_000 + PROBE_WIRE // 8)) is None
    assert _rate(None, (12.0, 2_000_000)) is None


# --- properties ---------------------------------------------------------------------------


@st.composite
def version_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """An old version and a new one made from it by edits, moves, insertions and cuts."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    old = rnd.randbytes(draw(st.integers(0, 600_000)))
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["edit", "insert", "cut", "move"]))
        at = rnd.randrange(len(new) + 1)
        n = rnd.randrange(1, 70_000)
        if kind == "edit":
            new[at : at + 16] = rnd.randbytes(16)
        elif kind == "insert":
            new[at:at] = rnd.randbytes(n)
        elif kind == "cut":
            del new[at : at + n]
        else:
            piece = bytes(new[at : at + n])
            del new[at : at + n]
            to = rnd.randrange(len(new) + 1)
            new[to:to] = piece
    return old, bytes(new)


@given(version_pairs(), st.sampled_from([64 * 1024, 200_000, 32 * 1024 * 1024]))
def test_any_new_version_comes_whole_and_verified_from_its_frames(
    pair: tuple[bytes, bytes], limit: int
) -> None:
    src, o, _n, need, wins, args = request_for(*pair, limit=limit)
    assert sum(w.count for w in wins) == len(need)
    for w in wins:
        assert w.count > 0
        assert all(0 <= lo < hi <= len(o.ids) for lo, hi in w.ranges)
        assert all(a[1] < b[0] for a, b in zip(w.ranges, w.ranges[1:], strict=False))
        assert w.prefix == sum(sum(o.sizes[lo:hi]) for lo, hi in w.ranges)
    if not need:
        return
    enc = chunkdelta.Encoder(src, *chunkdelta.parse_args(args))
    pieces = list(iter(enc.step, None))

    def prefix_of(ranges: Any) -> bytes:
        return chunkdelta.read_prefix(src, o, ranges)

    got = [c for b in chunkdelta.decode(iter(pieces), wins, prefix_of, need) for c in b]
    assert [cid for cid, _ in got] == [cid for cid, _ in need]
    assert all(chunk_id(data) == cid for cid, data in got)


def _ids(*names: str) -> list[bytes]:
    return [n.encode().ljust(32, b".") for n in names]


# A rebuilt tar: every header (h, 512 bytes) is new, d2's data changed, d1 and d3 did not.
OLD = _ids("a", "h1", "d1", "h2", "d2", "h3", "d3", "z")
NEW = _ids("a", "H1", "d1", "H2", "D2", "H3", "d3", "z")
SIZES = [20_000, 512, 20_000, 512, 20_000, 512, 20_000, 20_000]


def test_the_prefix_is_what_the_new_version_dropped_around_the_change() -> None:
    # The small new chunks came in the recipe (casd.recipeinline): only D2 is wanted.
    # Its stretch of the old version is h2 d2 h3 (with d1 and d3 at the margins); of
    # that only d2 is both dropped and of a size a wanted chunk could resemble.
    wins = chunkdelta.windows(NEW, SIZES, [(NEW[4], 20_000)], OLD, SIZES)
    assert [w.ranges for w in wins] == [((4, 5),)]
    assert wins[0].prefix == 20_000
    # Where small chunks are wanted too, the old small ones they replaced stay in.
    need = [(NEW[3], 512), (NEW[4], 20_000), (NEW[5], 512)]
    wins = chunkdelta.windows(NEW, SIZES, need, OLD, SIZES)
    assert [w.ranges for w in wins] == [((3, 6),)]


def test_an_insertion_that_dropped_nothing_keeps_its_whole_stretch() -> None:
    old = _ids("a", "b", "c", "d")
    new = _ids("a", "b", "X", "c", "d")
    wins = chunkdelta.windows(new, [20_000] * 5, [(new[2], 20_000)], old, [20_000] * 4)
    # Nothing between b and c was dropped: the neighbours are all there is to match.
    assert [w.ranges for w in wins] == [((1, 3),)]


def test_content_that_moved_keeps_only_the_edges_of_its_stretch() -> None:
    # f g moved to the front, and X came after them: X's anchors (g before, b after)
    # are out of order, so its stretch spans b..g, all of which the new version holds:
    # megabytes, in a real layer, that the receiver gets anyway. Only its edges are read.
    old = _ids("a", "b", "c", "d", "e", "f", "g", "h")
    new = _ids("a", "f", "g", "X", "b", "c", "d", "e", "h")
    wins = chunkdelta.windows(new, [20_000] * 9, [(new[3], 20_000)], old, [20_000] * 8)
    assert [w.ranges for w in wins] == [((0, 1), (7, 8))]
    assert wins[0].prefix == 40_000
