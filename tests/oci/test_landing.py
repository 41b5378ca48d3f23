"""A layer that lands as its compressed bytes (a sync's first pull of an image): its tar
is stored as the importer cuts it once both digests match, and nothing is stored from
bytes that are not the layer."""

from __future__ import annotations

import gzip
import os
from functools import partial
from pathlib import Path

import pytest
import trio

from casd.chunking import Chunker
from casd.errors import CasdError
from casd.oci import media, members
from casd.oci.importer import ingest_layer
from casd.oci.landing import LANDING_PREFIX, Landings, landing_name, store_compressed
from casd.oci.layers import LayerCache, LayerRecord, put_bytes, read_record, reencodes
from casd.oci.source import StoreSource
from casd.oci.sync import _Reencoder
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob
from tests.oci.images import sha256_digest as sha


def imported(tmp_path: Path, tar_bytes: bytes, how: str) -> tuple[MemoryStore, bytes, LayerRecord]:
    """A source store holding a layer as the importer keeps it: members (`oci convert`'s
    format) or zlib-made gzip, both re-encodable."""
    if how == "members":
        enc = members.MembersEncoder(members.MembersParams(1))
        layer = enc.update(tar_bytes) + enc.finish()
    else:
        layer = gzip.compress(tar_bytes, compresslevel=6, mtime=1234)
    src = MemoryStore()
    spool = tmp_path / "spool"
    spool.write_bytes(layer)
    desc = media.Descriptor(media.OCI_LAYER_GZIP, sha(layer), len(layer))
    out = ingest_layer(src, Chunker(), None, str(spool), desc, sha(tar_bytes))
    assert out.stored == "reencodable"
    rec = read_record(src, sha(layer))
    assert rec is not None
    return src, layer, rec


def pieces(data: bytes, size: int = 100_000) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("how", ["members", "zlib"])
def test_the_tar_is_stored_as_the_importer_cut_it_and_the_layer_checked(
    tmp_path: Path, tar_bytes: bytes, how: str
) -> None:
    src, layer, rec = imported(tmp_path, tar_bytes, how)
    dst = MemoryStore()
    landing = _Reencoder(rec, None)
    assert store_compressed(dst, iter(pieces(layer)), landing) == len(tar_bytes)
    assert read_blob(dst, rec.uncompressed) == tar_bytes
    # The same chunks as the source's: the next version's deltas find them here.
    assert dst.get_recipe(rec.uncompressed) == src.get_recipe(rec.uncompressed)
    assert landing.finish()  # this host makes the same bytes again


