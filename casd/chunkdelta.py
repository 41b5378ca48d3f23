"""The chunks a receiver lacks, as one zstd frame against the old version's bytes (issue #7).

Chunk dedup moves every chunk the receiver lacks, and a chunk that differs from an old one
by a few bytes moves whole. A whole-blob delta (casd.blobdelta) fixes that but encodes the
*whole* target: 120 MB of layer to save 14 MB costs seconds at both ends. This encodes
only the missing chunks, concatenated in recipe order, in one zstd frame whose prefix is
the old version's bytes around them (level 3, long-distance matching), so a match may
reach anywhere in that prefix: measured on the benchmark corpus it comes within 1 % of
``zstd --long --patch-from`` of the whole layer, for 0.1-0.5 s of encoding.

The prefix is not the whole old version but the old chunks *between the same anchors*
that the new version dropped: a run of new chunks the old version lacks lies between two
chunks both versions share, and what it replaced lies between the same two chunks of the
old version. A chunk both versions hold is no part of it (it moved; in a rebuilt layer
most of a stretch is such content), nor, when the small new chunks came in the recipe
(casd.recipeinline), is a small one (the old tar headers). Both ends read only those, so
a small change to a large blob reads little. The chunks go in *windows*
(:func:`windows`): one frame per window, its prefix closed at about WINDOW_PREFIX bytes,
so the source's first piece follows a read of one window's prefix, not of the whole old
version, reads overlap the transfer (the next window's prefix is read while one is in use), and
neither end holds more than two windows' prefixes:
a multi-GB base is never held whole. Ranges index the base's recipe, so the receiver
sends the xxh3-64 of that recipe's entries (as PULL_DELTA does): a source that cut the
base otherwise refuses instead of encoding against other bytes.

Operation ``chunks.delta`` (SPEC §4.5): the receiver names the target blob, the places of
the chunks it wants in the target's recipe (a bitmap, as WANT_AT), the base, its recipe
checksum and the windows; the source streams the frames as CALL_DATA pieces, flushed every
STEP_BYTES of input, so the receiver decodes, verifies and stores a piece while the next
one is encoded. The receiver decodes against its own copy of the same ranges, cuts the
output by the recipe's sizes and checks every chunk's id before storing it: a wrong or
corrupted base only makes chunks that fail their check, and the caller fetches what is
left as plain chunks.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import casproto
import trio
import xxhash

from casd import recipeinline
from casd.auth import Scope
from casd.chunking import chunk_id
from casd.errors import ChunkCorrupt, UserError
from casd.server import ops
from casd.storage.interface import Recipe, Store
from casd.zstd import (
    CompressionParameter,
    DecompressionParameter,
    ZstdCompressor,
    ZstdDecompressor,
    ZstdDict,
    ZstdError,
)

#: zstd level and long-distance matching, as the issue measured.
LEVEL = 3
#: The most prefix either end holds: it is kept whole in memory while the frame is made
#: or decoded.
MAX_PREFIX = 1 << 30
#: The most chunk bytes one frame carries (the frame states its size; the receiver holds
#: at most a piece of it at a time).
MAX_TARGET = 4 << 30
#: zstd's largest window on 64-bit builds: prefix and target together must fit in it.
MAX_WINDOW_LOG = 31
#: The source flushes the frame after this much input: a piece goes out, and is decoded,
#: while the next one is encoded.
STEP_BYTES = 4 * 1024 * 1024
#: Old chunks added on each side of a range: the bytes next to a change often moved with it.
MARGIN = 1
#: A frame's prefix is closed at about this many bytes, so the source's first piece
#: follows a read of this much, not of the whole old version, and neither end holds more.
WINDOW_PREFIX = 32 * 1024 * 1024
#: Verified chunks are handed on in batches of about this many bytes.
BATCH_BYTES = 4 * 1024 * 1024

# What the choice (:func:`pays`) counts. Measured here on the benchmark corpus (layers of
# 112-175 MB, 8-98 MB of them missing): the frames were 0.08-0.66 of the chunks they
# replaced as zstd'd chunks (0.4 median). Reading a prefix from a store took 4.3-4.6 ns a
# byte alone, making the frame 1 ns per prefix byte (indexing) and 2.6 ns per chunk byte;
# but in a sync over 100 Mbit/s, with both hosts and the link on this machine's two cores,
# the source spent 1.6 s of CPU on 153 MB of prefixes and 42 MB of chunks: 9 ns a prefix
# byte. The frames stream as fast as the slower of that and the link.
# The receiver reads its copy of the prefixes too (7 ns a byte), and decodes, checks and
# compresses for its store what the frames carry (4 ns a byte), at the same time.
# Frames are taken only where they should take at most PAY_MARGIN of the plain chunks'
# time: on the corpus the frames came to 0.04-0.70 of the plain chunks, and the choice
# cannot know which before encoding. At 0.7 (when prefixes were whole stretches, 2-4x
# what they are now) a step of 0.65 had taken 3.8 s as frames against 3.4 s as chunks
# over 100 Mbit/s. With the prefixes the new version dropped, every step of the corpus
# forced to frames over 100 Mbit/s (on 0a87607) was faster where the model gave it at
# most 0.74 (debian v1->v2 2.4 s against 2.9 s, pyapp v2->v3 2.75 s against 3.25 s).
# The two small pyapp steps (under 0.5 MB of frames) had looked slower by one run each
# (+0.08 s, +0.02 s), and the call's round trip was counted against frames for a while;
# five runs each (on eef17d8) put them level with chunks only (1.46 s against 1.45 s,
# 1.54 s against 1.56 s), the run-to-run spread being 0.1-0.2 s.
DELTA_SHARE = 0.5
READ_PER_PREFIX_BYTE = 7e-9
INDEX_PER_PREFIX_BYTE = 2e-9
ENCODE_PER_BYTE = 3e-9
DECODE_PER_BYTE = 4e-9
PAY_MARGIN = 0.8

OP = "chunks.delta"


class DeltaRefused(UserError):
    """A request ``chunks.delta`` cannot serve as asked (base cut otherwise, too large)."""


def recipe_sum(recipe: Recipe) -> int:
    """xxh3-64 of a recipe's entries: two stores hold the same cut of a blob if these agree."""
    return int(xxhash.xxh3_64_intdigest(casproto.pack_entries(recipe.ids, recipe.sizes)))


