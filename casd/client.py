"""The client side of the casd protocol: requests, pushes and pulls over one connection.

One background task reads frames and routes them by request id to whoever waits for
them, so any number of requests share the connection. Pushes and pulls are pipelined:
the recipe of a push streams while it is being cut, chunks go out as soon as the server
says it lacks them, and a pull keeps a bounded number of bytes of requests in flight, so
throughput does not depend on round-trip time.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import math
import mmap
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, BinaryIO, NoReturn

import casproto
import trio
import xxhash

from casd import __version__, zstd
from casd.address import parse_hostport
from casd.chunking import EMPTY_DIGEST, Chunker, ChunkerParams, chunk_id, format_digest
from casd.deltachoice import DeltaChooser
from casd.errors import (
    CasdError,
    ChunkCorrupt,
    ChunkMissing,
    ConfigError,
    DigestMismatch,
    PeerError,
    PeerGone,
    PeerRefused,
    StoreError,
)
from casd.ingest import MAX_CHUNK_SIZE
from casd.nursery import open_nursery
from casd.peer import PeerConnection, RequestEnded
from casd.refusal import hung_up, refused, tls_context, tls_failed, unreachable
from casd.storage.interface import Recipe
from casd.tcpinfo import delivery

Progress = Callable[[int], None]  # called with bytes of the blob done since the last call

# Recipe entries per PUSH_RECIPE frame, and the most input bytes one batch may cover.
# 8 MiB per batch at ~80 KiB per chunk is ~100 entries (~4 KiB of recipe): the server's
# answer comes back while the next batch is being cut, and a slow pipe holds back at
# most 8 MiB.
PUSH_BATCH_CHUNKS = 1024
PUSH_BATCH_BYTES = 8 * 1024 * 1024

# Cut-but-unanswered batches a push keeps: with the one being sent, at most ~5 x 8 MiB
# pinned in memory, and 32 MiB announced ahead covers a 1 Gbit/s link at 250 ms RTT.
PUSH_WINDOW_BATCHES = 4

# A pull asks for chunks in WANT batches of at most this many bytes, keeping at most
# PULL_WINDOW_BATCHES unanswered: 17 x 2 MiB = 34 MiB in flight, 2.7x the bandwidth-delay
# product of a 1 Gbit/s link at 100 ms RTT (12.5 MB). Chunks are handed on per complete
# batch, so a transfer cut off midway loses at most one batch (2 MiB) of what arrived.
PULL_BATCH_BYTES = 2 * 1024 * 1024
PULL_WINDOW_BATCHES = 16
# A batch with delta bases for some chunks asks for those without by place, in a WANT_AT
# of their own, only when there are at least this many: their ids (32 KiB) take 13 ms
# at 20 Mbit/s, 2.6 ms at 100 Mbit/s, and the second request cost about 10 ms of CPU a
# batch over loopback (0.3 s on 31 batches of 2,761 chunks).
SPLIT_WITHOUT_BASES = 1024

# zstd level for chunks sent over the wire (the server keeps them as sent when that saves
# space, so this is also the level at rest for pushed data). On real files level 1
# compresses 1.4x faster than level 3 for a ratio 1-3 % worse (docs: limits.md).
WIRE_LEVEL = 1
# fetch_chunks stops asking for deltas while more than this share of its time goes into
# waiting for its sink (the receiver's CPU or disk is the bottleneck, not the link).
SINK_BOUND = 0.5
# A reply route that is closed at either end: its request was given up.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
# How long giving up a streamed CALL may wait to tell the server.
CANCEL_SEND_S = 1.0
# The most entries a recipe delta may decode to (a 1 TB blob of 64 KiB chunks has 16 M).
MAX_RECIPE_ENTRIES = 1 << 24
#: Pieces of a streamed CALL (CALL_DATA) held for a slow sink before the connection waits.
CALL_DATA_WINDOW = 16
# Delta bases: how much of an old version a chunk is encoded against, and from what size
# on a chunk is worth it (the same rule as casd.replicate.choose_bases).
MIN_DELTA_CHUNK = 2048
BASE_BUDGET_FACTOR = 4
# zstd level of deltas (see casd.server.service.DELTA_LEVEL).
DELTA_LEVEL = 1

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a put or get did; the fields ``casctl --json`` prints."""

    digest: str
    size: int
    chunks: int
    chunks_transferred: int
    bytes_transferred: int  # chunk payload bytes that crossed (after compression)
    wire_bytes: int  # everything that crossed the socket, both directions
    chunks_from_seeds: int = 0
    new_chunks: int = 0
    raw_bytes_transferred: int = 0  # the transferred chunks, uncompressed
    chunks_delta: int = 0  # transferred chunks that came as deltas against a seed


@dataclass(frozen=True, slots=True)
class Inlined:
    """A RECIPE_INLINE as it came (SPEC §4.1): the recipe, whose inlined entries have the id
    casproto.INLINE_ID, the largest chunk asked to be inlined, whether the server encoded
    them against the base, and their bytes as one frame (casd.recipeinline decodes it)."""

    recipe: casproto.Recipe
    limit: int
    against_base: bool
    inline_sum: int
    frame: bytes | bytearray | memoryview