@pytest.mark.parametrize("how", ["members", "zlib"])
@pytest.mark.parametrize("damage", ["flipped", "cut short", "longer"])
def test_bytes_that_are_not_the_layer_store_no_tar(
    tmp_path: Path, tar_bytes: bytes, how: str, damage: str
) -> None:
    _, layer, rec = imported(tmp_path, tar_bytes, how)
    bad = bytearray(layer)
    if damage == "flipped":
        bad[len(bad) // 3] ^= 0x04
    elif damage == "cut short":
        del bad[-1000:]
    else:
        bad += b"\x00" * 10
    dst = MemoryStore()
    with pytest.raises(CasdError):
        store_compressed(dst, iter(pieces(bytes(bad))), _Reencoder(rec, None))
    assert not dst.has_blob(rec.uncompressed)


@pytest.mark.parametrize("how", ["members", "zlib"])
def test_the_cache_keeps_the_bytes_and_a_sampled_check_marks_them_unchecked(
    tmp_path: Path, tar_bytes: bytes, how: str
) -> None:
    # A member series is deflated again in part when the cache keeps its bytes: the
    # copy is marked and stays until a whole re-encoding made it (LayerCache.evict).
    # A zlib layer is re-encoded whole as it lands: an ordinary copy.
    _src, layer, rec = imported(tmp_path, tar_bytes, how)
    cache = LayerCache(str(tmp_path / "cache"))
    landing = _Reencoder(rec, cache)
    store_compressed(MemoryStore(), iter(pieces(layer)), landing)
    assert landing.finish()
    assert Path(cache.path(rec.digest)).read_bytes() == layer
    assert cache.unchecked(rec.digest) == (how == "members")


# --- deferred landings (casd.oci.landing.Landings) -----------------------------------------


def due(tmp_path: Path, layer: bytes, rec: LayerRecord) -> tuple[MemoryStore, LayerCache]:
    """A receiver as a sync leaves it when it defers a layer's landing: the bytes in the
    cache (unchecked), the record and the landing named, no tar."""
    dst = MemoryStore()
    record = put_bytes(dst, rec.to_json(), Chunker())
    dst.tag(media.layer_record_name(rec.digest), record)
    dst.tag(landing_name(rec.digest), record)
    cache = LayerCache(str(tmp_path / "cache"))
    cache.checker = partial(reencodes, dst)  # as the daemon's
    spool = tmp_path / "spool-b"
    spool.write_bytes(layer)
    cache.adopt(rec.digest, str(spool), checked=False, durable=True)
    return dst, cache


async def land_all(landings: Landings, rec: LayerRecord) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(landings.run)  # resumes what its names say is due
        with trio.fail_after(30):
            await landings.wait_for([rec.uncompressed])
        assert landings.pending == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("how", ["members", "zlib"])
async def test_a_due_landing_is_resumed_from_its_name_and_stores_the_tar(
    tmp_path: Path, tar_bytes: bytes, how: str
) -> None:
    src, layer, rec = imported(tmp_path, tar_bytes, how)
    dst, cache = due(tmp_path, layer, rec)
    source = StoreSource(dst, trio.to_thread.run_sync, cache)
    # Meanwhile the layer serves from the cache, its only copy here.
    assert await source.blob_size("x", rec.digest) == len(layer)
    assert not cache_may_evict(cache, rec.digest)

    landings = Landings(dst, cache)  # as a daemon starts after a crash: nothing submitted
    await land_all(landings, rec)
    assert (landings.landed, landings.kept_whole, landings.failed) == (1, 0, 0)
    assert read_blob(dst, rec.uncompressed) == tar_bytes
    assert dst.get_recipe(rec.uncompressed) == src.get_recipe(rec.uncompressed)
    assert dst.list_names(LANDING_PREFIX) == []
    # Now the tar makes the bytes again, so the cache may let them go.
    assert cache_may_evict(cache, rec.digest)


def cache_may_evict(cache: LayerCache, digest: str) -> bool:
    return cache._may_go(cache.path(digest))


async def test_a_landing_whose_tar_is_not_the_records_keeps_the_bytes_as_a_blob(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    _, layer, rec = imported(tmp_path, tar_bytes, "members")
    wrong = LayerRecord(
        rec.digest,
        rec.size,
        rec.media_type,
        sha(b"another tar"),
        rec.uncompressed_size,
        encoding=rec.encoding,
    )
    dst, cache = due(tmp_path, layer, wrong)
    landings = Landings(dst, cache)
    await land_all(landings, wrong)
    assert (landings.landed, landings.kept_whole) == (0, 1)
    assert not dst.has_blob(wrong.uncompressed)
    assert read_blob(dst, rec.digest) == layer  # serves from the store from now on
    assert dst.list_names(LANDING_PREFIX) == []


async def test_a_landing_whose_bytes_are_gone_is_dropped(tmp_path: Path, tar_bytes: bytes) -> None:
    _, layer, rec = imported(tmp_path, tar_bytes, "members")
    dst, cache = due(tmp_path, layer, rec)
    os.unlink(cache.path(rec.digest))
    landings = Landings(dst, cache)
    await land_all(landings, rec)
    assert dst.list_names(LANDING_PREFIX) == []
    assert not dst.has_blob(rec.uncompressed)


async def test_a_sync_waits_for_its_base_to_land(tmp_path: Path, tar_bytes: bytes) -> None:
    _, layer, rec = imported(tmp_path, tar_bytes, "members")
    dst, cache = due(tmp_path, layer, rec)
    landings = Landings(dst, cache)
    landings.submit(rec)
    assert landings.is_due(rec.digest)
    with trio.move_on_after(0.2):
        await landings.wait_for([rec.uncompressed])
        pytest.fail("returned before the landing ran")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(landings.run)
        with trio.fail_after(30):
            await landings.wait_for([rec.uncompressed, "sha256:" + "0" * 64])
        assert dst.has_blob(rec.uncompressed)
        nursery.cancel_scope.cancel()


async def test_landings_give_way_to_foreground_work_unless_one_is_waited_for(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    _, layer, rec = imported(tmp_path, tar_bytes, "members")
    dst, cache = due(tmp_path, layer, rec)
    landings = Landings(dst, cache)
    async with trio.open_nursery() as nursery:
        with landings.foreground():  # a client pulling a layer, say
            await nursery.start(landings.run)
            await trio.sleep(0.5)
            assert landings.pending == 1
            assert not dst.has_blob(rec.uncompressed)
            # A sync needs it as its base: it goes on, foreground or not.
            with trio.fail_after(30):
                await landings.wait_for([rec.uncompressed])
        assert dst.has_blob(rec.uncompressed)
        nursery.cancel_scope.cancel()


async def test_a_landing_stopped_before_its_record_was_named_leaves_nothing_behind(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    # A crash between naming the landing and naming the record: the sync never ended,
    # so the bytes serve nothing, and the cache must not keep them past its bound.
    _, layer, rec = imported(tmp_path, tar_bytes, "members")
    dst, cache = due(tmp_path, layer, rec)
    dst.untag(media.layer_record_name(rec.digest))
    landings = Landings(dst, cache)
    async with trio.open_nursery() as nursery:
        await nursery.start(landings.run)
        assert landings.pending == 0
        nursery.cancel_scope.cancel()
    assert dst.list_names(LANDING_PREFIX) == []
    assert not cache.has(rec.digest)
    assert not cache.unchecked(rec.digest)
