"""The daemon's side of one connection: handshake, then requests served concurrently.

Each request runs as a task in the connection's nursery with its own cancel scope, so a
client's CANCEL, a failed request or a dropped connection stops exactly the work it should.
Store calls run in worker threads (the store is synchronous); the event loop only moves
frames.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import casproto
import trio
import xxhash
from casproto import ErrorCode

from casd import __version__, recipeinline, zstd
from casd import ingest as ingest_mod
from casd.auth import Scope, TokenTable, required_scope
from casd.blobdelta import Link
from casd.client import Client, VerifiedChunk, open_client
from casd.deltachoice import Choosers
from casd.errors import (
    BlobMissing,
    CasdError,
    ChunkCorrupt,
    ChunkMissing,
    ConfigError,
    Forbidden,
    InvalidRef,
    NoSpace,
    PeerError,
    PeerGone,
    PeerRefused,
    UpstreamError,
    UserError,
)
from casd.ingest import BlobIngest, IngestError, StoreBatch
from casd.nursery import open_nursery
from casd.oci.landing import Landings
from casd.oci.layers import LayerCache
from casd.oci.sync import sync_with_images
from casd.peer import PeerConnection
from casd.replicate import (
    SyncReport,
    Throttle,
    delta_counters,
    resolve_names,
    source_delta_stats,
)
from casd.server import ops
from casd.storage._encode import decode_stored
from casd.storage.interface import ChunkIn, Store, StoredChunk
from casd.tcpinfo import delivery

log = logging.getLogger("casd.server")

# Frames of one push queued between the connection's reader and the push task. A CHUNK
# frame is at most ~256 KiB, so this bounds a push's queue near 16 MiB; when it is full
# the reader stops reading and TCP pushes back on the client.
PUSH_QUEUE_FRAMES = 64

# Chunks read from the store per worker-thread call when serving WANT: large enough to
# amortize the thread hop (~50 us), small enough to start sending quickly.
SERVE_BATCH = 64

# Recipe entries per RECIPE frame: 16,384 x ~40 B = 640 KiB, well under MAX_FRAME.
RECIPE_BATCH = casproto.MAX_BATCH

# A push whose stream pauses this long gets its buffered chunks stored right away.
IDLE_FLUSH_S = 0.2

# A push whose client sends nothing for this long is ended (its chunks stay stored).
PUSH_STALL_S = 120.0

# A connection with no request open and nothing received for this long is closed.
IDLE_TIMEOUT_S = 600.0

# WANT requests that may read chunks ahead while earlier ones send: each holds at most
# two SERVE_BATCH batches (2 x 64 x 256 KiB), so ~48 MiB per connection at worst.
WANT_READ_AHEAD = 2

# Requests one connection may have open at once, and pushes the daemon runs at once;
# beyond that the request is refused with BUSY (the client retries later).
MAX_REQUESTS_PER_CONNECTION = 1024
MAX_PUSHES = 128

# How long a connection may take to say HELLO before it is dropped.
HELLO_TIMEOUT = 30.0

FEATURES = frozenset(
    {
        "zstd",
        casproto.PREFIX_FEATURE,
        casproto.PACK_FEATURE,
        casproto.RECIPE_FEATURE,
        casproto.INLINE_FEATURE,
        casproto.WANT_AT_FEATURE,
    }
)
# RECIPE_DELTA: zstd level, and the largest frame sent (beyond it, plain RECIPE frames).
RECIPE_DELTA_LEVEL = 3
RECIPE_DELTA_MAX = casproto.MAX_FRAME - 4096
# Recipes a connection keeps for its WANT_AT batches (a sync fetches one blob at a time,
# a few small ones beside it).
RECIPES_KEPT = 4

# Chunks up to this size that a WANT batch answers next to each other travel as one
# CHUNK_PACK (SPEC §4.1): a tar member's header (512 B) or a small file costs more as a
# frame of its own (a 32-byte id, framing, zstd without context) than its bytes. On the
# 5,693 headers of a 153 MB layer: 658 KB zstd'd one by one (+182 KB of ids), 99 KB in
# 64 KiB packs.
PACK_MAX_CHUNK = 16 * 1024
# Largest pack, decoded: bounds what a receiver decompresses at once.
PACK_MAX_BYTES = 1024 * 1024
# zstd level of packs: what chunks at rest use (casd.storage._encode).
PACK_LEVEL = 3

# zstd level for chunks encoded against a prefix. Level 1 finds the same long matches
# against a similar base as level 3 (same sizes measured on edited source files) at a
# quarter of the time (0.1 vs 0.4 ms for a 64 KiB chunk against 256 KiB), and encoding
# time is what decides whether a delta pays.
DELTA_LEVEL = 1


@dataclass
class ServerStats:
    started: float = field(default_factory=time.time)
    connections: int = 0
    connections_open: int = 0
    requests: int = 0
    pushes: int = 0
    pulls: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    chunks_received: int = 0
    chunks_sent: int = 0
    recipe_deltas: int = 0  # recipes sent encoded against the client's older version
    recipe_inlines: int = 0  # ... with their small new chunks' bytes instead of ids
    inlined_chunks: int = 0
    inlined_raw_bytes: int = 0
    inlined_wire_bytes: int = 0
    inlined_against_base: int = 0  # ... of those recipes, encoded against the old version
    # Whole-blob deltas streamed (blob.delta): how many, their bytes, the blobs' size,
    # and the thread CPU seconds encoding took.
    blob_deltas: int = 0
    blob_delta_bytes: int = 0
    blob_delta_target_bytes: int = 0
    blob_delta_encode_s: float = 0.0
    # Missing chunks streamed as one frame against a base (chunks.delta): how many
    # frames, their bytes, the chunk bytes they carried, and the encoding's CPU.
    chunk_deltas: int = 0
    chunk_delta_bytes: int = 0
    chunk_delta_raw_bytes: int = 0
    chunk_delta_encode_s: float = 0.0
    # Layers streamed as their compressed bytes (oci.layer: a sync with no old version).
    layers_streamed: int = 0
    layer_stream_bytes: int = 0
    packs_sent: int = 0  # CHUNK_PACK frames, and the chunks they carried
    packed_chunks_sent: int = 0
    errors: int = 0
    delta_candidates: int = 0
    delta_chunks: int = 0
    delta_bytes_saved: int = 0
    # WANT_DELTA batches served encoded / as stored, by the measured choice; encode time.
    delta_batches: int = 0
    plain_batches: int = 0
    delta_chunks_received: int = 0  # CHUNK_DELTA frames in pushes
    delta_encode_s: float = 0.0


@dataclass
class ServerContext:
    """What every connection handler shares."""

    store: Store
    tokens: TokenTable = field(default_factory=TokenTable)
    pushes_running: int = 0
    # CA file for this daemon's own outgoing TLS connections (sync and repair sources).
    tls_ca: str | None = None
    # Where operations keep scratch files (OCI import spools) and the OCI layer cache.
    data_dir: str | None = None
    oci_cache: LayerCache | None = None
    # Layers whose tar is stored after their sync (casd.oci.landing); None: during it.
    landings: Landings | None = None
    # Whether this daemon asks its sync sources for deltas (`casd serve --no-delta`: no).
    deltas: bool = True
    # Per sync source, what its last large chunk stream found (rate, wire bytes per raw
    # byte): what a whole-blob delta is weighed against (casd.blobdelta.pays).
    links: dict[str, Link] = field(default_factory=dict)
    # Per client host, what serving it deltas measured (casd.deltachoice).
    choosers: Choosers = field(default_factory=Choosers)
    stats: ServerStats = field(default_factory=ServerStats)
    # Bounds the worker threads all connections may occupy with store calls at once.
    limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(8))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


def _base_entries(store: Store, base: str, base_sum: int) -> tuple[Any, bytes] | None:
    """The recipe of ``base`` as the client holds it and its packed entries (a recipe
    delta's prefix), or None: this store lacks ``base`` or holds it cut otherwise than
    the client (the checksum of its entries differs)."""
    try:
        old = store.get_recipe(base)
    except (BlobMissing, InvalidRef):
        return None
    prefix = casproto.pack_entries(old.ids, old.sizes)
    if xxhash.xxh3_64_intdigest(prefix) != base_sum:
        return None
    return old, prefix


def _recipe_delta(entries: bytes, prefix: bytes) -> bytes | None:
    """A recipe's ``entries`` as one zstd frame with the client's older version's entries
    ``prefix`` as prefix (RECIPE_DELTA, SPEC §4.1), or None to send it plain: the frame
    would not fit one frame. Worker thread."""
    data = zstd.compress_with_prefix(entries, prefix, RECIPE_DELTA_LEVEL)
    return data if len(data) <= RECIPE_DELTA_MAX else None


def _recipe_answer(
    store: Store, ev: casproto.Pull | casproto.PullDelta | casproto.PullInline
) -> tuple[Any, bytes | None, recipeinline.Encoded | None]:
    """The recipe PULL asks for, its RECIPE_DELTA frame (or None to send it plain), and
    for PULL_INLINE what RECIPE_INLINE carries besides (or None to answer as PULL_DELTA).
    Worker thread."""
    r = store.get_recipe(store.resolve(ev.ref))
    if isinstance(ev, casproto.Pull):
        return r, None, None
    held = _base_entries(store, ev.base, ev.base_sum)
    if held is None:
        return r, None, None
    old, prefix = held
    if isinstance(ev, casproto.PullInline) and ev.inline > 0:
        limit = casproto.inline_limit(ev.inline)
        try:
            inl = recipeinline.encode(store, r, old, limit, ev.rate)
        except (ChunkMissing, ChunkCorrupt) as exc:
            # The ids still serve: the client asks for the chunks, and learns of the
            # damage where it matters, for the chunk it needs.
            log.warning("%s: cannot inline its small chunks (%s); sending ids", r.digest, exc)
            inl = None
        if inl is not None:
            delta = _recipe_delta(inl.entries, prefix)
            if delta is not None and len(delta) + len(inl.frame) <= RECIPE_DELTA_MAX:
                return r, delta, inl
    return r, _recipe_delta(casproto.pack_entries(r.ids, r.sizes), prefix), None


def _ids_at(recipe: Any, ev: casproto.WantAt) -> tuple[bytes, ...]:
    """The ids at the places WANT_AT names in ``recipe``. Worker thread.

    Raises:
        InvalidRef: a place past the end of the recipe.
    """
    bits = ev.bitmap
    places = [ev.start + i for i in range(8 * len(bits)) if bits[i >> 3] >> (i & 7) & 1]
    if places[-1] >= len(recipe.ids):  # the codec saw to it that one bit is set
        raise InvalidRef(
            f"WANT_AT asks for entry {places[-1]} of {ev.digest}'s recipe, "
            f"which has {len(recipe.ids)}"
        )
    return tuple(recipe.ids[p] for p in places)


def error_code_for(exc: BaseException) -> ErrorCode:
    """The protocol error code that tells a client what went wrong with its request."""
    if isinstance(exc, UpstreamError):
        return ErrorCode(exc.code)
    if isinstance(exc, Forbidden):
        return ErrorCode.FORBIDDEN
    if isinstance(exc, Busy):
        return ErrorCode.BUSY
    if isinstance(exc, Stalled):
        return ErrorCode.CANCELLED
    if isinstance(exc, (BlobMissing, ChunkMissing)):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, InvalidRef):
        return ErrorCode.INVALID
    if isinstance(exc, IngestError):
        return ErrorCode.DIGEST_MISMATCH if exc.digest_mismatch else ErrorCode.INVALID
    if isinstance(exc, ChunkCorrupt):
        return ErrorCode.CHUNK_CORRUPT
    if isinstance(exc, NoSpace):
        return ErrorCode.NO_SPACE
    if isinstance(exc, ops.Unsupported):
        return ErrorCode.UNSUPPORTED
    if isinstance(exc, UserError):
        return ErrorCode.INVALID
    return ErrorCode.INTERNAL


class Busy(CasdError):
    """The daemon refuses more work for now (BUSY)."""


class Stalled(CasdError):
    """A client stopped sending in the middle of a request."""


class _Turnstile:
    """Lets tasks that were started in some order take turns in that order.

    WANT requests of one connection are served by concurrent tasks, so the next one's
    disk reads overlap the current one's sending; but they send in the order they were
    asked, so chunks arrive in the order the client needs them and a connection cut
    midway leaves complete batches rather than fragments of many.
    """

    def __init__(self) -> None:
        self._issued = 0
        self._serving = 0
        self._skipped: set[int] = set()
        self._changed = trio.Condition()

    def ticket(self) -> int:
        self._issued += 1
        return self._issued - 1

    async def wait(self, ticket: int, ahead: int = 0) -> None:
        """Wait until ``ticket`` is at most ``ahead`` turns away."""
        async with self._changed:
            while ticket - self._serving > ahead:
                await self._changed.wait()

    async def done(self, ticket: int) -> None:
        with trio.CancelScope(shield=True):  # a cancelled turn must still pass it on
            async with self._changed:
                if self._serving == ticket:
                    self._serving += 1
                else:  # finished before its turn came (failed early): skip it when it comes
                    self._skipped.add(ticket)
                while self._serving in self._skipped:
                    self._skipped.discard(self._serving)
                    self._serving += 1
                self._changed.notify_all()


class _CallReplies(Throttle):
    """What a CALL's operation reports through (ops.Progress): throttled CALL_PROGRESS,
    and CALL_DATA pieces, each sent as it comes."""

    def __init__(self, peer: PeerConnection, rid: int) -> None:
        super().__init__(lambda progress: peer.send(casproto.CallProgress(rid, progress)))
        self._peer, self._rid = peer, rid

    async def data(self, piece: bytes) -> None:
        await self._peer.send(casproto.CallData(self._rid, piece))


class _Request:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.queue: trio.MemorySendChannel[casproto.Message] | None = None


class Session:
    """One client connection, from HELLO to close."""

    def __init__(self, ctx: ServerContext, peer: PeerConnection) -> None:
        self.ctx = ctx
        self.peer = peer
        self.features: frozenset[str] = frozenset()
        self.scope = Scope.READ
        self._requests: dict[int, _Request] = {}
        self._wants = _Turnstile()
        # Recipes WANT_AT batches name chunks in, most recent last.
        self._recipes: OrderedDict[str, Any] = OrderedDict()
        # What deltas saved and cost, and the link, as measured for this client's host.
        self._delta = ctx.choosers.for_host(peer.ident.rpartition(":")[0] or peer.ident)

    async def run(self) -> None:
        try:
            if not await self._handshake():
                return
            async with open_nursery() as nursery:
                await self._dispatch(nursery)
                nursery.cancel_scope.cancel()
        except casproto.RemoteProtocolError as exc:
            log.info("%s: protocol error: %s", self.peer.ident, exc)
            self.ctx.stats.errors += 1
            await self._send_fatal(exc.code, str(exc))
        except PeerGone as exc:
            log.info("%s: %s", self.peer.ident, exc)
        finally:
            d = self._delta
            if d.batches[True] or d.batches[False]:
                log.info("%s: %s", self.peer.ident, d.describe())

    async def _send_fatal(self, code: ErrorCode, message: str) -> None:
        with trio.move_on_after(5):
            with contextlib.suppress(PeerGone, casproto.ProtocolError):
                await self.peer.send(casproto.Error(0, code, message))

    async def _handshake(self) -> bool:
        hello: object = None
        with trio.move_on_after(HELLO_TIMEOUT):
            hello = await self.peer.next_event()
        if hello is None:
            log.info("%s: no HELLO within %ss", self.peer.ident, HELLO_TIMEOUT)
            return False
        if hello is casproto.CLOSED or isinstance(hello, casproto.Error):
            return False  # gone, or ERROR(0) before HELLO (allowed in any state): it gave up
        assert isinstance(hello, casproto.Hello)  # the state machine allows nothing else
        if hello.version != casproto.PROTOCOL_VERSION:
            await self._send_fatal(
                ErrorCode.UNSUPPORTED_VERSION,
                f"this server speaks protocol version {casproto.PROTOCOL_VERSION}",
            )
            return False
        scope = self.ctx.tokens.scope_of(hello.token)
        if scope is None:
            log.warning("%s: refused: bad or missing token", self.peer.ident)
            await self._send_fatal(
                ErrorCode.UNAUTHORIZED,
                "this server requires a token (casctl --token or CASD_TOKEN)"
                if hello.token is None
                else "token refused",
            )
            return False
        self.scope = scope
        self.features = FEATURES & frozenset(hello.features)
        params = getattr(self.ctx.store, "params", None)
        chunker = params.to_dict() if params is not None else {}
        await self.peer.send(
            casproto.Welcome(
                0,
                casproto.PROTOCOL_VERSION,
                tuple(sorted(self.features)),
                f"casd/{__version__}",
                chunker,
                casproto.MAX_FRAME,
            )
        )
        return True

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            casproto.Has: self._has,
            casproto.Stat: self._stat,
            casproto.ListNames: self._list,
            casproto.Tag: self._tag,
            casproto.Untag: self._untag,
            casproto.Stats: self._stats,
            casproto.Pull: self._pull,
            casproto.PullDelta: self._pull,
            casproto.PullInline: self._pull,
            casproto.Sync: self._sync,
            casproto.Fsck: self._fsck,
            casproto.Call: self._call,
        }
        while True:
            ev = None
            with trio.move_on_after(IDLE_TIMEOUT_S if not self._requests else math.inf):
                ev = await self.peer.next_event()
            if ev is None:
                log.info("%s: idle for %.0f s; closing", self.peer.ident, IDLE_TIMEOUT_S)
                return
            if ev is casproto.CLOSED:
                return
            assert isinstance(ev, casproto.Message)
            kind = type(ev)
            rid = ev.rid
            if isinstance(ev, casproto.Error) and rid == 0:
                log.info("%s: client error: %s", self.peer.ident, ev.message)
                return
            if (
                kind in handlers
                or kind is casproto.PushBegin
                or kind is casproto.Want
                or kind is casproto.WantDelta
                or kind is casproto.WantAt
            ):
                needed = required_scope(ev)
                if needed > self.scope:
                    self._start(nursery, rid, self._forbidden, ev, needed)
                    continue
                busy = len(self._requests) >= MAX_REQUESTS_PER_CONNECTION or (
                    kind is casproto.PushBegin and self.ctx.pushes_running >= MAX_PUSHES
                )
                if busy:
                    self._start(nursery, rid, self._busy, ev)
                    continue
            if kind is casproto.WantAt:
                self._start(nursery, rid, self._want_at, ev, self._wants.ticket())
            elif kind is casproto.Want or kind is casproto.WantDelta:
                self._start(nursery, rid, self._want, ev, self._wants.ticket())
            elif kind in handlers:
                self._start(nursery, rid, handlers[kind], ev)
            elif kind is casproto.PushBegin:
                send, recv = trio.open_memory_channel[casproto.Message](PUSH_QUEUE_FRAMES)
                self._start(nursery, rid, self._push, ev, recv).queue = send
            elif kind is casproto.Cancel:
                cancelled = self._requests.get(rid)
                if cancelled is not None:
                    cancelled.scope.cancel()
            else:
                push = self._requests.get(rid)
                if push is not None and push.queue is not None:
                    # The push may have just ended (an error) and closed its queue: then
                    # this frame crossed its end on the wire and is dropped.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await push.queue.send(ev)
                # else: a frame for a push we already ended; the protocol allows it in flight

    def _start(
        self, nursery: trio.Nursery, rid: int, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> _Request:
        req = _Request()
        self._requests[rid] = req
        self.ctx.stats.requests += 1
        nursery.start_soon(self._guard, rid, req, fn, *args)
        return req

    async def _guard(
        self, rid: int, req: _Request, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        # Runs one request; turns its failure into an ERROR frame for that request alone.
        code: ErrorCode | None = None
        message = ""
        try:
            with req.scope:
                await fn(*args)
            if req.scope.cancelled_caught:
                code, message = ErrorCode.CANCELLED, "cancelled by the client"
        except CasdError as exc:
            if isinstance(exc, PeerGone):
                raise
            code, message = error_code_for(exc), str(exc)
            if code == ErrorCode.INTERNAL:
                log.exception("%s: request %d failed", self.peer.ident, rid)
        except Exception as exc:  # a bug: report it to the client and the log, keep serving
            log.exception("%s: request %d crashed", self.peer.ident, rid)
            code, message = ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"
        finally:
            if self._requests.get(rid) is req:  # the client may reuse rid once it saw the end
                del self._requests[rid]
        # No ERROR once the request's terminal frame went out (a CANCEL crossed it).
        if code is not None and rid in self.peer.conn.open_requests:
            self.ctx.stats.errors += 1
            await self.peer.send(casproto.Error(rid, code, message))

    async def _busy(self, ev: casproto.Message) -> None:
        raise Busy(f"too much work in flight; retry {type(ev).__name__} later")

    async def _forbidden(self, ev: casproto.Message, needed: Scope) -> None:
        raise Forbidden(
            f"{type(ev).__name__} needs a {needed.name.lower()} token; this connection's "
            f"token grants {self.scope.name.lower()}"
        )

    # --- simple requests -----------------------------------------------------------

    async def _has(self, ev: casproto.Has) -> None:
        have = await self.ctx.run(self.ctx.store.has_chunks, ev.ids)
        await self.peer.send(casproto.Have(ev.rid, casproto.pack_bitmap(have)))

    async def _stat(self, ev: casproto.Stat) -> None:
        if self.ctx.landings is not None:  # a layer's tar still being stored: it comes
            await self.ctx.landings.wait_for([ev.ref])  # (casd.oci.landing) soon

        def stat() -> casproto.BlobInfo:
            store = self.ctx.store
            digest = store.resolve(ev.ref)
            recipe = store.get_recipe(digest)
            names = tuple(store.names_of(digest))
            return casproto.BlobInfo(ev.rid, digest, recipe.size, len(recipe.ids), names)

        await self.peer.send(await self.ctx.run(stat))

    async def _list(self, ev: casproto.ListNames) -> None:
        entries = await self.ctx.run(self.ctx.store.list_names, ev.prefix)
        await self.peer.send(casproto.Names(ev.rid, tuple(tuple(e) for e in entries)))

    async def _tag(self, ev: casproto.Tag) -> None:
        await self.ctx.run(self.ctx.store.tag, ev.name, ev.digest)
        await self.peer.send(casproto.Ok(ev.rid))

    async def _untag(self, ev: casproto.Untag) -> None:
        await self.ctx.run(self.ctx.store.untag, ev.name)
        await self.peer.send(casproto.Ok(ev.rid))

    async def _stats(self, ev: casproto.Stats) -> None:
        st = await self.ctx.run(self.ctx.store.stats)
        s = self.ctx.stats
        stats: dict[str, int | float | str] = {
            "version": __version__,
            "uptime_s": round(time.time() - s.started, 3),
            "connections": s.connections,
            "connections_open": s.connections_open,
            "requests": s.requests,
            "pushes": s.pushes,
            "pulls": s.pulls,
            "bytes_received": s.bytes_received,
            "bytes_sent": s.bytes_sent,
            "chunks_received": s.chunks_received,
            "chunks_sent": s.chunks_sent,
            "packs_sent": s.packs_sent,
            "packed_chunks_sent": s.packed_chunks_sent,
            "recipe_deltas": s.recipe_deltas,
            "recipe_inlines": s.recipe_inlines,
            "inlined_chunks": s.inlined_chunks,
            "inlined_raw_bytes": s.inlined_raw_bytes,
            "inlined_wire_bytes": s.inlined_wire_bytes,
            "inlined_against_base": s.inlined_against_base,
            "blob_deltas": s.blob_deltas,
            "blob_delta_bytes": s.blob_delta_bytes,
            "blob_delta_target_bytes": s.blob_delta_target_bytes,
            "blob_delta_encode_s": round(s.blob_delta_encode_s, 4),
            "chunk_deltas": s.chunk_deltas,
            "chunk_delta_bytes": s.chunk_delta_bytes,
            "chunk_delta_raw_bytes": s.chunk_delta_raw_bytes,
            "chunk_delta_encode_s": round(s.chunk_delta_encode_s, 4),
            "layers_streamed": s.layers_streamed,
            "layer_stream_bytes": s.layer_stream_bytes,
            # The most this host's kernel saw the asking host's connections deliver
            # (fading; 0: not measured): what a sync there weighs a layer's bytes by.
            "peer_link_mbit": round((self._delta.host.link_rate or 0.0) * 8e-6, 2),
            "errors": s.errors,
            **_landing_stats(self.ctx.landings),
            "delta_candidates": s.delta_candidates,
            "delta_chunks": s.delta_chunks,
            "delta_bytes_saved": s.delta_bytes_saved,
            "delta_batches": s.delta_batches,
            "delta_chunks_received": s.delta_chunks_received,
            "plain_batches": s.plain_batches,
            "delta_encode_s": round(s.delta_encode_s, 4),
            "store_chunks": st.chunks,
            "store_blobs": st.blobs,
            "store_names": st.names,
            "store_raw_bytes": st.raw_bytes,
            "store_stored_bytes": st.stored_bytes,
        }
        stats.update({f"store_{k}": v for k, v in st.extra.items()})
        await self.peer.send(casproto.StatsResult(ev.rid, stats))

    # --- pull: recipe, then chunks on demand -----------------------------------------

    async def _pull(self, ev: casproto.Pull | casproto.PullDelta | casproto.PullInline) -> None:
        if self.ctx.landings is not None:
            await self.ctx.landings.wait_for([ev.ref])
        r, delta, inl = await self.ctx.run(_recipe_answer, self.ctx.store, ev)
        self.ctx.stats.pulls += 1
        if inl is not None:
            assert delta is not None
            self.ctx.stats.recipe_inlines += 1
            self.ctx.stats.inlined_chunks += inl.chunks
            self.ctx.stats.inlined_raw_bytes += inl.raw
            self.ctx.stats.inlined_wire_bytes += len(inl.frame)
            self.ctx.stats.inlined_against_base += inl.against_base
            await self.peer.send(
                casproto.RecipeInline(
                    ev.rid,
                    r.digest,
                    r.size,
                    len(r.ids),
                    delta,
                    inl.inline_sum,
                    inl.frame,
                    inl.against_base,
                )
            )
            return
        if delta is not None:
            self.ctx.stats.recipe_deltas += 1
            await self.peer.send(casproto.RecipeDelta(ev.rid, r.digest, r.size, len(r.ids), delta))
            return
        frames: list[casproto.Message] = []
        n = len(r.ids)
        for start in range(0, max(n, 1), RECIPE_BATCH):
            end = min(start + RECIPE_BATCH, n)
            frames.append(
                casproto.Recipe(
                    ev.rid, r.digest, r.size, r.ids[start:end], r.sizes[start:end], end >= n
                )
            )
        await self.peer.send_many(frames)

    async def _want_at(self, ev: casproto.WantAt, ticket: int) -> None:
        try:
            # The ids from our own recipe, kept for the next batches of the same blob (in
            # this task, not the worker thread: several WANT_ATs run at once).
            recipe = self._recipes.get(ev.digest)
            if recipe is None:
                recipe = await self.ctx.run(self.ctx.store.get_recipe, ev.digest)
                self._recipes[ev.digest] = recipe
                while len(self._recipes) > RECIPES_KEPT:
                    self._recipes.popitem(last=False)
            else:
                self._recipes.move_to_end(ev.digest)
            wanted = await self.ctx.run(_ids_at, recipe, ev)
        except BaseException:
            await self._wants.done(ticket)  # the turn passes on, or later WANTs would wait
            raise
        await self._want(casproto.Want(ev.rid, wanted), ticket)

    async def _want(self, ev: casproto.Want | casproto.WantDelta, ticket: int) -> None:
        zstd_ok = "zstd" in self.features
        pack_ok = casproto.PACK_FEATURE in self.features
        store = self.ctx.store
        bases = ev.bases if isinstance(ev, casproto.WantDelta) else None
        Frames = list[casproto.Chunk | casproto.ChunkPack]

        def read(start: int, end: int, delta: bool) -> tuple[Frames, int, float, float, int]:
            # As deltas, the raw size returned is that of the chunks tried as deltas
            # (what the delta choice weighs savings and CPU against).
            out: Frames = []
            run: list[tuple[casproto.Chunk, StoredChunk]] = []  # small chunks to pack
            # Neighbouring chunks list the same bases (the same region of the old version):
            # each is read and decoded once per batch.
            base_bytes: dict[bytes, bytes] = {}
            run_bytes = 0
            raw = 0
            encode_s = cpu_s = 0.0
            saved = 0
            # One index lookup for the batch, and one read per run of neighbouring records.
            for k, s in enumerate(store.get_stored_many(ev.ids[start:end]), start):
                cid = s.id
                if s.codec == casproto.Codec.ZSTD and not zstd_ok:
                    frame = casproto.Chunk(ev.rid, cid, casproto.Codec.RAW, store.get_chunk(cid))
                else:
                    frame = casproto.Chunk(ev.rid, cid, casproto.Codec(s.codec), s.payload)
                if delta and bases is not None and bases[k]:
                    raw += s.raw_size
                    t0, c0 = time.perf_counter(), time.thread_time()
                    plain = len(frame.data)
                    frame = self._delta_or(frame, s, bases[k], base_bytes)
                    encode_s += time.perf_counter() - t0
                    cpu_s += time.thread_time() - c0
                    saved += plain - len(frame.data)
                packable = (
                    pack_ok
                    and s.raw_size <= PACK_MAX_CHUNK
                    and frame.codec != casproto.Codec.ZSTD_PREFIX
                )
                if run and (not packable or run_bytes + s.raw_size > PACK_MAX_BYTES):
                    out.extend(self._pack(ev.rid, run, zstd_ok))
                    run, run_bytes = [], 0
                if packable:
                    run.append((frame, s))
                    run_bytes += s.raw_size
                else:
                    out.append(frame)
            out.extend(self._pack(ev.rid, run, zstd_ok))
            return out, raw, encode_s, cpu_s, saved

        async def read_batch(start: int, end: int, delta: bool) -> tuple[Frames, int, float, int]:
            # The batch's frames; for the chunks tried as deltas, their raw size, the CPU
            # seconds they cost and the bytes they saved (what the delta choice weighs).
            if not delta or end - start < 8:
                frames, raw, encode_s, cpu_s, saved = await self.ctx.run(read, start, end, delta)
            else:
                # zstd releases the GIL: two threads encode the two halves of a batch.
                mid = (start + end) // 2
                parts: list[tuple[Frames, int, float, float, int]] = [([], 0, 0.0, 0.0, 0)] * 2

                failed: list[CasdError] = []

                async def half(k: int, lo: int, hi: int) -> None:
                    try:
                        parts[k] = await self.ctx.run(read, lo, hi, delta)
                    except CasdError as exc:  # both halves may fail (unknown ids): report one
                        failed.append(exc)

                async with open_nursery() as halves:
                    halves.start_soon(half, 0, start, mid)
                    halves.start_soon(half, 1, mid, end)
                if failed:
                    raise failed[0]
                (f0, r0, e0, c0, s0), (f1, r1, e1, c1, s1) = parts
                frames, raw, encode_s, cpu_s, saved = f0 + f1, r0 + r1, e0 + e1, c0 + c1, s0 + s1
            self.ctx.stats.delta_encode_s += encode_s
            return frames, raw, cpu_s, saved

        # A reader task stays one batch ahead of the sender: disk and network overlap.
        send, recv = trio.open_memory_channel[tuple[Frames, bool | None]](1)

        async def produce() -> None:
            # Only the WANTs next in line read ahead: a client with a thousand WANTs open
            # does not make the server hold a thousand batches in memory.
            await self._wants.wait(ticket, ahead=WANT_READ_AHEAD)
            async with send:
                for i in range(0, len(ev.ids), SERVE_BATCH):
                    end = min(i + SERVE_BATCH, len(ev.ids))
                    offered = bases is not None and any(bases[i:end])
                    # Whether deltas pay is measured, not assumed (casd.deltachoice).
                    delta = offered and self._delta.choose()
                    frames, raw, cpu_s, saved = await read_batch(i, end, delta)
                    if offered:
                        # Counted as soon as it is known, not once sent: the next
                        # batches are chosen before this one goes out.
                        self._delta.record(delta, raw, saved, cpu_s)
                    await send.send((frames, delta if offered else None))

        try:
            async with open_nursery() as nursery:
                nursery.start_soon(produce)
                await self._wants.wait(ticket)  # reads start now; sending waits its turn
                async with recv:
                    async for frames, kind in recv:
                        await self.peer.send_many(frames)
                        self.ctx.stats.chunks_sent += sum(
                            len(f.lengths) if isinstance(f, casproto.ChunkPack) else 1
                            for f in frames
                        )
                        if kind is not None:
                            if (link := delivery(self.peer.stream)) is not None:
                                self._delta.observe_link(
                                    link.rate, link.app_limited, link.busy_us, link.rwnd_limited_us
                                )
                            if kind:
                                self.ctx.stats.delta_batches += 1
                            else:
                                self.ctx.stats.plain_batches += 1
        finally:
            await self._wants.done(ticket)

    def _pack(
        self, rid: int, run: list[tuple[casproto.Chunk, StoredChunk]], zstd_ok: bool
    ) -> list[casproto.Chunk | casproto.ChunkPack]:
        # Worker thread. A run of small chunks as one CHUNK_PACK; a run of one stays as it
        # is, so only chunks that are packed get decoded.
        if len(run) < 2:
            return [frame for frame, _ in run]
        data = b"".join(decode_stored(s.id, s.codec, s.payload, s.raw_size) for _, s in run)
        codec = casproto.Codec.RAW
        if zstd_ok:
            packed = zstd.compress(data, PACK_LEVEL)
            if len(packed) < len(data):
                codec, data = casproto.Codec.ZSTD, packed
        self.ctx.stats.packs_sent += 1
        self.ctx.stats.packed_chunks_sent += len(run)
        return [casproto.ChunkPack(rid, codec, tuple(s.raw_size for _, s in run), data)]

    def _delta_or(
        self,
        frame: casproto.Chunk,
        stored: StoredChunk,
        bases: tuple[bytes, ...],
        cache: dict[bytes, bytes],
    ) -> casproto.Chunk:
        # Worker thread. Encode the chunk against the client's bases when this store holds
        # them all and the result is smaller than what would be sent anyway. ``cache``
        # holds base chunks already read for this batch.
        store = self.ctx.store
        todo = [b for b in bases if b not in cache]
        if todo and not all(store.has_chunks(todo)):
            return frame
        for b in todo:
            cache[b] = store.get_chunk(b)
        prefix = b"".join(cache[b] for b in bases)
        raw = decode_stored(stored.id, stored.codec, stored.payload, stored.raw_size)
        try:
            delta = zstd.compress_with_prefix(raw, prefix, DELTA_LEVEL)
        except ValueError:  # zstd takes no prefix under 8 bytes: send the chunk as it is
            return frame
        self.ctx.stats.delta_candidates += 1
        if len(delta) >= len(frame.data):
            return frame
        self.ctx.stats.delta_chunks += 1
        self.ctx.stats.delta_bytes_saved += len(frame.data) - len(delta)
        return casproto.Chunk(frame.rid, frame.id, casproto.Codec.ZSTD_PREFIX, delta)

    # --- fsck ----------------------------------------------------------------------------

    async def _fsck(self, ev: casproto.Fsck) -> None:
        store = self.ctx.store
        result = await self.ctx.run(functools.partial(store.check, deep=ev.deep))
        repaired = 0
        if ev.repair_from and (result.damaged or result.missing):
            wanted = {**result.damaged, **result.missing}
            source = ev.repair_from
            try:
                async with open_client(source, token=ev.token, tls_ca=self.ctx.tls_ca) as peer:
                    ids = list(wanted)
                    have = await peer.has(ids)
                    need = [(cid, wanted[cid]) for cid, ok in zip(ids, have, strict=True) if ok]

                    async def keep(chunks: list[VerifiedChunk]) -> None:
                        nonlocal repaired
                        fresh = [ChunkIn(c.id, c.data) for c in chunks]
                        repaired += await self.ctx.run(store.rewrite_chunks, fresh)

                    if need:
                        await peer.fetch_chunks(need, keep)
            except PeerRefused as exc:
                raise UpstreamError(
                    f"repair source {source} refused: {exc.remote_message}", exc.code
                ) from exc
            except (PeerError, ConfigError) as exc:
                raise UpstreamError(
                    f"repair source {source}: {exc}", int(ErrorCode.UNREACHABLE)
                ) from exc
            log.info("%s: fsck repaired %d chunks from %s", self.peer.ident, repaired, source)
            result = await self.ctx.run(functools.partial(store.check, deep=ev.deep))
        report = result.as_dict()
        report["chunks_repaired"] = repaired
        report["clean"] = int(result.clean)
        damaged = tuple([*result.damaged, *result.missing][: casproto.MAX_BATCH])
        await self.peer.send(casproto.FsckDone(ev.rid, report, damaged))

    # --- sync: pull from another server ----------------------------------------------

    async def _sync(self, ev: casproto.Sync) -> None:
        async def send_progress(progress: dict[str, int | float | str]) -> None:
            await self.peer.send(casproto.SyncProgress(ev.rid, progress))

        source = ev.source
        try:
            async with open_client(source, token=ev.token, tls_ca=self.ctx.tls_ca) as src:
                src.allow_deltas = self.ctx.deltas
                before: dict[str, int | float] = {}
                pairs: list[tuple[str, str]] = []
                sizes: dict[str, int] = {}
                kernel_rate = [0.0]

                async def counters() -> None:
                    stats = await src.stats()
                    before.update(delta_counters(stats))
                    # What the source's kernel saw its connections to this host deliver.
                    kernel_rate[0] = float(stats.get("peer_link_mbit", 0) or 0) * 1e6 / 8

                async def names() -> None:
                    pairs.extend(await resolve_names(src, list(ev.names), ev.all, sizes))

                async with open_nursery() as first:  # one round trip for both
                    first.start_soon(counters)
                    first.start_soon(names)
                report = await pull_images(
                    self.ctx,
                    src,
                    source,
                    pairs,
                    sizes,
                    kernel_rate[0],
                    dry_run=ev.dry_run,
                    on_progress=send_progress,
                )
                if src.asked_deltas:
                    after = await source_delta_stats(src)
                    report.source = {k: round(after[k] - before.get(k, 0), 4) for k in after}
                else:  # nothing asked of it could have moved them: spare the round trip
                    report.source = dict.fromkeys(before, 0)
                report.wire_bytes = src.peer.wire_bytes  # the whole conversation, handshake on
        except PeerRefused as exc:
            raise UpstreamError(f"source {source} refused: {exc.remote_message}", exc.code) from exc
        except (PeerError, ConfigError) as exc:  # PeerGone included: the source broke off
            raise UpstreamError(f"source {source}: {exc}", int(ErrorCode.UNREACHABLE)) from exc
        log.info("%s: sync from %s: %s", self.peer.ident, source, report.as_dict())
        await self.peer.send(casproto.SyncDone(ev.rid, report.as_dict(), tuple(report.items)))

    # --- calls: named operations (SPEC §4.5) -------------------------------------------

    async def _call(self, ev: casproto.Call) -> None:
        op = ops.lookup(ev.op)
        if op is None:
            known = ", ".join(sorted(ops.load_builtin()))
            raise ops.Unsupported(f"this server has no operation {ev.op!r} (it has: {known})")
        if op.scope > self.scope:
            raise Forbidden(
                f"{op.name} needs a {op.scope.name.lower()} token; this connection's "
                f"token grants {self.scope.name.lower()}"
            )
        result = await op.run(self.ctx, dict(ev.args), _CallReplies(self.peer, ev.rid))
        log.info("%s: %s done", self.peer.ident, op.name)
        await self.peer.send(casproto.CallDone(ev.rid, result))

    # --- push ------------------------------------------------------------------------

    async def _push(
        self, ev: casproto.PushBegin, queue: trio.MemoryReceiveChannel[casproto.Message]
    ) -> None:
        ingest = BlobIngest(self.ctx.store, ev.name)
        self.ctx.stats.pushes += 1
        self.ctx.pushes_running += 1
        # One storer task writes batches in order while this task keeps taking frames:
        # receiving, and decoding/verifying/writing, overlap. The channel holds one batch,
        # so at most ~3 x FLUSH_BYTES of a push are in memory.
        to_store, storing = trio.open_memory_channel[StoreBatch](1)

        async def storer() -> None:
            async with storing:
                async for batch in storing:
                    await self.ctx.run(ingest.store_batch, batch)

        try:
            async with open_nursery() as nursery:
                nursery.start_soon(storer)
                async with to_store, queue:
                    while True:
                        msg = await self._next_push_frame(queue, ingest, to_store)
                        if msg is None:
                            return  # the client went away; what arrived is kept (finally)
                        if isinstance(msg, casproto.PushRecipe):
                            wanted = await self.ctx.run(ingest.want, msg.ids, msg.sizes)
                            await self.peer.send(
                                casproto.PushWant(msg.rid, casproto.pack_bitmap(wanted))
                            )
                        elif isinstance(msg, casproto.Chunk):
                            data = bytes(msg.data)  # already bytes when received: no copy
                            ingest.add_chunk(msg.id, int(msg.codec), data)
                            self.ctx.stats.chunks_received += 1
                            if ingest.pending_bytes >= ingest_mod.FLUSH_BYTES:
                                await to_store.send(ingest.take_batch())
                        elif isinstance(msg, casproto.ChunkDelta):
                            data = bytes(msg.data)
                            ingest.add_chunk(
                                msg.id, int(casproto.Codec.ZSTD_PREFIX), data, tuple(msg.bases)
                            )
                            self.ctx.stats.delta_chunks_received += 1
                            self.ctx.stats.chunks_received += 1
                            if ingest.pending_bytes >= ingest_mod.FLUSH_BYTES:
                                await to_store.send(ingest.take_batch())
                        elif isinstance(msg, casproto.PushEnd):
                            break
            # Every batch is stored now (the storer finished with the nursery).
            result = await self.ctx.run(ingest.finish, msg.size, msg.digest)
        finally:
            self.ctx.pushes_running -= 1
            if ingest.pending_bytes:
                # Chunks that arrived stay durable even when the push does not finish, so
                # a retry sends none of them again. Each is verified on the way in.
                with trio.CancelScope(shield=True), trio.move_on_after(30):
                    try:
                        await self.ctx.run(ingest.keep_received)
                    except CasdError as exc:
                        log.info(
                            "%s: could not keep chunks of an abandoned push: %s",
                            self.peer.ident,
                            exc,
                        )
        log.info(
            "%s: pushed %s (%d bytes, %d/%d chunks new)%s",
            self.peer.ident,
            result.digest,
            result.size,
            result.new_chunks,
            result.chunks,
            f" as {ev.name}" if ev.name else "",
        )
        await self.peer.send(
            casproto.PushDone(
                msg.rid,
                result.digest,
                result.size,
                result.chunks,
                result.new_chunks,
                result.new_bytes,
            )
        )

    async def _next_push_frame(
        self,
        queue: trio.MemoryReceiveChannel[casproto.Message],
        ingest: BlobIngest,
        to_store: trio.MemorySendChannel[StoreBatch],
    ) -> casproto.Message | None:
        # While chunks wait in memory, a pause in the stream makes them durable at once:
        # a stalled or slow client never has more than IDLE_FLUSH_S of work at risk.
        stalled_at = trio.current_time() + PUSH_STALL_S
        while True:
            try:
                with trio.move_on_at(stalled_at):
                    if not ingest.pending_bytes:
                        return await queue.receive()
                    with trio.move_on_after(IDLE_FLUSH_S):
                        return await queue.receive()
            except trio.EndOfChannel:
                return None
            if trio.current_time() >= stalled_at:
                raise Stalled(f"the push sent nothing for {PUSH_STALL_S:.0f} s")
            await to_store.send(ingest.take_batch())


async def handle_stream(ctx: ServerContext, stream: trio.abc.Stream) -> None:
    """serve_listeners handler: one connection (TCP or TLS) from accept to close."""
    tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        host, port = tcp.socket.getpeername()[:2]  # type: ignore[union-attr]
        ident = f"{host}:{port}"
    except (OSError, AttributeError):
        ident = "?"
    peer = PeerConnection(stream, casproto.Role.SERVER, ident)
    ctx.stats.connections += 1
    ctx.stats.connections_open += 1
    try:
        await Session(ctx, peer).run()
    except Exception:  # a bug in one connection must not take the daemon down
        log.exception("%s: connection handler crashed", ident)
    finally:
        ctx.stats.connections_open -= 1
        ctx.stats.bytes_received += peer.bytes_received
        ctx.stats.bytes_sent += peer.bytes_sent
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await peer.aclose()


async def pull_images(
    ctx: ServerContext,
    src: Client,
    source: str,
    pairs: list[tuple[str, str]],
    sizes: dict[str, int],
    kernel_rate: float,
    *,
    dry_run: bool = False,
    on_progress: Callable[[dict[str, int | float | str]], Awaitable[None]] | None = None,
) -> SyncReport:
    """Sync ``pairs`` (name, digest) from ``src`` (at ``source``) into this server's
    store, with what images reference: what a ``SYNC`` asks for, and what the OCI
    pull-through (casd.server.mirror) does for a client. ``kernel_rate``: what the
    source's kernel saw its connections here deliver (bytes/s; 0 if unknown)."""
    with _foreground(ctx.landings):
        report = await sync_with_images(
            src,
            ctx.store,
            ctx.run,
            pairs,
            dry_run=dry_run,
            on_progress=on_progress,
            cache=ctx.oci_cache,
            link=ctx.links.get(source) if ctx.deltas else None,
            layer_link=_fastest(ctx.links.get(source), kernel_rate),
            landings=ctx.landings,
            sizes=sizes,
        )
    if (link := report.link) is not None:  # for the next sync from there
        ctx.links[source] = link
    return report


def _foreground(landings: Landings | None) -> contextlib.AbstractContextManager[None]:
    return landings.foreground() if landings is not None else contextlib.nullcontext()


def _landing_stats(landings: Landings | None) -> dict[str, int | float]:
    if landings is None:
        return {}
    return {
        # Layers synced as their compressed bytes whose tars are still to be stored.
        "oci_landings_pending": landings.pending,
        "oci_landings_done": landings.landed,
        "oci_landings_kept_whole": landings.kept_whole,
        "oci_landings_failed": landings.failed,
        "oci_landing_s": round(landings.seconds, 3),
    }


def _fastest(measured: Link | None, kernel_rate: float) -> Link | None:
    """The link to a source at the faster of two figures: what this host's syncs from it
    measured (a stream's bytes over its time, which a busy receiver slows) and what the
    source's kernel saw its connections here deliver (which a busy receiver does not)."""
    rate = max(measured.rate if measured is not None else 0.0, kernel_rate)
    if rate <= 0:
        return None
    return Link(rate, measured.wire_per_raw if measured is not None else 1.0)