@dataclass(frozen=True)
class Window:
    """The next ``count`` chunks asked for, encoded as one frame against the old
    version's chunks ``ranges`` ([lo, hi) of its recipe, ascending), ``prefix`` bytes."""

    count: int
    ranges: tuple[tuple[int, int], ...]
    prefix: int


def _runs(
    ids: Sequence[bytes],
    sizes: Sequence[int],
    missing: set[bytes],
    old_pos: dict[bytes, int],
    offsets: Sequence[int],
    limit: int,
    margin: int,
) -> dict[bytes, tuple[int, int]]:
    """For each chunk of ``missing``, the old chunks it most likely resembles: those
    between the anchors around the first run of chunks the old version lacks that holds
    it, widened by ``margin``. Anchors are chunks both versions hold once (``old_pos``
    has only those): a chunk the old version holds in many places (zeros, a common
    header) tells nothing of where a run sits. Where the anchors are out of order (the
    content moved) and far apart, the chunks around each; where the stretch between them
    comes to more than ``limit`` bytes, a part of it about the chunk's relative place in
    the run, so consecutive chunks share most of theirs."""
    n_old = len(offsets) - 1
    out: dict[bytes, tuple[int, int]] = {}
    prev_anchor = -1
    i = 0
    while i < len(ids):
        at = old_pos.get(ids[i])
        if at is not None or ids[i] not in missing:
            if at is not None:
                prev_anchor = at
            i += 1
            continue
        j = i  # a run: chunks up to the next anchor, holding at least one missing one
        while j < len(ids) and ids[j] not in old_pos:
            j += 1
        next_anchor = old_pos[ids[j]] if j < len(ids) else n_old
        lo, hi = prev_anchor + 1, next_anchor
        if hi < lo:
            lo, hi = hi, lo
        lo, hi = max(0, lo - margin), min(n_old, hi + margin)
        old_bytes = offsets[hi] - offsets[lo]
        run_bytes = sum(sizes[i:j]) or 1
        done = 0
        for k in range(i, j):
            if ids[k] in missing and ids[k] not in out:
                if old_bytes <= limit:
                    out[ids[k]] = (lo, hi)
                else:
                    # A long run against a long stretch (a blob rewritten throughout, or
                    # with no anchor at all): the stretch's part at the chunk's place.
                    centre = offsets[lo] + old_bytes * done // run_bytes
                    a = bisect.bisect_right(offsets, centre - limit // 8) - 1
                    b = bisect.bisect_left(offsets, centre + limit // 8)
                    out[ids[k]] = (max(lo, a), min(hi, max(b, a + 1)))
            done += sizes[k]
        i = j
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        elif lo < hi:
            merged.append((lo, hi))
    return merged


def windows(
    ids: Sequence[bytes],
    sizes: Sequence[int],
    need: Sequence[tuple[bytes, int]],
    old_ids: Sequence[bytes],
    old_sizes: Sequence[int],
    limit: int | None = None,
    margin: int = MARGIN,
) -> list[Window]:
    """How to send ``need`` (the chunks of a blob of ``ids`` the receiver lacks, in order
    of first appearance) as frames against the old version: in order, each frame's chunks
    with the old chunks that sit between the same anchors and that the new version
    dropped (:func:`_dropped_only`) as their prefix, a frame closed once its prefix would
    pass ``limit`` bytes (WINDOW_PREFIX). A run of new chunks with no anchor before
    (after) it reaches to the old version's start (end)."""
    limit = WINDOW_PREFIX if limit is None else limit
    run_of = _dropped_only(
        ids,
        need,
        old_ids,
        old_sizes,
        _runs_of(ids, sizes, need, old_ids, old_sizes, limit, margin),
        margin,
    )
    offsets = [0]
    for size in old_sizes:
        offsets.append(offsets[-1] + size)

    def size_of(ranges: list[tuple[int, int]]) -> int:
        return sum(offsets[hi] - offsets[lo] for lo, hi in ranges)

    out: list[Window] = []
    ranges: list[tuple[int, int]] = []
    count = prefix = 0
    # The stretches already in this frame's prefix, by identity: the chunks of one stretch
    # share its tuple, and a stretch may be thousands of pieces (every dropped member of
    # a rebuilt layer), so comparing them piece by piece took 0.24 s on pyapp v3->v4.
    merged: set[int] = set()
    for cid, _ in need:
        parts = run_of.get(cid, _NO_PARTS)
        if id(parts) in merged:
            count += 1
            continue
        grown = _merge([*ranges, *parts])
        grown_size = size_of(grown)
        if count and grown_size > limit:
            out.append(Window(count, tuple(ranges), prefix))
            merged.clear()
            grown = _merge(list(parts))
            count, grown_size = 0, size_of(grown)
        merged.add(id(parts))
        count, ranges, prefix = count + 1, grown, grown_size
    if count:
        out.append(Window(count, tuple(ranges), prefix))
    return out


#: The stretch of a chunk with no old chunks around it (the empty range).
_NO_PARTS: tuple[tuple[int, int], ...] = ((0, 0),)


def _runs_of(
    ids: Sequence[bytes],
    sizes: Sequence[int],
    need: Sequence[tuple[bytes, int]],
    old_ids: Sequence[bytes],
    old_sizes: Sequence[int],
    limit: int,
    margin: int,
) -> dict[bytes, tuple[int, int]]:
    old_pos: dict[bytes, int] = {}
    repeated: set[bytes] = set()
    for i, cid in enumerate(old_ids):
        if old_pos.setdefault(cid, i) != i:
            repeated.add(cid)
    for cid in repeated:
        del old_pos[cid]
    offsets = [0]
    for size in old_sizes:
        offsets.append(offsets[-1] + size)
    return _runs(ids, sizes, {cid for cid, _ in need}, old_pos, offsets, limit, margin)


#: Old chunks up to this size are left out of the prefix of chunks larger than it when no
#: chunk that small is wanted: a receiver that took the small new chunks in the recipe
#: (casd.recipeinline) wants only larger ones, and the old small chunks (the tar headers
#: every member of a rebuilt layer replaced) only cost reading.
SMALL = recipeinline.ASK
#: A window's prefix in more pieces than this is read whole between its first and last.
MAX_PARTS = 4096


def _dropped_only(
    ids: Sequence[bytes],
    need: Sequence[tuple[bytes, int]],
    old_ids: Sequence[bytes],
    old_sizes: Sequence[int],
    run_of: dict[bytes, tuple[int, int]],
    margin: int = MARGIN,
) -> dict[bytes, tuple[tuple[int, int], ...]]:
    """Each chunk's stretch of the old version cut down to the old chunks the new version
    dropped (what the change replaced; a chunk both versions hold is content the
    receiver gets anyway, moved, and in a rebuilt layer most of a stretch: pyapp v3->v4's
    widest was 31 MB, 6.5 MB of it dropped), without small ones where only larger chunks
    are wanted. A stretch with nothing dropped in it keeps the old chunks at its edges
    (for a pure insertion, its neighbours: all there is to match)."""
    kept = set(ids)
    small_wanted = any(size <= SMALL for _, size in need)
    useful = [
        c not in kept and (small_wanted or s > SMALL)
        for c, s in zip(old_ids, old_sizes, strict=True)
    ]
    parts_of: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
    out: dict[bytes, tuple[tuple[int, int], ...]] = {}
    for cid, (lo, hi) in run_of.items():
        parts = parts_of.get((lo, hi))
        if parts is None:
            found: list[tuple[int, int]] = []
            p = lo
            while p < hi:
                if not useful[p]:
                    p += 1
                    continue
                q = p
                while q < hi and useful[q]:
                    q += 1
                found.append((p, q))
                p = q
            if not found:
                # Nothing dropped: an insertion, whose stretch is the old chunks at its
                # edges; or content that moved (anchors out of order), whose stretch may
                # be megabytes the receiver holds anyway: its edges only.
                found = _merge([(lo, min(hi, lo + margin)), (max(lo, hi - margin), hi)])
            if len(found) > MAX_PARTS:
                found = [(lo, hi)]
            parts = parts_of[(lo, hi)] = tuple(found)
        out[cid] = parts
    return out


def read_prefix(store: Store, base: Recipe, ranges: Sequence[tuple[int, int]]) -> bytes:
    """The bytes of ``ranges`` of blob ``base``, concatenated.

    Raises:
        DeltaRefused: they come to more than MAX_PREFIX.
    """
    size = sum(sum(base.sizes[lo:hi]) for lo, hi in ranges)
    if size > MAX_PREFIX:
        raise DeltaRefused(f"a prefix of {size} bytes; at most {MAX_PREFIX} are held")
    ids = [cid for lo, hi in ranges for cid in base.ids[lo:hi]]
    return b"".join(store.get_chunks(ids))


#: zstd takes no dictionary shorter than this: a shorter prefix is no prefix, at both ends.
MIN_PREFIX = 8


def _as_prefix(prefix: bytes) -> Any:
    return ZstdDict(prefix, is_raw=True).as_prefix if len(prefix) >= MIN_PREFIX else None


def _window_log(prefix: int, target: int) -> int:
    need = max(prefix + target, 1).bit_length()
    if need > MAX_WINDOW_LOG:
        raise DeltaRefused(f"prefix and chunks come to {prefix + target} bytes, past a zstd window")
    return max(20, need)


def pays(chunk_wire: float, wins: Sequence[Window], raw_bytes: int, rate: float) -> bool:
    """Whether fetching ``raw_bytes`` of chunks (about ``chunk_wire`` bytes on the wire as
    plain chunks) as frames ``wins`` takes less time at ``rate`` bytes/s. The frames
    stream as fast as the slower of the link and the CPU making them (reading the
    prefixes, indexing them, encoding), after the first window's prefix is read. The
    call's round trip is not counted: the plain chunks' request takes one as well."""
    if rate <= 0 or not wins or raw_bytes > MAX_TARGET:
        return False
    prefix = sum(w.prefix for w in wins)
    source = prefix * (READ_PER_PREFIX_BYTE + INDEX_PER_PREFIX_BYTE) + raw_bytes * ENCODE_PER_BYTE
    receiver = prefix * READ_PER_PREFIX_BYTE + raw_bytes * DECODE_PER_BYTE
    first = wins[0].prefix * (READ_PER_PREFIX_BYTE + INDEX_PER_PREFIX_BYTE)
    frames = first + max(chunk_wire * DELTA_SHARE / rate, source, receiver)
    return frames < PAY_MARGIN * chunk_wire / rate


class Ahead:
    """The prefixes of a run of windows, each read while the one before is in use (in a
    thread of its own, joined by :meth:`close`), so neither end's stream stalls at a
    window's edge for a read of tens of MB. At most two are held at a time."""

    def __init__(
        self, read: Callable[[Sequence[tuple[int, int]]], bytes], wins: Iterable[Any]
    ) -> None:
        self._read = read
        self._wins = iter(wins)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="casd-prefix")
        self._pending: deque[Future[bytes]] = deque()
        self.cpu_s = 0.0  # thread CPU the reads took
        self._lock = threading.Lock()
        self._submit()

    def _timed(self, ranges: Sequence[tuple[int, int]]) -> bytes:
        c0 = time.thread_time()
        try:
            return self._read(ranges)
        finally:
            with self._lock:
                self.cpu_s += time.thread_time() - c0

    def _submit(self) -> None:
        ranges = next(self._wins, None)
        if ranges is not None:
            self._pending.append(self._pool.submit(self._timed, ranges))

    def next(self) -> bytes:
        """The next window's prefix (raises what reading it raised)."""
        fut = self._pending.popleft()
        self._submit()
        return fut.result()

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)