class Client:
    """A connected, handshaken client. Make one with :func:`open_client`."""

    def __init__(self, peer: PeerConnection, welcome: casproto.Welcome, compress: bool) -> None:
        #: Delta-encoded chunks received on this connection: savings and decode time.
        self.delta = DeltaFigures()
        #: Whether fetches may ask for deltas (WANT_DELTA); `casd serve --no-delta` clears it.
        self.allow_deltas = True
        #: Whether this connection asked the server to encode anything (WANT_DELTA, or a
        #: whole-blob delta): only then can its delta counters have moved on our account.
        self.asked_deltas = False
        #: Operations the server answered UNSUPPORTED (an older casd): not asked again.
        self.unsupported_ops: set[str] = set()
        self.peer = peer
        self.welcome = welcome
        self.features = frozenset(welcome.features)
        self.compress = compress and "zstd" in self.features
        try:
            self.chunker_params: ChunkerParams | None = ChunkerParams.from_dict(welcome.chunker)
        except (CasdError, ValueError):
            self.chunker_params = None  # a server that cuts differently: we only dedup less
        self._rids = itertools.count(1)  # never reused: stale frames can't be mistaken
        self._routes: dict[int, trio.MemorySendChannel[casproto.Message]] = {}
        self._failure: BaseException | None = None

    # --- plumbing ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                ev = await self.peer.next_event()
                if ev is casproto.CLOSED:
                    self._failure = PeerGone(f"server {self.peer.ident} closed the connection")
                    return
                assert isinstance(ev, casproto.Message)
                if isinstance(ev, casproto.Error) and ev.rid == 0:
                    self._failure = refused(ev)
                    return
                route = self._routes.get(ev.rid)
                if route is not None:
                    try:
                        route.send_nowait(ev)
                    except trio.WouldBlock:
                        # Only a bounded route (a streamed CALL) fills up: its reader
                        # paces the stream, and the connection waits for it.
                        with contextlib.suppress(*_GONE):
                            await route.send(ev)
                    except _GONE:
                        pass  # the request was given up meanwhile
        except (PeerGone, casproto.ProtocolError) as exc:
            self._failure = PeerGone(f"connection to {self.peer.ident} failed: {exc}")
        finally:
            for route in self._routes.values():
                route.close()

    def _open(
        self, bound: float = math.inf
    ) -> tuple[int, trio.MemoryReceiveChannel[casproto.Message]]:
        if self._failure is not None:
            raise self._failure
        rid = next(self._rids)
        # Unbounded by default: every stream of replies is bounded by the window of its
        # request. A streamed CALL, whose length the server decides, is bounded here.
        send, recv = trio.open_memory_channel[casproto.Message](bound)
        self._routes[rid] = send
        return rid, recv

    def _close(self, rid: int) -> None:
        route = self._routes.pop(rid, None)
        if route is not None:
            route.close()

    async def _reply(self, recv: trio.MemoryReceiveChannel[casproto.Message]) -> Any:
        try:
            ev = await recv.receive()
        except trio.EndOfChannel:
            raise self._failure or PeerGone("connection closed") from None
        if isinstance(ev, casproto.Error):
            raise refused(ev)
        return ev

    async def _call(self, make: Callable[[int], casproto.Message]) -> Any:
        rid, recv = self._open()
        try:
            await self.peer.send(make(rid))
            return await self._reply(recv)
        finally:
            self._close(rid)

    # --- simple requests -----------------------------------------------------------------

    async def has(self, ids: list[bytes]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(ids), casproto.MAX_BATCH):
            part = tuple(ids[start : start + casproto.MAX_BATCH])

            def has(rid: int, part: tuple[bytes, ...] = part) -> casproto.Message:
                return casproto.Has(rid, part)

            reply = await self._call(has)
            out.extend(casproto.unpack_bitmap(reply.bitmap, len(part)))
        return out

    async def stat(self, ref: str) -> casproto.BlobInfo:
        reply: casproto.BlobInfo = await self._call(lambda rid: casproto.Stat(rid, ref))
        return reply

    async def list_names(self, prefix: str = "") -> list[tuple[str, str]]:
        reply = await self._call(lambda rid: casproto.ListNames(rid, prefix))
        return [(name, digest) for name, digest in reply.entries]

    async def tag(self, name: str, digest: str) -> None:
        await self._call(lambda rid: casproto.Tag(rid, name, digest))

    async def untag(self, name: str) -> None:
        await self._call(lambda rid: casproto.Untag(rid, name))

    async def stats(self) -> dict[str, int | float | str]:
        reply = await self._call(lambda rid: casproto.Stats(rid))
        return dict(reply.stats)

    async def fsck(
        self, *, deep: bool = False, repair_from: str | None = None, token: str | None = None
    ) -> casproto.FsckDone:
        """Ask this server to check its store (and repair it from ``repair_from``)."""
        reply: casproto.FsckDone = await self._call(
            lambda rid: casproto.Fsck(rid, deep, repair_from, token)
        )
        return reply

    async def sync_from(
        self,
        source: str,
        *,
        token: str | None = None,
        names: list[str] = (),  # type: ignore[assignment]
        all_names: bool = False,
        dry_run: bool = False,
        on_progress: Callable[[dict[str, int | float | str]], None] | None = None,
    ) -> casproto.SyncDone:
        """Ask this server to pull blobs from server ``source`` (direct-mode sync).

        Raises:
            PeerRefused: this server, or the source through it, refused or failed; the
                error names which.
        """
        rid, recv = self._open()
        try:
            await self.peer.send(
                casproto.Sync(rid, source, token, tuple(names), all_names, dry_run)
            )
            while True:
                reply = await self._reply(recv)
                if isinstance(reply, casproto.SyncDone):
                    return reply
                if on_progress is not None:
                    on_progress(reply.progress)
        finally:
            self._close(rid)

    async def call(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        on_progress: Callable[[dict[str, int | float | str]], None] | None = None,
    ) -> dict[str, Any]:
        """Run the server's named operation ``op`` (SPEC §4.5) and return its result.

        Raises:
            PeerRefused: the server has no such operation (UNSUPPORTED), the token lacks
                its scope, an argument was bad, or the operation failed.
        """
        rid, recv = self._open()
        try:
            await self.peer.send(casproto.Call(rid, op, dict(args or {})))
            while True:
                reply = await self._reply(recv)
                if isinstance(reply, casproto.CallDone):
                    return dict(reply.result)
                if on_progress is not None:
                    on_progress(reply.progress)
        except PeerRefused as exc:
            if exc.code_name == "NOT_FOUND":
                exc.hint = None  # the operation's message says what was missing, and where
            raise
        finally:
            self._close(rid)

    async def call_stream(
        self,
        op: str,
        args: dict[str, Any],
        sink: Callable[[bytes], Awaitable[None]],
    ) -> dict[str, Any]:
        """Run an operation that streams (SPEC §4.5, CALL_DATA): ``sink`` is awaited with
        each piece, in order, and may take its time (at most CALL_DATA_WINDOW pieces wait
        here; beyond that the connection waits). Returns the result; raises as :meth:`call`.
        """
        rid, recv = self._open(CALL_DATA_WINDOW)
        ended = False
        try:
            await self.peer.send(casproto.Call(rid, op, dict(args)))
            while True:
                reply = await self._reply(recv)
                if isinstance(reply, casproto.CallDone):
                    ended = True
                    return dict(reply.result)
                if isinstance(reply, casproto.CallData):
                    await sink(bytes(reply.data))  # bytes already when received: no copy
        except PeerRefused:
            ended = True  # the ERROR ended it
            raise
        finally:
            self._close(rid)
            if not ended and self._failure is None:
                # Given up here (the sink failed, or we were cancelled): the server stops
                # producing. Best effort, and never a wait on a stuck connection.
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(CANCEL_SEND_S),
                    contextlib.suppress(CasdError, *_GONE),
                ):
                    await self.peer.send(casproto.Cancel(rid))

    # --- push --------------------------------------------------------------------------

    async def push(
        self,
        chunks: Iterator[memoryview],
        *,
        name: str | None = None,
        expected_digest: str | None = None,
        progress: Progress | None = None,
        base: str | None = None,
    ) -> TransferResult:
        """Send a blob, given as its chunks in order; only chunks the server lacks travel.

        ``base`` is a local file holding an older version of the blob: the chunks of it the
        server holds serve as bases, and wanted chunks travel as deltas against them
        (CHUNK_DELTA, SPEC §5.1) while that delivers faster than plain chunks.

        Raises:
            PeerRefused: the server refused (bad name, digest mismatch, disk full...).
            PeerGone: the connection broke; stored chunks stay on the server, so a retry
                sends only the rest.
            DigestMismatch: ``expected_digest`` is not the digest of the data.
        """
        wire_before = self.peer.wire_bytes
        index = None
        if base is not None and casproto.PREFIX_FEATURE in self.features:
            index = await self._base_index(base)
        batcher = _PushBatcher(chunks, index)
        chooser = DeltaChooser()
        deltas = 0
        rid, replies = self._open()
        sent_chunks = 0
        sent_bytes = 0
        try:
            await self.peer.send(casproto.PushBegin(rid, name))
            batches_send, batches_recv = trio.open_memory_channel[_Batch](PUSH_WINDOW_BATCHES)

            async def cut_and_announce() -> None:
                # Cut and hash in a worker thread, announce each batch as soon as it is cut.
                async with batches_send:
                    while True:
                        batch = await trio.to_thread.run_sync(batcher.next_batch)
                        if batch is None:
                            return
                        await self.peer.send(
                            casproto.PushRecipe(rid, batch.ids, batch.sizes), within=rid
                        )
                        await batches_send.send(batch)

            async def send_wanted() -> None:
                nonlocal sent_chunks, sent_bytes, deltas
                async with batches_recv:
                    async for batch in batches_recv:
                        want = await self._reply(replies)
                        if not isinstance(want, casproto.PushWant):
                            raise PeerError(f"server answered a recipe with {type(want).__name__}")
                        wanted = casproto.unpack_bitmap(want.bitmap, len(batch.ids))
                        idx = [i for i, w in enumerate(wanted) if w]
                        if idx:
                            offered = index is not None and any(batch.bases[i] for i in idx)
                            use = offered and chooser.choose()
                            frames, cpu_s, saved = await self._encode_parallel(
                                rid, batch, idx, index if use else None
                            )
                            await self.peer.send_many(frames, within=rid)
                            if offered:
                                raw = sum(batch.sizes[i] for i in idx)
                                chooser.record(use, raw, saved, cpu_s)
                                if (link := delivery(self.peer.stream)) is not None:
                                    chooser.observe_link(
                                        link.rate,
                                        link.app_limited,
                                        link.busy_us,
                                        link.rwnd_limited_us,
                                    )
                            deltas += sum(isinstance(f, casproto.ChunkDelta) for f in frames)
                            sent_chunks += len(frames)
                            sent_bytes += sum(len(f.data) for f in frames)
                        if progress is not None:
                            progress(batch.nbytes)

            async with open_nursery() as nursery:
                nursery.start_soon(cut_and_announce)
                nursery.start_soon(send_wanted)
            digest = format_digest(batcher.sha.digest()) if batcher.size else EMPTY_DIGEST
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatch(expected_digest, digest)
            await self.peer.send(casproto.PushEnd(rid, batcher.size, digest), within=rid)
            done = await self._reply(replies)
        except RequestEnded:
            await self._raise_push_error(replies)
        finally:
            self._close(rid)
            if index is not None:
                index.close()
        result = self._push_result(done, sent_chunks, sent_bytes, wire_before)
        return dataclasses.replace(result, chunks_delta=deltas)

    async def _base_index(self, path: str) -> _BaseIndex:
        """Cut ``path`` and learn which of its chunks the server holds (HAS)."""
        if self.chunker_params is None:
            raise ConfigError("the server cuts chunks in a way this casctl does not know")
        index = await trio.to_thread.run_sync(_BaseIndex.of_file, path, self.chunker_params)
        held = await self.has(list(index.ids))
        index.keep(held)
        return index

    async def _encode_parallel(
        self, rid: int, batch: _Batch, idx: list[int], index: _BaseIndex | None = None
    ) -> tuple[list[casproto.Chunk | casproto.ChunkDelta], float, int]:
        # zstd releases the GIL: compressing halves of a batch on two threads uses both
        # cores (measured 240 -> 436 MB/s at level 1 on real files here).
        # Also the CPU seconds the deltas cost and the bytes they saved (the delta choice).
        if not self.compress or len(idx) < 4:
            return self._encode_chunks(rid, batch, idx, index)
        parts: list[tuple[list[casproto.Chunk | casproto.ChunkDelta], float, int]] = [
            ([], 0.0, 0)
        ] * 2
        half = len(idx) // 2

        async def encode(k: int, part: list[int]) -> None:
            parts[k] = await trio.to_thread.run_sync(self._encode_chunks, rid, batch, part, index)

        async with open_nursery() as nursery:
            nursery.start_soon(encode, 0, idx[:half])
            nursery.start_soon(encode, 1, idx[half:])
        (f0, c0, s0), (f1, c1, s1) = parts
        return f0 + f1, c0 + c1, s0 + s1

    def _relay_frames(self, rid: int, chunks: list[VerifiedChunk]) -> list[casproto.Chunk]:
        # Worker thread. Chunks fetched for a relay go on zstd'd as they came where the other
        # side speaks zstd; the others (packed, delta-decoded, or stored raw by the source)
        # are compressed again when that saves bytes, as for any push.
        frames = []
        for c in chunks:
            if c.codec == casproto.Codec.ZSTD and self.compress:
                frames.append(casproto.Chunk(rid, c.id, c.codec, c.payload))
                continue
            frame = casproto.Chunk(rid, c.id, casproto.Codec.RAW, c.data)
            if self.compress:
                packed = zstd.compress(c.data, WIRE_LEVEL)
                if len(packed) < len(c.data):
                    frame = casproto.Chunk(rid, c.id, casproto.Codec.ZSTD, packed)
            frames.append(frame)
        return frames

    def _encode_chunks(
        self, rid: int, batch: _Batch, idx: list[int], index: _BaseIndex | None = None
    ) -> tuple[list[casproto.Chunk | casproto.ChunkDelta], float, int]:
        # Runs in a worker thread: zstd releases the GIL.
        out: list[casproto.Chunk | casproto.ChunkDelta] = []
        cpu_s, saved = 0.0, 0
        for i in idx:
            view = batch.views[i]
            best: casproto.Chunk | casproto.ChunkDelta = casproto.Chunk(
                rid, batch.ids[i], casproto.Codec.RAW, view
            )
            if self.compress:
                packed = zstd.compress(view, WIRE_LEVEL)
                if len(packed) < len(view):
                    best = casproto.Chunk(rid, batch.ids[i], casproto.Codec.ZSTD, packed)
            bases = batch.bases[i]
            if index is not None and bases:
                c0 = time.thread_time()
                try:
                    delta = zstd.compress_with_prefix(view, index.read(bases), DELTA_LEVEL)
                except ValueError:  # a prefix under 8 bytes: zstd takes none
                    delta = None
                cpu_s += time.thread_time() - c0
                if delta is not None and len(delta) < len(best.data):
                    saved += len(best.data) - len(delta)
                    best = casproto.ChunkDelta(rid, batch.ids[i], bases, delta)
            out.append(best)
        return out, cpu_s, saved

    # --- pull --------------------------------------------------------------------------

    def one_chunk(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes is one chunk on this server (FastCDC cuts
        nothing shorter than its minimum)."""
        params = self.chunker_params
        return params is not None and 0 < size <= params.min

    async def first_chunk(self, digest: str) -> casproto.Chunk | casproto.ChunkPack | None:
        """The first chunk of blob ``digest`` as it came, asked for by its place (WANT_AT
        place 0) before the recipe has said its id: for a blob of one chunk (an image's
        manifest, config, layer record), asked together with the recipe, its bytes then
        cost no round trip of their own. Unverified: :func:`first_chunk_of` checks it
        against the recipe. None where the server lacks want-at or refused."""
        if casproto.WANT_AT_FEATURE not in self.features:
            return None
        rid, recv = self._open()
        try:
            await self.peer.send(casproto.WantAt(rid, digest, 0, casproto.pack_bitmap([True])))
            try:
                reply = await self._reply(recv)
            except PeerRefused:
                return None
        finally:
            self._close(rid)
        return reply if isinstance(reply, casproto.Chunk | casproto.ChunkPack) else None

    async def fetch_recipe(
        self, ref: str, base: tuple[str, bytes] | None = None
    ) -> casproto.Recipe:
        """The whole recipe of a blob, parts joined into one Recipe.

        ``base`` is (digest, entries): a blob this side holds that ``ref`` is likely a new
        version of, and its recipe's entries (casproto.pack_entries). The server may then
        send the recipe encoded against those (PULL_DELTA): the entries both versions
        share cost next to nothing, only new ids cross.
        """
        got = await self._fetch_recipe(ref, base, 0)
        assert isinstance(got, casproto.Recipe)
        return got

    async def fetch_recipe_inline(
        self, ref: str, base: tuple[str, bytes], limit: int, rate: int
    ) -> casproto.Recipe | Inlined:
        """As :meth:`fetch_recipe` with a base, asking for the bytes of the recipe's
        small new chunks (at most ``limit`` bytes) instead of their ids, encoded against
        the base's where over a link of ``rate`` bytes/s that pays (0: never; PULL_INLINE,
        SPEC §4.1): the answer is then :class:`Inlined`, for casd.recipeinline to decode.
        A plain Recipe where the server sent one (it lacks the feature or the base, or
        had nothing to inline)."""
        if casproto.INLINE_FEATURE not in self.features:
            return await self.fetch_recipe(ref, base)
        return await self._fetch_recipe(ref, base, limit, rate)

    async def _fetch_recipe(
        self, ref: str, base: tuple[str, bytes] | None, inline: int, rate: int = 0
    ) -> casproto.Recipe | Inlined:
        rid, recv = self._open()
        ids: list[bytes] = []
        sizes: list[int] = []
        try:
            if base is not None and casproto.RECIPE_FEATURE in self.features:
                base_sum = xxhash.xxh3_64_intdigest(base[1])
                if inline:
                    await self.peer.send(
                        casproto.PullInline(rid, ref, base[0], base_sum, inline, rate)
                    )
                else:
                    await self.peer.send(casproto.PullDelta(rid, ref, base[0], base_sum))
            else:
                await self.peer.send(casproto.Pull(rid, ref))
            while True:
                part = await self._reply(recv)
                if isinstance(part, casproto.RecipeDelta | casproto.RecipeInline):
                    assert base is not None
                    recipe = self._decode_recipe(part, base[1])
                    if isinstance(part, casproto.RecipeDelta):
                        return recipe
                    limit = casproto.inline_limit(inline)
                    return Inlined(recipe, limit, part.against_base, part.inline_sum, part.inline)
                # Sizes bound what decoding a chunk may allocate: a server that claims
                # chunks beyond the protocol's limit is lying (a decompression bomb).
                if part.sizes and max(part.sizes) > MAX_CHUNK_SIZE:
                    raise self._bad_recipe(f"a {max(part.sizes)}-byte chunk")
                ids.extend(part.ids)
                sizes.extend(part.sizes)
                if part.last:
                    return casproto.Recipe(
                        0, part.digest, part.size, tuple(ids), tuple(sizes), True
                    )
        finally:
            self._close(rid)

    def _bad_recipe(self, what: str) -> PeerError:
        return PeerError(
            f"{self.peer.ident} sent a recipe with {what}; chunks are at most "
            f"{MAX_CHUNK_SIZE} bytes and a blob has at most one per byte"
        )

    def _decode_recipe(
        self, part: casproto.RecipeDelta | casproto.RecipeInline, prefix: bytes
    ) -> casproto.Recipe:
        # The count is checked before anything is decoded: a blob has at most one chunk
        # per byte, so a lying count cannot make us allocate more than its size would.
        if part.count > max(part.size, 1) or part.count > MAX_RECIPE_ENTRIES:
            raise self._bad_recipe(f"{part.count} entries for {part.size} bytes")
        try:
            entries = zstd.decompress_bounded(
                part.data, part.count * casproto.ENTRY_SIZE, prefix=prefix
            )
            ids, sizes = casproto.unpack_entries(entries, part.count)
        except ValueError as exc:
            raise PeerError(
                f"{self.peer.ident} sent a recipe delta that does not decode: {exc}"
            ) from None
        if sizes and max(sizes) > MAX_CHUNK_SIZE:
            raise self._bad_recipe(f"a {max(sizes)}-byte chunk")
        if sum(sizes) != part.size:
            raise self._bad_recipe(f"chunks of {sum(sizes)} bytes for a blob of {part.size}")
        return casproto.Recipe(0, part.digest, part.size, ids, sizes, True)

    def _push_result(
        self, done: casproto.PushDone, chunks: int, sent: int, wire_before: int, raw: int = 0
    ) -> TransferResult:
        return TransferResult(
            digest=done.digest,
            size=done.size,
            chunks=done.chunks,
            chunks_transferred=chunks,
            bytes_transferred=sent,
            wire_bytes=self.peer.wire_bytes - wire_before,
            new_chunks=done.new_chunks,
            raw_bytes_transferred=raw,
        )

    async def _raise_push_error(
        self, replies: trio.MemoryReceiveChannel[casproto.Message]
    ) -> NoReturn:
        # The server ended a push while we were still sending: its ERROR is among the
        # replies, after any PUSH_WANTs that crossed it.
        while True:
            await self._reply(replies)

    async def push_recipe_from(
        self, src: Client, recipe: casproto.Recipe, *, name: str | None = None
    ) -> TransferResult:
        """Push a blob held by server ``src`` to this server, relaying only what it lacks.

        The recipe goes out in batches; for each batch this server answers which chunks
        it needs, those are fetched from ``src`` (verified) and forwarded in order. This
        server verifies every chunk and the digest, as for any push.

        Raises:
            PeerRefused, PeerGone: either server failed.
        """
        wire_before = self.peer.wire_bytes
        rid, replies = self._open()
        sent_chunks = 0
        sent_bytes = 0
        raw_bytes = 0
        n = len(recipe.ids)
        batches = [
            (recipe.ids[i : i + PUSH_BATCH_CHUNKS], recipe.sizes[i : i + PUSH_BATCH_CHUNKS])
            for i in range(0, n, PUSH_BATCH_CHUNKS)
        ]
        try:
            await self.peer.send(casproto.PushBegin(rid, name))
            await self.peer.send_many(
                [casproto.PushRecipe(rid, i, s) for i, s in batches], within=rid
            )
            for ids, sizes in batches:
                want = await self._reply(replies)
                if not isinstance(want, casproto.PushWant):
                    raise PeerError(f"server answered a recipe with {type(want).__name__}")
                wanted = casproto.unpack_bitmap(want.bitmap, len(ids))
                need = [(c, z) for c, z, w in zip(ids, sizes, wanted, strict=True) if w]
                if not need:
                    continue

                async def forward(chunks: list[VerifiedChunk]) -> None:
                    nonlocal sent_chunks, sent_bytes, raw_bytes
                    frames = await trio.to_thread.run_sync(self._relay_frames, rid, chunks)
                    await self.peer.send_many(frames, within=rid)
                    sent_chunks += len(frames)
                    sent_bytes += sum(len(f.data) for f in frames)
                    raw_bytes += sum(len(c.data) for c in chunks)

                await src.fetch_chunks(need, forward)
            await self.peer.send(casproto.PushEnd(rid, recipe.size, recipe.digest), within=rid)
            done = await self._reply(replies)
        except RequestEnded:
            await self._raise_push_error(replies)
        finally:
            self._close(rid)
        return self._push_result(done, sent_chunks, sent_bytes, wire_before, raw_bytes)

    async def fetch_chunks(
        self,
        need: list[tuple[bytes, int]],
        sink: Callable[[list[VerifiedChunk]], Awaitable[None]],
        *,
        bases: dict[bytes, tuple[bytes, ...]] | None = None,
        read_base: Callable[[tuple[bytes, ...]], bytes] | None = None,
        at: tuple[str, Sequence[int]] | None = None,
        batch_bytes: int = PULL_BATCH_BYTES,
    ) -> int:
        """Fetch chunks by (id, size), verified, handing them to ``sink`` in order.

        Chunks are asked for in WANT batches of at most ``batch_bytes``, with at most
        PULL_WINDOW_BATCHES unanswered: throughput does not depend on the round-trip time.
        Each batch is decoded and checked against its ids on two threads while ``sink``
        takes the previous one. Returns the payload bytes that crossed the wire.

        With ``bases`` (chunk id -> ids of similar chunks we hold) and ``read_base`` (their
        bytes, concatenated; runs in a worker thread), batches are asked for with
        WANT_DELTA, so the server may send each chunk encoded against its bases.

        With ``at`` (a blob's digest, and the place of each of ``need`` in its recipe, in
        ascending order), batches without deltas are asked for with WANT_AT: a bitmap of
        places instead of 32 bytes of id per chunk.

        Raises:
            PeerRefused: the server lacks a chunk or failed.
            ChunkCorrupt: the server sent bytes that are not the chunk asked for.
        """
        sizes = dict(need)
        use_delta = (
            self.allow_deltas
            and bool(bases)
            and read_base is not None
            and (casproto.PREFIX_FEATURE in self.features)
        )
        places: Sequence[int] | None = None
        if at is not None and casproto.WANT_AT_FEATURE in self.features:
            places = at[1]
        batches: list[tuple[bytes, ...]] = []
        batch_places: list[tuple[int, int]] = []  # (first, past the last) index into need
        cur: list[bytes] = []
        cur_bytes = 0
        first = 0
        for k, (cid, size) in enumerate(need):
            if cur and (
                cur_bytes + size > batch_bytes
                or len(cur) >= casproto.MAX_BATCH
                # A WANT_AT bitmap spans at most MAX_BATCH places.
                or (places is not None and places[k] - places[first] >= casproto.MAX_BATCH)
            ):
                batches.append(tuple(cur))
                batch_places.append((first, k))
                cur, cur_bytes, first = [], 0, k
            cur.append(cid)
            cur_bytes += size
        if cur:
            batches.append(tuple(cur))
            batch_places.append((first, len(need)))
        fetched_bytes = 0
        opened_send, opened_recv = trio.open_memory_channel[
            tuple[int, trio.MemoryReceiveChannel[casproto.Message], tuple[bytes, ...]]
        ](PULL_WINDOW_BATCHES)
        verified_send, verified_recv = trio.open_memory_channel[list[VerifiedChunk]](1)

        # When the peer fails midway, what already arrived is still verified and handed to
        # the sink before the failure is raised: a sync cut off midway keeps every chunk
        # that crossed, and its re-run moves none of them again.
        failure: PeerError | None = None
        retry: list[bytes] = []  # deltas we could not decode: fetched again as they are
        sink_share = [0.0]  # smoothed share of time receive() waits for the sink
        last = [trio.current_time()]

        async def send(ids: tuple[bytes, ...], request: Callable[[int], casproto.Message]) -> None:
            # One request for ``ids``, made by ``request(rid)``; receive() takes its answers.
            rid, recv = self._open()
            message = request(rid)
            if isinstance(message, casproto.WantDelta):
                self.asked_deltas = True
            await self.peer.send(message)
            await opened_send.send((rid, recv, ids))

        async def send_plain(ids: tuple[bytes, ...], where: Sequence[int]) -> None:
            # ``where``: the indexes into ``need`` of ``ids``.
            if places is None or at is None:
                await send(ids, partial(casproto.Want, ids=ids))
                return
            start, wanted = places[where[0]], {places[k] for k in where}
            bits = casproto.pack_bitmap(p in wanted for p in range(start, places[where[-1]] + 1))
            await send(ids, partial(casproto.WantAt, digest=at[0], start=start, bitmap=bits))

        async def ask() -> None:
            nonlocal failure
            async with opened_send:
                try:
                    for ids, (lo, hi) in zip(batches, batch_places, strict=True):
                        # Deltas trade CPU for link bytes: not while our own side (storing,
                        # hashing, re-encoding what arrives) is what holds things up.
                        delta_now = use_delta and sink_share[0] < SINK_BOUND
                        hints = tuple(bases.get(i, ()) for i in ids) if delta_now and bases else ()
                        rest = [j for j, h in enumerate(hints) if not h]
                        if not any(hints):
                            await send_plain(ids, range(lo, hi))
                        elif places is None or len(rest) < SPLIT_WITHOUT_BASES:
                            # One request for the whole batch, its chunks without bases
                            # named by id too (32 bytes each). A request of their own
                            # cost more than that saved: 0.3 s more on 2,761 chunks over
                            # loopback, in two requests per batch answered and checked
                            # apart, whatever the server chose.
                            await send(ids, partial(casproto.WantDelta, ids=ids, bases=hints))
                        else:
                            # Many chunks without bases (tar headers too small for a
                            # delta): named by place, in a request of their own, their
                            # ids would have been most of the bytes that crossed.
                            some = tuple(ids[j] for j, h in enumerate(hints) if h)
                            their = tuple(h for h in hints if h)
                            await send(some, partial(casproto.WantDelta, ids=some, bases=their))
                            await send_plain(tuple(ids[j] for j in rest), [lo + j for j in rest])
                except PeerError as exc:
                    failure = failure or exc
                except trio.BrokenResourceError:
                    pass  # receive() stopped early: it has the failure

        async def receive() -> None:
            nonlocal fetched_bytes, failure
            async with opened_recv, verified_send:
                async for rid, recv, ids in opened_recv:
                    frames: list[casproto.Chunk | _Packed] = []
                    try:
                        got = 0
                        while got < len(ids):
                            reply = await self._reply(recv)
                            if isinstance(reply, casproto.ChunkPack):
                                n = len(reply.lengths)
                                frames.append(_Packed(reply, ids[got : got + n]))
                                got += n
                            else:
                                # WANT_AT names no ids: the protocol layer cannot check
                                # that each answer is the chunk asked for at its place.
                                if reply.id != ids[got]:
                                    raise ChunkCorrupt(
                                        reply.id, "the server sent a chunk out of place"
                                    )
                                frames.append(reply)
                                got += 1
                    except PeerError as exc:
                        failure = failure or exc
                    finally:
                        self._close(rid)
                    if not frames:
                        continue
                    fetched_bytes += sum(len(f.data) for f in frames)
                    half = len(frames) // 2
                    parts: list[list[VerifiedChunk]] = [[], []]

                    async def check(
                        k: int,
                        part: list[casproto.Chunk | _Packed],
                        parts: list[list[VerifiedChunk]] = parts,
                    ) -> None:
                        parts[k] = await trio.to_thread.run_sync(
                            verify_chunks, part, sizes, bases, read_base, retry, self.delta
                        )

                    async with open_nursery() as checkers:
                        checkers.start_soon(check, 0, frames[:half])
                        checkers.start_soon(check, 1, frames[half:])
                    # After a failure, every batch already asked for is still drained:
                    # frames that arrived before the failure are kept whatever their batch.
                    t0 = trio.current_time()
                    await verified_send.send(parts[0] + parts[1])
                    now = trio.current_time()
                    # The share of time spent waiting for the sink, smoothed: near 1 when
                    # the sink, not the link, is the bottleneck.
                    blocked = (now - t0) / max(now - last[0], 1e-6)
                    sink_share[0] += 0.3 * (min(blocked, 1.0) - sink_share[0])
                    last[0] = now

        async def deliver() -> None:
            async with verified_recv:
                async for chunks in verified_recv:
                    await sink(chunks)

        async with open_nursery() as nursery:
            nursery.start_soon(ask)
            nursery.start_soon(receive)
            nursery.start_soon(deliver)
        if failure is not None:
            raise failure
        if retry:
            again = [(cid, sizes[cid]) for cid in dict.fromkeys(retry)]
            fetched_bytes += await self.fetch_chunks(again, sink)
        return fetched_bytes

    async def pull(
        self,
        ref: str,
        out: BinaryIO,
        *,
        seeds: list[str] = (),  # type: ignore[assignment]
        progress: Progress | None = None,
    ) -> TransferResult:
        """Write blob ``ref`` to ``out``, fetching only chunks no seed file holds.

        Every fetched chunk is checked against its id and the whole output against the
        blob's digest; ``out`` holds unverified bytes until this returns.

        Raises:
            PeerRefused: unknown ref, or the server failed.
            ChunkCorrupt: the server sent bytes that are not the chunk asked for.
            DigestMismatch: the assembled blob does not match its digest.
        """
        wire_before = self.peer.wire_bytes
        recipe = await self.fetch_recipe(ref)
        assembler = _Assembler(recipe, out)
        if seeds:
            if self.chunker_params is None:
                raise ConfigError(
                    "the server cuts chunks in a way this casctl does not know; seeds cannot help"
                )
            await trio.to_thread.run_sync(assembler.index_seeds, seeds, self.chunker_params)
        need = assembler.needed()
        # Chunks the seeds lack may still resemble seed chunks (an older version of the
        # blob): ask for them as deltas against those (SPEC §4.3).
        bases: dict[bytes, tuple[bytes, ...]] = {}
        old = assembler.seed_recipe()
        if old is not None and need and casproto.PREFIX_FEATURE in self.features:
            from casd.replicate import choose_bases

            bases = await trio.to_thread.run_sync(choose_bases, recipe, need, old)
        delta_before = self.delta.snapshot()

        async def write(chunks: list[VerifiedChunk]) -> None:
            written = await trio.to_thread.run_sync(assembler.feed, chunks)
            if progress is not None:
                progress(written)

        fetched_bytes = await self.fetch_chunks(
            need, write, bases=bases or None, read_base=assembler.read_seed if bases else None
        )
        deltas = self.delta.snapshot()[0] - delta_before[0]
        written = await trio.to_thread.run_sync(assembler.finish)
        if progress is not None:
            progress(written)
        return TransferResult(
            digest=recipe.digest,
            size=recipe.size,
            chunks=len(recipe.ids),
            chunks_transferred=len(need),
            bytes_transferred=fetched_bytes,
            wire_bytes=self.peer.wire_bytes - wire_before,
            chunks_from_seeds=assembler.from_seeds,
            chunks_delta=deltas,
        )


@dataclass(frozen=True, slots=True)
class _Packed:
    """A CHUNK_PACK as received, with the ids it answers (the next ones asked for)."""

    pack: casproto.ChunkPack
    ids: tuple[bytes, ...]

    @property
    def data(self) -> bytes | bytearray | memoryview:
        return self.pack.data


@dataclass(frozen=True, slots=True)
class VerifiedChunk:
    """A fetched chunk whose bytes hash to its id: ``data`` decoded, ``frame`` as sent."""

    id: bytes
    data: bytes
    codec: casproto.Codec
    payload: bytes  # as it crossed the wire (zstd when codec is ZSTD)


def _unpack(item: _Packed, sizes: dict[bytes, int]) -> list[VerifiedChunk]:
    """The chunks of a CHUNK_PACK, each checked against the id asked for at its place."""
    pack = item.pack
    for cid, length in zip(item.ids, pack.lengths, strict=True):
        if sizes.get(cid) != length:
            raise ChunkCorrupt(cid, f"the server packed it as {length} bytes")
    total = sum(pack.lengths)  # bounded by what we asked for, so by PULL_BATCH_BYTES
    payload = bytes(pack.data)
    if pack.codec == casproto.Codec.ZSTD:
        try:
            data = zstd.decompress_bounded(payload, total)
        except ValueError as exc:
            raise ChunkCorrupt(item.ids[0], f"a pack of chunks is invalid zstd: {exc}") from exc
    else:
        data = payload
    if len(data) != total:
        raise ChunkCorrupt(item.ids[0], f"a pack of chunks holds {len(data)} bytes, not {total}")
    out = []
    view = memoryview(data)
    pos = 0
    for cid, length in zip(item.ids, pack.lengths, strict=True):
        chunk = bytes(view[pos : pos + length])
        pos += length
        if chunk_id(chunk) != cid:
            raise ChunkCorrupt(cid, "the server packed bytes that do not hash to the chunk id")
        out.append(VerifiedChunk(cid, chunk, casproto.Codec.RAW, chunk))
    return out


def verify_chunks(
    frames: Sequence[casproto.Chunk | _Packed],
    sizes: dict[bytes, int],
    bases: dict[bytes, tuple[bytes, ...]] | None = None,
    read_base: Callable[[tuple[bytes, ...]], bytes] | None = None,
    retry: list[bytes] | None = None,
    figures: DeltaFigures | None = None,
) -> list[VerifiedChunk]:
    """Decode fetched chunks and check each against its id. Thread-safe, GIL mostly free.

    With ``retry``, a delta that cannot be decoded here (a base chunk is missing or fails
    its checksum in our store, or the result does not hash to the id) is not an error: its
    id goes to ``retry``, to be fetched again without bases. Nothing unverified is ever
    returned. ``figures`` accumulates what deltas saved and cost to decode.

    Raises:
        ChunkCorrupt: a chunk was not asked for, does not decode, or does not hash to its id.
    """
    out: list[VerifiedChunk] = []
    for f in frames:
        if isinstance(f, _Packed):
            out.extend(_unpack(f, sizes))
            continue
        size = sizes.get(f.id)
        if size is None:
            raise ChunkCorrupt(f.id, "the server sent a chunk that was not asked for")
        payload = bytes(f.data)  # received data is bytes already: no copy
        if f.codec == casproto.Codec.ZSTD:
            try:
                data = zstd.decompress_bounded(payload, size)
            except ValueError as exc:
                raise ChunkCorrupt(f.id, f"sent zstd data is invalid: {exc}") from exc
        elif f.codec == casproto.Codec.ZSTD_PREFIX:
            hint = bases.get(f.id) if bases else None
            if not hint or read_base is None:
                raise ChunkCorrupt(f.id, "the server sent a delta that was not asked for")
            started = time.perf_counter()
            try:
                data = zstd.decompress_bounded(payload, size, prefix=read_base(hint))
                if len(data) != size or chunk_id(data) != f.id:
                    raise ValueError("the decoded delta does not hash to the chunk id")
            except (ValueError, StoreError) as exc:  # StoreError: our base is bad
                if retry is None:
                    raise ChunkCorrupt(f.id, f"sent delta does not decode: {exc}") from exc
                retry.append(f.id)
                if figures is not None:
                    figures.fallbacks += 1
                continue
            if figures is not None:
                figures.add(len(payload), size, time.perf_counter() - started)
        else:
            data = payload
        if len(data) != size or chunk_id(data) != f.id:
            raise ChunkCorrupt(f.id, "the server sent bytes that do not hash to the chunk id")
        out.append(VerifiedChunk(f.id, data, casproto.Codec(f.codec), payload))
    return out


def first_chunk_of(
    reply: casproto.Chunk | casproto.ChunkPack | None, recipe: casproto.Recipe
) -> VerifiedChunk | None:
    """The blob's first chunk from ``reply`` (:meth:`Client.first_chunk`), if it is that
    chunk, decoded and checked against the recipe's first id; else None (it is then
    fetched as any other: nothing unverified is kept)."""
    if reply is None or not recipe.ids:
        return None
    cid, size = recipe.ids[0], recipe.sizes[0]
    frame: casproto.Chunk | _Packed
    if isinstance(reply, casproto.ChunkPack):
        if len(reply.lengths) != 1:
            return None
        frame = _Packed(reply, (cid,))
    elif reply.id != cid:
        return None
    else:
        frame = reply
    try:
        return verify_chunks([frame], {cid: size})[0]
    except (ChunkCorrupt, IndexError):
        return None


@dataclass
class DeltaFigures:
    """What delta-encoded chunks cost and saved on one connection (receiver's view)."""

    chunks: int = 0
    raw_bytes: int = 0  # their size decoded
    wire_bytes: int = 0  # their size as they crossed
    decode_s: float = 0.0
    fallbacks: int = 0  # deltas that could not be decoded here and were fetched again
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, wire: int, raw: int, seconds: float) -> None:
        with self._lock:
            self.chunks += 1
            self.wire_bytes += wire
            self.raw_bytes += raw
            self.decode_s += seconds

    def snapshot(self) -> tuple[int, int, int, float, int]:
        with self._lock:
            return self.chunks, self.raw_bytes, self.wire_bytes, self.decode_s, self.fallbacks


