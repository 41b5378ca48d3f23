"""Syncing images: a name that points at a manifest or index brings what it references.

``casctl sync`` copies named blobs. When such a blob is an OCI manifest or index, the
destination also needs its config, its layers and their layer records. Re-encodable
layers travel as their *uncompressed* chunks, each delta-encoded against the same layer
of the image the destination held under that name before; the destination re-encodes
them, checks the digest, and only then records the layer. If its zlib does not reproduce
the digest, it asks the source to materialize the compressed bytes as a blob
(``oci.materialize``) and fetches those instead.

Names move last: an image name never points at an image whose parts are missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import fields
from typing import Any

import trio

from casd import tcpinfo
from casd.blobdelta import Link
from casd.chunking import Chunker, format_digest
from casd.client import Client
from casd.errors import NoSpace, PeerRefused, StoreError, UserError
from casd.nursery import open_nursery
from casd.oci import gogzip, gzipre, media, members
from casd.oci.landing import CheckedLayer, Landings, landing_name, store_compressed
from casd.oci.layers import (
    PIECE,
    Growing,
    LayerCache,
    LayerError,
    LayerRecord,
    can_reencode_here,
    read_record,
    read_small,
)
from casd.oci.tarcut import TarCutter
from casd.replicate import Cut, SyncReport, Throttle, stream_to_thread, sync_into_store
from casd.storage.interface import Store

log = logging.getLogger("casd.oci")

Run = Callable[..., Awaitable[Any]]
Progress = Callable[[dict[str, int | float | str]], Awaitable[None]] | None

#: Pieces (of casd.oci.layers.PIECE bytes) of a streamed layer that may wait for the
#: thread that stores them; beyond that the connection waits.
LAYER_PIECES_AHEAD = 8


def _merge(into: SyncReport, part: SyncReport) -> None:
    for f in fields(SyncReport):
        if f.type in ("int", "float") and f.name not in ("wire_bytes", "started"):
            setattr(into, f.name, getattr(into, f.name) + getattr(part, f.name))
        elif f.type == "str" and (text := getattr(part, f.name)):
            setattr(into, f.name, "; ".join(x for x in (getattr(into, f.name), text) if x))


def _document(store: Store, digest: str) -> media.Document | None:
    data = read_small(store, digest)
    return media.sniff(data) if data is not None else None


def _old_layers(store: Store, old: str | None) -> dict[str, list[str]]:
    """The uncompressed digests of the layers of the image previously held, per
    platform key ("" for a single manifest): the bases for the new version's layers."""
    out: dict[str, list[str]] = {}
    if old is None:
        return out
    doc = _document(store, old)
    if doc is None:
        return out
    manifests = [("", old, doc)] if doc.kind == "manifest" else []
    for m in doc.manifests:
        sub = _document(store, m.digest)
        if sub is not None:
            manifests.append((_platform_key(m), m.digest, sub))
    for key, _, mdoc in manifests:
        uncompressed = []
        for layer in mdoc.layers:
            try:
                rec = read_record(store, layer.digest)
            except Exception:  # a bad record only costs a base hint
                rec = None
            uncompressed.append(rec.uncompressed if rec is not None else layer.digest)
        out[key] = uncompressed
    return out


def _layer_digests(store: Store, doc: media.Document) -> set[str]:
    out = {x.digest for x in doc.layers}
    for m in doc.manifests:
        sub = _document(store, m.digest)
        if sub is not None:
            out |= {x.digest for x in sub.layers}
    return out


def _previous_version(
    store: Store, name: str, doc: media.Document, names: dict[str, str]
) -> str | None:
    """The image this store holds that ``name`` most likely is a new version of: one in the
    same repository (``REPO:`` prefix), sharing the most layers with ``doc``; among equals
    the greatest tag (v9 before v10 is a guess; any version of the image is a fair base)."""
    repo, sep, _ = name.rpartition(":")
    if not sep:
        return None
    wanted = _layer_digests(store, doc)
    best: tuple[int, str] | None = None
    best_digest = None
    for other, digest in names.items():
        if not other.startswith(repo + ":") or other == name:
            continue
        odoc = _document(store, digest)
        if odoc is None:
            continue
        score = (len(wanted & _layer_digests(store, odoc)), other)
        if best is None or score > best:
            best, best_digest = score, digest
    return best_digest


