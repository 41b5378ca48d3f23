"""A layer that lands as its compressed bytes (a sync's first pull of an image): its tar
is stored as the importer cuts it once both digests match, and nothing is stored from
bytes that are not the layer."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from casd.chunking import Chunker
from casd.errors import CasdError
from casd.oci import media, members
from casd.oci.importer import ingest_layer
from casd.oci.layers import LayerCache, LayerRecord, read_record
from casd.oci.sync import _Reencoder, _store_compressed
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
    assert _store_compressed(dst, iter(pieces(layer)), landing) == len(tar_bytes)
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
        _store_compressed(dst, iter(pieces(bytes(bad))), _Reencoder(rec, None))
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
    _store_compressed(MemoryStore(), iter(pieces(layer)), landing)
    assert landing.finish()
    assert Path(cache.path(rec.digest)).read_bytes() == layer
    assert cache.unchecked(rec.digest) == (how == "members")
