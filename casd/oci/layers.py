"""How casd holds OCI layers, and how it hands out their exact compressed bytes.

A layer arrives as compressed bytes named by their sha256 (D_c). casd stores the
*uncompressed* tar as an ordinary blob (its digest is the layer's diff_id, D_u), cut at
tar member boundaries so that versions of a layer share chunks. Next to it goes a *layer
record*: a small JSON blob under the name ``.oci/layer/<D_c>`` that says how to get D_c
back:

- ``encoding`` set: re-encoding D_u with these parameters gives D_c byte for byte:
  Python's zlib settings verified at import, or the gzip members ``oci convert`` made
  (:mod:`casd.oci.members`). Only the uncompressed chunks are kept.
- ``raw`` set: the compressed bytes could not be reproduced (Go's gzip, zstd, ...); they
  are kept as a blob of their own, and the reason is in ``note``.

Re-encoding costs CPU (zlib level 6: tens of MB/s; a converted layer: hundreds) where a
transfer would cost link time, so a verified re-encoding is also written to a bounded
on-disk cache (:class:`LayerCache`) that serves repeated pulls at disk speed; the cache
is only a copy, and losing it loses nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from casd.chunking import Chunker, chunk_id, format_digest
from casd.errors import BlobMissing, CasdError
from casd.leases import leases_for
from casd.oci import media
from casd.storage.interface import ChunkIn, PutResult, Recipe, Store

log = logging.getLogger("casd.oci")

#: Chunks are written to the store in batches of about this many bytes (one fsync each).
BATCH_BYTES = 8 * 1024 * 1024

#: Pieces handed to zlib and to the network: large enough that zlib releases the GIL and
#: per-call overhead vanishes, small enough to keep memory flat.
PIECE = 1024 * 1024


class LayerError(CasdError):
    """A layer record is missing, unreadable, or does not reproduce its digest."""


@dataclass(frozen=True)
class LayerRecord:
    digest: str  # D_c: what manifests name
    size: int
    media_type: str
    uncompressed: str  # D_u: the diff_id
    uncompressed_size: int
    # {"codec": "gzip", ...GzipParams.to_dict()} (imported, zlib reproduces it) or
    # {"codec": "gzip-members", ...MembersParams.to_dict()} (made by `oci convert`)
    encoding: dict[str, Any] | None = None
    raw: str | None = None  # D_c again, when the compressed bytes are stored as a blob
    note: str = ""
    # `oci convert` results: "<codec>-<level>" -> digest of the re-compressed layer.
    converted: dict[str, str] | None = None

    @property
    def reencodable(self) -> bool:
        return self.encoding is not None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "casd_oci_layer": 1,
            "digest": self.digest,
            "size": self.size,
            "media_type": self.media_type,
            "uncompressed": self.uncompressed,
            "uncompressed_size": self.uncompressed_size,
        }
        if self.encoding is not None:
            doc["encoding"] = self.encoding
        if self.raw is not None:
            doc["raw"] = self.raw
        if self.note:
            doc["note"] = self.note
        if self.converted:
            doc["converted"] = self.converted
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LayerRecord:
        try:
            doc = json.loads(data)
            if doc.get("casd_oci_layer") != 1:
                raise ValueError("not a version-1 layer record")
            return cls(
                digest=str(doc["digest"]),
                size=int(doc["size"]),
                media_type=str(doc["media_type"]),
                uncompressed=str(doc["uncompressed"]),
                uncompressed_size=int(doc["uncompressed_size"]),
                encoding=doc.get("encoding"),
                raw=doc.get("raw"),
                note=str(doc.get("note", "")),
                converted=doc.get("converted"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LayerError(f"unreadable layer record: {exc}") from None


# --- reading and writing blobs through the store ---------------------------------------


def read_blob(store: Store, digest: str) -> bytes:
    recipe = store.get_recipe(digest)
    return b"".join(store.get_chunks(recipe.ids))


def read_small(store: Store, digest: str) -> bytes | None:
    """A blob's bytes if it exists and is at most MAX_MANIFEST_SIZE, else None."""
    try:
        recipe = store.get_recipe(digest)
    except BlobMissing:
        return None
    if recipe.size > media.MAX_MANIFEST_SIZE:
        return None
    return b"".join(store.get_chunks(recipe.ids))