# --- the source ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What the receiver asks for."""

    target: str
    count: int  # entries in target's recipe
    places: Sequence[int]  # ascending places in it of the chunks wanted
    base: str
    base_sum: int
    wins: Sequence[Window]

    def as_args(self) -> dict[str, Any]:
        bits = [False] * self.count
        for p in self.places:
            bits[p] = True
        return {
            "target": self.target,
            "at": casproto.pack_bitmap(bits),
            "base": self.base,
            "base_sum": self.base_sum,
            "windows": [[w.count, *(x for r in w.ranges for x in r)] for w in self.wins],
        }


def _ints(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    )


def parse_args(args: ops.Document) -> tuple[str, bytes, str, int, list[list[int]]]:
    target, base = ops.arg_str(args, "target"), ops.arg_str(args, "base")
    at, base_sum, wins = args.get("at"), args.get("base_sum"), args.get("windows")
    if not isinstance(at, bytes):
        raise UserError("argument 'at' must be a bitmap (bin)")
    if isinstance(base_sum, bool) or not isinstance(base_sum, int) or base_sum < 0:
        raise UserError("argument 'base_sum' must be an unsigned integer")
    if (
        not isinstance(wins, list | tuple)
        or not wins
        or not all(_ints(w) and len(w) % 2 == 1 and w[0] > 0 for w in wins)
    ):
        raise UserError(
            "argument 'windows' must be a list of [count, lo, hi, lo, hi, ...] of integers"
        )
    return target, at, base, base_sum, [list(w) for w in wins]


