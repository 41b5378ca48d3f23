"""Chunk packs (SPEC §4.1): small chunks a WANT asks for travel together in CHUNK_PACK
frames, compressed as one, without their ids; the receiver still checks every chunk
against the id it asked for at that place, and stores nothing that fails."""

from __future__ import annotations

import hashlib
import io
import random
from typing import Any

import casproto
import pytest

from casd import zstd
from casd.chunking import chunk_id, format_digest
from casd.client import _Packed, verify_chunks
from casd.errors import ChunkCorrupt
from casd.replicate import sync_into_store
from casd.server import service
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob
from tests.casd.server.test_service import client_for


async def run(fn: Any, *args: Any) -> Any:
    return fn(*args)


def small_chunks(n: int, seed: int = 0) -> list[bytes]:
    """Tar-header-like records: similar to each other, each distinct, 512 B to 3 KiB."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        path = f"usr/lib/python3/site-packages/pkg{rnd.randrange(40)}/module_{i}.py"
        meta = f"{path}\0{0o644:07o}\0{1000:07o}\0{rnd.randrange(10**6):011o}\0ustar\0"
        out.append((meta.encode() * rnd.randint(8, 40))[: rnd.randint(512, 3072)])
    return out


async def serve_blob(store: MemoryStore, parts: list[bytes]) -> str:
    async with client_for(store) as c:
        result = await c.push(iter(parts), name="blob")
    return result.digest


async def sync_stats(parts: list[bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    src, dst = MemoryStore(), MemoryStore()
    digest = await serve_blob(src, parts)
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest)])
        stats = await c.stats()
    assert read_blob(dst, digest) == b"".join(parts)
    return report.as_dict(), stats


async def test_small_chunks_travel_packed_and_each_is_verified() -> None:
    big = random.Random(1).randbytes(100_000)  # too large to pack: a CHUNK of its own
    parts = [*small_chunks(300), big, *small_chunks(50, seed=2)]
    report, stats = await sync_stats(parts)
    assert report["chunks_fetched"] == len(parts)
    assert stats["packs_sent"] >= 2  # before and after the large chunk
    assert stats["packed_chunks_sent"] == len(parts) - 1
    one_by_one = sum(len(zstd.compress(p, 3)) for p in parts if p is not big)
    assert report["bytes_fetched"] - len(big) < one_by_one / 3


async def test_without_the_feature_chunks_travel_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parts = small_chunks(200)
    packed, _ = await sync_stats(parts)
    monkeypatch.setattr(service, "FEATURES", service.FEATURES - {casproto.PACK_FEATURE})
    plain, stats = await sync_stats(parts)
    assert stats["packs_sent"] == 0
    assert plain["wire_bytes"] > 2 * packed["wire_bytes"]


async def test_a_pull_assembles_packed_chunks() -> None:
    parts = small_chunks(100)
    store = MemoryStore()
    digest = await serve_blob(store, parts)
    out = io.BytesIO()
    async with client_for(store) as c:
        got = await c.pull(digest, out)
    assert out.getvalue() == b"".join(parts)
    assert got.digest == format_digest(hashlib.sha256(out.getvalue()).digest())


def packed(parts: list[bytes], codec: casproto.Codec = casproto.Codec.ZSTD) -> _Packed:
    data = b"".join(parts)
    payload = zstd.compress(data, 3) if codec == casproto.Codec.ZSTD else data
    pack = casproto.ChunkPack(1, codec, tuple(map(len, parts)), payload)
    return _Packed(pack, tuple(chunk_id(p) for p in parts))


def test_a_pack_verifies_into_its_chunks() -> None:
    parts = small_chunks(5)
    sizes = {chunk_id(p): len(p) for p in parts}
    for codec in (casproto.Codec.RAW, casproto.Codec.ZSTD):
        got = verify_chunks([packed(parts, codec)], sizes)
        assert [c.data for c in got] == parts
        assert [c.id for c in got] == [chunk_id(p) for p in parts]


def test_a_pack_whose_bytes_are_not_the_chunks_asked_for_is_refused() -> None:
    parts = small_chunks(3)
    item = packed(parts)
    sizes = {chunk_id(p): len(p) for p in parts}
    # A length other than the size the recipe gave: refused before anything is decoded.
    with pytest.raises(ChunkCorrupt, match="packed it as"):
        verify_chunks([item], {**sizes, item.ids[1]: len(parts[1]) + 1})
    # The right lengths, but the middle bytes are another chunk's.
    other = parts[1][::-1]
    lie = _Packed(packed([parts[0], other, parts[2]]).pack, item.ids)
    with pytest.raises(ChunkCorrupt, match="do not hash"):
        verify_chunks([lie], sizes)


def test_a_pack_that_does_not_decode_is_refused() -> None:
    parts = small_chunks(2)
    sizes = {chunk_id(p): len(p) for p in parts}
    bad = casproto.ChunkPack(1, casproto.Codec.ZSTD, tuple(map(len, parts)), b"not zstd")
    with pytest.raises(ChunkCorrupt, match="invalid zstd"):
        verify_chunks([_Packed(bad, tuple(sizes))], sizes)
    short = casproto.ChunkPack(1, casproto.Codec.RAW, tuple(map(len, parts)), parts[0])
    with pytest.raises(ChunkCorrupt, match="holds"):
        verify_chunks([_Packed(short, tuple(sizes))], sizes)
