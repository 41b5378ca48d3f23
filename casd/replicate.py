"""Replication between servers: what `casctl sync` does.

Two ways to move a blob from a source server to a destination:

- **direct** (:func:`sync_into_store`): the destination daemon connects to the source as
  a client and pulls what its own store lacks. Data goes source -> destination only.
- **relay** (:func:`relay_sync`): `casctl` holds a connection to each and forwards the
  chunks, for when the destination cannot reach the source.

Both decide per name: a name already pointing at the same digest costs nothing; a blob
already held only gets its name set; otherwise the recipe is fetched (36 bytes per chunk),
the chunks the destination lacks travel in a pipelined stream, every chunk is verified on
arrival and stored at once (so an interrupted sync resumes where it stopped), and the
blob commits only after its sha256 checks out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import casproto
import trio

from casd import blobdelta, chunkdelta, recipeinline
from casd.chunking import Chunker, format_digest
from casd.client import Client, Inlined, VerifiedChunk, first_chunk_of
from casd.errors import (
    BlobMissing,
    CasdError,
    ChunkCorrupt,
    ChunkMissing,
    DigestMismatch,
    NoSpace,
    PeerError,
    PeerRefused,
    StoreError,
    UserError,
)
from casd.leases import leases_for
from casd.nursery import open_nursery
from casd.pools import SharedPool
from casd.refs import is_digest
from casd.storage.interface import ChunkIn, Recipe, Store

log = logging.getLogger("casd.sync")

#: Cuts a stream into chunks (a Chunker's cut_stream, or an OCI layer's TarCutter's).
Cut = Callable[[Any], Iterator[Any]]

#: A chunk stream moving at least this many wire bytes measures the link: smaller ones
#: are mostly round trips and TCP slow start.
MEASURE_STREAM_BYTES = 4 * 1024 * 1024

# Progress frames are sent at most this often: often enough for a smooth bar, rarely
# enough that a sync of many small blobs is not dominated by them.
PROGRESS_INTERVAL_S = 0.25

# Recipes fetched ahead of the blob being copied, requested together. A recipe is ~36
# bytes per chunk; eight ahead hide the round trip of each small blob.
RECIPE_PREFETCH = 8
#: Batches of fetched chunks that may wait for the blob hash (a batch is at most
#: PULL_BATCH_BYTES): the bound on memory when hashing lags behind the link.
HASH_LAG_BATCHES = 16
#: Blobs up to this size are copied side by side, at most SMALL_BLOBS_AT_ONCE at a time.
SMALL_BLOB = 1024 * 1024
SMALL_BLOBS_AT_ONCE = 8
#: Pieces of a whole-blob delta that may wait for the rebuild before the transfer waits.
DELTA_PIECES_AHEAD = 4

Run = Callable[..., Awaitable[Any]]  # runs a sync store call in a worker thread


@dataclass
class SyncReport:
    """Totals of one sync; ``as_dict`` is what SYNC_DONE and `casctl sync --json` carry."""

    dry_run: bool = False
    blobs: int = 0
    blobs_copied: int = 0
    blobs_present: int = 0
    blobs_unchanged: int = 0
    chunks: int = 0  # chunks of the blobs that had to be copied
    chunks_fetched: int = 0
    chunks_reused: int = 0
    chunks_delta: int = 0  # fetched chunks that came encoded against an older version
    bytes_total: int = 0  # size of the blobs that had to be copied
    bytes_fetched: int = 0  # chunk payload that crossed (compressed where it was)
    bytes_raw_fetched: int = 0  # the same chunks, uncompressed
    wire_bytes: int = 0
    # Deltas as this side saw them: raw and wire size, decode time, deltas re-fetched whole.
    delta_raw_bytes: int = 0
    delta_wire_bytes: int = 0
    delta_decode_s: float = 0.0
    delta_fallbacks: int = 0
    # Blobs that came as one whole-blob delta (casd.blobdelta), and those deltas' size.
    blobs_as_delta: int = 0
    blob_delta_bytes: int = 0
    # Missing chunks that came as one frame against the old version (casd.chunkdelta):
    # frames, their wire bytes and the chunk bytes they carried; the link rate the choice
    # used (bytes/s, 0: none), and the chunk deltas that failed and came plain instead.
    chunk_delta_frames: int = 0
    chunk_delta_bytes: int = 0
    chunk_delta_raw: int = 0
    chunk_delta_fallbacks: int = 0
    delta_choice: str = ""
    # Small new chunks whose bytes came in the recipe instead of their ids (RECIPE_INLINE,
    # casd.recipeinline): how many, their size, and the frame that carried them.
    chunks_inlined: int = 0
    inline_raw_bytes: int = 0
    inline_wire_bytes: int = 0
    inline_fallbacks: int = 0  # answers whose bytes did not decode against our base
    # Per blob, the recipe entries that came inlined: held when the blob is copied, but
    # moved, not reused.
    inlined_entries: dict[str, int] = field(default_factory=dict)
    # Layers that came as their compressed bytes (no old version to encode against), and
    # the wire bytes they took.
    layers_streamed: int = 0
    layer_stream_bytes: int = 0
    # Layers with an old version here that still came as their compressed bytes: made by
    # Go's gzip, on a link where they cross sooner than casd-gogzip makes them again.
    layers_whole: int = 0
    # Streamed layers whose tar is stored after the sync (casd.oci.landing): they serve
    # from the layer cache meanwhile.
    layers_deferred: int = 0
    # The chunk stream of blobs large enough to measure the link by: wire bytes, seconds,
    # and the raw size of the chunks it carried.
    stream_wire: int = 0
    stream_s: float = 0.0
    stream_raw: int = 0
    # What a probe (the first chunks of a blob, to choose frames by) measured: the rate
    # and the wire bytes per raw byte; 0 where none ran. A probe's chunks come in small
    # batches and are no stream above, and its figure is the one the choice took: the
    # next sync from this source starts from it (a blob lacking too little to probe then
    # still has a rate to choose by).
    probed_rate: float = 0.0
    probed_wire_per_raw: float = 0.0
    # The source's choice and cost while this sync ran (its server-wide counters).
    source: dict[str, int | float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    items: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def link(self) -> blobdelta.Link | None:
        """What the chunk stream found, where it moved enough to tell; else what a probe
        found."""
        if self.stream_s > 0 and self.stream_raw > 0:
            return blobdelta.Link(
                self.stream_wire / self.stream_s, self.stream_wire / self.stream_raw
            )
        if self.probed_rate > 0:
            return blobdelta.Link(self.probed_rate, self.probed_wire_per_raw)
        return None

    def as_dict(self) -> dict[str, int | float | str]:
        seconds = time.monotonic() - self.started
        return {
            "dry_run": int(self.dry_run),
            "blobs": self.blobs,
            "blobs_copied": self.blobs_copied,
            "blobs_present": self.blobs_present,
            "blobs_unchanged": self.blobs_unchanged,
            "chunks": self.chunks,
            "chunks_fetched": self.chunks_fetched,
            "chunks_reused": self.chunks_reused,
            "chunks_delta": self.chunks_delta,
            "bytes_total": self.bytes_total,
            "bytes_fetched": self.bytes_fetched,
            "bytes_raw_fetched": self.bytes_raw_fetched,
            "wire_bytes": self.wire_bytes,
            "delta_raw_bytes": self.delta_raw_bytes,
            "delta_wire_bytes": self.delta_wire_bytes,
            "delta_decode_s": round(self.delta_decode_s, 4),
            "delta_fallbacks": self.delta_fallbacks,
            "blobs_as_delta": self.blobs_as_delta,
            "blob_delta_bytes": self.blob_delta_bytes,
            "chunk_delta_frames": self.chunk_delta_frames,
            "chunk_delta_bytes": self.chunk_delta_bytes,
            "chunk_delta_raw": self.chunk_delta_raw,
            "chunk_delta_fallbacks": self.chunk_delta_fallbacks,
            "delta_choice": self.delta_choice,
            "chunks_inlined": self.chunks_inlined,
            "inline_raw_bytes": self.inline_raw_bytes,
            "inline_wire_bytes": self.inline_wire_bytes,
            "inline_fallbacks": self.inline_fallbacks,
            "layers_streamed": self.layers_streamed,
            "layer_stream_bytes": self.layer_stream_bytes,
            "layers_whole": self.layers_whole,
            "layers_deferred": self.layers_deferred,
            "link_mbit": round(self.link.rate * 8 / 1e6, 2) if self.link else 0,
            **{f"source_{k}": v for k, v in self.source.items()},
            "seconds": round(seconds, 4),
        }


class Throttle:
    def __init__(self, send: Callable[[dict[str, int | float | str]], Awaitable[None]] | None):
        self._send = send
        self._last = 0.0

    async def __call__(self, progress: dict[str, int | float | str], force: bool = False) -> None:
        now = time.monotonic()
        if self._send is not None and (force or now - self._last >= PROGRESS_INTERVAL_S):
            self._last = now
            await self._send(progress)


async def resolve_names(
    src: Client, names: list[str], all_names: bool, sizes: dict[str, int] | None = None
) -> list[tuple[str, str]]:
    """(name, digest) pairs to sync. A digest given as a name syncs that blob unnamed.
    ``sizes`` gets the size of each blob the source said (by digest)."""
    if all_names:
        return await src.list_names()
    out = []
    for ref in names:
        try:
            info = await src.stat(ref)
        except PeerRefused as exc:
            if exc.code_name == "NOT_FOUND":
                exc.hint = f"`casctl --server {src.peer.ident} ls` lists what the source has"
            raise
        out.append((ref, info.digest))
        if sizes is not None:
            sizes[info.digest] = info.size
    return out


#: A missing chunk's bases are at most this many times its size (but at least
#: BASE_BUDGET_MIN bytes): encoding and decoding cost grows with the prefix.
BASE_BUDGET_FACTOR = 4
BASE_BUDGET_MIN = 8 * 1024
#: Chunks smaller than this get no bases: a 512-byte tar header saves ~100 bytes as a
#: delta, less than the round of prefix setup costs in CPU at both ends.
MIN_DELTA_CHUNK = 2048


def choose_bases(
    recipe: casproto.Recipe | Recipe,
    need: list[tuple[bytes, int]],
    old: Recipe,
    max_bases: int = casproto.MAX_BASES,
) -> dict[bytes, tuple[bytes, ...]]:
    """For each missing chunk, the chunks of the old version most likely to resemble it.

    Chunks both versions share are anchors. A run of new chunks between two anchors
    replaced the old chunks between the same anchors, so those are its bases; in a long
    run, each new chunk gets the old chunks at the same relative byte position (the
    window zstd can reach). No anchor before or after: the run is aligned to the old
    blob's start or end.
    """
    missing = {cid for cid, _ in need}
    old_pos: dict[bytes, int] = {}
    for i, cid in enumerate(old.ids):
        old_pos.setdefault(cid, i)
    old_offsets = [0]
    for size in old.sizes:
        old_offsets.append(old_offsets[-1] + size)
    out: dict[bytes, tuple[bytes, ...]] = {}
    ids, sizes = recipe.ids, recipe.sizes
    i = 0
    prev_anchor = -1  # index in old.ids of the last anchor seen
    while i < len(ids):
        if ids[i] in old_pos:
            prev_anchor = old_pos[ids[i]]
            i += 1
            continue
        j = i  # the run of chunks the old version lacks: ids[i:j]
        while j < len(ids) and ids[j] not in old_pos:
            j += 1
        next_anchor = old_pos[ids[j]] if j < len(ids) else len(old.ids)
        lo, hi = prev_anchor + 1, next_anchor  # old chunks between the anchors
        if lo >= hi:
            i = j
            continue
        run_bytes = sum(sizes[i:j]) or 1
        old_start, old_bytes = old_offsets[lo], old_offsets[hi] - old_offsets[lo]
        done = 0
        for k in range(i, j):
            if ids[k] in missing and ids[k] not in out and sizes[k] >= MIN_DELTA_CHUNK:
                # Map this chunk's place in the run onto the old run by proportion, and
                # take the old chunks nearest it, up to a byte budget: zstd indexes the
                # whole prefix, so a 512-byte tar header must not drag in 2 MiB of bases.
                at = old_start + old_bytes * done // run_bytes
                centre = min(max(_index_at(old_offsets, at), lo), hi - 1)
                budget = max(BASE_BUDGET_FACTOR * sizes[k], BASE_BUDGET_MIN)
                a = b = centre
                total = old.sizes[centre]
                while b - a + 1 < max_bases:
                    grow_right = b + 1 < hi and (a <= lo or b - centre <= centre - a)
                    nxt = b + 1 if grow_right else a - 1
                    if nxt < lo or nxt >= hi or total + old.sizes[nxt] > budget:
                        break
                    total += old.sizes[nxt]
                    a, b = min(a, nxt), max(b, nxt)
                out[ids[k]] = tuple(old.ids[p] for p in range(a, b + 1))
            done += sizes[k]
        i = j
    return out


def _index_at(offsets: list[int], at: int) -> int:
    import bisect

    return max(0, bisect.bisect_right(offsets, at) - 1)


def _missing(recipe: casproto.Recipe, have: list[bool]) -> list[tuple[bytes, int]]:
    """Distinct (id, size) the destination lacks, in order of first appearance."""
    seen: set[bytes] = set()
    need = []
    held = dict(zip(_distinct(recipe.ids), have, strict=True))
    for cid, size in zip(recipe.ids, recipe.sizes, strict=True):
        if cid not in seen and not held[cid]:
            need.append((cid, size))
        seen.add(cid)
    return need


def _first_places(recipe: casproto.Recipe, need: list[tuple[bytes, int]]) -> list[int]:
    """Where each of ``need`` first appears in ``recipe`` (ascending, as ``need`` is in
    order of first appearance)."""
    first: dict[bytes, int] = {}
    for k, cid in enumerate(recipe.ids):
        first.setdefault(cid, k)
    return [first[cid] for cid, _ in need]


def _distinct(ids: tuple[bytes, ...]) -> list[bytes]:
    return list(dict.fromkeys(ids))


class _BaseReader:
    """The bytes of delta bases (chunks of the old version) from the store, for decoding
    deltas. Neighbouring chunks list the same bases, so recently read ones are kept, up
    to ``limit`` bytes. Thread-safe: the two threads that verify a batch share it."""

    def __init__(self, store: Store, limit: int = 8 * 1024 * 1024) -> None:
        self._store = store
        self._limit = limit
        self._held = 0
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, cid: bytes) -> bytes:
        with self._lock:
            data = self._cache.get(cid)
            if data is not None:
                self._cache.move_to_end(cid)
                return data
        data = self._store.get_chunk(cid)  # outside the lock: decoding releases the GIL
        with self._lock:
            if cid not in self._cache:
                self._cache[cid] = data
                self._held += len(data)
                while self._held > self._limit:
                    _, old = self._cache.popitem(last=False)
                    self._held -= len(old)
        return data

    def read(self, ids: tuple[bytes, ...]) -> bytes:
        return b"".join(self._get(i) for i in ids)


#: The blob hash reads the chunks held before in stretches of about this many bytes.
HASH_READ_BYTES = 4 * 1024 * 1024

_read_ahead_pool = SharedPool(2, "casd-read-ahead").get


class _OrderedHasher:
    """sha256 of a blob fed as its chunks become available, in recipe order.

    Fetched chunks arrive in order of first appearance, so hashing follows the transfer
    instead of re-reading the whole blob after it; chunks held before (or repeated) are
    read from the store when their turn comes. Worker-thread calls, one at a time.
    """

    def __init__(
        self,
        recipe: casproto.Recipe,
        store: Store,
        held: list[bytes],
        tee: Callable[[bytes], None] | None = None,
    ) -> None:
        self._recipe = recipe
        self._store = store
        self._available = set(held)
        self._pos = 0
        self._sha = hashlib.sha256()
        # Also handed every byte of the blob, in order (an OCI layer re-encodes as it lands).
        self._tee = tee

    def advance(self, fresh: dict[bytes, bytes]) -> None:
        """Hash on as far as the chunks at hand reach. ``fresh``: chunks not in the store
        yet (a chunk of an earlier call must be stored by now: it is read from there)."""
        self._available.update(fresh)
        ids, sizes = self._recipe.ids, self._recipe.sizes
        # The stretches that can be hashed now, each read in one go.
        stretches: list[tuple[int, int, int]] = []
        pos = self._pos
        while pos < len(ids) and ids[pos] in self._available:
            start, end, nbytes = pos, pos, 0
            while end < len(ids) and ids[end] in self._available and nbytes < HASH_READ_BYTES:
                nbytes += sizes[end]
                end += 1
            stretches.append((start, end, nbytes))
            pos = end
        if not stretches:
            return

        def read(k: int) -> list[bytes]:
            start, end, _ = stretches[k]
            return self._store.get_chunks([c for c in ids[start:end] if c not in fresh])

        # The next stretch's held chunks are read (decompressed) in another thread while
        # this one is hashed and re-encoded: after the last chunk of a 122 MB layer had
        # arrived, hashing the chunks held before still took 0.5 s over 1 Gbit/s, one
        # step after another in one thread.
        pool = _read_ahead_pool()
        ahead = pool.submit(read, 0)
        try:
            for k, (start, end, nbytes) in enumerate(stretches):
                held_now = ahead.result()
                if k + 1 < len(stretches):
                    ahead = pool.submit(read, k + 1)
                held = iter(held_now)
                # Hashed and handed on as one stretch: per chunk (21,800 in a 122 MB
                # layer) the calls cost more than the copy that joins them.
                pieces = [fresh.get(ids[i]) for i in range(start, end)]
                stretch = b"".join([p if p is not None else next(held) for p in pieces])
                if len(stretch) != nbytes:
                    raise DigestMismatch(
                        self._recipe.digest,
                        f"{len(stretch)} bytes where the recipe has {nbytes} "
                        f"(entries {start}-{end})",
                    )
                self._sha.update(stretch)
                if self._tee is not None:
                    self._tee(stretch)
                self._pos = end
        finally:
            # No read outlives the call (nor its errors, raised by result() if waited on).
            if not ahead.cancel():
                with contextlib.suppress(Exception):
                    ahead.result()

    def finish(self) -> str:
        self.advance({})
        if self._pos != len(self._recipe.ids):
            raise DigestMismatch(self._recipe.digest, "an incomplete blob")
        return format_digest(self._sha.digest())


async def sync_into_store(
    src: Client,
    store: Store,
    run: Run,
    pairs: list[tuple[str, str]],
    *,
    dry_run: bool = False,
    on_progress: Callable[[dict[str, int | float | str]], Awaitable[None]] | None = None,
    base_hints: dict[str, str] | None = None,
    defer_names: list[tuple[str, str]] | None = None,
    on_blob: Callable[[str], Awaitable[None]] | None = None,
    tee: Callable[[str], Callable[[bytes], None] | None] | None = None,
    link: blobdelta.Link | None = None,
    cut: Callable[[str], Cut] | None = None,
    sizes: dict[str, int] | None = None,
) -> SyncReport:
    """Direct mode: copy blobs from the ``src`` server into the local ``store``.

    ``sizes``: the blobs' sizes, where the caller knows them (a manifest says those of
    its config and layers): a blob of one chunk then has its chunk asked for with its
    recipe, in the same round trip (Client.first_chunk).

    ``base_hints`` maps a digest to a local blob to delta-encode it against when it has
    no previous version under its name (OCI layers: the same layer of the previous
    image). With ``defer_names`` the names are not moved but appended there, so a caller
    can first complete what the blobs reference (an image's layers) and tag after.
    ``on_blob(digest)`` is awaited after each blob this call copies is committed.
    ``tee(digest)`` may return a function that is handed the blob's bytes in order as they
    are hashed (in a worker thread), so work on them overlaps the transfer; a second call
    for the same digest means the first attempt was abandoned.

    A blob with a base here may instead come as one whole-blob delta (casd.blobdelta)
    where, over ``link`` (as earlier syncs from this source measured it), the bytes it
    would save outweigh its CPU; ``cut(digest)`` cuts the rebuilt blob (an OCI
    layer's tar is cut at its members, as the source cut it). Any failure falls back to
    chunks.

    Raises:
        PeerRefused, PeerGone: the source failed; what was stored so far stays.
        ChunkCorrupt, DigestMismatch: the source sent bad data; nothing of it is visible.
        NoSpace, StoreError: the local store failed.
    """
    report = SyncReport(dry_run=dry_run)
    wire_before = src.peer.wire_bytes
    delta_before = src.delta.snapshot()
    progress = Throttle(on_progress)
    local_names = dict(await run(store.list_names))
    held = await run(lambda: [store.has_blob(d) for _, d in pairs])
    # Recipes of the blobs to copy are fetched ahead, in order, while earlier blobs'
    # chunks stream: many small blobs cost no round trip each.
    to_fetch = list(dict.fromkeys(d for (_, d), h in zip(pairs, held, strict=True) if not h))
    recipes_in, recipes_out = trio.open_memory_channel[casproto.Recipe](RECIPE_PREFETCH)
    single = set() if dry_run else {d for d, n in (sizes or {}).items() if src.one_chunk(n)}
    firsts: dict[str, casproto.Chunk | casproto.ChunkPack | None] = {}
    base_of: dict[str, str] = {}
    for name, digest in pairs:
        if (old := _old_version(name, digest, local_names, base_hints or {})) is not None:
            base_of.setdefault(digest, old)

    async def prefetch() -> None:
        # RECIPE_PREFETCH requests go out together: the recipes of an image's config and
        # layer records cost one round trip, not one each.
        got: dict[str, casproto.Recipe] = {}

        async def recipe_of(digest: str) -> casproto.Recipe:
            # The old version's recipe, where this side holds one: the new recipe then
            # comes encoded against it, and the ids both share cost next to nothing; the
            # small new chunks (new tar headers) come in it as bytes, not ids, encoded
            # against the old version's where deltas are allowed and, over the link as
            # an earlier sync measured it, that pays.
            base = base_of.get(digest)
            old = await run(_held_recipe, store, base) if base else None
            if old is None:
                return await src.fetch_recipe(digest)
            ask = (old.digest, casproto.pack_entries(old.ids, old.sizes))
            rate = int(link.rate) if link is not None and src.allow_deltas else 0
            got = await src.fetch_recipe_inline(digest, ask, recipeinline.ASK, rate)
            if isinstance(got, casproto.Recipe):
                return got
            try:
                recipe: casproto.Recipe
                chunks: list[tuple[bytes, bytes]]
                recipe, chunks = await run(_store_inlined, store, got, old)
            except (recipeinline.InlineMismatch, ChunkMissing, ChunkCorrupt) as exc:
                # Our copy of the base reads otherwise than the source's (damage the store
                # did or did not notice): the chunks come the ordinary way, checked each.
                log.warning("%s: %s; fetching the recipe again without them", digest, exc)
                report.inline_fallbacks += 1
                return await src.fetch_recipe(digest, ask)
            except ValueError as exc:
                raise PeerError(
                    f"{src.peer.ident} sent inlined chunks that break the protocol: {exc}"
                ) from None
            # Counted here, not in the worker: several recipes are fetched at once.
            report.chunks_inlined += len(chunks)
            report.inline_raw_bytes += sum(len(d) for _, d in chunks)
            report.inline_wire_bytes += len(got.frame)
            report.inlined_entries[digest] = got.recipe.ids.count(casproto.INLINE_ID)
            return recipe

        async def one(digest: str) -> None:
            if digest not in single:
                got[digest] = await recipe_of(digest)
                return

            async def first() -> None:
                firsts[digest] = await src.first_chunk(digest)

            async with open_nursery() as both:
                both.start_soon(first)
                got[digest] = await recipe_of(digest)

        async with recipes_in:
            for i in range(0, len(to_fetch), RECIPE_PREFETCH):
                window = to_fetch[i : i + RECIPE_PREFETCH]
                async with open_nursery() as fetchers:
                    for digest in window:
                        fetchers.start_soon(one, digest)
                for digest in window:
                    await recipes_in.send(got.pop(digest))

    async with open_nursery() as nursery, recipes_out:
        nursery.start_soon(prefetch)
        await _copy_all(
            src,
            store,
            run,
            pairs,
            recipes_out,
            local_names,
            report,
            progress,
            wire_before,
            dry_run,
            base_hints or {},
            defer_names,
            on_blob,
            tee,
            link,
            cut,
            firsts,
        )
    report.wire_bytes = src.peer.wire_bytes - wire_before
    _, raw, wire, decode_s, fallbacks = (
        a - b for a, b in zip(src.delta.snapshot(), delta_before, strict=True)
    )
    report.delta_raw_bytes, report.delta_wire_bytes = int(raw), int(wire)
    report.delta_decode_s, report.delta_fallbacks = float(decode_s), int(fallbacks)
    return report


#: Source counters a sync reports the change of (casd stats names).
SOURCE_DELTA_STATS = (
    "delta_batches",
    "plain_batches",
    "delta_encode_s",
    "delta_bytes_saved",
    "blob_delta_encode_s",
    "chunk_delta_encode_s",
)


async def source_delta_stats(src: Client) -> dict[str, int | float]:
    """The source's delta counters now; a sync reports their change."""
    return delta_counters(await src.stats())


def delta_counters(stats: dict[str, Any]) -> dict[str, int | float]:
    """The delta counters of a source's ``stats``."""
    return {k: v for k in SOURCE_DELTA_STATS if isinstance(v := stats.get(k, 0), int | float)}


async def _copy_all(
    src: Client,
    store: Store,
    run: Run,
    pairs: list[tuple[str, str]],
    recipes: trio.MemoryReceiveChannel[casproto.Recipe],
    local_names: dict[str, str],
    report: SyncReport,
    progress: Throttle,
    wire_before: int,
    dry_run: bool,
    base_hints: dict[str, str],
    defer_names: list[tuple[str, str]] | None,
    on_blob: Callable[[str], Awaitable[None]] | None = None,
    tee: Callable[[str], Callable[[bytes], None] | None] | None = None,
    link: blobdelta.Link | None = None,
    cut: Callable[[str], Cut] | None = None,
    firsts: dict[str, casproto.Chunk | casproto.ChunkPack | None] | None = None,
) -> None:
    seen: dict[str, casproto.Recipe] = {}
    # Report items in the order of ``pairs``, whichever blob finishes first.
    items: list[tuple[str, str, str] | None] = []

    async def copy(name: str, digest: str, recipe: casproto.Recipe, slot: int) -> None:
        named = not is_digest(name)
        # Leased before has_chunks: gc spares these chunks until the commit (casd.leases).
        lease = await run(leases_for(store).lease, recipe.ids)
        have = await run(store.has_chunks, _distinct(recipe.ids))
        need = _missing(recipe, have)
        report.chunks += len(recipe.ids)
        report.chunks_reused += len(recipe.ids) - len(need)
        report.chunks_reused -= report.inlined_entries.pop(digest, 0)
        report.bytes_total += recipe.size
        first = (firsts or {}).pop(digest, None)
        if need and need[0][0] == recipe.ids[0] and (got := first_chunk_of(first, recipe)):
            # Asked for with the recipe (a blob of one chunk): here already, checked.
            await run(_store_verified, store, [got])
            need = need[1:]
            report.chunks_fetched += 1
            report.bytes_raw_fetched += len(got.data)
            report.bytes_fetched += len(got.payload)
        if dry_run:
            report.chunks_fetched += len(need)
            report.bytes_raw_fetched += sum(size for _, size in need)
            items[slot] = (name, digest, "would-copy")
            return

        old_digest = _old_version(name, digest, local_names, base_hints)
        if old_digest is not None and not await run(store.has_blob, old_digest):
            old_digest = None
        committed = False  # a whole-blob delta commits the blob as it rebuilds it
        if (
            old_digest is not None
            and link is not None
            and chunkdelta.OP in src.unsupported_ops  # an older source: the whole blob
            and blobdelta.pays(await run(_chunk_wire, store, need, old_digest), recipe.size, link)
        ):
            try:
                await _copy_as_delta(src, store, run, recipe, old_digest, report, cut, tee)
                committed = True
            except (PeerRefused, UserError, StoreError) as exc:
                if isinstance(exc, NoSpace):
                    raise
                # The source lacks the base or the operation, or the delta was bad: no
                # harm done (nothing of it is visible), the chunks still come.
                log.warning("%s: whole-blob delta failed (%s); fetching chunks", digest, exc)
        if not committed:
            await _fetch_as_chunks(
                src,
                store,
                run,
                name,
                recipe,
                need,
                old_digest,
                report,
                progress,
                wire_before,
                tee,
                link,
            )
        if named and defer_names is not None:
            defer_names.append((name, digest))
            named = False
        if not committed:
            local = Recipe(digest, recipe.size, recipe.ids, recipe.sizes)
            await run(store.commit_blob, local, name if named else None)
        elif named:
            await run(store.tag, name, digest)
        lease.release()
        report.blobs_copied += 1
        items[slot] = (name, digest, "copied")
        if on_blob is not None:
            await on_blob(digest)
        await progress(_progress(report, name, src, wire_before), force=True)

    # Small blobs (an image's config, layer records) are copied side by side: each costs
    # round trips more than bytes, and one after another they added up to one round
    # trip per blob. Large ones go one at a time, each at the link's full rate.
    small = trio.CapacityLimiter(SMALL_BLOBS_AT_ONCE)

    running: dict[str, trio.Event] = {}

    async def copy_small(name: str, digest: str, recipe: casproto.Recipe, slot: int) -> None:
        try:
            async with small:
                await copy(name, digest, recipe, slot)
        finally:
            running.pop(digest).set()

    async with open_nursery() as nursery:
        for name, digest in pairs:
            report.blobs += 1
            slot = len(items)
            items.append(None)
            named = not is_digest(name)
            if (copying := running.get(digest)) is not None:
                await copying.wait()  # the same blob under another name: copied once
            if await run(store.has_blob, digest):
                if named and local_names.get(name) == digest:
                    report.blobs_unchanged += 1
                    items[slot] = (name, digest, "unchanged")
                    continue
                report.blobs_present += 1
                if dry_run:
                    items[slot] = (name, digest, "would-tag")
                    continue
                if named and defer_names is not None:
                    defer_names.append((name, digest))
                elif named:
                    await run(store.tag, name, digest)
                items[slot] = (name, digest, "present")
                continue
            recipe = seen.get(digest)
            if recipe is None:  # the first time this digest needs its recipe
                recipe = seen[digest] = await recipes.receive()
                assert recipe.digest == digest  # prefetched in the same order
            if recipe.size <= SMALL_BLOB:
                running[digest] = trio.Event()
                nursery.start_soon(copy_small, name, digest, recipe, slot)
            else:
                await copy(name, digest, recipe, slot)
    report.items.extend(item for item in items if item is not None)


def _old_version(
    name: str, digest: str, local_names: dict[str, str], base_hints: dict[str, str]
) -> str | None:
    """The blob ``digest`` is most likely a new version of, as far as names tell: the one
    held under the same name, or for an unnamed blob the caller's hint."""
    old = base_hints.get(digest) if is_digest(name) else local_names.get(name)
    return None if old == digest else old


def _held_recipe(store: Store, digest: str) -> Recipe | None:
    """``digest``'s recipe, if it is held: a recipe delta's base."""
    try:
        return store.get_recipe(digest)
    except BlobMissing:
        return None


def _store_inlined(
    store: Store, got: Inlined, base: Recipe
) -> tuple[casproto.Recipe, list[tuple[bytes, bytes]]]:
    """The recipe of a RECIPE_INLINE, and its inlined chunks, decoded against ``base`` and
    stored (their ids are their hashes, computed here). Worker thread.

    Raises:
        InlineMismatch, ValueError: as recipeinline.decode; nothing was stored.
        NoSpace, StoreError: the store failed.
    """
    r = got.recipe
    ids, chunks = recipeinline.decode(
        store, r.ids, r.sizes, base, got.limit, got.against_base, got.inline_sum, got.frame
    )
    store.put_chunks([ChunkIn(cid, data) for cid, data in chunks], verify=False)
    return casproto.Recipe(0, r.digest, r.size, ids, r.sizes, True), chunks


#: Chunks of the old version whose stored size _chunk_wire looks up, at most (about).
WIRE_SAMPLE = 1024


def _chunk_wire(store: Store, need: list[tuple[bytes, int]], old_digest: str) -> float:
    """About what the chunks in ``need`` would put on the wire: their raw size, times
    how much the old version compresses as this store holds it (chunks go as the
    source stores them, and the old version is the nearest content to judge by; the
    last stream's own figure is of other content, tar headers for one)."""
    old = store.get_recipe(old_digest)
    distinct = dict(zip(old.ids, old.sizes, strict=True))
    # A sample judges the ratio as well as the whole: every chunk of a 21,800-chunk layer
    # took 80-110 ms of index lookups here, before the first chunk could be asked for.
    step = max(1, len(distinct) // WIRE_SAMPLE)
    sample = list(distinct)[::step]
    raw = sum(distinct[c] for c in sample)
    ratio = store.stored_bytes(sample) / raw if raw else 1.0
    return sum(size for _, size in need) * ratio


def _store_verified(store: Store, chunks: list[VerifiedChunk]) -> None:
    # Verified when they arrived (casd.client.verify_chunks): stored without hashing
    # again, in the compressed form they came in.
    batch = [ChunkIn(c.id, c.data, c.codec, c.payload, decoded_from_encoded=True) for c in chunks]
    store.put_chunks(batch, verify=False)


async def _fetch_as_chunks(
    src: Client,
    store: Store,
    run: Run,
    name: str,
    recipe: casproto.Recipe,
    need: list[tuple[bytes, int]],
    old_digest: str | None,
    report: SyncReport,
    progress: Throttle,
    wire_before: int,
    tee: Callable[[str], Callable[[bytes], None] | None] | None,
    link: blobdelta.Link | None = None,
) -> None:
    """Fetch the chunks of ``recipe`` this store lacks (``need``), and check the blob's
    digest; the caller commits it. With an old version ``old_digest`` here, they may
    come as one frame against it (casd.chunkdelta) where that saves more link time than
    it costs, ``link`` or a first stretch of plain chunks telling the link's rate; else,
    and for what such a frame failed to bring, as chunks the source may delta-encode
    one by one where it finds that pays."""
    digest = recipe.digest
    missing = {cid for cid, _ in need}
    hasher = _OrderedHasher(
        recipe,
        store,
        held=[c for c in recipe.ids if c not in missing],
        tee=tee(digest) if tee is not None else None,
    )

    # The blob hash (and a tee such as an OCI layer's re-encoding) follows the transfer
    # in a task of its own: it reads the chunks held before from the store, which must
    # not hold up storing what arrives. The queue bounds how far it may lag.
    to_hash, hash_queue = trio.open_memory_channel[dict[bytes, bytes]](HASH_LAG_BATCHES)

    async def follow() -> None:
        async with hash_queue:
            async for fresh in hash_queue:
                await run(hasher.advance, fresh)

    async def keep(chunks: list[VerifiedChunk]) -> None:
        # The hash takes them from memory, so storing them runs beside it; the next batch
        # comes only once they are stored (the hash reads earlier batches from the store).
        await to_hash.send({c.id: c.data for c in chunks})
        await run(_store_verified, store, chunks)
        report.chunks_delta += sum(c.codec == casproto.Codec.ZSTD_PREFIX for c in chunks)
        report.chunks_fetched += len(chunks)
        report.bytes_raw_fetched += sum(len(c.data) for c in chunks)
        await progress(_progress(report, name, src, wire_before))

    async def plain(
        part: list[tuple[bytes, int]], sink: Any = keep, batch_bytes: int | None = None
    ) -> None:
        bases: dict[bytes, tuple[bytes, ...]] = {}
        if old_digest is not None:
            # The previous version under this name: the natural base to encode against.
            old = await run(store.get_recipe, old_digest)
            bases = await run(choose_bases, recipe, part, old)
        t0, w0, r0 = trio.current_time(), src.peer.wire_bytes, report.bytes_raw_fetched
        report.bytes_fetched += await src.fetch_chunks(
            part,
            sink,
            bases=bases or None,
            read_base=_BaseReader(store).read,
            at=(digest, _first_places(recipe, part)),
            **({"batch_bytes": batch_bytes} if batch_bytes else {}),
        )
        if (wire := src.peer.wire_bytes - w0) >= MEASURE_STREAM_BYTES:
            report.stream_wire += wire
            report.stream_s += trio.current_time() - t0
            report.stream_raw += report.bytes_raw_fetched - r0

    async with open_nursery() as nursery:
        nursery.start_soon(follow)
        async with to_hash:
            rest = need
            if (
                old_digest is not None
                and src.allow_deltas
                and chunkdelta.OP not in src.unsupported_ops
            ):
                rest = await _fetch_as_frame(
                    src, store, run, recipe, need, old_digest, keep, plain, report, link
                )
            if rest:
                await plain(rest)
    actual = await run(hasher.finish)
    if actual != digest:
        raise DigestMismatch(digest, actual)


#: Without a measured link, the chunks a blob lacks start as plain chunks until about this
#: many wire bytes have crossed: their pace tells whether one frame against the old version
#: (casd.chunkdelta) pays for the rest. A blob lacking less than this moves plain.
PROBE_WIRE = 2 * 1024 * 1024
#: Chunks judged to take fewer wire bytes than this come plain without a probe.
PROBE_MIN_WIRE = 4 * PROBE_WIRE
#: Stretches of chunks the probe may take to see PROBE_WIRE / 2 bytes cross.
PROBE_ROUNDS = 3
#: The probe's chunks are asked for in batches of this many bytes: the link is timed from
#: the first batch taken to the last byte, so there must be several.
PROBE_BATCH_BYTES = 256 * 1024
#: Pieces of a chunk-delta frame that may wait for the decoder before the transfer waits.
FRAME_PIECES_AHEAD = 4


@dataclass
class _Choice:
    """What a sync chose for a blob's missing chunks, and why (``delta_choice``)."""

    report: SyncReport
    digest: str

    def say(self, what: str) -> None:
        r = self.report
        r.delta_choice = "; ".join(x for x in (r.delta_choice, f"{self.digest[:19]}: {what}") if x)


def _rate(first: tuple[float, int] | None, last: tuple[float, int]) -> float | None:
    """Bytes/s the link delivered, from (time, bytes received) when the first chunks were
    taken to when the last byte came: the pace once the stream was under way, without
    the round trip before its first byte. None when nearly everything had come by the
    time the first chunks were taken: this host, not the link, set the pace."""
    if first is None:
        return None
    (t0, b0), (t1, b1) = first, last
    if t1 <= t0 or b1 - b0 < PROBE_WIRE // 4:
        return None
    return (b1 - b0) / (t1 - t0)


async def _fetch_as_frame(
    src: Client,
    store: Store,
    run: Run,
    recipe: casproto.Recipe,
    need: list[tuple[bytes, int]],
    old_digest: str,
    keep: Callable[[list[VerifiedChunk]], Awaitable[None]],
    plain: Callable[..., Awaitable[None]],
    report: SyncReport,
    link: blobdelta.Link | None,
) -> list[tuple[bytes, int]]:
    """Fetch what of ``need`` pays as one frame against the old version ``old_digest``
    (casd.chunkdelta), handing the chunks to ``keep`` verified; what is left to fetch
    as plain chunks. Where ``link`` does not say the link's rate, a first stretch of
    ``need`` comes plain (by ``plain``) and its pace does. A frame that fails leaves
    what it did not bring to the plain chunks: nothing unverified is kept."""
    old = await run(store.get_recipe, old_digest)
    raw = sum(size for _, size in need)
    if not raw:
        return need
    wire_per_raw = await run(_chunk_wire, store, need, old_digest) / raw
    rest = need
    rate = link.rate if link is not None else None
    choice = _Choice(report, recipe.digest)
    if rate is None and raw * wire_per_raw < PROBE_MIN_WIRE:
        # Probing costs round trips, which over a fast link a small transfer does not win
        # back; and what frames could save of it is little over any link.
        choice.say("plain: too little missing to measure the link by")
        return need
    if rate is None:
        first: list[tuple[float, int]] = []

        async def timed(chunks: list[VerifiedChunk]) -> None:
            if not first:
                first.append((trio.current_time(), src.peer.bytes_received))
            await keep(chunks)

        start = (trio.current_time(), src.peer.wire_bytes)
        probed_raw = crossed = 0
        for _ in range(PROBE_ROUNDS):
            # Chunks judged to take what the probe still lacks; judged again on what the
            # earlier ones really took (they may come as deltas, or compress better).
            cut, wire = 0, 0.0
            while cut < len(rest) and wire < PROBE_WIRE - crossed:
                wire += rest[cut][1] * wire_per_raw
                cut += 1
            if cut >= len(rest):
                choice.say(
                    f"plain: the first chunks took {crossed} bytes, far fewer than judged, "
                    "and the rest is too little to measure the link by"
                )
                return rest
            probe, rest = rest[:cut], rest[cut:]
            await plain(probe, timed, PROBE_BATCH_BYTES)
            probed_raw += sum(size for _, size in probe)
            crossed = src.peer.wire_bytes - start[1]
            wire_per_raw = crossed / max(1, probed_raw)
            if crossed >= PROBE_WIRE // 2:
                break
        if crossed < PROBE_WIRE // 2:
            choice.say(f"plain: the first chunks ({crossed} bytes) did not tell the link's rate")
            return rest
        rate = _rate(first[0] if first else None, (src.peer.received_at, src.peer.bytes_received))
        if rate is None:
            choice.say("plain: the chunks came faster than this host took them")
            return rest
        report.probed_rate, report.probed_wire_per_raw = rate, wire_per_raw
    rest_raw = sum(size for _, size in rest)
    wins = await run(chunkdelta.windows, recipe.ids, recipe.sizes, rest, old.ids, old.sizes)
    prefix_bytes = sum(w.prefix for w in wins)
    mbit = f"{rate * 8 / 1e6:.0f} Mbit/s"
    if not chunkdelta.pays(rest_raw * wire_per_raw, wins, rest_raw, rate):
        choice.say(
            f"plain: {len(wins)} frames against {prefix_bytes / 1e6:.1f} MB of the old "
            f"version cost more than they save at {mbit}"
        )
        return rest
    choice.say(
        f"{len(wins)} frames against {prefix_bytes / 1e6:.1f} MB of the old version at {mbit}"
    )
    kept: set[bytes] = set()
    token = trio.lowlevel.current_trio_token()

    def prefix_of(ranges: Sequence[tuple[int, int]]) -> bytes:
        return chunkdelta.read_prefix(store, old, ranges)

    def consume(pieces: Iterator[bytes]) -> None:
        # In a worker thread: each window's prefix is read while the source reads its own.
        with contextlib.closing(chunkdelta.decode(pieces, wins, prefix_of, rest)) as batches:
            for batch in batches:
                chunks = [
                    VerifiedChunk(cid, data, casproto.Codec.ZSTD_PREFIX, b"") for cid, data in batch
                ]
                trio.from_thread.run(keep, chunks, trio_token=token)
                kept.update(cid for cid, _ in batch)

    request = chunkdelta.Request(
        recipe.digest,
        len(recipe.ids),
        _first_places(recipe, rest),
        old_digest,
        chunkdelta.recipe_sum(old),
        wins,
    )
    src.asked_deltas = True
    try:
        made = await stream_to_thread(
            src, run, chunkdelta.OP, request.as_args(), consume, FRAME_PIECES_AHEAD
        )
    except (PeerRefused, UserError, ChunkCorrupt) as exc:
        if isinstance(exc, PeerRefused) and exc.code_name == "UNSUPPORTED":
            src.unsupported_ops.add(chunkdelta.OP)
        report.chunk_delta_fallbacks += 1
        choice.say(f"failed ({exc}), the rest came plain")
        log.warning("%s: chunk delta failed (%s); fetching chunks", recipe.digest, exc)
        return [x for x in rest if x[0] not in kept]
    report.chunk_delta_frames += 1
    report.chunk_delta_bytes += int(made.get("size", 0))
    report.chunk_delta_raw += rest_raw
    report.bytes_fetched += int(made.get("size", 0))
    return []


async def _copy_as_delta(
    src: Client,
    store: Store,
    run: Run,
    recipe: casproto.Recipe,
    base: str,
    report: SyncReport,
    cut: Callable[[str], Cut] | None,
    tee: Callable[[str], Callable[[bytes], None] | None] | None,
) -> None:
    """Copy ``recipe.digest`` as one whole-blob delta against ``base``, held here and
    (the source is asked) there: the source streams the delta while it encodes it, and
    this side rebuilds the target as the pieces arrive, checking its digest."""
    digest = recipe.digest
    cutter = cut(digest) if cut is not None else Chunker().cut_stream
    feed = tee(digest) if tee is not None else None

    def rebuild(pieces: Iterator[bytes]) -> None:
        blobdelta.rebuild(store, pieces, base, digest, recipe.size, cutter, feed)

    src.asked_deltas = True
    made = await stream_to_thread(
        src, run, "blob.delta", {"target": digest, "base": base}, rebuild, DELTA_PIECES_AHEAD
    )
    report.blobs_as_delta += 1
    report.blob_delta_bytes += int(made.get("size", 0))


async def stream_to_thread(
    src: Client,
    run: Run,
    op: str,
    args: dict[str, Any],
    consume: Callable[[Iterator[bytes]], None],
    ahead: int,
    on_piece: Callable[[int], Awaitable[None]] | None = None,
    on_sent: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Call ``op``, whose answer streams (CALL_DATA), and hand its pieces as they cross to
    ``consume``, run by ``run`` in a worker thread (at most ``ahead`` pieces wait for it);
    ``op``'s result. ``on_piece(size)`` is awaited as each piece arrives (progress);
    ``on_sent()`` is called once the source stopped sending (``consume`` may still be
    at work on the last pieces). A
    stream that fails ends early for ``consume``, and the cause is raised; if
    ``consume`` fails first, the source is told to stop.

    Raises:
        CasdError: the source failed, or ``consume`` did (a bad stream).
    """
    pieces_in, pieces_out = trio.open_memory_channel[bytes](ahead)
    token = trio.lowlevel.current_trio_token()
    made: dict[str, Any] = {}
    failed: list[CasdError] = []

    def pieces() -> Iterator[bytes]:
        # In the consuming worker thread: each piece as it crosses.
        while True:
            try:
                yield trio.from_thread.run(pieces_out.receive, trio_token=token)
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def sink(piece: bytes) -> None:
        await pieces_in.send(piece)
        if on_piece is not None:
            await on_piece(len(piece))

    async def fetch() -> None:
        async with pieces_in:
            try:
                made.update(await src.call_stream(op, args, sink))
            except CasdError as exc:
                # The consumer then sees the stream end early; the cause is this.
                failed.append(exc)
            except trio.BrokenResourceError:
                pass  # the consumer stopped first: it has the error
            finally:
                if on_sent is not None:
                    on_sent()

    try:
        async with open_nursery() as nursery:
            nursery.start_soon(fetch)
            async with pieces_out:
                await run(consume, pieces())
    except CasdError:
        if failed:
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]
    return made


def _progress(
    report: SyncReport, name: str, src: Client, before: int
) -> dict[str, int | float | str]:
    return {
        "name": name,
        "blobs_done": report.blobs_copied + report.blobs_present + report.blobs_unchanged,
        "bytes_done": report.bytes_raw_fetched,
        "chunks_fetched": report.chunks_fetched,
        "wire_bytes": src.peer.wire_bytes - before,
    }


async def relay_sync(
    src: Client,
    dst: Client,
    pairs: list[tuple[str, str]],
    *,
    dry_run: bool = False,
    on_progress: Callable[[dict[str, int | float | str]], Awaitable[None]] | None = None,
) -> SyncReport:
    """Relay mode: move blobs from ``src`` to ``dst`` through this client.

    The destination says which chunks it lacks (it answers the recipe as a push), the
    client fetches exactly those from the source and forwards them; the destination
    verifies every chunk and the digest as for any push.

    Raises:
        PeerRefused, PeerGone: either server failed.
    """
    report = SyncReport(dry_run=dry_run)
    wire_before = src.peer.wire_bytes + dst.peer.wire_bytes
    progress = Throttle(on_progress)
    dst_names = dict(await dst.list_names())
    for name, digest in pairs:
        report.blobs += 1
        named = not is_digest(name)
        try:
            await dst.stat(digest)
            held = True
        except PeerRefused as exc:
            if exc.code_name != "NOT_FOUND":
                raise
            held = False
        if held:
            if named and dst_names.get(name) == digest:
                report.blobs_unchanged += 1
                report.items.append((name, digest, "unchanged"))
                continue
            report.blobs_present += 1
            if not dry_run and named:
                await dst.tag(name, digest)
            report.items.append((name, digest, "would-tag" if dry_run else "present"))
            continue
        recipe = await src.fetch_recipe(digest)
        report.chunks += len(recipe.ids)
        report.bytes_total += recipe.size
        if dry_run:
            distinct = _distinct(recipe.ids)
            need = _missing(recipe, await dst.has(distinct))
            report.chunks_fetched += len(need)
            report.chunks_reused += len(recipe.ids) - len(need)
            report.bytes_raw_fetched += sum(size for _, size in need)
            report.items.append((name, digest, "would-copy"))
            continue
        result = await dst.push_recipe_from(src, recipe, name=name if named else None)
        report.chunks_fetched += result.chunks_transferred
        report.chunks_reused += len(recipe.ids) - result.chunks_transferred
        report.bytes_fetched += result.bytes_transferred
        report.bytes_raw_fetched += result.raw_bytes_transferred
        report.blobs_copied += 1
        report.items.append((name, digest, "copied"))
        await progress(
            {
                "name": name,
                "blobs_done": report.blobs_copied,
                "wire_bytes": src.peer.wire_bytes + dst.peer.wire_bytes - wire_before,
            },
            force=True,
        )
    report.wire_bytes = src.peer.wire_bytes + dst.peer.wire_bytes - wire_before
    return report
