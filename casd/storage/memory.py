"""MemoryStore: the reference implementation of the store interface, and a test double."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

from casd.chunking import chunk_id
from casd.errors import BlobIncomplete, BlobMissing, ChunkCorrupt, ChunkMissing
from casd.leases import LeaseTable
from casd.refs import check_digest, check_name, is_digest
from casd.storage._encode import DEFAULT_LEVEL, decode_stored, encode_for_store
from casd.storage.check import check_blobs_and_names
from casd.storage.interface import (
    CheckResult,
    ChunkIn,
    Codec,
    GarbageResult,
    PackStat,
    PutResult,
    Recipe,
    RewriteResult,
    StoredChunk,
    StoreStats,
)


class MemoryStore:
    """Everything in dicts. Same contracts as DiskStore, minus durability.

    ``fail_on_put`` lets tests inject a failure for chunk ids of their choosing, the way
    desync's TestStore does: it is called per chunk and raises what it returns.
    """

    def __init__(
        self,
        *,
        level: int = DEFAULT_LEVEL,
        fail_on_put: Callable[[bytes], Exception | None] | None = None,
    ) -> None:
        self._level = level
        self._fail_on_put = fail_on_put
        self._lock = threading.RLock()  # reentrant, for exclusive()
        self._chunks: dict[bytes, StoredChunk] = {}
        self._blobs: dict[str, Recipe] = {}
        self._times: dict[str, float] = {}  # digest -> commit time
        self.leases = LeaseTable()
        self._names: dict[str, str] = {}
        self._stored_bytes = 0
        self._raw_bytes = 0

    # chunks
    def has_chunks(self, ids: Sequence[bytes]) -> list[bool]:
        return [i in self._chunks for i in ids]

    def get_stored(self, chunk_id: bytes) -> StoredChunk:
        try:
            return self._chunks[chunk_id]
        except KeyError:
            raise ChunkMissing(chunk_id) from None

    def get_stored_many(self, ids: Sequence[bytes]) -> list[StoredChunk]:
        return [self.get_stored(i) for i in ids]

    def get_chunk(self, chunk_id: bytes) -> bytes:
        s = self.get_stored(chunk_id)
        return decode_stored(chunk_id, s.codec, s.payload, s.raw_size)

    def get_chunks(self, ids: Sequence[bytes]) -> list[bytes]:
        return [self.get_chunk(i) for i in ids]

    def stored_bytes(self, ids: Sequence[bytes]) -> int:
        return sum(len(self.get_stored(i).payload) for i in ids)

    def put_chunks(self, chunks: Sequence[ChunkIn], *, verify: bool = True) -> PutResult:
        prepared: dict[bytes, StoredChunk] = {}
        for c in chunks:
            if c.id in self._chunks or c.id in prepared:
                continue
            if self._fail_on_put is not None and (exc := self._fail_on_put(c.id)) is not None:
                raise exc
            codec, payload = encode_for_store(c, verify=verify, level=self._level)
            prepared[c.id] = StoredChunk(c.id, Codec(codec), payload, len(c.data))
        with self._lock:
            new = {k: v for k, v in prepared.items() if k not in self._chunks}
            self._chunks.update(new)
            raw = sum(v.raw_size for v in new.values())
            stored = sum(len(v.payload) for v in new.values())
            self._raw_bytes += raw
            self._stored_bytes += stored
        return PutResult(len(new), raw, stored)

    # blobs
    def get_recipe(self, digest: str) -> Recipe:
        try:
            return self._blobs[digest]
        except KeyError:
            raise BlobMissing(digest) from None

    def has_blob(self, digest: str) -> bool:
        return digest in self._blobs

    def commit_blob(self, recipe: Recipe, name: str | None = None) -> bool:
        check_digest(recipe.digest)
        if name is not None:
            check_name(name)
        with self._lock:
            missing = len({i for i in recipe.ids if i not in self._chunks})
            if missing:
                raise BlobIncomplete(recipe.digest, missing)
            new = recipe.digest not in self._blobs
            if new:
                self._blobs[recipe.digest] = recipe
            self._times[recipe.digest] = time.time()
            if name is not None:
                self._names[name] = recipe.digest
        return new

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        for d in sorted(self._blobs):
            yield d, self._blobs[d].size

    # names
    def resolve(self, ref: str) -> str:
        if is_digest(ref):
            check_digest(ref)
            if ref not in self._blobs:
                raise BlobMissing(ref)
            return ref
        check_name(ref)
        try:
            return self._names[ref]
        except KeyError:
            raise BlobMissing(ref) from None

    def tag(self, name: str, digest: str) -> None:
        check_name(name)
        check_digest(digest)
        with self._lock:
            if digest not in self._blobs:
                raise BlobMissing(digest)
            self._names[name] = digest

    def untag(self, name: str) -> None:
        check_name(name)
        with self._lock:
            if self._names.pop(name, None) is None:
                raise BlobMissing(name)

    def list_names(self, prefix: str = "") -> list[tuple[str, str]]:
        return sorted((n, d) for n, d in self._names.items() if n.startswith(prefix))

    def names_of(self, digest: str) -> list[str]:
        return sorted(n for n, d in self._names.items() if d == digest)

    def check(self, *, deep: bool = False) -> CheckResult:
        result = CheckResult(deep=deep, chunks=len(self._chunks))
        for cid, s in list(self._chunks.items()):
            result.chunks_checked += 1
            try:
                raw = decode_stored(cid, s.codec, s.payload, s.raw_size)
                if deep and chunk_id(raw) != cid:
                    result.damaged[cid] = s.raw_size
            except ChunkCorrupt:
                result.damaged[cid] = s.raw_size
        check_blobs_and_names(self, result)
        return result

    def rewrite_chunks(self, chunks: Sequence[ChunkIn]) -> int:
        prepared = {}
        for c in chunks:
            codec, payload = encode_for_store(c, verify=True, level=self._level)
            prepared[c.id] = StoredChunk(c.id, Codec(codec), payload, len(c.data))
        with self._lock:
            self._chunks.update(prepared)
        return len(prepared)

    # garbage collection (the Collectable interface)
    def exclusive(self) -> AbstractContextManager[None]:
        return self._lock  # type: ignore[return-value]

    def iter_chunk_ids(self) -> Iterator[bytes]:
        with self._lock:
            ids = list(self._chunks)
        yield from ids

    def iter_blob_times(self) -> Iterator[tuple[str, float]]:
        with self._lock:
            pairs = sorted(self._times.items())
        yield from pairs

    def blob_times(self, digests: Sequence[str]) -> list[float | None]:
        with self._lock:
            return [self._times.get(d) for d in digests]

    def delete_garbage(
        self,
        *,
        names: Sequence[tuple[str, str]] = (),
        blobs: Sequence[str] = (),
        chunks: Sequence[bytes] = (),
        dry_run: bool = False,
    ) -> GarbageResult:
        for _, d in names:
            check_digest(d)
        for d in blobs:
            check_digest(d)
        with self._lock, self.leases.frozen() as leased:
            n_names = n_blobs = n_named = n_chunks = n_leased = raw = stored = 0
            gone_names = [
                (name, digest) for name, digest in names if self._names.get(name) == digest
            ]
            n_names = len(gone_names)
            remaining = dict(self._names)
            for name, _ in gone_names:
                remaining.pop(name, None)
            named = set(remaining.values())
            gone_blobs: list[str] = []
            for d in dict.fromkeys(blobs):
                if d in named:
                    n_named += 1
                elif d in self._blobs:
                    gone_blobs.append(d)
            n_blobs = len(gone_blobs)
            gone_chunks: list[bytes] = []
            for cid in dict.fromkeys(chunks):
                if cid in leased:
                    n_leased += 1
                elif (s := self._chunks.get(cid)) is not None:
                    gone_chunks.append(cid)
                    raw += s.raw_size
                    stored += len(s.payload)
            n_chunks = len(gone_chunks)
            if not dry_run:
                self._names = remaining
                for d in gone_blobs:
                    del self._blobs[d]
                    self._times.pop(d, None)
                for cid in gone_chunks:
                    del self._chunks[cid]
                self._raw_bytes -= raw
                self._stored_bytes -= stored
        return GarbageResult(n_names, n_blobs, n_chunks, raw, stored, n_leased, n_named)

    def pack_stats(self) -> list[PackStat]:
        return []  # no packs: nothing to compact

    def rewrite_packs(
        self,
        numbers: Sequence[int],
        on_done: Callable[[RewriteResult], None] | None = None,
    ) -> list[RewriteResult]:
        return [RewriteResult(n, reason="no such pack") for n in numbers]

    def stats(self) -> StoreStats:
        return StoreStats(
            chunks=len(self._chunks),
            blobs=len(self._blobs),
            names=len(self._names),
            raw_bytes=self._raw_bytes,
            stored_bytes=self._stored_bytes,
        )

    def close(self) -> None:
        pass
