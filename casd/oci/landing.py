"""Storing a layer's tar from its compressed bytes, now or after its sync (a landing).

A layer with no old version on the receiving host comes as its compressed bytes, as a
registry sends it. The host keeps its tar, cut into chunks, so the next version can come
as a delta against it: decompressing, cutting, hashing and compressing every chunk costs
about 60 MB/s of tar per core, several times what a fast link delivers. When the layer
cache can hold the bytes, the sync therefore only checks their digest, writes them to the
cache durably and records the layer, which then serves from the cache at once; the tar
is stored afterwards by :class:`Landings`, one layer at a time, in a thread at the lowest
CPU priority so that the clients pulling the image go first.

Until its landing is done, a layer's bytes are the only copy: the cache keeps them past
its bound (they are adopted unchecked, and no tar is here to check them against) and a
name ``.oci/landing/<D>`` keeps the landing due across restarts. A new sync that would
delta-encode against such a layer waits for its landing first. A landing whose tar is not
the one the record names stores the compressed bytes as a blob instead (they were
verified): the layer keeps serving, it only comes whole next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import trio

from casd.chunking import Chunker, format_digest
from casd.errors import DigestMismatch
from casd.oci import gogzip, gzipre, members
from casd.oci.layers import (
    PIECE,
    BlobWriter,
    IterReader,
    LayerCache,
    LayerError,
    LayerRecord,
    put_stream,
    read_record,
)
from casd.oci.tarcut import TarCutter
from casd.storage.interface import Store

log = logging.getLogger("casd.oci")

#: Seconds without foreground work before a landing goes on.
IDLE_GRACE = 1.0

#: Names ``.oci/landing/<layer digest>`` -> the layer's record blob: landings still due.
LANDING_PREFIX = ".oci/landing/"


def landing_name(digest: str) -> str:
    return LANDING_PREFIX + digest


class Keeper(Protocol):
    """Where :func:`store_compressed` hands the bytes and tar it sees (for the cache,
    and for checking that this host makes the bytes again)."""

    rec: LayerRecord

    @property
    def keeps_bytes(self) -> bool: ...

    def keep(self, piece: bytes) -> None: ...

    def feed(self, data: bytes) -> None: ...

    def kept_whole(self, *, checked: bool = True) -> None: ...


class CheckedLayer:
    """A layer's compressed bytes as they arrive, hashed and counted as they pass: more
    bytes than the layer has fail at once, and :meth:`check` once all have passed."""

    def __init__(self, rec: LayerRecord, pieces: Iterator[bytes]) -> None:
        self.rec = rec
        self._pieces = pieces
        self._sha = hashlib.sha256()
        self._size = 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._pieces:
            self._size += len(piece)
            if self._size > self.rec.size:
                raise DigestMismatch(
                    self.rec.digest, f"a stream longer than its {self.rec.size} bytes"
                )
            self._sha.update(piece)
            yield piece

    def check(self) -> None:
        """Raises DigestMismatch unless the bytes that passed were the layer."""
        got = format_digest(self._sha.digest())
        if got != self.rec.digest or self._size != self.rec.size:
            raise DigestMismatch(self.rec.digest, f"{got} ({self._size} bytes)")


def store_compressed(store: Store, pieces: Iterator[bytes], landing: Keeper) -> int:
    """Worker thread: check the compressed bytes arriving as ``pieces`` against the
    layer ``landing`` re-encodes, decompress them, and store the tar cut as the importer
    cuts it; the tar blob is committed only once both digests match. That this host can
    make the bytes again is checked as they pass: a converted layer's members one by one
    (casd.oci.members.MembersDecoder, and ``landing`` keeps the bytes for the cache),
    other layers by ``landing`` re-encoding the tar. Returns the tar's size.

    Raises:
        DigestMismatch: the bytes are not the layer, or do not decompress to its tar.
        LayerFormatError: they are not gzip, or not members this host makes.
    """
    rec = landing.rec
    stream = CheckedLayer(rec, pieces)

    encoding = rec.encoding or {}
    codec = encoding.get("codec")
    checked_members = codec == members.CODEC
    if checked_members:
        params = members.MembersParams.from_dict(
            {k: v for k, v in encoding.items() if k != "codec"}
        )
        # Members are deflated again only in part when the cache keeps the bytes (and
        # holds them until the whole layer was made here): else in full, now.
        decoder = members.MembersDecoder(params, sample=landing.keeps_bytes)

        def tar() -> Iterator[bytes | bytearray]:
            for piece in stream:
                landing.keep(piece)
                yield from decoder.feed(piece)
            yield from decoder.finish()

    elif codec == gogzip.CODEC and landing.keeps_bytes:
        # Go's gzip: made again here at about a third of the speed the landing goes at.
        # The cache keeps the bytes as they came (held until a whole re-encoding made
        # them, as for members), and the helper makes the first blocks now: a host whose
        # build differs is found at once, not at eviction.
        pg = gogzip.PgzipParams.from_dict({k: v for k, v in encoding.items() if k != "codec"})
        head, plain = bytearray(), bytearray()
        sample = 4 * pg.block
        sampled = False

        def check_sample() -> None:
            nonlocal sampled
            sampled = True
            if not gogzip.sample_matches(pg, head, plain):
                raise gzipre.LayerFormatError(
                    f"layer {rec.digest}: this host's {gogzip.HELPER} does not make its "
                    "first blocks"
                )

        def compressed() -> Iterator[bytes]:
            for piece in stream:
                landing.keep(piece)
                if not sampled and len(head) < 2 * sample:
                    head.extend(piece)
                yield piece

        def tar() -> Iterator[bytes | bytearray]:
            for piece in gzipre.decompress(compressed()):
                if not sampled:
                    plain.extend(piece)
                    if len(plain) > sample:
                        check_sample()
                yield piece
            if not sampled:
                check_sample()

    else:

        def tar() -> Iterator[bytes | bytearray]:
            for piece in gzipre.decompress(iter(stream)):
                landing.feed(piece)
                yield piece

    with BlobWriter(store, background=True) as w:
        for chunk in TarCutter(Chunker()).cut_stream(IterReader(tar())):  # type: ignore[arg-type]
            w.add(chunk)
        stream.check()
        if w.digest != rec.uncompressed:
            raise DigestMismatch(rec.uncompressed, w.digest)
        w.commit()
    if checked_members:
        landing.kept_whole(checked=decoder.fully_checked)
    elif codec == gogzip.CODEC and landing.keeps_bytes:
        landing.kept_whole(checked=False)
    return w.size


class _Cached:
    """A :class:`Keeper` for bytes that are in the cache already (adopted unchecked:
    the cache checks them against the tar before it lets them go)."""

    keeps_bytes = True

    def __init__(self, rec: LayerRecord) -> None:
        self.rec = rec

    def keep(self, piece: bytes) -> None:
        pass

    def feed(self, data: bytes) -> None:
        pass

    def kept_whole(self, *, checked: bool = True) -> None:
        pass


class Stopped(Exception):
    """The daemon is stopping: the landing stays due (its name is kept)."""


def land_from_cache(
    store: Store,
    cache: LayerCache,
    rec: LayerRecord,
    stop: threading.Event,
    pause: Callable[[threading.Event], None] | None = None,
) -> str:
    """Worker thread: store the tar of the layer whose bytes the cache holds. Returns
    "landed", or "kept whole" where the tar was not the record's (the bytes, verified
    when they came, are then stored as a blob, which serves the layer from now on).
    ``pause(stop)`` is called before each piece: it returns when the landing may go on."""
    if store.has_blob(rec.uncompressed):
        return "landed"
    path = cache.path(rec.digest)

    def pieces(f: Any) -> Iterator[bytes]:
        while data := f.read(PIECE):
            if pause is not None:
                pause(stop)
            if stop.is_set():
                raise Stopped
            yield data

    try:
        with open(path, "rb") as f:
            store_compressed(store, pieces(f), _Cached(rec))
        return "landed"
    except (DigestMismatch, gzipre.LayerFormatError, LayerError) as exc:
        log.warning(
            "layer %s: its tar is not what its record says (%s); keeping its bytes as a blob",
            rec.digest,
            exc,
        )
    with open(path, "rb") as f:
        got = put_stream(store, f, Chunker())
    if got != rec.digest:  # the cache's copy changed under it: nothing to do but say so
        raise LayerError(f"cached layer {rec.digest} now reads as {got}")
    return "kept whole"


class _Niced(threading.Thread):
    """``fn(*args)`` in a new thread at the lowest CPU priority (Linux nice values are per
    thread; a new one, since a pooled thread could not be raised again unprivileged)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        super().__init__(name="casd-landing", daemon=True)
        self._call = (fn, args)
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        fn, args = self._call
        try:
            self.result = fn(*args)
        except BaseException as exc:
            self.error = exc