def _platform_key(desc: media.Descriptor) -> str:
    p = desc.platform or {}
    return "/".join(str(p.get(k, "")) for k in ("os", "architecture", "variant"))


async def sync_with_images(
    src: Client,
    store: Store,
    run: Run,
    pairs: list[tuple[str, str]],
    *,
    dry_run: bool = False,
    on_progress: Progress = None,
    cache: LayerCache | None = None,
    link: Link | None = None,
    layer_link: Link | None = None,
    landings: Landings | None = None,
    sizes: dict[str, int] | None = None,
) -> SyncReport:
    """:func:`casd.replicate.sync_into_store`, completed with what images reference;
    ``link`` as there; ``layer_link`` the link as fast as it was seen to go, which
    decides whether a layer made by Go's gzip comes whole (:func:`whole_is_faster`).
    ``landings``: where a layer that comes as its compressed bytes has its tar stored
    after the sync (casd.oci.landing); without, during it."""
    local_before = dict(await run(store.list_names))
    deferred: list[tuple[str, str]] = []
    report = await sync_into_store(
        src,
        store,
        run,
        pairs,
        dry_run=dry_run,
        on_progress=on_progress,
        defer_names=deferred,
        sizes=sizes,
    )
    if not dry_run:
        for name, digest in pairs:
            doc = await run(_document, store, digest)
            if doc is not None:
                old = local_before.get(name) or await run(
                    _previous_version, store, name, doc, local_before
                )
                await _complete_image(
                    src,
                    store,
                    run,
                    digest,
                    old,
                    report,
                    on_progress,
                    cache,
                    link,
                    layer_link,
                    landings,
                )
        for name, digest in deferred:
            await run(store.tag, name, digest)
    return report


def _done(report: SyncReport) -> int:
    """What a sync's progress counts as done: chunk bytes fetched, and layers streamed."""
    return report.bytes_raw_fetched + report.layer_stream_bytes


def _after(report: SyncReport, on_progress: Progress) -> Progress:
    """``on_progress`` for a part of the sync that counts from zero (a sync_into_store
    call of its own), counting on from what ``report`` has done: one sync's progress
    grows, part after part."""
    if on_progress is None:
        return None
    send, before = on_progress, _done(report)

    async def shifted(p: dict[str, int | float | str]) -> None:
        await send({**p, "bytes_done": before + int(p.get("bytes_done", 0))})

    return shifted


async def _sync_digests(
    src: Client,
    store: Store,
    run: Run,
    digests: list[str],
    report: SyncReport,
    on_progress: Progress,
    hints: dict[str, str] | None = None,
    on_blob: Callable[[str], Awaitable[None]] | None = None,
    tee: Callable[[str], Callable[[bytes], None] | None] | None = None,
    link: Link | None = None,
    cut: Callable[[str], Cut] | None = None,
    sizes: dict[str, int] | None = None,
) -> None:
    todo = [d for d in dict.fromkeys(digests) if not await run(store.has_blob, d)]
    if not todo:
        return
    part = await sync_into_store(
        src,
        store,
        run,
        [(d, d) for d in todo],
        on_progress=_after(report, on_progress),
        base_hints=hints,
        on_blob=on_blob,
        tee=tee,
        link=link,
        cut=cut,
        sizes=sizes,
    )
    _merge(report, part)


