"""Small new chunks in the recipe (PULL_INLINE / RECIPE_INLINE, SPEC §4.1, issue #7).

A rebuilt layer gives every tar member a new header, a chunk of its own. A receiver that
holds the old version gets those chunks' bytes in the recipe itself instead of their ids,
and over a slow link encoded against the old headers. It computes each id from the
bytes, and the blob's digest is checked as always. A base that reads otherwise here than
at the source (noticed or not) makes the receiver ask again the old way; a source that
lacks the base inlines nothing, and with deltas off nothing is encoded against the base.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import casproto
import pytest
from casproto import Codec

from casd import recipeinline
from casd.blobdelta import Link
from casd.chunking import Chunker, chunk_id, format_digest
from casd.errors import ChunkCorrupt
from casd.oci.tarcut import TarCutter
from casd.replicate import sync_into_store
from casd.server import service
from casd.storage.interface import StoredChunk
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob, store_blob
from tests.casd.server.test_service import client_for
from tests.oci.images import make_tar

FILES = 300
SLOW = Link(1e5, 0.5)  # 800 kbit/s: reading the old headers pays


async def run(fn: Any, *args: Any) -> Any:
    import trio

    return await trio.to_thread.run_sync(fn, *args)


def digest_of(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest())


def layers() -> tuple[bytes, bytes]:
    """A layer of small and large files, and its rebuild: every header has a new mtime,
    three small files and one large file changed."""
    rnd = random.Random(11)
    files: dict[str, bytes] = {
        f"app/pkg/mod{i:03}.py": rnd.randbytes(rnd.randrange(200, 900)) for i in range(FILES)
    }
    files["app/lib/big.so"] = rnd.randbytes(400_000)
    old = make_tar(files, mtime=1_700_000_000)
    for i in (5, 150, 290):
        files[f"app/pkg/mod{i:03}.py"] += b"# patched\n"
    big = bytearray(files["app/lib/big.so"])
    big[200_000:200_008] = b"patched!"
    files["app/lib/big.so"] = bytes(big)
    return old, make_tar(files, mtime=1_700_086_400)


def cutter() -> TarCutter:
    return TarCutter(Chunker())


def on_both(old: bytes, new: bytes) -> tuple[MemoryStore, MemoryStore]:
    """A source holding both versions under "layer" (new last), a receiver holding old;
    both cut at the tar's members, as the OCI bridge cuts layers."""
    src, dst = MemoryStore(), MemoryStore()
    store_blob(src, old, "layer", cutter())  # type: ignore[arg-type]
    store_blob(dst, old, "layer", cutter())  # type: ignore[arg-type]
    store_blob(src, new, "layer", cutter())  # type: ignore[arg-type]
    return src, dst


