"""What the OCI pull API serves, read from a casd store.

An image is served as ``REPO:TAG`` when a casd name ``REPO:TAG`` points at a manifest or
index (``casctl oci import`` names images that way by default). Manifests and blobs are
also served by digest under any repository name, as a content-addressed store holds
them once for all. A compressed layer comes from, in order: a blob with its digest, the layer
cache (the only copy while a synced layer's tar is yet to be stored), or re-encoding its
uncompressed chunks (verified as it streams, and kept in the cache once complete).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import trio

from casd.errors import BlobMissing
from casd.oci import media
from casd.oci.http import ManifestHit
from casd.oci.landing import Landings
from casd.oci.layers import (
    PIECE,
    Growing,
    LayerCache,
    LayerError,
    LayerRecord,
    iter_blob,
    read_record,
    read_small,
    verified_encoding,
)
from casd.storage.interface import Store

Run = Callable[..., Awaitable[Any]]

_END = object()


def _pieces(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Regroup small pieces into ~PIECE-sized ones (fewer thread hops and sends)."""
    held: list[bytes] = []
    size = 0
    for c in chunks:
        held.append(c)
        size += len(c)
        if size >= PIECE:
            yield b"".join(held)
            held, size = [], 0
    if held:
        yield b"".join(held)


def _file_range(path: str, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            data = f.read(min(PIECE, left))
            if not data:
                raise LayerError(f"cached layer {path} is shorter than expected")
            left -= len(data)
            yield data


def _reencoded_range(
    store: Store, cache: LayerCache | None, rec: LayerRecord, start: int, end: int
) -> Iterator[bytes]:
    """Bytes [start, end) of a re-encoded layer. A whole-layer read also fills the cache:
    the bytes go to a temporary file that is renamed in only once the digest matched."""
    tmp: Any = None
    if cache is not None and start == 0 and end == rec.size and rec.size <= cache.max_bytes:
        fd, tmp_path = tempfile.mkstemp(dir=cache.dir, prefix="tmp")
        tmp = os.fdopen(fd, "wb")
    try:
        pos = 0
        for piece in verified_encoding(store, rec):
            if tmp is not None:
                tmp.write(piece)
            lo, hi = max(start - pos, 0), min(end - pos, len(piece))
            pos += len(piece)
            if lo < hi:
                yield piece[lo:hi]
            if pos >= end and tmp is None:
                return
        if tmp is not None:
            tmp.close()
            cache.adopt(rec.digest, tmp_path)  # type: ignore[union-attr]
            tmp = None
    finally:
        if tmp is not None:
            tmp.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)