async def _complete_image(
    src: Client,
    store: Store,
    run: Run,
    top: str,
    old: str | None,
    report: SyncReport,
    on_progress: Progress,
    cache: LayerCache | None,
    link: Link | None,
    layer_link: Link | None = None,
    landings: Landings | None = None,
) -> None:
    doc = await run(_document, store, top)
    assert doc is not None
    if doc.kind == "index":
        await _sync_digests(
            src,
            store,
            run,
            [m.digest for m in doc.manifests],
            report,
            on_progress,
            sizes={m.digest: m.size for m in doc.manifests},
        )
        manifests = [(_platform_key(m), m.digest) for m in doc.manifests]
    else:
        manifests = [("", top)]
    old_layers = await run(_old_layers, store, old)

    # Configs, and the layer records of layers this store cannot serve yet.
    configs: list[str] = []
    sizes: dict[str, int] = {}  # of the small blobs asked for next, as the source says
    wanted: list[tuple[str, media.Descriptor, int]] = []  # (platform key, layer, index)
    for key, digest in manifests:
        mdoc = await run(_document, store, digest)
        if mdoc is None or mdoc.config is None:
            continue
        configs.append(mdoc.config.digest)
        sizes[mdoc.config.digest] = mdoc.config.size
        for i, layer in enumerate(mdoc.layers):
            wanted.append((key, layer, i))

    # Which layers have a record on the source: asked all at once (one round trip).
    records: dict[str, str] = {}  # compressed digest -> record blob digest on the source
    plain: list[str] = []
    todo = [
        layer.digest
        for _, layer, _ in wanted
        if not await run(store.has_blob, layer.digest)
        and not await run(_layer_ready, store, layer.digest, cache)
    ]

    async def lookup(d: str) -> None:
        try:
            info = await src.stat(media.layer_record_name(d))
        except PeerRefused as exc:
            if exc.code_name != "NOT_FOUND":
                raise
            plain.append(d)
            return
        records[d] = info.digest
        sizes[info.digest] = info.size

    async with open_nursery() as lookups:
        for d in dict.fromkeys(todo):
            lookups.start_soon(lookup, d)
    await _sync_digests(
        src,
        store,
        run,
        configs + plain + list(records.values()),
        report,
        on_progress,
        sizes=sizes,
    )

    # A layer kept raw moves as its compressed bytes (as a registry would send it; its
    # tar can be recovered from them here, no need to move it too); a re-encodable one as
    # its tar's chunks, delta-encoded against the same layer of the old image, and is
    # re-encoded and checked here as soon as it arrived, while the next ones transfer.
    parsed: dict[str, LayerRecord] = {}
    contents: list[str] = []
    hints: dict[str, str] = {}
    for key, layer, i in wanted:
        d = layer.digest
        if d not in records or d in parsed:
            continue
        rec = LayerRecord.from_json(await run(read_small, store, records[d]) or b"")
        bases: list[str] = old_layers.get(key) or next(iter(old_layers.values()), [])
        makeable = rec.raw is None and rec.reencodable and can_reencode_here(rec)
        # Its compressed bytes can land in the cache, its tar stored after the sync.
        deferrable = landings is not None and cache is not None and rec.size <= cache.max_bytes
        whole = makeable and bool(bases) and whole_is_faster(rec, layer_link)
        if whole:
            report.layers_whole += 1
            log.info(
                "layer %s: its %d bytes cross sooner than this host makes them again from "
                "its %d-byte tar; fetching them",
                d,
                rec.size,
                rec.uncompressed_size,
            )
        if (rec.raw is None and rec.reencodable and not makeable) or (whole and not deferrable):
            # Made by Go's gzip, and this host either lacks the helper that makes it again
            # or would take longer making it than its bytes take to cross: the compressed
            # bytes come as a blob, which then serves the layer here.
            if not whole:
                log.info(
                    "layer %s: this host cannot make its bytes again (%s), fetching them",
                    d,
                    (rec.encoding or {}).get("lib") or f"no {gogzip.HELPER}",
                )
            await src.call("oci.materialize", {"digest": d})
            contents.append(d)
            continue
        parsed[d] = rec
        if rec.raw is not None or not rec.reencodable:
            contents.append(rec.raw or d)
            continue
        contents.append(rec.uncompressed)
        # A layer that comes whole streams as a first pull's does (no base: no hint).
        if bases and not whole:
            hints[rec.uncompressed] = bases[min(i, len(bases) - 1)]
    by_content = {
        (rec.uncompressed if rec.reencodable and rec.raw is None else rec.raw or d): d
        for d, rec in parsed.items()
    }
    if landings is not None:  # a base whose tar is still being stored here: wait for it
        await landings.wait_for(set(hints.values()))
    verify_limit = trio.CapacityLimiter(1)  # one core re-encodes, the other receives
    failed: list[str] = []
    done: set[str] = set()
    # A layer whose tar crosses now is re-encoded as it lands (fed by the sync's hasher),
    # so checking its digest overlaps the transfer instead of following it.
    landing = {
        rec.uncompressed: _Reencoder(rec, cache)
        for rec in parsed.values()
        if rec.reencodable and rec.raw is None
    }

    def tee(content: str) -> Callable[[bytes], None] | None:
        r = landing.get(content)
        if r is not None and r.fed:  # an attempt that was abandoned: start again
            r.discard()
            r = landing[content] = _Reencoder(r.rec, cache)
        return r.feed if r is not None else None

    def cut(content: str) -> Cut:
        # A layer's tar rebuilt from a whole-blob delta is cut as the importer cut it, so
        # its chunks are the source's (and the next version's delta finds them).
        return TarCutter(Chunker()).cut_stream

    async def verify(d: str) -> None:
        rec = parsed[d]
        if rec.reencodable and rec.raw is None:
            r = landing.get(rec.uncompressed)
            if r is not None and r.fed:
                ok = await run(r.finish)
                if not ok and _made_by_isal(rec):
                    # ISA-L now and then makes other (valid) bytes of a segment than it
                    # makes of it every other time (once in 96 syncs of the benchmark):
                    # once more, from the tar now stored, before the bytes cross instead.
                    async with verify_limit:
                        ok = await run(_verify, store, rec, cache)
                    if ok:
                        log.warning("layer %s came out right when made a second time", d)
            else:  # the tar was here already: re-encode it now
                if r is not None:
                    r.discard()
                async with verify_limit:
                    ok = await run(_verify, store, rec, cache)
            if not ok:
                failed.append(d)
                return
        if d in deferred:
            # Its bytes, in the cache, are its only copy here until its tar is stored:
            # the landing is due (a name, so a restart resumes it) before the layer shows.
            await run(store.tag, landing_name(d), records[d])
            await run(store.tag, media.layer_record_name(d), records[d])
            assert landings is not None
            landings.submit(rec)
            report.layers_deferred += 1
            return
        await run(store.tag, media.layer_record_name(d), records[d])

    deferred: set[str] = set()

    try:
        async with open_nursery() as verifiers:

            async def arrived(content: str) -> None:
                d = by_content.get(content)
                if d is not None and d not in done:
                    done.add(d)
                    verifiers.start_soon(verify, d)

            # A layer with no old version here comes as its compressed bytes, as a registry
            # sends it: with nothing to encode against, chunks would save a few per cent of
            # the bytes and cost both hosts their CPU (the source reads and packs tens of
            # thousands of chunks, this side checks and compresses each again).
            # One after another on the wire, each at the link's full rate; but the next is
            # asked for about a round trip before the one before has crossed, so its first
            # bytes follow that one's last: the link never idles between layers (an idle
            # connection also falls back to TCP slow start).
            streamed: set[str] = set()
            in_flight = [0]

            async def land(
                content: str, r: _Reencoder, after: trio.Event | None, crossed: trio.Event
            ) -> None:
                try:
                    if after is not None:
                        await after.wait()
                    defer = landings is not None and r.keeps_bytes
                    ok = await _land_compressed(
                        src, store, run, r, report, on_progress, in_flight, crossed.set, defer=defer
                    )
                    if ok and defer:
                        deferred.add(by_content[content])
                finally:
                    crossed.set()
                if ok:
                    streamed.add(content)
                    await arrived(content)

            async with open_nursery() as streams:
                after: trio.Event | None = None
                for content, r in list(landing.items()):
                    if content in hints or await run(store.has_blob, content):
                        continue
                    crossed = trio.Event()
                    streams.start_soon(land, content, r, after, crossed)
                    after = crossed
            await _sync_digests(
                src,
                store,
                run,
                [c for c in contents if c not in streamed],
                report,
                on_progress,
                hints,
                arrived,
                tee,
                link,
                cut,
            )
            for d in parsed:  # layers whose content was here already
                await arrived(next(c for c, x in by_content.items() if x == d))

    finally:
        # A sync that ends early leaves no layer file growing that nobody finishes.
        for r in landing.values():
            r.abandon()

    for d in failed:
        log.warning("layer %s does not re-encode here; fetching its compressed bytes", d)
        await src.call("oci.materialize", {"digest": d})
        await _sync_digests(src, store, run, [d], report, on_progress)
        # The blob itself now serves the layer; its record (kept on the source) is not
        # needed here.


