"""Online garbage collection: delete what no root reaches, then compact the packs.

Roots (git-prune style):

- every name, except layer records (``.oci/layer/<D>``): those are reached through the
  manifests that list layer ``D``;
- every blob committed (or committed again) less than ``grace_s`` seconds ago, so an
  unnamed ``casctl put`` survives a while and a blob being tagged right now is safe;
- every chunk leased by a transfer in progress (casd.leases).

From the root blobs, :func:`casd.oci.media.references` is followed transitively (manifest
-> config, layers and their layer records; index -> manifests; layer record -> content).
A blob no root reaches is deleted; a layer-record name whose layer is unreached goes with
it (unless its record was committed within the grace period: an import in progress). A
chunk no remaining recipe names and no lease holds is deleted from the index. Finally a
pack whose live fraction fell below ``min_live`` is rewritten (its live records copied to
the current pack) and removed.

Concurrency with writers. *Mark* runs against a snapshot (blob list with commit times,
names) without locks. *Sweep* holds the store's write lock (``exclusive``): it re-reads
names and blob times, marks again from everything that changed since the snapshot (new
or re-pointed names, new or re-committed blobs), spares the chunks of every blob that
now exists and was not found garbage, and deletes in one transaction that also skips
leased chunks (under the lease table's freeze). A push leases its chunks before asking
which the store holds, so nothing it relies on is deleted; a commit after the sweep sees
the deletions and fails cleanly (BlobIncomplete) if it did not lease.

Crash safety: the sweep is one index transaction; a pack rewrite makes its copies
durable before the index points at them, and commits the index before it unlinks the
old file (docs/format.md, "Garbage collection").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from casd.auth import Scope
from casd.errors import BlobMissing, InvalidRef, StoreError, UserError
from casd.oci.media import LAYER_RECORD_PREFIX, MAX_MANIFEST_SIZE, references
from casd.server import ops
from casd.storage.interface import Collectable, PackStat, RewriteResult, Store
from casd.storage.packfile import PACK_HEADER

if TYPE_CHECKING:
    from casd.server.service import ServerContext

DEFAULT_GRACE_S = 3600.0
DEFAULT_MIN_LIVE = 0.5


class GcStore(Store, Collectable, Protocol):
    """A store garbage collection can run on."""


class GcBusy(UserError):
    """A collection of this store is already running."""


class GcUnreadable(StoreError):
    """A reachable blob cannot be read, so what it references is unknown."""


@dataclass
class GcReport:
    dry_run: bool = False
    blobs_scanned: int = 0
    blobs_reachable: int = 0
    blobs_recent: int = 0  # roots by the grace period
    blobs_deleted: int = 0
    names_removed: int = 0
    chunks_scanned: int = 0
    chunks_deleted: int = 0
    chunks_leased: int = 0  # unreferenced, but spared for a transfer in progress
    bytes_freed: int = 0  # stored bytes of the deleted chunks
    packs: int = 0
    packs_rewritten: int = 0
    packs_skipped: int = 0  # below min_live, but left alone (see the daemon log)
    pack_bytes_before: int = 0
    pack_bytes_after: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int | float | str]:
        return {
            "dry_run": int(self.dry_run),
            "blobs_scanned": self.blobs_scanned,
            "blobs_reachable": self.blobs_reachable,
            "blobs_recent": self.blobs_recent,
            "blobs_deleted": self.blobs_deleted,
            "names_removed": self.names_removed,
            "chunks_scanned": self.chunks_scanned,
            "chunks_deleted": self.chunks_deleted,
            "chunks_leased": self.chunks_leased,
            "bytes_freed": self.bytes_freed,
            "packs": self.packs,
            "packs_rewritten": self.packs_rewritten,
            "packs_skipped": self.packs_skipped,
            "pack_bytes_before": self.pack_bytes_before,
            "pack_bytes_after": self.pack_bytes_after,
            "seconds": round(self.seconds, 4),
        }


def collectable(store: object) -> GcStore:
    """``store`` if it supports garbage collection.

    Raises:
        UserError: it does not.
    """
    if not isinstance(store, Collectable):
        raise UserError(f"this server's store ({type(store).__name__}) cannot collect garbage")
    return cast(GcStore, store)


# One collection per store at a time: two would each spare only their own view.
_running: set[int] = set()
_running_lock = threading.Lock()


class Collector:
    """One garbage collection of ``store``, in phases the caller runs in order:
    :meth:`mark`, :meth:`sweep`, :meth:`plan_compaction`, :meth:`compact` (any number of
    times, a few packs each), :meth:`finish`. Each phase is synchronous and may take long
    (run it in a worker thread). Use as a context manager: it holds the per-store guard.
    """

    def __init__(
        self,
        store: GcStore,
        *,
        dry_run: bool = False,
        grace_s: float = DEFAULT_GRACE_S,
        min_live: float = DEFAULT_MIN_LIVE,
        now: float | None = None,
    ) -> None:
        if grace_s < 0 or grace_s != grace_s:
            raise UserError("grace must be a number of seconds, at least 0")
        if not 0.0 <= min_live <= 1.0:
            raise UserError("min_live must be a fraction between 0 and 1")
        self.store = store
        self.dry_run = dry_run
        self.min_live = min_live
        self.started = time.monotonic()
        self.cutoff = (time.time() if now is None else now) - grace_s
        self.report = GcReport(dry_run=dry_run)
        self._times: dict[str, float] = {}  # the snapshot: digest -> commit time
        self._names: dict[str, str] = {}  # the snapshot: name -> digest
        self._reachable: set[str] = set()  # digests (not all of them stored blobs)
        self._garbage: list[str] = []
        self._candidates: list[bytes] = []  # chunks no surviving snapshot blob uses
        self._packs: list[PackStat] = []
        self._targets: list[int] = []
        self._guarded = False

    def __enter__(self) -> Collector:
        with _running_lock:
            if id(self.store) in _running:
                raise GcBusy("a garbage collection of this store is already running")
            _running.add(id(self.store))
            self._guarded = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._guarded:
            with _running_lock:
                _running.discard(id(self.store))
            self._guarded = False

    # --- reading what blobs reference -------------------------------------------------

    def _read_small(self, digest: str) -> bytes | None:
        try:
            recipe = self.store.get_recipe(digest)
        except (BlobMissing, InvalidRef):
            return None
        if recipe.size > MAX_MANIFEST_SIZE:
            return None
        if not recipe.ids:
            return b""
        try:
            first = self.store.get_chunk(recipe.ids[0])
            if first[:1] != b"{":
                return b""  # not JSON, so no image document: references() needs no more
            return first + b"".join(self.store.get_chunk(i) for i in recipe.ids[1:])
        except StoreError as exc:
            raise GcUnreadable(
                f"blob {digest} is reachable but cannot be read ({exc}); nothing was "
                "collected. Check the store with `casctl fsck` and repair it first"
            ) from exc

    def _traverse(self, roots: Iterable[str], names: dict[str, str]) -> None:
        reachable = self._reachable
        stack = [d for d in roots if d not in reachable]
        while stack:
            d = stack.pop()
            if d in reachable:
                continue
            reachable.add(d)
            for child in references(d, self._read_small, names.get):
                if child not in reachable:
                    stack.append(child)

    # --- phases ------------------------------------------------------------------------

    def mark(self) -> None:
        """Snapshot blobs and names, and find every blob the roots reach. No locks."""
        store = self.store
        # Names first: a blob a name points at is then in the blob snapshot too.
        self._names = dict(store.list_names())
        self._times = dict(store.iter_blob_times())
        self.report.blobs_scanned = len(self._times)
        recent = [d for d, t in self._times.items() if t > self.cutoff]
        self.report.blobs_recent = len(recent)
        roots = [d for n, d in self._names.items() if not n.startswith(LAYER_RECORD_PREFIX)]
        self._traverse([*roots, *recent], self._names)
        self._garbage = [d for d in self._times if d not in self._reachable]
        self.report.blobs_reachable = len(self._times) - len(self._garbage)
        # Chunks the surviving blobs use; every other chunk in the index is a candidate.
        live: set[bytes] = set()
        for d in self._times:
            if d in self._reachable:
                try:
                    live.update(store.get_recipe(d).ids)
                except BlobMissing:  # cannot happen while this collection runs alone
                    raise GcUnreadable(f"blob {d} vanished during the collection") from None
        candidates = []
        scanned = 0
        for cid in store.iter_chunk_ids():
            scanned += 1
            if cid not in live:
                candidates.append(cid)
        self.report.chunks_scanned = scanned
        self._candidates = candidates

    def _layer_names_to_remove(self) -> list[tuple[str, str]]:
        out = []
        for name, digest in self._names.items():
            if not name.startswith(LAYER_RECORD_PREFIX):
                continue
            layer = name[len(LAYER_RECORD_PREFIX) :]
            if layer in self._reachable:
                continue
            if self._times.get(digest, 0.0) > self.cutoff:
                continue  # a record committed just now: its image is being imported
            out.append((name, digest))
        return out

    def sweep(self) -> None:
        """Under the store's write lock: catch up with what changed since the snapshot,
        then delete the garbage in one transaction (or, dry, count it)."""
        store = self.store
        with store.exclusive():
            names_now = dict(store.list_names())
            times_now = dict(store.iter_blob_times())
            roots = [
                d
                for n, d in names_now.items()
                if self._names.get(n) != d and not n.startswith(LAYER_RECORD_PREFIX)
            ]
            roots += [d for d, t in times_now.items() if d not in self._times or t > self.cutoff]
            changed_records = {
                n[len(LAYER_RECORD_PREFIX) :]: d
                for n, d in names_now.items()
                if n.startswith(LAYER_RECORD_PREFIX) and self._names.get(n) != d
            }
            while True:
                self._traverse(roots, names_now)
                # A re-pointed layer record counts once its layer is reachable.
                roots = [
                    d
                    for layer, d in changed_records.items()
                    if layer in self._reachable and d not in self._reachable
                ]
                if not roots:
                    break
            garbage = [d for d in self._garbage if d in times_now and d not in self._reachable]
            kept = set(self._garbage) - set(garbage)
            fresh: set[bytes] = set()
            for d in times_now:
                if d not in self._times or d in kept:
                    fresh.update(store.get_recipe(d).ids)
            chunks = [c for c in self._candidates if c not in fresh]
            layer_names = self._layer_names_to_remove()
            result = store.delete_garbage(
                names=layer_names, blobs=garbage, chunks=chunks, dry_run=self.dry_run
            )
        self.report.blobs_deleted = result.blobs
        self.report.names_removed = result.names
        self.report.chunks_deleted = result.chunks
        self.report.chunks_leased = result.chunks_leased
        self.report.bytes_freed = result.stored_bytes
        self._garbage = []
        self._candidates = []

    def plan_compaction(self) -> list[int]:
        """Which packs to rewrite: those whose live fraction is below min_live, and every
        pack with no live record but some dead bytes."""
        self._packs = self.store.pack_stats()
        self.report.packs = len(self._packs)
        self.report.pack_bytes_before = sum(p.file_bytes for p in self._packs)
        self._targets = [p.number for p in self._packs if self._worth_rewriting(p)]
        return list(self._targets)

    def _worth_rewriting(self, p: PackStat) -> bool:
        if p.live_bytes >= p.file_bytes - PACK_HEADER.size:
            return False  # nothing dead in it (a fresh pack: only its header)
        if p.live_records == 0:
            return True
        # The pack taking appends is retired and rewritten too: a store smaller than one
        # pack would otherwise never get space back.
        return p.live_fraction < self.min_live

    def compact(self, numbers: list[int]) -> list[RewriteResult]:
        """Rewrite these packs (from :meth:`plan_compaction`); dry, only count them."""
        if self.dry_run:
            self.report.packs_rewritten += len(numbers)
            return []
        results = self.store.rewrite_packs(numbers)
        for r in results:
            if r.removed:
                self.report.packs_rewritten += 1
            else:
                self.report.packs_skipped += 1
                self.report.skipped.append(f"pack {r.number}: {r.reason}")
        return results

    def finish(self) -> GcReport:
        if self.dry_run:
            stats = {p.number: p for p in self._packs}
            saved = sum(
                stats[n].file_bytes - stats[n].live_bytes for n in self._targets if n in stats
            )
            self.report.pack_bytes_after = self.report.pack_bytes_before - saved
        elif self.report.packs_rewritten:
            self.report.pack_bytes_after = sum(p.file_bytes for p in self.store.pack_stats())
        else:
            self.report.pack_bytes_after = self.report.pack_bytes_before
        self.report.seconds = time.monotonic() - self.started
        return self.report


def collect(
    store: object,
    *,
    dry_run: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    min_live: float = DEFAULT_MIN_LIVE,
    now: float | None = None,
) -> GcReport:
    """Run a whole collection in this thread (tests, offline use)."""
    with Collector(
        collectable(store), dry_run=dry_run, grace_s=grace_s, min_live=min_live, now=now
    ) as c:
        c.mark()
        c.sweep()
        c.compact(c.plan_compaction())
        return c.finish()


# --- the daemon's operation --------------------------------------------------------------


@ops.operation(
    "gc",
    Scope.ADMIN,
    "delete blobs no name reaches and chunks no blob uses; compact mostly-dead packs",
)
async def gc_operation(
    ctx: ServerContext, args: ops.Document, progress: ops.Progress
) -> ops.Document:
    import logging

    log = logging.getLogger("casd.gc")
    collector = Collector(
        collectable(ctx.store),
        dry_run=ops.arg_bool(args, "dry_run"),
        grace_s=ops.arg_number(args, "grace_s", DEFAULT_GRACE_S),
        min_live=ops.arg_number(args, "min_live", DEFAULT_MIN_LIVE),
    )
    report = collector.report

    async def say(phase: str) -> None:
        await progress({"phase": phase, **report.as_dict()})  # throttled by the caller

    with collector:
        await say("mark")
        await ctx.run(collector.mark)
        await say("sweep")
        await ctx.run(collector.sweep)
        await say("compact")
        targets = await ctx.run(collector.plan_compaction)
        for number in targets:
            await ctx.run(collector.compact, [number])
            await say("compact")
        result = await ctx.run(collector.finish)
    for why in result.skipped:
        log.warning("gc left %s", why)
    log.info("gc: %s", result.as_dict())
    return dict(result.as_dict())