class Landings:
    """The landings due on this daemon: submitted by syncs, resumed on start (from the
    ``.oci/landing/`` names), run one at a time by :meth:`run`."""

    def __init__(self, store: Store, cache: LayerCache) -> None:
        self.store = store
        self.cache = cache
        self._due: dict[str, trio.Event] = {}  # layer digest -> set once landed (or given up)
        self._contents: dict[str, str] = {}  # tar digest -> layer digest, while due
        self._send, self._receive = trio.open_memory_channel[LayerRecord](math.inf)
        # Landings give way to foreground work (syncs, clients pulling layers) unless
        # someone waits for one: in a worker thread a landing holds the GIL most of the
        # time, and a nice value does not give way on that.
        self._busy = 0
        self._waiting = 0
        self._go = threading.Event()
        self._go.set()
        self._idle_since = 0.0  # time.monotonic() when the last foreground work ended
        self.landed = 0
        self.kept_whole = 0
        self.failed = 0
        self.seconds = 0.0

    @property
    def pending(self) -> int:
        return len(self._due)

    def is_due(self, digest: str) -> bool:
        return digest in self._due

    def submit(self, rec: LayerRecord) -> None:
        """Land ``rec``'s tar soon. Its landing name must be tagged already."""
        if rec.digest in self._due:
            return
        self._due[rec.digest] = trio.Event()
        self._contents[rec.uncompressed] = rec.digest
        # Stopping: due again on the next start (its name stays).
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(rec)

    async def wait_for(self, contents: Iterable[str]) -> None:
        """Until the layers whose tars are ``contents`` (those due) have landed."""
        for c in contents:
            d = self._contents.get(c)
            if d is not None and d in self._due:
                log.info("waiting for layer %s to land before it serves as a base", d)
                self._waiting += 1
                self._update()
                try:
                    await self._due[d].wait()
                finally:
                    self._waiting -= 1
                    self._update()

    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """Landings pause while this is held (a sync, a layer streaming to a client)."""
        self._busy += 1
        self._update()
        try:
            yield
        finally:
            self._busy -= 1
            self._update()

    def _update(self) -> None:
        if self._busy == 0:
            self._idle_since = time.monotonic()
        if self._busy == 0 or self._waiting:
            self._go.set()
        else:
            self._go.clear()

    def _pause(self, stop: threading.Event) -> None:
        """Worker thread: wait while foreground work runs, and for IDLE_GRACE after it
        (a client that pulls an image just synced asks for its manifest, config and
        layers one after another: the landing does not wedge itself between them)."""
        while True:
            if stop.is_set():
                raise Stopped
            if self._go.wait(0.2):
                if self._waiting:
                    return
                left = self._idle_since + IDLE_GRACE - time.monotonic()
                if left <= 0:
                    return
                stop.wait(min(left, 0.2))

    def _resume(self) -> list[LayerRecord]:
        out = []
        for name, _ in self.store.list_names(LANDING_PREFIX):
            digest = name[len(LANDING_PREFIX) :]
            try:
                rec = read_record(self.store, digest)
            except LayerError:
                rec = None
            if rec is None or not self.cache.has(digest):
                log.warning(
                    "landing of layer %s cannot resume: its record or bytes are gone", digest
                )
                self.store.untag(name)
                if rec is None:  # stopped before its sync named it: the bytes serve nothing
                    self.cache.discard(digest)
                continue
            out.append(rec)
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Land what is due, one layer at a time, until cancelled."""
        for rec in await trio.to_thread.run_sync(self._resume):
            self.submit(rec)
        task_status.started()
        async with self._receive:
            async for rec in self._receive:
                try:
                    await self._land(rec)
                finally:
                    self._contents.pop(rec.uncompressed, None)
                    done = self._due.pop(rec.digest, None)
                    if done is not None:
                        done.set()

    async def _land(self, rec: LayerRecord) -> None:
        stop = threading.Event()
        started = time.perf_counter()
        t = _Niced(land_from_cache, self.store, self.cache, rec, stop, self._pause)
        t.start()
        try:
            await trio.to_thread.run_sync(t.join, abandon_on_cancel=True)
        except trio.Cancelled:
            # The thread still uses the store: have it stop, and wait until it has.
            stop.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(t.join)
            raise
        finally:
            self.seconds += time.perf_counter() - started
        if t.error is not None:
            self.failed += 1
            log.error(
                "landing layer %s failed: %s (it is tried again when casd next starts)",
                rec.digest,
                t.error,
            )
            return
        if t.result == "kept whole":
            self.kept_whole += 1
        else:
            self.landed += 1
        try:
            await trio.to_thread.run_sync(self.store.untag, landing_name(rec.digest))
        except Exception as exc:  # landed all the same; its name is dropped on the next start
            log.error("layer %s landed, but its landing name stays: %s", rec.digest, exc)
        log.info(
            "layer %s landed (%s) in %.1fs", rec.digest, t.result, time.perf_counter() - started
        )