#: A layer stream asks for the next layer when what is left of it would cross in this
#: many round trips (the kernel's smoothed figure for the connection), once at least
#: NEXT_AFTER_BYTES came (a rate measured on less is noise).
NEXT_LEAD = 2.0
NEXT_AFTER_BYTES = 1 << 20


async def _land_compressed(
    src: Client,
    store: Store,
    run: Run,
    landing: _Reencoder,
    report: SyncReport,
    on_progress: Progress,
    in_flight: list[int],
    received: Callable[[], None] | None = None,
    *,
    defer: bool = False,
) -> bool:
    """Fetch the layer ``landing`` re-encodes as its compressed bytes (oci.layer) and
    store its tar, as the importer would from a registry. Returns False where that
    failed and nothing of it is visible (the source cannot stream it, or what came is
    not the layer): its chunks come instead. ``received`` is called about a round trip
    before the source sends its last byte, and again once it has (the tar is then still
    being stored); ``in_flight[0]`` counts the
    bytes of the landings under way, for progress. ``defer``: only check the bytes and
    keep them, durably, in the cache (``landing`` keeps them); the tar is stored later
    (casd.oci.landing)."""
    rec = landing.rec
    wire, started = src.peer.wire_bytes, trio.current_time()
    made: list[int] = []
    progress = Throttle(on_progress)
    done = [0]
    first: list[float] = []  # when the first piece came
    round_trip = tcpinfo.rtt(src.peer.stream)

    async def arrived(size: int) -> None:
        done[0] += size
        in_flight[0] += size
        now = trio.current_time()
        if not first:
            first.append(now)
        elif received is not None and round_trip and done[0] >= NEXT_AFTER_BYTES:
            # The next layer is asked for a round trip before this one's last byte: its
            # first bytes then follow this one's last without the link idling between.
            rate = done[0] / max(now - first[0], 1e-3)
            if rec.size - done[0] <= rate * round_trip * NEXT_LEAD:
                received()
        await progress(
            {
                "name": rec.digest,
                "bytes_done": _done(report) + in_flight[0],
                "wire_bytes": src.peer.wire_bytes - wire,
            }
        )

    def land(pieces: Iterator[bytes]) -> None:
        made.append(
            _spool_compressed(pieces, landing)
            if defer
            else store_compressed(store, pieces, landing)
        )

    # What crossed, and when, as the source stopped sending: the next layer's stream
    # begins then, while this one's tail is still being stored.
    sent_at: list[tuple[int, float]] = []

    def sent() -> None:
        sent_at.append((src.peer.wire_bytes, trio.current_time()))
        if received is not None:
            received()

    try:
        await stream_to_thread(
            src,
            run,
            "oci.layer",
            {"digest": rec.digest},
            land,
            LAYER_PIECES_AHEAD,
            arrived,
            sent,
        )
    except NoSpace:
        raise
    except (PeerRefused, UserError, StoreError, LayerError, gzipre.LayerFormatError) as exc:
        log.warning("layer %s did not stream (%s); fetching its chunks", rec.digest, exc)
        return False
    finally:
        in_flight[0] -= done[0]
    end_wire, ended = sent_at[0]
    wire = end_wire - wire
    report.layers_streamed += 1
    report.layer_stream_bytes += wire
    report.blobs_copied += 1
    report.bytes_total += made[0]
    # A stream like any other for what the link is measured by (casd.blobdelta.Link).
    report.stream_wire += wire
    report.stream_s += ended - started
    report.stream_raw += made[0]
    return True