class StoreSource:
    """casd's store as an :class:`casd.oci.http.OciSource`."""

    def __init__(
        self,
        store: Store,
        run: Run,
        cache: LayerCache | None = None,
        landings: Landings | None = None,
    ) -> None:
        self.store = store
        self.run = run
        self.cache = cache
        # Paused while a blob streams: its client goes first (casd.oci.landing).
        self.landings = landings

    # --- manifests and tags -----------------------------------------------------------

    def _hit(self, digest: str) -> ManifestHit | None:
        data = read_small(self.store, digest)
        if data is None:
            return None
        doc = media.sniff(data)
        if doc is None:
            return None
        return ManifestHit(data=data, media_type=doc.media_type, digest=digest)

    def _manifest(self, repo: str, reference: str) -> ManifestHit | None:
        if reference.startswith("sha256:"):
            return self._hit(reference) if self.store.has_blob(reference) else None
        try:
            digest = self.store.resolve(f"{repo}:{reference}")
        except (BlobMissing, ValueError):
            return None
        except Exception as exc:  # InvalidRef: not a name casd could hold
            if type(exc).__name__ == "InvalidRef":
                return None
            raise
        return self._hit(digest)

    async def manifest(self, repo: str, reference: str) -> ManifestHit | None:
        hit: ManifestHit | None = await self.run(self._manifest, repo, reference)
        return hit

    def _tags(self, repo: str) -> list[str] | None:
        prefix = f"{repo}:"
        out = []
        for name, digest in self.store.list_names(prefix):
            tag = name[len(prefix) :]
            if not tag or "/" in tag or ":" in tag:
                continue
            if self._hit(digest) is not None:
                out.append(tag)
        return sorted(out) if out else None

    async def tags(self, repo: str) -> list[str] | None:
        tags: list[str] | None = await self.run(self._tags, repo)
        return tags

    async def has_repository(self, repo: str) -> bool:
        return await self.tags(repo) is not None

    # --- blobs ------------------------------------------------------------------------

    def _locate(self, digest: str) -> tuple[str, int, LayerRecord | None] | None:
        """("blob" | "cache" | "growing" | "reencode", size, record) or None."""
        if self.store.has_blob(digest):
            return "blob", self.store.get_recipe(digest).size, None
        if self.cache is not None:
            # The cache holds only checked copies, each a little before its record is
            # named; a layer whose landing is due (casd.oci.landing) has no tar yet.
            try:
                return "cache", os.path.getsize(self.cache.path(digest)), None
            except FileNotFoundError:
                pass
            # A layer a sync is bringing now (its record is named only once it checked):
            # served as its bytes reach the cache. Once they are all there, its file is
            # renamed into the cache before it stops growing, so a reader who finds the
            # file gone finds it there.
            if (g := self.cache.growing(digest)) is not None:
                return "growing", g.total, None
        try:
            rec = read_record(self.store, digest)
        except LayerError:
            return None
        if rec is None or not rec.reencodable:
            return None
        if not self.store.has_blob(rec.uncompressed):
            return None
        return "reencode", rec.size, rec

    async def blob_size(self, repo: str, digest: str) -> int | None:
        found = await self.run(self._locate, digest)
        return None if found is None else int(found[1])

    @contextlib.asynccontextmanager
    async def open_blob(
        self, repo: str, digest: str, start: int, end: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        found = await self.run(self._locate, digest)
        if found is None:
            raise BlobMissing(f"blob {digest} is not in the store")
        kind, _, rec = found
        growing, f = None, None
        if kind == "growing":
            assert self.cache is not None
            growing = self.cache.growing(digest)
            # None: it ended meanwhile (in the cache now, or failed).
            f = None if growing is None else await self.run(_open_or_none, growing.path)
            if f is None:
                growing = None
                found = await self.run(self._locate, digest)
                if found is None or found[0] == "growing":
                    raise BlobMissing(f"blob {digest} is not in the store")
                kind, _, rec = found
        if growing is not None:
            gen: Iterator[bytes] = iter(())
            it = _follow(self.run, f, growing, digest, start, end)
        else:
            if kind == "blob":
                gen = _pieces(iter_blob(self.store, digest, start, end))
            elif kind == "cache":
                assert self.cache is not None
                gen = _file_range(self.cache.path(digest), start, end)
            else:
                assert rec is not None
                gen = _reencoded_range(self.store, self.cache, rec, start, end)
            it = _from_thread(self.run, gen)

        busy = self.landings.foreground() if self.landings else contextlib.nullcontext()
        try:
            with busy:
                yield it
        finally:
            await it.aclose()  # type: ignore[attr-defined]
            await self.run(_close, gen)
            if f is not None:
                f.close()


def _open_or_none(path: str) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


async def _from_thread(run: Run, gen: Iterator[bytes]) -> AsyncIterator[bytes]:
    while True:
        piece = await run(next, gen, _END)
        if piece is _END:
            return
        yield piece


#: How often a reader of a growing layer looks for more of it (seconds).
FOLLOW_POLL = 0.005
#: A growing layer that gains no byte for this long is given up on (seconds).
FOLLOW_STALL = 120.0


async def _follow(
    run: Run, f: Any, growing: Growing, digest: str, start: int, end: int
) -> AsyncIterator[bytes]:
    """Bytes [start, end) of a layer while a sync writes it into the cache. Its last
    byte is held back until the whole layer checked: a reader never gets a complete
    wrong blob (what it got before is dropped with the connection)."""
    pos, idle_since = start, trio.current_time()
    while pos < end:
        ok = growing.ok
        if ok is False:
            raise LayerError(f"layer {digest} did not arrive whole, or was not the layer")
        have = min(growing.size, end if ok else end - 1)
        if ok and growing.size < end:
            raise LayerError(f"layer {digest} ended at {growing.size} of {end} bytes")
        if have <= pos:
            if trio.current_time() - idle_since > FOLLOW_STALL:
                raise LayerError(f"layer {digest} stopped arriving")
            await trio.sleep(FOLLOW_POLL)
            continue
        data = await run(os.pread, f.fileno(), min(have - pos, PIECE), pos)
        if not data:
            raise LayerError(f"layer {digest}: its file is shorter than announced")
        pos += len(data)
        idle_since = trio.current_time()
        yield data


def _close(gen: Iterator[bytes]) -> None:
    close = getattr(gen, "close", None)
    if close is not None:
        close()