def resolve_name(store: Store, name: str) -> str | None:
    try:
        return store.resolve(name)
    except BlobMissing:
        return None


def iter_blob(store: Store, digest: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes [start, end) of a committed blob, chunk by chunk (each verified), read
    from the store a few MiB at a time."""
    recipe = store.get_recipe(digest)
    end = recipe.size if end is None else min(end, recipe.size)
    pos = 0
    group: list[tuple[bytes, int]] = []  # (id, offset in the blob)
    group_bytes = 0
    for cid, size in zip(recipe.ids, recipe.sizes, strict=True):
        if pos >= end:
            break
        if pos + size > start:
            group.append((cid, pos))
            group_bytes += size
            if group_bytes >= READ_GROUP_BYTES:
                yield from _cut(store, group, start, end)
                group, group_bytes = [], 0
        pos += size
    yield from _cut(store, group, start, end)


#: iter_blob reads chunks from the store in groups of about this many bytes.
READ_GROUP_BYTES = 4 * 1024 * 1024


def _cut(store: Store, group: list[tuple[bytes, int]], start: int, end: int) -> Iterator[bytes]:
    for (_, pos), data in zip(group, store.get_chunks([cid for cid, _ in group]), strict=True):
        yield data[max(0, start - pos) : min(len(data), end - pos)]


def read_record(store: Store, digest: str) -> LayerRecord | None:
    """The layer record of compressed layer ``digest``, or None if casd has none."""
    target = resolve_name(store, media.layer_record_name(digest))
    if target is None:
        return None
    data = read_small(store, target)
    if data is None:
        raise LayerError(f"layer record of {digest} points at a missing blob {target}")
    return LayerRecord.from_json(data)


class BlobWriter:
    """Feeds chunks into a store in batches and builds the blob's recipe and sha256.

    The chunks are durable as each batch is written; the blob becomes visible only at
    :meth:`commit`, which checks nothing was skipped. Not thread-safe. With
    ``background``, each batch is stored (compressed, written, indexed) by a thread of
    its own while the caller cuts and hashes the next: a layer arriving from the network
    is then stored at the pace of two cores, not one.
    """

    def __init__(self, store: Store, *, background: bool = False) -> None:
        self.store = store
        # Garbage collection spares leased chunks until the blob commits (casd.leases).
        self._lease = leases_for(store).lease()
        self._sha = hashlib.sha256()
        self._ids: list[bytes] = []
        self._sizes: list[int] = []
        self._batch: list[ChunkIn] = []
        self._batch_bytes = 0
        self._putter = ThreadPoolExecutor(1, "casd-put") if background else None
        self._pending: Future[PutResult] | None = None
        self.size = 0
        self.new_chunks = 0
        self.new_bytes = 0

    def add(self, chunk: bytes | memoryview) -> None:
        data = bytes(chunk)  # the views of a cutter's window are recycled
        cid = chunk_id(data)
        self._sha.update(data)
        self._ids.append(cid)
        self._sizes.append(len(data))
        self.size += len(data)
        self._batch.append(ChunkIn(cid, data))
        self._lease.add((cid,))
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Store the batch gathered so far; in the background, after the one before."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._wait()
        if not batch:
            return
        if self._putter is None:
            self._count(self.store.put_chunks(batch, verify=False))  # ids computed above
        else:
            self._pending = self._putter.submit(self.store.put_chunks, batch, verify=False)

    def _wait(self) -> None:
        # The batch in the background is stored (or its failure raised) before the next.
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._count(pending.result())

    def _count(self, result: PutResult) -> None:
        self.new_chunks += result.new_chunks
        self.new_bytes += result.new_stored_bytes

    @property
    def digest(self) -> str:
        return format_digest(self._sha.digest())

    @property
    def chunk_ids(self) -> list[bytes]:
        return self._ids

    def commit(self, name: str | None = None) -> str:
        try:
            self.flush()
            self._wait()
            recipe = Recipe(self.digest, self.size, tuple(self._ids), tuple(self._sizes))
            self.store.commit_blob(recipe, name)
        finally:
            self.release()
        return recipe.digest

    def release(self) -> None:
        """Give up the lease (after a commit, or when the blob is abandoned) and the
        background thread, once it finished. Idempotent."""
        if self._putter is not None:
            self._putter.shutdown(wait=True)
            self._putter = None
        self._lease.release()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def put_bytes(store: Store, data: bytes, chunker: Chunker, name: str | None = None) -> str:
    """Store a small blob (a manifest, config or record) and return its digest."""
    with BlobWriter(store) as w:
        for c in chunker.cut(data):
            w.add(c)
        return w.commit(name)


def put_stream(store: Store, stream: BinaryIO, chunker: Chunker) -> str:
    with BlobWriter(store) as w:
        for c in chunker.cut_stream(stream):
            w.add(c)
        return w.commit()


class IterReader:
    """A readable stream over an iterator of byte pieces, for code that pulls with
    ``readinto`` (the chunkers) from code that pushes pieces (decoders, encoders)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._cur = memoryview(b"")

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        filled = 0
        while filled < len(view):
            if not self._cur:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._cur = memoryview(piece).cast("B")
                continue
            n = min(len(view) - filled, len(self._cur))
            view[filled : filled + n] = self._cur[:n]
            self._cur = self._cur[n:]
            filled += n
        return filled


# --- re-encoding ---------------------------------------------------------------------


def make_encoder(encoding: dict[str, Any] | None, digest: str = "") -> Any:
    """The streaming encoder (``update``/``finish``) a layer record's ``encoding`` names."""
    from casd.oci import gogzip, gzipre, members

    enc = encoding or {}
    rest = {k: v for k, v in enc.items() if k != "codec"}
    if enc.get("codec") == "gzip":  # an imported layer zlib reproduces
        return gzipre.GzipEncoder(gzipre.GzipParams.from_dict(rest))
    if enc.get("codec") == members.CODEC:  # a layer `oci convert` made
        return members.MembersEncoder(members.MembersParams.from_dict(rest))
    if enc.get("codec") == gogzip.CODEC:  # an imported layer Go's pgzip made
        return gogzip.PgzipEncoder(gogzip.PgzipParams.from_dict(rest))
    raise LayerError(f"layer {digest}: unknown encoding {enc.get('codec')!r}")


def can_reencode_here(record: LayerRecord) -> bool:
    """Whether this host has what re-encoding ``record``'s layer takes (a layer Go's
    pgzip made needs the ``casd-gogzip`` helper, converted members their deflater);
    whether the bytes come out the same is another question, answered by their digest."""
    from casd.oci import gogzip, members

    if not record.reencodable or record.raw is not None:
        return False
    enc = record.encoding or {}
    if enc.get("codec") == members.CODEC:
        level = enc.get("level")
        return members.makes_here(str(enc.get("lib", "")), level if isinstance(level, int) else -1)
    return enc.get("codec") != gogzip.CODEC or gogzip.helper() is not None


def encode_layer(store: Store, record: LayerRecord) -> Iterator[bytes]:
    """The compressed bytes of a re-encodable layer, made from its uncompressed chunks,
    in pieces; memory is bounded by a piece plus zlib's window. Does not verify: callers
    hash what they hand on (see :func:`verified_encoding`)."""
    enc = make_encoder(record.encoding, record.digest)
    direct = getattr(enc, "buffers_input", False)  # no need to gather pieces for it
    pending: list[bytes] = []
    held = 0
    for data in iter_blob(store, record.uncompressed):
        if direct:
            if out := enc.update(data):
                yield out
            continue
        pending.append(data)
        held += len(data)
        if held >= PIECE:
            out = enc.update(b"".join(pending))
            pending, held = [], 0
            if out:
                yield out
    tail = enc.update(b"".join(pending)) + enc.finish()
    if tail:
        yield tail


def verified_encoding(store: Store, record: LayerRecord) -> Iterator[bytes]:
    """:func:`encode_layer`, checked: the last piece is held back until the whole output
    hashed to the record's digest, and LayerError raised instead of handing it out if it
    did not; a receiver streaming the pieces never gets a complete wrong blob."""
    sha = hashlib.sha256()
    size = 0
    held: bytes | None = None
    for piece in encode_layer(store, record):
        sha.update(piece)
        size += len(piece)
        if size > record.size:
            break  # already wrong: stop before handing out more than the blob's size
        if held is not None:
            yield held
        held = piece
    got = format_digest(sha.digest())
    if got == record.digest and size == record.size:
        if held is not None:
            yield held
        return
    raise LayerError(
        f"re-encoding layer {record.digest} gave {got} ({size} bytes): this host's zlib "
        "does not reproduce it"
    )


def reencodes(store: Store, digest: str) -> bool:
    """Whether this host makes layer ``digest``'s compressed bytes, byte for byte, from
    the tar it holds (the check :class:`LayerCache` runs before evicting a file adopted
    unchecked). Re-encodes the whole layer."""
    record = read_record(store, digest)
    if record is None or not record.reencodable or record.raw is not None:
        return False
    if not store.has_blob(record.uncompressed):  # its landing is due (casd.oci.landing)
        return False
    return _reproduces(store, record)


def _reproduces(store: Store, record: LayerRecord) -> bool:
    """Whether re-encoding ``record``'s tar here gives its digest (logs why not)."""
    try:
        for _ in verified_encoding(store, record):
            pass
    except LayerError as exc:
        log.warning("%s", exc)
        return False
    return True


# --- the cache of verified re-encodings ------------------------------------------------


#: Beside a cached file whose bytes are the layer's (their digest matched) but which this
#: host has not made again from the tar in full (a landing checked a sample of its
#: members): it is not evicted until a whole re-encoding has reproduced it.
UNCHECKED = ".unchecked"


class Growing:
    """A layer's compressed bytes as a sync writes them into the cache: the first ``size``
    are in the file at ``path`` (flushed, so another reader sees them), of ``total``.
    ``ok`` stays None while it grows, then says whether the bytes were the layer (checked
    against its digest; the file then goes into the cache under the layer's name, or
    away, but an open file still reads). Written from one worker thread, read from the
    event loop: plain attributes, each set in one step."""

    def __init__(self, path: str, total: int) -> None:
        self.path = path
        self.total = total
        self.size = 0
        self.ok: bool | None = None


class LayerCache:
    """Verified compressed layers on disk, so a re-encoded layer is encoded once.

    Files are named by digest and written to a temporary name first, renamed only after
    their sha256 matched: a file in the cache is always a correct copy. Bounded by
    ``max_bytes``; the least recently used files go first, except that a file adopted
    unchecked goes only once ``checker`` (digest -> whether this host re-encodes the
    layer from its tar, byte for byte) said yes: until then it may be the only way this
    host can serve the layer.
    """

    def __init__(self, directory: str, max_bytes: int = 8 * 1024**3) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.checker: Callable[[str], bool] | None = None
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        # Layers a sync is writing in now, which the OCI API serves as they grow.
        self._growing: dict[str, Growing] = {}
        for leftover in os.listdir(directory):
            path = os.path.join(directory, leftover)
            if leftover.startswith("tmp") or (
                leftover.endswith(UNCHECKED) and not os.path.exists(path[: -len(UNCHECKED)])
            ):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, digest.replace(":", "-"))

    def grow(self, digest: str, path: str, total: int) -> Growing:
        """Announce that the file at ``path`` (in the cache's directory) is being
        written with layer ``digest``'s ``total`` bytes; :meth:`grown` ends it."""
        g = Growing(path, total)
        with self._lock:
            old = self._growing.get(digest)
            self._growing[digest] = g
        if old is not None and old.ok is None:
            old.ok = False  # an attempt given up: its readers stop
        return g

    def growing(self, digest: str) -> Growing | None:
        return self._growing.get(digest)

    def grown(self, digest: str, g: Growing, ok: bool) -> None:
        """The end of :meth:`grow`'s file: ``ok`` if it is in the cache now (adopted)."""
        g.ok = ok
        with self._lock:
            if self._growing.get(digest) is g:
                del self._growing[digest]

    def open(self, digest: str) -> BinaryIO | None:
        try:
            f = open(self.path(digest), "rb")  # noqa: SIM115 - handed to the caller
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(f.fileno())  # recently used
        return f

    def has(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def unchecked(self, digest: str) -> bool:
        """Whether the cached copy of ``digest`` waits for a whole re-encoding."""
        return os.path.exists(self.path(digest) + UNCHECKED)

    def fill(self, store: Store, record: LayerRecord) -> bool:
        """Re-encode ``record`` into the cache. Returns whether it reproduced its digest
        (if not, nothing is cached)."""
        if self.max_bytes < record.size:
            return _reproduces(store, record)  # too large to cache: still verify
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix="tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for piece in verified_encoding(store, record):
                    f.write(piece)
            os.replace(tmp, self.path(record.digest))
        except LayerError as exc:
            log.warning("%s", exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(record.digest) + UNCHECKED)  # made here: checked
        self.evict()
        return True

    def adopt(self, digest: str, path: str, *, checked: bool = True, durable: bool = False) -> None:
        """Move a verified file (for example an import's spool) into the cache.
        ``checked=False``: its digest matched, but this host has not yet made the same
        bytes from the tar in full, so it is kept until it has (see :attr:`checker`).
        ``durable``: the file (synced by the caller) is the layer's only copy here: the
        rename is synced too before this returns."""
        marker = self.path(digest) + UNCHECKED
        if not checked:
            # The mark first: a crash between the two leaves a mark without a file
            # (removed on start), never an unchecked file that looks checked.
            with open(marker, "wb") as f:
                if durable:
                    os.fsync(f.fileno())
        os.replace(path, self.path(digest))
        if durable:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if checked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
        self.evict()

    def discard(self, digest: str) -> None:
        """Remove the cached copy of ``digest`` (and its unchecked mark), if any."""
        for path in (self.path(digest), self.path(digest) + UNCHECKED):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _may_go(self, path: str) -> bool:
        """Whether the cached file at ``path`` may be evicted: checked, or found now to
        be what this host makes of the layer's tar (worth the time: the alternative is
        keeping it past the bound)."""
        marker = path + UNCHECKED
        if not os.path.exists(marker):
            return True
        digest = os.path.basename(path).replace("-", ":", 1)
        try:
            ok = self.checker is not None and self.checker(digest)
        except Exception as exc:  # a check that cannot run keeps the file
            log.warning("cannot check cached layer %s: %s", digest, exc)
            ok = False
        if not ok:
            log.warning(
                "keeping cached layer %s beyond the cache bound: this host does not make "
                "its bytes again from its tar",
                digest,
            )
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
        return True

    def evict(self) -> None:
        with self._lock:
            entries = []
            for entry in os.scandir(self.dir):
                if entry.name.startswith("tmp") or entry.name.endswith(UNCHECKED):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    entries.append((st.st_mtime, st.st_size, entry.path))
            total = sum(e[1] for e in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                if not self._may_go(path):
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    total -= size
