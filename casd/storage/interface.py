"""What a casd store is: small layered interfaces whose docstrings are contracts.

A store holds three things: *chunks* (bytes named by their BLAKE3 id), *blobs* (a
sha256 digest and its recipe: the ordered chunk ids and sizes that make it up) and
*names* (text that points at a blob digest). Every implementation passes
``casd.storage.testing.StoreConformance``.

All methods are synchronous and thread-safe; the daemon calls them from worker threads.
Writes are serialized inside the store; reads run concurrently with writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import casproto

from casd.leases import LeaseTable

# How a chunk's bytes are held: the same numbers at rest and on the wire, so a chunk
# moves from pack file to socket without being decoded and encoded again.
Codec = casproto.Codec


@dataclass(frozen=True, slots=True)
class ChunkIn:
    """A chunk handed to a store.

    ``data`` is the chunk itself. ``encoded``, when given, is the same chunk already
    encoded with ``codec`` (for example as it came off the wire), so the store need not
    compress it again; the store decides whether to keep it. ``decoded_from_encoded``
    says ``data`` was obtained by decoding ``encoded``, which spares the store decoding
    it a second time to check that the two agree.
    """

    id: bytes
    data: bytes | memoryview
    codec: Codec = Codec.RAW
    encoded: bytes | memoryview | None = None
    decoded_from_encoded: bool = False


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as the store holds it: ``payload`` is ``raw_size`` bytes once decoded."""

    id: bytes
    codec: Codec
    payload: bytes
    raw_size: int