#: A layer's bytes that are to be its only copy here are synced every this many bytes.
SYNC_EVERY = 8 * 1024 * 1024


class _Reencoder:
    """Re-encodes a layer's tar fed in order, hashes the output, and writes it to the cache
    (renamed in only once the digest matched). ``feed`` and ``finish`` run in worker
    threads, one at a time.

    A layer whose compressed bytes arrive checked otherwise
    (:func:`casd.oci.landing.store_compressed`) is not re-encoded: they are handed to
    ``keep`` instead, for the cache, and ``kept_whole`` says they were all the layer."""

    def __init__(self, rec: LayerRecord, cache: LayerCache | None) -> None:
        self.rec = rec
        self.fed = False
        self._encoder: Any = None  # made on first use: Go's gzip starts a helper process
        self._sha = hashlib.sha256()
        self._size = 0
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._cache = cache
        self._tmp: Any = None
        self._tmp_path = ""
        self._kept: bool | None = None  # None: re-encoding; else whether keep() had it all
        self._checked = True
        self._durable = False
        self._unsynced = 0  # bytes kept durable-to-be since the last sync
        self._growing: Growing | None = None
        if cache is not None and rec.size <= cache.max_bytes:
            fd, self._tmp_path = tempfile.mkstemp(dir=cache.dir, prefix="tmp")
            self._tmp = os.fdopen(fd, "wb")

    @property
    def _enc(self) -> Any:
        if self._encoder is None:
            from casd.oci.layers import make_encoder

            self._encoder = make_encoder(self.rec.encoding, self.rec.digest)
        return self._encoder

    @property
    def keeps_bytes(self) -> bool:
        """Whether the bytes handed to :meth:`keep` end in the cache (if they check)."""
        return self._tmp is not None

    def feed(self, data: bytes) -> None:
        self.fed = True
        if getattr(self._enc, "buffers_input", False):
            self._out(self._enc.update(data))
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= PIECE:  # zlib on large pieces: fewer calls, GIL released
            self._out(self._enc.update(b"".join(self._held)))
            self._held, self._held_bytes = [], 0

    def keep(self, piece: bytes, *, durable: bool = False) -> None:
        """``durable``: the bytes will have to reach the disk (see :meth:`kept_whole`);
        they are synced as they come, so that :meth:`finish` waits for the last few
        megabytes only, not the whole layer (40 MB took 90 ms here)."""
        self.fed = True
        self._kept = False
        if self._tmp is not None:
            self._write(piece)
            if durable:
                self._unsynced += len(piece)
                if self._unsynced >= SYNC_EVERY:
                    self._tmp.flush()
                    os.fdatasync(self._tmp.fileno())
                    self._unsynced = 0

    def kept_whole(self, *, checked: bool = True, durable: bool = False) -> None:
        """All the layer's bytes went to :meth:`keep`; ``checked``: and this host was
        found to make them all again (else the cache keeps them until it has);
        ``durable``: they are the only copy here, so they reach the disk before
        :meth:`finish` returns."""
        self._kept = True
        self._checked = checked
        self._durable = durable

    def _write(self, piece: bytes) -> None:
        self._tmp.write(piece)
        # Pieces are up to a megabyte: one flush each lets a reader follow closely.
        self._tmp.flush()
        if self._growing is None and self._cache is not None:
            # From its first bytes on, the OCI API serves the layer from this file as it
            # grows (casd.oci.source); not before: an attempt may end before any.
            self._growing = self._cache.grow(self.rec.digest, self._tmp_path, self.rec.size)
        if self._growing is not None:
            self._growing.size += len(piece)

    def verified(self) -> None:
        """The bytes written so far were checked to be the whole layer."""
        if self._growing is not None:
            self._growing.ok = True

    def _out(self, piece: bytes) -> None:
        if piece:
            self._sha.update(piece)
            self._size += len(piece)
            if self._tmp is not None:
                self._write(piece)

    def finish(self) -> bool:
        if self._kept is not None:
            ok = self._kept
        else:
            self._out(self._enc.update(b"".join(self._held)) + self._enc.finish())
            self._held = []
            digest = format_digest(self._sha.digest())
            ok = digest == self.rec.digest and self._size == self.rec.size
        if not ok:
            log.warning("layer %s does not re-encode here", self.rec.digest)
        if self._tmp is not None:
            if ok and self._durable:
                self._tmp.flush()
                os.fsync(self._tmp.fileno())
            self._tmp.close()
            self._tmp = None
            if ok and self._cache is not None:
                self._cache.adopt(
                    self.rec.digest, self._tmp_path, checked=self._checked, durable=self._durable
                )
            else:
                os.unlink(self._tmp_path)
            self._grown(ok)
        return ok

    def _grown(self, ok: bool) -> None:
        if self._growing is not None and self._cache is not None:
            self._cache.grown(self.rec.digest, self._growing, ok)
            self._growing = None

    def abandon(self) -> None:
        """:meth:`discard`, unless :meth:`finish` or :meth:`discard` ran already."""
        if self._tmp is not None or self._growing is not None:
            self.discard()

    def discard(self) -> None:
        if self._encoder is not None and hasattr(self._encoder, "close"):
            self._encoder.close()
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None
            os.unlink(self._tmp_path)
        self._grown(False)


