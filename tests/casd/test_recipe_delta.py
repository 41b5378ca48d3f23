"""Recipe deltas (PULL_DELTA / RECIPE_DELTA, SPEC §4.1): a receiver that holds an older
version of a blob gets the new recipe encoded against the old one's, so the ids both
share cost next to nothing; a server that cuts the old version otherwise, or lacks it,
sends the recipe plain; a recipe delta that lies is refused before it can cost memory."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import casproto
import pytest
import trio

from casd import zstd
from casd.chunking import Chunker, ChunkerParams, format_digest
from casd.errors import PeerError, PeerRefused
from casd.replicate import sync_into_store
from casd.server import service
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob, store_blob
from tests.casd.server.test_service import client_for


async def run(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def digest_of(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest())


def versions() -> tuple[bytes, bytes]:
    """A blob of small chunks, and a version with a few edits: most ids are shared."""
    rnd = random.Random(3)
    old = rnd.randbytes(4_000_000)
    new = bytearray(old)
    for pos in range(50_000, len(old), 400_000):
        new[pos : pos + 4] = b"edit"
    return old, bytes(new)


SMALL = ChunkerParams(min=1024, avg=4096, max=16384)  # about 1,000 entries per version


async def sync_new(old_on_dst: bytes, *, features: frozenset[str] | None = None) -> Any:
    old, new = versions()
    src, dst = MemoryStore(), MemoryStore()
    store_blob(src, old, "blob", Chunker(SMALL))
    store_blob(dst, old_on_dst, "blob", Chunker(SMALL))
    store_blob(src, new, "blob", Chunker(SMALL))
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest_of(new))])
        stats = await c.stats()
    assert read_blob(dst, dst.resolve("blob")) == new
    return report, stats


async def test_a_new_version_s_recipe_comes_encoded_against_the_old_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PULL_DELTA alone: with PULL_INLINE these small chunks would come in the recipe.
    monkeypatch.setattr(service, "FEATURES", service.FEATURES - {casproto.INLINE_FEATURE})
    old, _ = versions()
    report, stats = await sync_new(old)
    assert stats["recipe_deltas"] == 1
    monkeypatch.setattr(service, "FEATURES", service.FEATURES - {casproto.RECIPE_FEATURE})
    plain, stats = await sync_new(old)
    assert stats["recipe_deltas"] == 0
    # ~1,000 entries of 36 bytes each, of which a few dozen are new.
    assert plain.wire_bytes - report.wire_bytes > 25_000


async def test_an_old_version_cut_otherwise_gets_the_recipe_plain() -> None:
    old, _ = versions()
    # The receiver holds the same old bytes, but chunked otherwise: its entries differ
    # from the server's, so the checksum in PULL_DELTA does not match.
    src, dst = MemoryStore(), MemoryStore()
    _, new = versions()
    store_blob(src, old, "blob", Chunker(SMALL))
    store_blob(dst, old, "blob", Chunker())
    store_blob(src, new, "blob", Chunker(SMALL))
    async with client_for(src) as c:
        await sync_into_store(c, dst, run, [("blob", digest_of(new))])
        assert (await c.stats())["recipe_deltas"] == 0
    assert read_blob(dst, dst.resolve("blob")) == new


async def test_a_lying_recipe_delta_is_refused() -> None:
    src = MemoryStore()
    data = b"x" * 1000
    store_blob(src, data, "blob")
    async with client_for(src) as c:
        prefix = casproto.pack_entries([b"\x01" * 32], [1000])
        bomb = zstd.compress_with_prefix(b"\x00" * 36_000_000, prefix, 3)  # tiny frame
        too_many = casproto.RecipeDelta(0, digest_of(data), 1000, 1_000_000, bomb)
        with pytest.raises(PeerError, match="entries for 1000 bytes"):
            c._decode_recipe(too_many, prefix)
        garbage = casproto.RecipeDelta(0, digest_of(data), 1000, 1, b"not zstd")
        with pytest.raises(PeerError, match="does not decode"):
            c._decode_recipe(garbage, prefix)
        wrong_sum = casproto.pack_entries([b"\x02" * 32], [999])
        frame = zstd.compress_with_prefix(wrong_sum, prefix, 3)
        with pytest.raises(PeerError, match="chunks of 999 bytes"):
            c._decode_recipe(casproto.RecipeDelta(0, digest_of(data), 1000, 1, frame), prefix)


# --- WANT_AT: chunks named by their places in the recipe -----------------------------


async def copy_to_empty(data: bytes) -> Any:
    src, dst = MemoryStore(), MemoryStore()
    digest = store_blob(src, data, "blob", Chunker(SMALL)).digest
    async with client_for(src) as c:
        report = await sync_into_store(c, dst, run, [("blob", digest)])
    assert read_blob(dst, digest) == data
    return report


async def test_chunks_are_asked_for_by_place_not_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(4).randbytes(3_000_000)
    by_place = await copy_to_empty(data)
    monkeypatch.setattr(service, "FEATURES", service.FEATURES - {casproto.WANT_AT_FEATURE})
    by_id = await copy_to_empty(data)
    assert by_place.chunks_fetched == by_id.chunks_fetched > 500
    # 32 bytes of id (and msgpack's 2) per chunk, against a bit.
    assert by_id.wire_bytes - by_place.wire_bytes > 30 * by_id.chunks_fetched


async def test_a_want_at_past_the_recipe_is_refused() -> None:
    src = MemoryStore()
    data = random.Random(5).randbytes(300_000)
    digest = store_blob(src, data, "blob", Chunker(SMALL)).digest
    n = len(src.get_recipe(digest).ids)
    async with client_for(src) as c:
        rid, recv = c._open()
        await c.peer.send(casproto.WantAt(rid, digest, n - 1, b"\x02"))  # entry n: none
        with pytest.raises(PeerRefused, match=f"entry {n} of"):
            await c._reply(recv)
        rid, recv = c._open()
        await c.peer.send(casproto.WantAt(rid, digest, n - 1, b"\x01"))  # the last entry
        chunk = await c._reply(recv)
        assert chunk.id == src.get_recipe(digest).ids[-1]
