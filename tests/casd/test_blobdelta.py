"""Whole-blob deltas (casd.blobdelta, issue #7): a blob travels as one zstd frame with its
old version as prefix, streamed as it is encoded; the receiver rebuilds it from its own
copy of the old version as the pieces arrive, and what it stores is checked against the
digest, whatever the delta or the base holds. A sync uses one only where the link is slow
enough for it to pay, and falls back to chunks when it cannot."""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any

import pytest
import trio

from casd import blobdelta, chunkdelta
from casd.blobdelta import Link
from casd.chunking import Chunker, format_digest
from casd.errors import DigestMismatch
from casd.replicate import _chunk_wire, sync_into_store
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob, store_blob
from tests.casd.server.test_service import client_for


async def run(fn: Any, *args: Any) -> Any:
    # As the daemon runs store calls: in a worker thread (a rebuild waits there for the
    # pieces that are still crossing).
    return await trio.to_thread.run_sync(fn, *args)


def versions(size: int = 2_000_000, seed: int = 7) -> tuple[bytes, bytes]:
    """An old version and a new one with an insertion and scattered small edits, all
    through (as a layer whose every file header changed): chunk dedup reuses little."""
    rnd = random.Random(seed)
    old = bytearray(rnd.randbytes(size))
    new = bytearray(old)
    for pos in range(1000, size, 40_000):
        new[pos : pos + 8] = rnd.randbytes(8)
    new[size // 2 : size // 2] = rnd.randbytes(3000)
    return bytes(old), bytes(new)


def digest_of(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest())


def delta_between(old: bytes, new: bytes) -> tuple[MemoryStore, str, str, list[bytes]]:
    """The source's store, the two digests, and the delta's pieces as the source sends them."""
    src = MemoryStore()
    base = store_blob(src, old).digest
    target = store_blob(src, new).digest
    enc = blobdelta.Encoder(src, target, base)
    assert enc.target_size == len(new)
    return src, base, target, list(iter(enc.step, None))


def test_a_new_version_rebuilds_from_a_small_delta_and_the_old_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blobdelta, "STEP_BYTES", 256 * 1024)  # several pieces
    old, new = versions()
    _src, base, target, pieces = delta_between(old, new)
    assert len([p for p in pieces if p]) > 3  # it streams: pieces come as input is taken
    assert sum(map(len, pieces)) < len(new) // 20  # chunks of the new version: all new

    dst = MemoryStore()
    store_blob(dst, old)
    seen: list[bytes] = []
    blobdelta.rebuild(dst, iter(pieces), base, target, len(new), Chunker().cut_stream, seen.append)
    assert read_blob(dst, target) == new
    assert b"".join(seen) == new  # the tee is handed every byte, in order


@pytest.mark.parametrize("damage", ["flipped-byte", "wrong-base"])
def test_a_bad_delta_or_base_stores_nothing_visible(damage: str) -> None:
    old, new = versions()
    _src, base, target, pieces = delta_between(old, new)
    dst = MemoryStore()
    delta = b"".join(pieces)
    if damage == "flipped-byte":
        store_blob(dst, old)
        delta = delta[:-100] + bytes([delta[-100] ^ 1]) + delta[-99:]
    else:  # the receiver's "old version" is another blob of the same size
        base = store_blob(dst, os.urandom(len(old))).digest
    with pytest.raises(DigestMismatch):
        blobdelta.rebuild(dst, iter([delta]), base, target, len(new), Chunker().cut_stream)
    assert not dst.has_blob(target)


def test_a_delta_cut_short_stores_nothing_visible() -> None:
    old, new = versions()
    _src, base, target, pieces = delta_between(old, new)
    dst = MemoryStore()
    store_blob(dst, old)
    short = b"".join(pieces)[:-50]  # the connection broke before the last piece
    with pytest.raises(DigestMismatch, match="decoding to"):
        blobdelta.rebuild(dst, iter([short]), base, target, len(new), Chunker().cut_stream)
    assert not dst.has_blob(target)


def test_a_delta_that_decodes_to_more_than_the_target_size_is_refused() -> None:
    old, new = versions(200_000)
    _src, _base, target, pieces = delta_between(old, new)
    with pytest.raises(DigestMismatch, match="more than"):
        list(blobdelta.decode(iter(pieces), old, len(new) - 1, target))


def test_a_delta_with_bytes_after_its_frame_is_refused() -> None:
    old, new = versions(200_000)
    _src, _base, target, pieces = delta_between(old, new)
    with pytest.raises(DigestMismatch, match="after its zstd frame"):
        list(blobdelta.decode(iter([*pieces, b"trailing"]), old, len(new), target))


def test_a_base_beyond_the_memory_budget_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = versions(300_000)
    src = MemoryStore()
    base, target = store_blob(src, old).digest, store_blob(src, new).digest
    monkeypatch.setattr(blobdelta, "MAX_BASE", 100_000)
    with pytest.raises(blobdelta.DeltaTooLarge):
        blobdelta.Encoder(src, target, base)
    dst = MemoryStore()
    store_blob(dst, old)
    with pytest.raises(blobdelta.DeltaTooLarge):  # and the receiver will not hold it either
        blobdelta.rebuild(dst, iter([b""]), base, target, len(new), Chunker().cut_stream)