@dataclass(slots=True)
class _Batch:
    ids: tuple[bytes, ...]
    sizes: tuple[int, ...]
    views: list[memoryview]
    nbytes: int
    bases: list[tuple[bytes, ...]]  # per chunk: delta bases, or ()


class _PushBatcher:
    """Cuts and hashes a chunk stream batch by batch; each call runs in a worker thread.

    With a base index, each chunk also gets its delta bases: the base chunks at the same
    place, where "the same place" follows the last chunk both versions share (an anchor):
    an insertion or deletion before it shifts the rest of the file.
    """

    def __init__(self, chunks: Iterator[memoryview], index: _BaseIndex | None = None) -> None:
        self._chunks = chunks
        self._index = index
        self._shift = 0  # base offset minus new offset, at the last anchor
        self.sha = hashlib.sha256()
        self.size = 0

    def next_batch(self) -> _Batch | None:
        ids: list[bytes] = []
        sizes: list[int] = []
        views: list[memoryview] = []
        bases: list[tuple[bytes, ...]] = []
        nbytes = 0
        index = self._index
        for view in self._chunks:
            cid = chunk_id(view)
            ids.append(cid)
            self.sha.update(view)
            sizes.append(len(view))
            views.append(view)
            if index is not None:
                at = self.size + nbytes
                anchor = index.offset_of(cid)
                if anchor is not None:
                    self._shift = anchor - at
                    bases.append(())
                elif len(view) < MIN_DELTA_CHUNK:
                    bases.append(())
                else:
                    bases.append(index.around(at + self._shift, len(view)))
            else:
                bases.append(())
            nbytes += len(view)
            if len(ids) >= PUSH_BATCH_CHUNKS or nbytes >= PUSH_BATCH_BYTES:
                break
        if not ids:
            return None
        self.size += nbytes
        return _Batch(tuple(ids), tuple(sizes), views, nbytes, bases)