def cannot_read(store: MemoryStore, damaged: set[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """``store`` notices damage to ``damaged`` whenever a read includes one of them."""
    real = store.get_chunks

    def failing(ids: Any) -> list[bytes]:
        if hit := damaged & set(ids):
            raise ChunkCorrupt(next(iter(hit)), "checksum mismatch")
        return real(ids)

    monkeypatch.setattr(store, "get_chunks", failing)


def source_with_both() -> tuple[MemoryStore, Any, Any]:
    """A source holding both versions of the layer, and their recipes (old, new)."""
    old, new = layers()
    src, _ = on_both(old, new)
    return src, src.get_recipe(digest_of(old)), src.get_recipe(digest_of(new))


async def sync_new(
    src: MemoryStore, dst: MemoryStore, new: bytes, link: Link | None = None, **kw: Any
) -> Any:
    async with client_for(src) as c:
        for k, v in kw.items():
            setattr(c, k, v)
        report = await sync_into_store(c, dst, run, [("layer", digest_of(new))], link=link)
        stats = await c.stats()
    target = dst.get_recipe(dst.resolve("layer"))
    assert read_blob(dst, target.digest) == new
    for cid in set(target.ids):
        assert chunk_id(dst.get_chunk(cid)) == cid  # nothing stored under a wrong id
    return report, stats


async def test_a_rebuilt_layer_s_new_headers_come_as_bytes_in_the_recipe_not_as_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = layers()
    report, stats = await sync_new(*on_both(old, new), new)
    assert stats["recipe_inlines"] == 1
    # Every member's header changed (FILES files, their directories), and three files.
    assert report.chunks_inlined >= FILES + 3
    assert report.inline_raw_bytes >= 512 * FILES
    # Over a slow link, against the old headers: a new mtime and checksum cost a few bytes.
    slow, _ = await sync_new(*on_both(old, new), new, SLOW)
    assert slow.chunks_inlined == report.chunks_inlined
    assert slow.inline_wire_bytes * 4 < report.inline_wire_bytes * 3
    assert slow.inline_wire_bytes < 12 * slow.chunks_inlined
    monkeypatch.setattr(service, "FEATURES", service.FEATURES - {casproto.INLINE_FEATURE})
    by_id, stats = await sync_new(*on_both(old, new), new)
    assert stats["recipe_inlines"] == 0
    assert by_id.chunks_inlined == 0
    assert by_id.chunks_fetched > report.chunks_fetched + FILES
    # Inlined chunks were moved, not reused: both count only what the old version held.
    assert report.chunks_reused == by_id.chunks_reused
    # Each inlined chunk saved its id in the recipe and in the request for it.
    assert by_id.wire_bytes - report.wire_bytes > 30 * report.chunks_inlined


def test_the_frame_is_encoded_against_the_old_headers_the_new_version_dropped() -> None:
    src, o, n = source_with_both()
    sizes_of = {}
    for rate, against in ((0, False), (int(SLOW.rate), True)):
        enc = recipeinline.encode(src, n, o, recipeinline.ASK, rate)
        assert enc is not None
        assert enc.against_base is against
        ids, sizes = casproto.unpack_entries(enc.entries, len(n.ids))
        assert ids.count(casproto.INLINE_ID) == enc.chunks
        got, chunks = recipeinline.decode(
            src, ids, sizes, o, recipeinline.ASK, against, enc.inline_sum, enc.frame
        )
        assert got == n.ids
        assert all(chunk_id(data) == cid for cid, data in chunks)
        sizes_of[against] = len(enc.frame)
    # Against the old headers the same bytes take less.
    assert sizes_of[True] * 4 < sizes_of[False] * 3


def test_the_source_reads_the_old_chunks_only_where_the_link_is_slow_enough_to_pay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, o, n = source_with_both()
    reads: list[int] = []
    real = recipeinline._read_prefix

    def counting(store: Any, ids: Any) -> bytes:
        reads.append(len(ids))
        return real(store, ids)

    monkeypatch.setattr(recipeinline, "_read_prefix", counting)
    for rate in (0, 125_000_000):  # not measured; 1 Gbit/s
        enc = recipeinline.encode(src, n, o, recipeinline.ASK, rate)
        assert enc is not None
        assert not enc.against_base
    assert reads == []
    enc = recipeinline.encode(src, n, o, recipeinline.ASK, int(SLOW.rate))
    assert enc is not None
    assert enc.against_base
    # The old headers the new version replaced (files, big.so, three directories) and the
    # old versions of the three small files it changed.
    assert reads == [FILES + 1 + 3 + 3]
    # What the source weighs: the bytes saved, at the link's rate, against the client's
    # read of the prefix.
    assert recipeinline.pays(10_000, 1_000_000, 1000)  # 10 ms against 6.5 ms
    assert not recipeinline.pays(5_000, 1_000_000, 1000)
    assert not recipeinline.pays(10_000, 0, 1000)
    # The source reads them only where the frame made without is large enough that a
    # prefix could pay: over 100 Mbit/s not for 22 bytes a chunk (only headers changed),
    # but for 225 (small files changed too).
    assert not recipeinline.worth_trying(274_275, 11_000_000, 12_560)
    assert recipeinline.worth_trying(3_043_850, 11_000_000, 13_490)


@pytest.mark.parametrize("damage", ["unnoticed", "noticed"])
async def test_a_base_damaged_in_the_receivers_store_falls_back_and_stores_nothing_wrong(
    damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = layers()
    src, dst = on_both(old, new)
    o = dst.get_recipe(digest_of(old))
    dropped = set(o.ids) - set(src.get_recipe(digest_of(new)).ids)
    if damage == "unnoticed":
        # Bitrot the store did not catch: the old headers read as other bytes.
        for cid in dropped:
            stored = dst.get_stored(cid)
            data = bytes(b ^ 0x5A for b in dst.get_chunk(cid))
            dst._chunks[cid] = StoredChunk(cid, Codec.RAW, data, stored.raw_size)
    else:
        cannot_read(dst, dropped, monkeypatch)
    report, stats = await sync_new(src, dst, new, SLOW)
    assert stats["recipe_inlines"] == 1  # the source inlined; this side could not use it
    assert report.inline_fallbacks == 1
    assert report.chunks_inlined == 0
    assert report.chunks_fetched > FILES  # the new headers came as chunks


async def test_a_source_that_cannot_read_the_old_chunks_sends_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = layers()
    src, dst = on_both(old, new)
    dropped = set(src.get_recipe(digest_of(old)).ids) - set(src.get_recipe(digest_of(new)).ids)
    cannot_read(src, dropped, monkeypatch)
    report, stats = await sync_new(src, dst, new, SLOW)
    assert stats["recipe_inlines"] == 0
    assert stats["recipe_deltas"] == 1
    assert report.chunks_fetched > FILES


async def test_nothing_is_inlined_against_a_base_the_source_lacks() -> None:
    old, new = layers()
    src, dst = MemoryStore(), MemoryStore()
    store_blob(dst, old, "layer", cutter())  # type: ignore[arg-type]
    store_blob(src, new, "layer", cutter())  # type: ignore[arg-type]
    report, stats = await sync_new(src, dst, new, SLOW)
    assert stats["recipe_inlines"] == 0
    assert report.chunks_inlined == 0


async def test_with_deltas_off_nothing_is_encoded_against_the_base(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = layers()
    deltas_on, _ = await sync_new(*on_both(old, new), new, SLOW)

    def no_prefix(*args: Any) -> bytes:
        raise AssertionError("the old headers were read")

    # Even over a slow link: the old headers are not read at either end.
    monkeypatch.setattr(recipeinline, "_read_prefix", no_prefix)
    report, _ = await sync_new(*on_both(old, new), new, SLOW, allow_deltas=False)
    assert report.chunks_inlined == deltas_on.chunks_inlined > FILES
    assert report.inline_wire_bytes * 3 > deltas_on.inline_wire_bytes * 4
    assert report.chunks_delta == 0


def test_an_answer_that_breaks_the_spec_is_refused_before_it_is_decoded() -> None:
    src, o, n = source_with_both()
    enc = recipeinline.encode(src, n, o, recipeinline.ASK, int(SLOW.rate))
    assert enc is not None
    assert enc.against_base
    ids, sizes = casproto.unpack_entries(enc.entries, len(n.ids))
    args = (True, enc.inline_sum, enc.frame)
    with pytest.raises(ValueError, match="over the 512 asked for"):
        recipeinline.decode(src, ids, sizes, o, 512, *args)
    # The frame's declared size must be the inlined entries' total.
    short = list(sizes)
    short[ids.index(casproto.INLINE_ID)] -= 1
    with pytest.raises(ValueError, match="declares"):
        recipeinline.decode(src, ids, tuple(short), o, recipeinline.ASK, *args)
    with pytest.raises(ValueError, match="not a zstd frame"):
        recipeinline.decode(src, ids, sizes, o, recipeinline.ASK, True, enc.inline_sum, b"junk")
    with pytest.raises(recipeinline.InlineMismatch, match="did not decode"):
        recipeinline.decode(
            src, ids, sizes, o, recipeinline.ASK, True, enc.inline_sum ^ 1, enc.frame
        )
    # Decoded without the prefix it was made with: other bytes, never a wrong chunk.
    with pytest.raises((recipeinline.InlineMismatch, ValueError)):
        recipeinline.decode(src, ids, sizes, o, recipeinline.ASK, False, *args[1:])


def test_more_than_a_recipe_inline_carries_is_left_to_the_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, o, n = source_with_both()
    monkeypatch.setattr(casproto, "MAX_INLINE_BYTES", 100_000)
    assert recipeinline.encode(src, n, o, recipeinline.ASK, int(SLOW.rate)) is None