def test_it_pays_on_a_slow_link_only() -> None:
    chunk_wire, size = 40_000_000, 300_000_000  # the chunks of a 300 MB layer: 40 MB
    # A delta half that size saves 20 MB of link time, against 9 s of CPU.
    assert blobdelta.pays(chunk_wire, size, Link(1e6, 0.4))  # 8 Mbit/s: 20 s saved
    assert not blobdelta.pays(chunk_wire, size, Link(125e6, 0.4))  # 1 Gbit/s: 0.16 s
    assert not blobdelta.pays(chunk_wire, size, None)  # unmeasured: the chunks measure it
    assert not blobdelta.pays(400_000, size, Link(1e6, 0.4))  # little would cross anyway


def test_what_the_chunks_would_move_is_judged_by_how_the_old_version_compresses() -> None:
    store = MemoryStore()
    text = store_blob(store, b"".join(b"line %d of a source file\n" % i for i in range(200_000)))
    noise = store_blob(store, os.urandom(2_000_000))
    need = [(b"\x01" * 32, 1_000_000)]  # a megabyte of chunks missing
    assert _chunk_wire(store, need, text.digest) < 300_000  # compresses well: less crosses
    assert _chunk_wire(store, need, noise.digest) > 950_000  # kept raw: all of it


async def test_a_sync_over_a_slow_link_moves_a_whole_blob_delta() -> None:
    old, new = versions()
    src, dst = MemoryStore(), MemoryStore()
    store_blob(src, old, "blob")
    async with client_for(src) as c:
        await sync_into_store(c, dst, run, [("blob", digest_of(old))])
    store_blob(src, new, "blob")
    async with client_for(src) as c:
        c.unsupported_ops.add(chunkdelta.OP)  # an older source: whole blobs
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=Link(1e5, 0.5))
        stats = await c.stats()  # the source counts what it streamed
    assert report.blobs_as_delta == 1
    assert report.blobs_copied == 1
    assert read_blob(dst, dst.resolve("blob")) == new
    assert report.wire_bytes < len(new) // 10
    assert stats["blob_deltas"] == 1
    assert stats["blob_delta_bytes"] == report.blob_delta_bytes > 0
    assert stats["blob_delta_target_bytes"] == len(new)
    assert stats["blob_delta_encode_s"] > 0


async def test_when_the_source_lacks_the_base_the_sync_falls_back_to_chunks() -> None:
    old, new = versions()
    src, dst = MemoryStore(), MemoryStore()
    store_blob(dst, old, "blob")  # the receiver's old version, which the source never had
    store_blob(src, new, "blob")
    async with client_for(src) as c:
        c.unsupported_ops.add(chunkdelta.OP)  # an older source: whole blobs
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=Link(1e5, 0.5))
    assert report.blobs_as_delta == 0
    assert report.chunks_fetched > 0
    assert read_blob(dst, dst.resolve("blob")) == new


def next_version_on_source(old: bytes, new: bytes) -> tuple[MemoryStore, MemoryStore]:
    """A source holding both versions under "blob" (new last) and a receiver holding old."""
    src, dst = MemoryStore(), MemoryStore()
    store_blob(src, old, "blob")
    store_blob(dst, old, "blob")
    store_blob(src, new, "blob")
    return src, dst


async def test_a_long_stream_is_paced_by_the_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    # More pieces than the client holds (CALL_DATA_WINDOW) and the sync queues
    # (DELTA_PIECES_AHEAD), taken slowly: the connection waits for the rebuild, and
    # nothing is lost or reordered.
    monkeypatch.setattr(blobdelta, "STEP_BYTES", 32 * 1024)
    real = blobdelta.rebuild

    def slow_rebuild(store: Any, pieces: Any, *args: Any) -> None:
        def slowly() -> Any:
            for piece in pieces:
                time.sleep(0.002)
                yield piece

        real(store, slowly(), *args)

    monkeypatch.setattr(blobdelta, "rebuild", slow_rebuild)
    old, new = versions()
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        c.unsupported_ops.add(chunkdelta.OP)  # an older source: whole blobs
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=Link(1e5, 0.5))
    assert report.blobs_as_delta == 1
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_a_rebuild_that_fails_midway_falls_back_to_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blobdelta, "STEP_BYTES", 32 * 1024)

    def failing_rebuild(store: Any, pieces: Any, base: str, target: str, *args: Any) -> None:
        next(iter(pieces))  # the stream is under way
        raise DigestMismatch(target, "a damaged base, say")

    monkeypatch.setattr(blobdelta, "rebuild", failing_rebuild)
    old, new = versions()
    src, dst = next_version_on_source(old, new)
    async with client_for(src) as c:
        c.unsupported_ops.add(chunkdelta.OP)  # an older source: whole blobs
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))], link=Link(1e5, 0.5))
        assert await c.stat("blob")  # the connection still serves after the abandoned stream
    assert report.blobs_as_delta == 0
    assert report.chunks_fetched > 0
    assert read_blob(dst, dst.resolve("blob")) == new