class _BaseIndex:
    """The chunks of a local older version that the server holds, by offset."""

    def __init__(self, mm: mmap.mmap | None, entries: list[tuple[bytes, int, int]]) -> None:
        self._mm = mm
        self._entries = entries  # (id, offset, size) in file order
        self._offset: dict[bytes, int] = {}
        self._view: dict[bytes, memoryview] = {}

    @classmethod
    def of_file(cls, path: str, params: ChunkerParams) -> _BaseIndex:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return cls(None, [])
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise ConfigError(f"cannot read base {path}: {exc.strerror}") from exc
        entries = []
        at = 0
        for view in Chunker(params).cut(mm):
            entries.append((chunk_id(view), at, len(view)))
            at += len(view)
        return cls(mm, entries)

    @property
    def ids(self) -> tuple[bytes, ...]:
        return tuple(e[0] for e in self._entries)

    def keep(self, held: list[bool]) -> None:
        """Keep only the chunks the server holds (usable as bases)."""
        assert self._mm is not None or not self._entries
        self._entries = [e for e, h in zip(self._entries, held, strict=True) if h]
        for cid, at, size in self._entries:
            self._offset.setdefault(cid, at)
            if self._mm is not None:
                self._view.setdefault(cid, memoryview(self._mm)[at : at + size])
        self._starts = [e[1] for e in self._entries]

    def offset_of(self, cid: bytes) -> int | None:
        return self._offset.get(cid)

    def around(self, at: int, size: int) -> tuple[bytes, ...]:
        """Up to MAX_BASES held chunks around byte ``at`` of the base, about 2x ``size``."""
        if not self._entries:
            return ()
        k = max(0, bisect.bisect_right(self._starts, at) - 1)
        lo = hi = k
        total = self._entries[k][2]
        while hi - lo + 1 < casproto.MAX_BASES and total < BASE_BUDGET_FACTOR * size:
            grew = False
            if hi + 1 < len(self._entries):
                hi += 1
                total += self._entries[hi][2]
                grew = True
            if lo > 0 and hi - lo + 1 < casproto.MAX_BASES:
                lo -= 1
                total += self._entries[lo][2]
                grew = True
            if not grew:
                break
        return tuple(self._entries[j][0] for j in range(lo, hi + 1))

    def read(self, ids: tuple[bytes, ...]) -> bytes:
        return b"".join(self._view[i] for i in ids)

    def close(self) -> None:
        self._view.clear()
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()


