"""sync_into_store over many blobs: small ones (an image's config and layer records) are
copied side by side, since one after another each cost a round trip; the report still
lists them in the order asked, and a blob named twice is copied once."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import trio

from casd.chunking import format_digest
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