class Encoder:
    """The frames of the chunks of ``target`` at the places ``at`` marks, one per window
    against its ranges of ``base``, made a step at a time. Worker-thread calls, one at
    a time; one window's prefix is held at a time.

    Raises (on construction):
        DeltaRefused: the base is cut otherwise here, or the windows or places are wrong.
        BlobMissing: the source lacks the target or the base.
    """

    def __init__(
        self, store: Store, target: str, at: bytes, base: str, base_sum: int, wins: list[list[int]]
    ) -> None:
        trecipe = store.get_recipe(target)
        self._base = store.get_recipe(base)
        if recipe_sum(self._base) != base_sum:
            raise DeltaRefused(f"base {base} is cut differently here; fetch plain chunks")
        try:
            bits = casproto.unpack_bitmap(at, len(trecipe.ids))
        except casproto.LocalProtocolError:
            raise DeltaRefused(
                f"a bitmap of {len(at)} bytes for {len(trecipe.ids)} chunks"
            ) from None
        wanted = [k for k, b in enumerate(bits) if b]
        self.ids = [trecipe.ids[k] for k in wanted]
        self._sizes = [trecipe.sizes[k] for k in wanted]
        self.raw = sum(self._sizes)
        if not self.ids or self.raw > MAX_TARGET:
            raise DeltaRefused(f"{len(self.ids)} chunks of {self.raw} bytes asked for")
        self._wins: list[tuple[int, list[tuple[int, int]]]] = []
        for w in wins:
            ranges = list(zip(w[1::2], w[2::2], strict=True))
            last = 0
            for lo, hi in ranges:
                if not last <= lo < hi <= len(self._base.ids):
                    raise DeltaRefused(
                        f"range [{lo}, {hi}) is not ascending within the base's "
                        f"{len(self._base.ids)} chunks"
                    )
                last = hi
            self._wins.append((w[0], ranges))
        if sum(n for n, _ in self._wins) != len(self.ids):
            raise DeltaRefused(
                f"windows for {sum(n for n, _ in self._wins)} chunks, {len(self.ids)} asked for"
            )
        self._store = store
        self._ahead = Ahead(
            lambda ranges: read_prefix(store, self._base, ranges), (r for _, r in self._wins)
        )
        self.prefix_bytes = 0
        self._win = 0  # the window being encoded
        self._next = 0  # the next chunk of self.ids
        self._end = 0  # past the last chunk of the current window
        self._comp: ZstdCompressor | None = None

    def _open(self) -> ZstdCompressor:
        count = self._wins[self._win][0]
        prefix = self._ahead.next()
        self.prefix_bytes += len(prefix)
        self._end = self._next + count
        raw = sum(self._sizes[self._next : self._end])
        comp = ZstdCompressor(
            options={
                CompressionParameter.compression_level: LEVEL,
                CompressionParameter.window_log: _window_log(len(prefix), raw),
                CompressionParameter.enable_long_distance_matching: 1,
            },
            zstd_dict=_as_prefix(prefix),
        )
        comp.set_pledged_input_size(raw)
        return comp

    @property
    def read_cpu_s(self) -> float:
        """Thread CPU the prefix reads took (in a thread of their own)."""
        return self._ahead.cpu_s

    def close(self) -> None:
        """Stop reading prefixes ahead; idempotent (worker thread: it joins a thread)."""
        self._ahead.close()

    def step(self) -> bytes | None:
        """The next piece of the frames, or None after the last."""
        if self._win >= len(self._wins):
            return None
        out, taken = [], 0
        while self._win < len(self._wins) and taken < STEP_BYTES:
            if self._comp is None:
                self._comp = self._open()
            stop, nbytes = self._next, 0
            while stop < self._end and stop - self._next < 256 and nbytes < STEP_BYTES:
                nbytes += self._sizes[stop]
                stop += 1
            group = self.ids[self._next : stop]
            for data in self._store.get_chunks(group):
                out.append(self._comp.compress(data))
                taken += len(data)
            self._next += len(group)
            if self._next >= self._end:
                out.append(self._comp.flush())
                self._comp = None
                self._win += 1
        if self._win >= len(self._wins):
            self.close()
        if self._comp is not None:
            out.append(self._comp.flush(ZstdCompressor.FLUSH_BLOCK))
        return b"".join(out)