class _Assembler:
    """Writes a blob in recipe order from seeds and fetched chunks, hashing as it goes.

    Fetched chunks arrive in the order of their first appearance in the recipe, so the
    blob is written strictly sequentially (a pipe works as output). Chunks that appear
    again later are kept in memory until their last use.
    """

    def __init__(self, recipe: casproto.Recipe, out: BinaryIO) -> None:
        self.recipe = recipe
        self.out = out
        self.sha = hashlib.sha256()
        self.pos = 0  # next recipe entry to write
        self.from_seeds = 0
        self._seed: dict[bytes, memoryview] = {}
        # Every chunk of the seeds, in order: what a delta may be encoded against.
        self._seed_all: dict[bytes, memoryview] = {}
        self._seed_order: list[tuple[bytes, int]] = []
        self._maps: list[mmap.mmap] = []
        self._ready: dict[bytes, bytes | memoryview] = {}
        self._uses: dict[bytes, int] = {}
        for cid in recipe.ids:
            self._uses[cid] = self._uses.get(cid, 0) + 1
        self._sizes = dict(zip(recipe.ids, recipe.sizes, strict=True))

    def index_seeds(self, paths: list[str], params: ChunkerParams) -> None:
        chunker = Chunker(params)
        for path in paths:
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size == 0:
                        continue
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise ConfigError(f"cannot read seed {path}: {exc.strerror}") from exc
            self._maps.append(mm)
            for view in chunker.cut(mm):
                cid = chunk_id(view)
                if cid in self._uses and cid not in self._seed:
                    self._seed[cid] = view
                if cid not in self._seed_all:
                    self._seed_all[cid] = view
                    self._seed_order.append((cid, len(view)))

    def seed_recipe(self) -> Recipe | None:
        """The seeds' chunks as one old version, for choosing delta bases."""
        if not self._seed_order:
            return None
        ids = tuple(c for c, _ in self._seed_order)
        sizes = tuple(n for _, n in self._seed_order)
        return Recipe("sha256:" + "0" * 64, sum(sizes), ids, sizes)

    def read_seed(self, ids: tuple[bytes, ...]) -> bytes:
        """The bytes of seed chunks, concatenated: a delta's base (worker thread)."""
        try:
            return b"".join(self._seed_all[i] for i in ids)
        except KeyError as exc:
            raise ChunkMissing(exc.args[0]) from None

    def needed(self) -> list[tuple[bytes, int]]:
        """Distinct chunks no seed holds, in order of first appearance."""
        seen: set[bytes] = set()
        out = []
        for cid, size in zip(self.recipe.ids, self.recipe.sizes, strict=True):
            if cid not in seen and cid not in self._seed:
                seen.add(cid)
                out.append((cid, size))
        return out

    def feed(self, chunks: list[VerifiedChunk]) -> int:
        """Take verified chunks and write everything that can now be written."""
        for c in chunks:
            self._ready[c.id] = c.data
        return self._write_available()

    def _write_available(self) -> int:
        ids = self.recipe.ids
        written = 0
        while self.pos < len(ids):
            cid = ids[self.pos]
            data = self._ready.get(cid)
            if data is None:
                data = self._seed.get(cid)
                if data is None:
                    break
                self.from_seeds += 1
            self.out.write(data)
            self.sha.update(data)
            written += len(data)
            left = self._uses[cid] - 1
            self._uses[cid] = left
            if left == 0:
                self._ready.pop(cid, None)
            self.pos += 1
        return written

    def finish(self) -> int:
        written = self._write_available()
        try:
            if self.pos != len(self.recipe.ids):
                raise PeerError("the transfer ended before every chunk arrived")
            actual = format_digest(self.sha.digest())
            if actual != self.recipe.digest:
                raise DigestMismatch(self.recipe.digest, actual)
            return written
        finally:
            self._seed.clear()
            self._seed_all.clear()
            for mm in self._maps:
                with contextlib.suppress(BufferError):  # a view still lives; GC unmaps
                    mm.close()