def whole_is_faster(rec: LayerRecord, link: Link | None) -> bool:
    """Whether a layer Go's gzip made should come as its compressed bytes although an
    old version of it is here: on ``link`` (as fast as it was seen to go) they cross
    sooner than casd-gogzip would make them again from the tar, which serving them
    takes, whole (about 90 MB/s of tar on 2 cores). With nothing measured: chunks (the
    fewest bytes). Converted layers (members) always come as chunks: they re-encode
    about three times faster, and the fewest bytes is what a converted image promises
    (bench/oci.py weighs them against the ideal on every link)."""
    if link is None or link.rate <= 0 or (rec.encoding or {}).get("codec") != gogzip.CODEC:
        return False
    return rec.size / link.rate < rec.uncompressed_size / gogzip.REENCODE_RATE


def _layer_ready(store: Store, digest: str, cache: LayerCache | None) -> bool:
    try:
        rec = read_record(store, digest)
    except Exception:
        return False
    if rec is None:
        return False
    # Its tar, or (its landing due) its bytes in the cache.
    return store.has_blob(rec.uncompressed) or (cache is not None and cache.has(digest))


def _spool_compressed(pieces: Iterator[bytes], landing: _Reencoder) -> int:
    """Worker thread: check the compressed bytes arriving as ``pieces`` against the
    layer and hand them all to ``landing`` (which writes them to the cache, durably);
    the tar is stored later (casd.oci.landing). Returns the tar's size, as the record
    says it."""
    stream = CheckedLayer(landing.rec, pieces)
    for piece in stream:
        landing.keep(piece, durable=True)
    stream.check()
    landing.kept_whole(checked=False, durable=True)
    # Checked: a reader following the file (casd.oci.source) may have its last byte now,
    # without waiting for the file to reach the disk and be renamed into the cache.
    landing.verified()
    return landing.rec.uncompressed_size


def _made_by_isal(rec: LayerRecord) -> bool:
    enc = rec.encoding or {}
    return enc.get("codec") == members.CODEC and members.family(str(enc.get("lib", ""))) == "isa-l"


def _verify(store: Store, rec: LayerRecord, cache: LayerCache | None) -> bool:
    from casd.oci.layers import verified_encoding

    if cache is not None:
        return cache.fill(store, rec)
    try:
        for _ in verified_encoding(store, rec):
            pass
    except Exception as exc:
        log.warning("%s", exc)
        return False
    return True