@ops.operation(OP, Scope.READ, "stream chunks asked for as zstd frames against a base's bytes")
async def _chunks_delta(ctx: Any, args: ops.Document, progress: ops.Progress) -> ops.Document:
    # Read scope: it only reads blobs the caller may read. Pieces go out while the next
    # ones are made (two in hand at most).
    target, at, base, base_sum, wins = parse_args(args)
    started = time.monotonic()
    clock = ops.ThreadClock()
    enc: Encoder = await ctx.run(
        clock, lambda: Encoder(ctx.store, target, at, base, base_sum, wins)
    )
    try:
        sent = await ops.stream_steps(ctx.run, enc.step, progress, clock)
    finally:
        with trio.CancelScope(shield=True):
            await ctx.run(enc.close)
    cpu = clock.seconds + enc.read_cpu_s  # the prefixes are read in a thread of their own
    stats = ctx.stats
    stats.chunk_deltas += 1
    stats.chunk_delta_bytes += sent
    stats.chunk_delta_raw_bytes += enc.raw
    stats.chunk_delta_encode_s += cpu
    return {
        "size": sent,
        "raw": enc.raw,
        "chunks": len(enc.ids),
        "prefix": enc.prefix_bytes,
        "seconds": round(time.monotonic() - started, 4),
        "encode_cpu_s": round(cpu, 4),
    }