@asynccontextmanager
async def open_client(
    address: str,
    *,
    token: str | None = None,
    compress: bool = True,
    tls_ca: str | None = None,
) -> AsyncIterator[Client]:
    """Connect to a casd server and handshake.

    ``tls://HOST:PORT`` connects with TLS, checking the server's certificate against
    ``tls_ca`` (a PEM file; default: $CASD_TLS_CA, else the system's CAs).

    Raises:
        PeerError: the server cannot be reached, fails TLS, or speaks no casd protocol.
        PeerRefused: the server refused the connection (token, version).
    """
    use_tls = address.startswith("tls://")
    host, port = parse_hostport(address.removeprefix("tls://"))
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if use_tls:
                stream = await _tls_handshake(stream, host, address, tls_ca)
    except trio.TooSlowError:
        raise unreachable(address, None) from None
    except OSError as exc:
        raise unreachable(address, exc) from exc
    async with open_client_on_stream(stream, address, token=token, compress=compress) as c:
        yield c


async def _tls_handshake(
    tcp: trio.abc.Stream, host: str, address: str, tls_ca: str | None
) -> trio.SSLStream[trio.abc.Stream]:
    stream = trio.SSLStream(tcp, tls_context(tls_ca), server_hostname=host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await tcp.aclose()
        raise tls_failed(address, exc.__cause__ or exc) from exc
    return stream


#: What a client offers in its HELLO (SPEC §3).
FEATURES = (
    "zstd",
    casproto.PREFIX_FEATURE,
    casproto.PACK_FEATURE,
    casproto.RECIPE_FEATURE,
    casproto.INLINE_FEATURE,
    casproto.WANT_AT_FEATURE,
)


@asynccontextmanager
async def open_client_on_stream(
    stream: trio.abc.Stream,
    address: str,
    *,
    token: str | None = None,
    compress: bool = True,
    features: tuple[str, ...] = FEATURES,
) -> AsyncIterator[Client]:
    """Handshake over an already open stream (TCP, TLS, or in-memory in tests), offering
    ``features``."""
    peer = PeerConnection(stream, casproto.Role.CLIENT, address)
    try:
        await peer.send(
            casproto.Hello(
                0,
                casproto.PROTOCOL_VERSION,
                features,
                token,
                f"casctl/{__version__}",
            )
        )
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                ev = await peer.next_event()
        except trio.TooSlowError:
            raise PeerError(f"{address} did not answer the casd handshake") from None
        except casproto.ProtocolError as exc:
            raise PeerError(f"{address} does not speak the casd protocol: {exc}") from exc
        if isinstance(ev, casproto.Error):
            raise refused(ev)
        if not isinstance(ev, casproto.Welcome):
            raise hung_up(address)
        client = Client(peer, ev, compress)
        async with open_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await peer.aclose()
