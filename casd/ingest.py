"""Receiving a blob: the server's half of a push, without I/O.

A :class:`BlobIngest` takes a recipe in batches, says which chunks it needs, takes those
chunks in recipe order, stores them durably as they come, hashes the whole blob on the
way (new chunks from memory, held ones from the store), and commits the blob only when
its sha256 matches the claimed digest. Its methods are synchronous; the daemon runs the
heavy ones (``want``, ``flush``, ``finish``) in worker threads.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass

from casd import zstd
from casd.chunking import format_digest
from casd.errors import ChunkCorrupt, StoreError
from casd.leases import leases_for
from casd.storage.interface import ChunkIn, Codec, Recipe, Store

# Chunks received but not yet written are flushed to the store once they reach this many
# bytes: each flush is one fsync and one index commit (~1-20 ms), so 8 MiB batches keep
# that cost under 5 % at 1 GB/s, while an interrupted push loses at most 8 MiB.
FLUSH_BYTES = 8 * 1024 * 1024

# SPEC §4: a chunk decodes to at most 16 MiB. A larger recipe size would let a zstd frame
# declaring that size make us allocate it (a decompression bomb: 4 bytes per 128 KiB).
MAX_CHUNK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class IngestResult:
    digest: str
    size: int
    chunks: int
    new_chunks: int
    new_bytes: int
    new_blob: bool


@dataclass(frozen=True, slots=True)
class StoreBatch:
    """Received chunks handed from the network side to a storing thread."""

    # (id, codec, data as sent, raw size, bases of a delta or ())
    items: list[tuple[bytes, int, bytes, int, tuple[bytes, ...]]]
    limit: int  # recipe entries before this position can be hashed once it is stored


class IngestError(StoreError):
    """The pushed data is inconsistent (a protocol-level INVALID / DIGEST_MISMATCH)."""

    def __init__(self, message: str, *, digest_mismatch: bool = False) -> None:
        super().__init__(message)
        self.digest_mismatch = digest_mismatch


class BlobIngest:
    """One blob being received into ``store``. Not thread-safe: one caller at a time."""

    def __init__(self, store: Store, name: str | None = None) -> None:
        self._store = store
        self._name = name
        self._ids: list[bytes] = []
        self._sizes: list[int] = []
        self._asked: set[bytes] = set()
        # Wanted (id, size, recipe position) whose data has not arrived yet, in order.
        self._expect: deque[tuple[bytes, int, int]] = deque()
        # Received, not yet stored: (id, codec, data as sent, raw size from the recipe).
        self._pending: list[tuple[bytes, int, bytes, int, tuple[bytes, ...]]] = []
        self._pending_bytes = 0
        # Position of the next recipe entry to feed into the blob hash.
        self._hashed = 0
        self._sha = hashlib.sha256()
        self._new_chunks = 0
        self._new_bytes = 0
        # Every chunk of the recipe is leased before the store is asked whether it holds
        # it, so garbage collection spares it until the push ends (casd.leases). Released
        # by finish / keep_received / close, or when the ingest is garbage collected.
        self._lease = leases_for(store).lease()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def want(self, ids: tuple[bytes, ...], sizes: tuple[int, ...]) -> list[bool]:
        """Take the next batch of the recipe; return which entries the sender must send.

        Each distinct id is asked for at most once per blob, and never when the store
        already holds it. May run in a worker thread while :meth:`store_batch` runs in
        another: it only appends to what that one reads.
        """
        if sizes and max(sizes) > MAX_CHUNK_SIZE:
            raise IngestError(f"a recipe entry of {max(sizes)} bytes exceeds {MAX_CHUNK_SIZE}")
        self._lease.add(ids)
        have = self._store.has_chunks(ids)
        wanted: list[bool] = []
        base = len(self._ids)
        for k, (cid, size, held) in enumerate(zip(ids, sizes, have, strict=True)):
            need = not held and cid not in self._asked
            if need:
                self._asked.add(cid)
                self._expect.append((cid, size, base + k))
            wanted.append(need)
        self._sizes.extend(sizes)
        self._ids.extend(ids)  # last: a reader that sees an id also sees its size
        return wanted

    def add_chunk(self, cid: bytes, codec: int, data: bytes, bases: tuple[bytes, ...] = ()) -> None:
        """Buffer one wanted chunk (cheap; decoding and hashing happen in store_batch).
        ``bases``: a CHUNK_DELTA's base chunks (``codec`` is then ZSTD_PREFIX).

        Raises:
            IngestError: the chunk is not the next one wanted.
        """
        if not self._expect or self._expect[0][0] != cid:
            raise IngestError(f"chunk {cid.hex()} was not asked for at this point")
        _, size, _ = self._expect.popleft()
        self._pending.append((cid, codec, data, size, bases))
        self._pending_bytes += len(data)

    def take_batch(self) -> StoreBatch:
        """Hand over the buffered chunks, with how far the blob can be hashed after them.

        Every recipe entry before the first chunk still awaited is either held by the
        store or in this or an earlier batch, so hashing can reach that point.
        """
        limit = self._expect[0][2] if self._expect else len(self._ids)
        batch = StoreBatch(self._pending, limit)
        self._pending = []
        self._pending_bytes = 0
        return batch

    def store_batch(self, batch: StoreBatch, *, hash_blob: bool = True) -> None:
        """Decode, verify and store a batch, then hash the blob up to its limit.

        Batches must be stored in the order they were taken, one at a time.

        Raises:
            ChunkCorrupt: a chunk does not decode or does not hash to its id.
            IngestError: the recipe's sizes disagree with the chunks.
            NoSpace, StoreError: the store could not take them.
        """
        chunks: list[ChunkIn] = []
        for cid, codec, data, size, bases in batch.items:
            if codec == Codec.ZSTD_PREFIX:
                try:
                    prefix = b"".join(self._store.get_chunk(b) for b in bases)
                except StoreError as exc:  # missing or damaged: the client resends plainly
                    raise IngestError(
                        f"delta base of chunk {cid.hex()} is not usable here: {exc}"
                    ) from exc
                try:
                    raw = zstd.decompress_bounded(data, size, prefix=prefix)
                except ValueError as exc:
                    raise ChunkCorrupt(cid, f"sent delta does not decode: {exc}") from exc
                chunks.append(ChunkIn(cid, raw))
            elif codec == Codec.ZSTD:
                try:
                    raw = zstd.decompress_bounded(data, size)
                except ValueError as exc:
                    raise ChunkCorrupt(cid, f"sent zstd data is invalid: {exc}") from exc
                chunks.append(ChunkIn(cid, raw, Codec.ZSTD, data, decoded_from_encoded=True))
            elif codec == Codec.RAW:
                if len(data) != size:
                    raise ChunkCorrupt(cid, f"sent {len(data)} bytes, the recipe says {size}")
                chunks.append(ChunkIn(cid, data))
            else:
                raise ChunkCorrupt(cid, f"sent with unknown codec {codec}")
        if chunks:
            result = self._store.put_chunks(chunks, verify=True)
            self._new_chunks += result.new_chunks
            self._new_bytes += result.new_stored_bytes
        if hash_blob:
            self._advance_hash({c.id: c.data for c in chunks}, batch.limit)

    def flush(self) -> None:
        """Store everything buffered now (take_batch + store_batch in one call)."""
        self.store_batch(self.take_batch())

    def keep_received(self) -> None:
        """Store what was received of a push that will not finish, so a retry skips it."""
        try:
            self.store_batch(self.take_batch(), hash_blob=False)
        finally:
            self.close()

    def close(self) -> None:
        """Release the chunks' lease (the push is over). Idempotent."""
        self._lease.release()

    def _advance_hash(self, fresh: dict[bytes, bytes | memoryview], limit: int) -> None:
        # Fresh chunks hash from memory; held ones and earlier batches' from the store.
        for i in range(self._hashed, limit):
            cid = self._ids[i]
            data = fresh.get(cid)
            if data is None:
                data = self._store.get_chunk(cid)
            if len(data) != self._sizes[i]:
                raise IngestError(
                    f"recipe entry {i} says {self._sizes[i]} bytes but chunk {cid.hex()} "
                    f"has {len(data)}"
                )
            self._sha.update(data)
        self._hashed = max(self._hashed, limit)

    def finish(self, size: int, digest: str) -> IngestResult:
        """Check size and digest, then commit the blob (and name) atomically.

        Raises:
            IngestError: chunks are still outstanding, or size/digest do not match (then
                nothing becomes visible; received chunks stay, reusable).
            StoreError: the commit failed.
        """
        try:
            return self._finish(size, digest)
        finally:
            self.close()

    def _finish(self, size: int, digest: str) -> IngestResult:
        self.flush()
        if self._expect:
            raise IngestError(f"{len(self._expect)} wanted chunks never arrived")
        total = sum(self._sizes)
        if total != size:
            raise IngestError(
                f"recipe adds up to {total} bytes, the sender claims {size}", digest_mismatch=True
            )
        actual = format_digest(self._sha.digest())
        if actual != digest:
            raise IngestError(
                f"assembled blob is {actual}, the sender claims {digest}", digest_mismatch=True
            )
        recipe = Recipe(digest, size, tuple(self._ids), tuple(self._sizes))
        new_blob = self._store.commit_blob(recipe, self._name)
        return IngestResult(
            digest, size, len(self._ids), self._new_chunks, self._new_bytes, new_blob
        )