# --- the receiver --------------------------------------------------------------------


def decode(
    pieces: Iterable[bytes],
    wins: Sequence[Window],
    prefix_of: Callable[[Sequence[tuple[int, int]]], bytes],
    need: Sequence[tuple[bytes, int]],
) -> Generator[list[tuple[bytes, bytes]], None, None]:
    """The chunks ``need`` (id, size), in order, from the frames of ``wins`` arriving as
    ``pieces``, each decoded against ``prefix_of(window.ranges)`` and checked against
    its id; in batches of about BATCH_BYTES.

    Raises:
        ChunkCorrupt: a chunk's bytes are not its id's (a wrong base, a bad frame), or
            the frames do not decode to exactly the chunks asked for.
    """
    if sum(w.count for w in wins) != len(need):
        raise ValueError("the windows do not cover the chunks asked for")
    first = need[0][0] if need else b""
    stream = iter(pieces)
    ahead = Ahead(prefix_of, (w.ranges for w in wins))
    try:
        yield from _decode(stream, wins, ahead, need, first)
    finally:
        ahead.close()


def _decode(
    stream: Iterator[bytes],
    wins: Sequence[Window],
    ahead: Ahead,
    need: Sequence[tuple[bytes, int]],
    first: bytes,
) -> Iterator[list[tuple[bytes, bytes]]]:
    data = b""
    k = 0  # the next chunk of need
    batch: list[tuple[bytes, bytes]] = []
    batch_bytes = 0
    for w in wins:
        sizes = [size for _, size in need[k : k + w.count]]
        total = sum(sizes)
        prefix = ahead.next()
        dec = ZstdDecompressor(
            zstd_dict=_as_prefix(prefix),
            options={DecompressionParameter.window_log_max: MAX_WINDOW_LOG},
        )
        buf = bytearray()
        made = 0
        end = k + w.count
        try:
            while not dec.eof:
                if not data and dec.needs_input:
                    got = next(stream, None)
                    if got is None:
                        raise ChunkCorrupt(first, "a chunk delta that ended early")
                    data = got
                out = dec.decompress(data, max_length=BATCH_BYTES)
                data = b""
                made += len(out)
                if made > total:
                    raise ChunkCorrupt(first, f"a chunk delta frame decoding past {total} bytes")
                buf += out
                pos = 0
                while k < end and len(buf) - pos >= need[k][1]:
                    cid, size = need[k]
                    chunk = bytes(buf[pos : pos + size])
                    if chunk_id(chunk) != cid:
                        raise ChunkCorrupt(
                            cid, "its delta against the old version decodes to other bytes"
                        )
                    batch.append((cid, chunk))
                    batch_bytes += size
                    pos += size
                    k += 1
                    if batch_bytes >= BATCH_BYTES:
                        yield batch
                        batch, batch_bytes = [], 0
                del buf[:pos]
        except ZstdError as exc:
            raise ChunkCorrupt(first, f"a chunk delta that does not decode: {exc}") from None
        data = dec.unused_data
        if made != total or k != end:
            raise ChunkCorrupt(first, f"a chunk delta frame decoding to {made} of {total} bytes")
    if data or any(stream):
        raise ChunkCorrupt(first, "a chunk delta with bytes after its last frame")
    if batch:
        yield batch
