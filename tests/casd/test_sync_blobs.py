"""sync_into_store over many blobs: small ones (an image's config and layer records) are
copied side by side, since one after another each cost a round trip; the report still
lists them in the order asked, and a blob named twice is copied once."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import trio

from casd.chunking import DEFAULT_PARAMS, format_digest
from casd.replicate import SMALL_BLOBS_AT_ONCE, sync_into_store
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob, store_blob
from tests.casd.server.test_service import client_for


async def run(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def digest_of(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest())


async def test_small_blobs_are_fetched_side_by_side_and_reported_in_order() -> None:
    src, dst = MemoryStore(), MemoryStore()
    blobs = {f"small-{i}": os.urandom(20_000) for i in range(12)}
    blobs["large"] = os.urandom(3_000_000)
    for name, data in blobs.items():
        store_blob(src, data, name)
    pairs = [(name, digest_of(data)) for name, data in blobs.items()]
    async with client_for(src) as c:
        now = peak = 0
        fetch = c.fetch_chunks

        async def counting(*args: Any, **kw: Any) -> int:
            nonlocal now, peak
            now += 1
            peak = max(peak, now)
            try:
                await trio.sleep(0.01)  # as a round trip would
                return await fetch(*args, **kw)
            finally:
                now -= 1

        c.fetch_chunks = counting  # type: ignore[method-assign]
        report = await sync_into_store(c, dst, run, pairs)
    assert 1 < peak <= SMALL_BLOBS_AT_ONCE + 1  # and the large one, on its own
    assert [(n, d) for n, d, _ in report.items] == pairs
    assert {a for _, _, a in report.items} == {"copied"}
    for name, data in blobs.items():
        assert read_blob(dst, dst.resolve(name)) == data


async def test_a_blob_under_two_names_is_copied_once() -> None:
    src, dst = MemoryStore(), MemoryStore()
    data = os.urandom(50_000)
    store_blob(src, data, "a")
    store_blob(src, data, "b")
    async with client_for(src) as c:
        report = await sync_into_store(
            c, dst, run, [("a", digest_of(data)), ("b", digest_of(data))]
        )
    assert [a for _, _, a in report.items] == ["copied", "present"]
    assert report.blobs_copied == 1
    assert dst.resolve("a") == dst.resolve("b") == digest_of(data)


async def test_a_blob_of_one_chunk_comes_with_its_recipe() -> None:
    """Where the caller knows a blob is one chunk (a manifest says its config's size),
    the chunk is asked for by its place with the recipe: no round trip of its own."""
    src, dst = MemoryStore(), MemoryStore()
    small = {f"small-{i}": os.urandom(5_000 + i) for i in range(3)}
    large = os.urandom(600_000)  # said to be small, which it is not: still copied whole
    for name, data in [*small.items(), ("large", large)]:
        store_blob(src, data, name)
    pairs = [(n, digest_of(d)) for n, d in [*small.items(), ("large", large)]]
    sizes = {digest_of(d): len(d) for d in small.values()} | {digest_of(large): 1000}
    async with client_for(src) as c:
        c.chunker_params = DEFAULT_PARAMS  # what a daemon's disk store tells (not a memory one)
        asked: list[int] = []
        fetch = c.fetch_chunks

        async def counting(need: Any, *args: Any, **kw: Any) -> int:
            asked.append(len(need))
            return int(await fetch(need, *args, **kw))

        c.fetch_chunks = counting  # type: ignore[method-assign]
        report = await sync_into_store(c, dst, run, pairs, sizes=sizes)
    for name, data in [*small.items(), ("large", large)]:
        assert read_blob(dst, dst.resolve(name)) == data
    # Only the large one's chunks after its first were asked for the usual way.
    assert len(asked) == 1
    assert asked[0] == report.chunks - 4
    assert report.chunks_fetched == report.chunks


async def test_a_first_chunk_that_is_not_the_recipes_is_not_kept() -> None:
    """The chunk asked for by place is checked against the recipe's first id when that
    comes: another chunk, or bytes that do not hash to it, are dropped and the chunk is
    fetched as any other; a server without want-at is not asked."""
    import casproto

    src, dst = MemoryStore(), MemoryStore()
    blobs = {f"b{i}": os.urandom(4_000) for i in range(3)}
    for name, data in blobs.items():
        store_blob(src, data, name)
    pairs = [(n, digest_of(d)) for n, d in blobs.items()]
    sizes = {digest_of(d): len(d) for d in blobs.values()}
    async with client_for(src) as c:
        c.chunker_params = DEFAULT_PARAMS
        firsts_asked: list[str] = []
        real_first = c.first_chunk

        async def lying(digest: str) -> Any:
            firsts_asked.append(digest)
            reply = await real_first(digest)
            assert isinstance(reply, casproto.Chunk | casproto.ChunkPack)
            if digest == pairs[0][1]:  # another blob's chunk
                return await real_first(pairs[1][1])
            if digest == pairs[1][1]:  # damaged bytes
                return casproto.Chunk(
                    0,
                    reply.id if isinstance(reply, casproto.Chunk) else b"x" * 32,
                    casproto.Codec.RAW,
                    b"\0" * 4_000,
                )
            return reply

        c.first_chunk = lying  # type: ignore[method-assign]
        report = await sync_into_store(c, dst, run, pairs, sizes=sizes)
        assert sorted(firsts_asked) == sorted(d for _, d in pairs)
        assert report.chunks_fetched == 3
        for name, data in blobs.items():
            assert read_blob(dst, dst.resolve(name)) == data
        # An older server, without want-at: nothing asked by place.
        dst2 = MemoryStore()
        c.features = frozenset(c.features) - {casproto.WANT_AT_FEATURE}  # type: ignore[misc]
        c.first_chunk = real_first  # type: ignore[method-assign]
        assert await c.first_chunk(pairs[0][1]) is None
        await sync_into_store(c, dst2, run, pairs, sizes=sizes)
        for name, data in blobs.items():
            assert read_blob(dst2, dst2.resolve(name)) == data
