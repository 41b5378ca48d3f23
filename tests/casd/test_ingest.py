"""BlobIngest: the server's half of a push, without I/O."""

from __future__ import annotations

import hashlib
import os

import pytest

from casd import zstd
from casd.chunking import Chunker, chunk_id, format_digest
from casd.errors import ChunkCorrupt
from casd.ingest import BlobIngest, IngestError
from casd.storage.interface import Codec
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob, store_blob


def recipe_of(data: bytes) -> tuple[list[bytes], list[bytes], list[int]]:
    views = [bytes(v) for v in Chunker().cut(data)]
    return views, [chunk_id(v) for v in views], [len(v) for v in views]


def push(store: MemoryStore, data: bytes, name: str | None = None, batch: int = 3) -> int:
    """Drive an ingest the way the daemon does; returns how many chunks were asked for."""
    views, ids, sizes = recipe_of(data)
    ingest = BlobIngest(store, name)
    asked = 0
    for start in range(0, len(ids), batch):
        wanted = ingest.want(tuple(ids[start : start + batch]), tuple(sizes[start : start + batch]))
        for i, w in enumerate(wanted):
            if w:
                ingest.add_chunk(ids[start + i], Codec.RAW, views[start + i])
                asked += 1
        ingest.flush()
    result = ingest.finish(len(data), format_digest(hashlib.sha256(data).digest()))
    assert result.digest == format_digest(hashlib.sha256(data).digest())
    return asked


def test_a_new_blob_asks_for_every_distinct_chunk_once() -> None:
    store = MemoryStore()
    # A repeat far longer than the largest chunk: its inner chunks recur exactly.
    block = os.urandom(2_000_000)
    data = block + os.urandom(200_000) + block  # the repeat is not asked for again
    _views, ids, _ = recipe_of(data)
    asked = push(store, data, "x")
    assert asked == len(set(ids)) < len(ids)
    assert read_blob(store, store.resolve("x")) == data


def test_a_blob_sharing_chunks_asks_only_for_the_new_ones() -> None:
    store = MemoryStore()
    v1 = os.urandom(1_000_000)
    store_blob(store, v1)
    v2 = v1[:500_000] + b"edit" + v1[500_000:]
    assert push(store, v2) <= 2


def test_chunks_must_come_in_the_order_asked() -> None:
    store = MemoryStore()
    views, ids, sizes = recipe_of(os.urandom(600_000))
    ingest = BlobIngest(store)
    ingest.want(tuple(ids), tuple(sizes))
    with pytest.raises(IngestError, match="not asked for"):
        ingest.add_chunk(ids[1], Codec.RAW, views[1])


def test_a_chunk_that_does_not_hash_to_its_id_is_refused() -> None:
    store = MemoryStore()
    views, ids, sizes = recipe_of(os.urandom(100_000))
    ingest = BlobIngest(store)
    ingest.want(tuple(ids[:1]), tuple(sizes[:1]))
    forged = bytes(reversed(views[0]))
    ingest.add_chunk(ids[0], Codec.RAW, forged)
    with pytest.raises(ChunkCorrupt):
        ingest.flush()
    assert store.has_chunks(ids[:1]) == [False]


def test_a_lying_digest_commits_nothing_but_keeps_the_chunks() -> None:
    store = MemoryStore()
    data = os.urandom(400_000)
    views, ids, sizes = recipe_of(data)
    ingest = BlobIngest(store, "liar")
    for i, w in enumerate(ingest.want(tuple(ids), tuple(sizes))):
        if w:
            ingest.add_chunk(ids[i], Codec.RAW, views[i])
    with pytest.raises(IngestError, match="assembled blob is") as info:
        ingest.finish(len(data), format_digest(b"\x00" * 32))
    assert info.value.digest_mismatch
    assert store.stats().blobs == 0
    assert store.list_names() == []
    assert all(store.has_chunks(ids))  # reusable by a retry


def test_a_wrong_size_is_a_digest_mismatch() -> None:
    store = MemoryStore()
    data = b"hello" * 10
    views, ids, sizes = recipe_of(data)
    ingest = BlobIngest(store)
    for i, w in enumerate(ingest.want(tuple(ids), tuple(sizes))):
        if w:
            ingest.add_chunk(ids[i], Codec.RAW, views[i])
    with pytest.raises(IngestError, match="adds up to"):
        ingest.finish(len(data) + 1, format_digest(hashlib.sha256(data).digest()))


def test_recipe_sizes_that_lie_are_caught() -> None:
    store = MemoryStore()
    data = os.urandom(100_000)
    store_blob(store, data)
    _, ids, sizes = recipe_of(data)
    ingest = BlobIngest(store)
    ingest.want(tuple(ids), tuple(s + 1 for s in sizes))
    with pytest.raises(IngestError, match="says"):
        ingest.finish(sum(sizes) + len(sizes), format_digest(hashlib.sha256(data).digest()))


def test_zstd_chunks_are_decoded_and_verified() -> None:
    store = MemoryStore()
    data = b"compressible " * 50_000
    views, ids, sizes = recipe_of(data)
    ingest = BlobIngest(store, "z")
    for i, w in enumerate(ingest.want(tuple(ids), tuple(sizes))):
        if w:
            ingest.add_chunk(ids[i], Codec.ZSTD, zstd.compress(views[i], 3))
    ingest.finish(len(data), format_digest(hashlib.sha256(data).digest()))
    assert read_blob(store, store.resolve("z")) == data


def test_missing_chunks_at_finish_are_an_error() -> None:
    store = MemoryStore()
    data = os.urandom(100_000)
    _, ids, sizes = recipe_of(data)
    ingest = BlobIngest(store)
    ingest.want(tuple(ids), tuple(sizes))
    with pytest.raises(IngestError, match="never arrived"):
        ingest.finish(len(data), format_digest(hashlib.sha256(data).digest()))