@dataclass(frozen=True, slots=True)
class Recipe:
    """A blob: its digest, size, and the chunks it is made of, in order."""

    digest: str
    size: int
    ids: tuple[bytes, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.sizes):
            raise ValueError("recipe ids and sizes differ in length")
        if sum(self.sizes) != self.size:
            raise ValueError(f"recipe sizes add to {sum(self.sizes)}, not {self.size}")


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a ``put_chunks`` call changed."""

    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    chunks: int
    blobs: int
    names: int
    raw_bytes: int  # chunk bytes before compression, each distinct chunk once
    stored_bytes: int  # chunk bytes as held (after compression), excluding record headers
    extra: dict[str, int] = field(default_factory=dict)


@dataclass
class CheckResult:
    """What a store check found. ``damaged`` maps chunk id -> its size once decoded."""

    deep: bool
    chunks: int = 0
    chunks_checked: int = 0
    damaged: dict[bytes, int] = field(default_factory=dict)
    # Chunks recipes name but the index lacks, with their sizes from the recipes.
    missing: dict[bytes, int] = field(default_factory=dict)
    blobs: int = 0
    blobs_incomplete: list[str] = field(default_factory=list)
    blobs_damaged: list[str] = field(default_factory=list)  # deep: sha256 does not match
    names: int = 0
    names_dangling: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.damaged
            or self.missing
            or self.blobs_incomplete
            or self.blobs_damaged
            or self.names_dangling
        )

    def as_dict(self) -> dict[str, int | float | str]:
        return {
            "deep": int(self.deep),
            "chunks": self.chunks,
            "chunks_checked": self.chunks_checked,
            "chunks_damaged": len(self.damaged),
            "chunks_missing": len(self.missing),
            "blobs": self.blobs,
            "blobs_incomplete": len(self.blobs_incomplete),
            "blobs_damaged": len(self.blobs_damaged),
            "names": self.names,
            "names_dangling": len(self.names_dangling),
        }


@runtime_checkable
class ChunkReader(Protocol):
    def has_chunks(self, ids: Sequence[bytes]) -> list[bool]:
        """For each id, whether the store holds that chunk. Never raises for unknown ids.

        Raises:
            StoreError: the index could not be read.
        """
        ...

    def get_chunk(self, chunk_id: bytes) -> bytes:
        """The chunk's bytes, decoded and checked against the stored checksum.

        Raises:
            ChunkMissing: no such chunk.
            ChunkCorrupt: the stored bytes fail their checksum or do not decode. Corrupt
                bytes are never returned.
        """
        ...

    def get_chunks(self, ids: Sequence[bytes]) -> list[bytes]:
        """The chunks' bytes, in order, as :meth:`get_chunk` would return each; faster
        for many chunks (a blob's, read in order).

        Raises:
            ChunkMissing, ChunkCorrupt: as :meth:`get_chunk`, for the first that is.
        """
        ...

    def stored_bytes(self, ids: Sequence[bytes]) -> int:
        """How many bytes the chunks take as stored (compressed), without reading them:
        what sending them as they are would cost.

        Raises:
            ChunkMissing: one of them is not held.
        """
        ...

    def get_stored(self, chunk_id: bytes) -> StoredChunk:
        """The chunk as stored (possibly compressed), checked against its checksum.

        Lets a server send a chunk without decoding and re-encoding it.

        Raises:
            ChunkMissing, ChunkCorrupt: as :meth:`get_chunk`.
        """
        ...

    def get_stored_many(self, ids: Sequence[bytes]) -> list[StoredChunk]:
        """The chunks as stored, in order, as :meth:`get_stored` would return each;
        faster for many (a server's batch: one index lookup, reads of neighbours joined).

        Raises:
            ChunkMissing, ChunkCorrupt: as :meth:`get_stored`, for the first that is.
        """
        ...


@runtime_checkable
class ChunkWriter(ChunkReader, Protocol):
    def put_chunks(self, chunks: Sequence[ChunkIn], *, verify: bool = True) -> PutResult:
        """Store a batch of chunks. Idempotent: chunks already held are skipped.

        Either every chunk of the batch is durable (fsynced) and indexed when this returns,
        or the call raises and none of the batch became visible. With ``verify`` (the
        default) each chunk's bytes are hashed and must match its id; a caller that has
        just hashed them itself may pass ``verify=False``.

        Raises:
            ChunkCorrupt: ``verify`` is on and a chunk does not hash to its id, or its
                ``encoded`` form does not decode to ``data``.
            NoSpace: the disk is full; the store stays consistent and usable.
            StoreError: any other failure to write.
        """
        ...


@runtime_checkable
class BlobStore(Protocol):
    def get_recipe(self, digest: str) -> Recipe:
        """The recipe of a committed blob.

        Raises:
            BlobMissing: no blob with that digest.
        """
        ...

    def has_blob(self, digest: str) -> bool:
        """Whether a blob with this digest is committed."""
        ...

    def commit_blob(self, recipe: Recipe, name: str | None = None) -> bool:
        """Make a blob visible, and optionally point ``name`` at it, in one atomic step.

        The caller vouches that the chunks, in order, hash to ``recipe.digest`` (it
        assembled and hashed them); the store checks that it holds every chunk. Returns
        whether the blob is new. Committing an existing blob again only moves the name
        (and, in a :class:`Collectable` store, refreshes its commit time).

        Raises:
            BlobIncomplete: a chunk of the recipe is not in the store; nothing changed.
            InvalidRef: ``name`` is not a valid name.
        """
        ...

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        """(digest, size) of every committed blob, in digest order."""
        ...


@runtime_checkable
class RefStore(Protocol):
    def resolve(self, ref: str) -> str:
        """The digest a name points at; a digest of a committed blob resolves to itself.

        Raises:
            BlobMissing: unknown name, or a digest of no committed blob.
            InvalidRef: ``ref`` is neither a valid name nor a valid digest.
        """
        ...

    def tag(self, name: str, digest: str) -> None:
        """Point ``name`` at a committed blob, replacing what it pointed at.

        Raises:
            BlobMissing: no such blob.
            InvalidRef: bad name or digest text.
        """
        ...

    def untag(self, name: str) -> None:
        """Remove a name (the blob stays until garbage collection).

        Raises:
            BlobMissing: no such name.
        """
        ...

    def list_names(self, prefix: str = "") -> list[tuple[str, str]]:
        """(name, digest) pairs whose name starts with ``prefix``, sorted by name."""
        ...

    def names_of(self, digest: str) -> list[str]:
        """The names that point at ``digest``, sorted."""
        ...


@runtime_checkable
class Checkable(Protocol):
    def check(self, *, deep: bool = False) -> CheckResult:
        """Verify every chunk record (checksum; with ``deep`` also its id), every recipe
        against the index (with ``deep`` also each blob's sha256), and every name.
        Reports; changes nothing. Never raises for damage it finds.
        """
        ...

    def rewrite_chunks(self, chunks: Sequence[ChunkIn]) -> int:
        """Store ``chunks`` anew even where the index already has their ids, replacing
        damaged records. Each must hash to its id. Returns how many were written.

        Raises:
            ChunkCorrupt: a chunk does not hash to its id; nothing was written.
            NoSpace, StoreError: as put_chunks.
        """
        ...


@dataclass(frozen=True, slots=True)
class GarbageResult:
    """What one ``delete_garbage`` call removed."""

    names: int = 0
    blobs: int = 0
    chunks: int = 0
    raw_bytes: int = 0  # of the deleted chunks, decoded
    stored_bytes: int = 0  # of the deleted chunks, as held (what pack rewrites reclaim)
    chunks_leased: int = 0  # chunks asked for but spared because a transfer holds them
    blobs_named: int = 0  # blobs asked for but spared because a name points at them


@dataclass(frozen=True, slots=True)
class PackStat:
    """One pack file: how much of it the index still points at."""

    number: int
    file_bytes: int  # size of the file, pack header included
    live_bytes: int  # record headers and payloads of records the index points at
    live_records: int
    active: bool  # the pack still takes appends (a rewrite retires it first)

    @property
    def live_fraction(self) -> float:
        from casd.storage.packfile import PACK_HEADER

        body = self.file_bytes - PACK_HEADER.size
        if self.live_records == 0 or body <= 0:
            return 0.0
        return min(1.0, self.live_bytes / body)


@dataclass(frozen=True, slots=True)
class RewriteResult:
    """What one ``rewrite_pack`` call did."""

    number: int
    moved_records: int = 0
    moved_bytes: int = 0
    freed_bytes: int = 0  # size of the removed file
    removed: bool = False  # False: the pack was left as it was (see ``reason``)
    reason: str = ""


@runtime_checkable
class Collectable(Protocol):
    """What garbage collection (casd.gc) needs of a store, beyond :class:`Store`.

    Blob commit times: every commit (a new blob, or an existing blob committed again)
    records the wall-clock time, so a collector can spare recently committed blobs.
    Blobs committed before a store recorded times report time 0.0.
    """

    #: Chunks held by in-progress transfers; ``delete_garbage`` never deletes them.
    leases: LeaseTable

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold the store's write lock: while held, no other thread stores chunks, commits,
        tags or untags (they wait). Reentrant, so the holder may call any method of the
        store, including writes. Keep it short.
        """
        ...

    def iter_chunk_ids(self) -> Iterator[bytes]:
        """The id of every chunk the index holds (order unspecified; a snapshot)."""
        ...

    def iter_blob_times(self) -> Iterator[tuple[str, float]]:
        """(digest, commit time in seconds since the epoch) of every blob, digest order."""
        ...

    def blob_times(self, digests: Sequence[str]) -> list[float | None]:
        """For each digest its commit time, or None when no such blob is committed."""
        ...

    def delete_garbage(
        self,
        *,
        names: Sequence[tuple[str, str]] = (),
        blobs: Sequence[str] = (),
        chunks: Sequence[bytes] = (),
        dry_run: bool = False,
    ) -> GarbageResult:
        """Remove names, blob recipes and chunk index entries in one atomic step.

        ``names`` are (name, digest) pairs: a name is removed only if it still points at
        that digest. A blob is removed only if no name points at it once ``names`` are
        gone. A chunk is removed only if no lease holds it (checked under the lease
        table's freeze, atomically with the deletion). Unknown names, blobs and chunks
        are skipped. The caller vouches that no remaining recipe names a chunk it asks
        to delete. Crash-safe: either all of it happened, or none. With ``dry_run`` the
        result says what would go, and nothing changes.

        Raises:
            NoSpace, StoreError: the index could not be written; nothing changed.
        """
        ...

    def pack_stats(self) -> list[PackStat]:
        """Every pack and its live bytes (a scan of the chunk index). Empty for stores
        without packs."""
        ...

    def rewrite_packs(
        self,
        numbers: Sequence[int],
        on_done: Callable[[RewriteResult], None] | None = None,
    ) -> list[RewriteResult]:
        """Compact packs: copy the live records of each retired pack in ``numbers`` into
        the current pack, point the index at the copies, then remove the old file (a pack
        with no live record is just removed). Concurrent reads and writes keep working
        throughout; ``on_done`` is called after each pack. Returns one result per pack.

        A pack that still takes appends is retired first (the next write starts a new
        pack). A pack holding a live record that fails its checksum is left alone
        (``removed`` False, ``reason`` says why). Order on disk: the copies
        are durable before the index points at them, and the index commit that stops
        pointing into the old file is durable before the file is unlinked, so a crash at
        any point loses nothing (at worst a dead pack file stays, for the next rewrite).

        Raises:
            NoSpace, StoreError: copying failed; the index still points at readable
                records (old or new).
        """
        ...


@runtime_checkable
class Store(ChunkWriter, BlobStore, RefStore, Checkable, Protocol):
    """A complete store: chunks, blobs and names."""

    def stats(self) -> StoreStats:
        """Counts and byte totals; cheap (no scan of the data)."""
        ...

    def close(self) -> None:
        """Release files and the index. Idempotent; the store is unusable afterwards."""
        ...
