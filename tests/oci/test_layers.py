"""How casd holds layers: ingest (re-encodable, raw, uncompressed), re-encoding byte-exact,
the cache, serving ranges, convert and materialize. In-process on a MemoryStore."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import zlib
from functools import partial
from pathlib import Path

import pytest

from casd.chunking import Chunker, format_digest
from casd.errors import UserError
from casd.oci import media, members
from casd.oci.importer import ImportError_, ingest_layer, layer_present
from casd.oci.layers import (
    UNCHECKED,
    LayerCache,
    LayerError,
    LayerRecord,
    can_reencode_here,
    encode_layer,
    put_bytes,
    read_blob,
    read_record,
    reencodes,
    verified_encoding,
)
from casd.oci.ops import convert_image, inspect_image, materialize
from casd.oci.source import StoreSource
from casd.storage.memory import MemoryStore


def sha(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest())


def spool(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / f"spool-{sha(data)[7:19]}"
    path.write_bytes(data)
    return str(path)


def ingest(store: MemoryStore, tmp_path: Path, data: bytes, mt: str, diff: str | None = None):  # type: ignore[no-untyped-def]
    desc = media.Descriptor(mt, sha(data), len(data))
    return ingest_layer(store, Chunker(), None, spool(tmp_path, data), desc, diff)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_a_python_gzip_layer_is_kept_uncompressed_and_re_encodes_byte_exact(
    tmp_path: Path, tar_bytes: bytes, level: int
) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, compresslevel=level, mtime=1234)
    out = ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP, sha(tar_bytes))
    assert out.stored == "reencodable"
    assert out.uncompressed == sha(tar_bytes)
    assert not store.has_blob(sha(layer))  # only the tar's chunks are kept
    rec = read_record(store, sha(layer))
    assert rec is not None
    assert rec.reencodable
    assert b"".join(encode_layer(store, rec)) == layer
    assert read_blob(store, rec.uncompressed) == tar_bytes
    assert layer_present(store, sha(layer))


def test_a_layer_no_zlib_setting_reproduces_is_kept_as_it_came(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    gzip_tool = shutil.which("gzip")
    assert gzip_tool, "GNU gzip is part of every Debian system"
    # GNU gzip's own deflate: it may or may not match zlib; pigz-like streams do not. Build
    # a stream zlib cannot produce for sure: two gzip members.
    layer = gzip.compress(tar_bytes[:100_000], mtime=0) + gzip.compress(
        tar_bytes[100_000:], mtime=0
    )
    store = MemoryStore()
    out = ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP, sha(tar_bytes))
    assert out.stored == "raw"
    assert out.note
    assert store.has_blob(sha(layer))
    assert read_blob(store, sha(layer)) == layer
    rec = read_record(store, sha(layer))
    assert rec is not None
    assert rec.raw == sha(layer)
    assert rec.uncompressed == sha(tar_bytes)
    assert subprocess.run([gzip_tool, "--version"], capture_output=True).returncode == 0


def test_a_zstd_layer_is_kept_raw_with_its_content_chunked(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    from casd import zstd

    layer = zstd.compress(tar_bytes, 3)
    store = MemoryStore()
    out = ingest(
        store, tmp_path, layer, "application/vnd.oci.image.layer.v1.tar+zstd", sha(tar_bytes)
    )
    assert out.stored == "raw"
    assert read_blob(store, out.uncompressed) == tar_bytes


def test_an_uncompressed_layer_is_its_own_blob(tmp_path: Path, tar_bytes: bytes) -> None:
    store = MemoryStore()
    out = ingest(store, tmp_path, tar_bytes, "application/vnd.oci.image.layer.v1.tar")
    assert out.stored == "uncompressed"
    assert read_blob(store, sha(tar_bytes)) == tar_bytes
    assert read_record(store, sha(tar_bytes)) is None


def test_a_diff_id_that_does_not_match_fails_the_import(tmp_path: Path, tar_bytes: bytes) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    with pytest.raises(ImportError_, match="diff_id"):
        ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP, sha(b"something else"))
    assert read_record(store, sha(layer)) is None
    assert not layer_present(store, sha(layer))


def test_a_truncated_gzip_layer_is_an_error_not_a_crash(tmp_path: Path, tar_bytes: bytes) -> None:
    layer = gzip.compress(tar_bytes, mtime=0)[:-1000]
    with pytest.raises(ImportError_):
        ingest(MemoryStore(), tmp_path, layer, media.OCI_LAYER_GZIP)


def test_a_wrong_record_never_streams_a_complete_wrong_blob(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    rec = read_record(store, sha(layer))
    assert rec is not None
    assert rec.encoding is not None
    lying = LayerRecord(
        rec.digest,
        rec.size,
        rec.media_type,
        rec.uncompressed,
        rec.uncompressed_size,
        encoding={**rec.encoding, "level": 1 if rec.encoding["level"] != 1 else 9},
    )
    pieces: list[bytes] = []

    def drain() -> None:
        pieces.extend(verified_encoding(store, lying))

    with pytest.raises(LayerError, match="does not reproduce"):
        drain()
    got = b"".join(pieces)
    assert len(got) < rec.size  # the last piece was held back, or the excess cut off


def test_the_cache_holds_only_verified_copies(tmp_path: Path, tar_bytes: bytes) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    rec = read_record(store, sha(layer))
    assert rec is not None
    cache = LayerCache(str(tmp_path / "cache"), max_bytes=10 * len(layer))
    assert cache.fill(store, rec)
    assert Path(cache.path(rec.digest)).read_bytes() == layer
    bad = LayerRecord(
        rec.digest,
        rec.size + 1,
        rec.media_type,
        rec.uncompressed,
        rec.uncompressed_size,
        encoding=rec.encoding,
    )
    Path(cache.path(rec.digest)).unlink()
    assert not cache.fill(store, bad)
    assert not cache.has(rec.digest)
    assert not list(Path(cache.dir).iterdir())  # no temporary left behind


def test_the_cache_evicts_the_least_recently_used(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "c"), max_bytes=250)
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes(100))
        cache.adopt(f"sha256:{i:064x}", str(p))
    assert not cache.has(f"sha256:{0:064x}")
    assert cache.has(f"sha256:{2:064x}")


def test_a_copy_adopted_unchecked_is_evicted_only_once_this_host_makes_it(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    cache = LayerCache(str(tmp_path / "c"), max_bytes=len(layer) + 50)
    copy = tmp_path / "landed"
    copy.write_bytes(layer)
    cache.adopt(sha(layer), str(copy), checked=False)
    assert cache.unchecked(sha(layer))
    asked: list[str] = []

    def no(digest: str) -> bool:
        asked.append(digest)
        return False

    def newer(i: int) -> None:
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes(100))
        cache.adopt(f"sha256:{i:064x}", str(p))

    # No checker, or one that says no: kept past the bound, the others go instead.
    newer(1)
    cache.checker = no
    newer(2)
    assert asked == [sha(layer)]
    assert cache.has(sha(layer))
    assert cache.unchecked(sha(layer))
    assert not cache.has(f"sha256:{1:064x}")
    # Once this host makes the same bytes from the tar, it is an ordinary copy.
    cache.checker = partial(reencodes, store)
    newer(3)
    assert not cache.has(sha(layer))
    assert not cache.unchecked(sha(layer))
    assert not [p for p in Path(cache.dir).iterdir() if p.name.endswith(UNCHECKED)]


def test_a_re_encoded_copy_is_checked_and_a_lone_mark_goes_on_start(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    rec = read_record(store, sha(layer))
    assert rec is not None
    cache = LayerCache(str(tmp_path / "c"))
    copy = tmp_path / "landed"
    copy.write_bytes(layer)
    cache.adopt(rec.digest, str(copy), checked=False)
    assert cache.fill(store, rec)
    assert not cache.unchecked(rec.digest)
    assert reencodes(store, rec.digest)
    assert not reencodes(store, sha(b"no such layer"))
    # A crash between the mark and the rename leaves a mark alone: gone on start.
    Path(cache.path(sha(b"x")) + UNCHECKED).touch()
    LayerCache(cache.dir)
    assert sorted(p.name for p in Path(cache.dir).iterdir()) == [rec.digest.replace(":", "-")]


async def test_the_store_source_serves_every_kind_of_blob_and_range(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    plain = put_bytes(store, b"config bytes", Chunker())

    async def run(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    for cache in (None, LayerCache(str(tmp_path / "cache"))):
        source = StoreSource(store, run, cache)
        for digest, data in ((sha(layer), layer), (plain, b"config bytes")):
            assert await source.blob_size("any/repo", digest) == len(data)
            for start, end in ((0, len(data)), (5, 9), (len(data) - 3, len(data))):
                async with source.open_blob("any/repo", digest, start, end) as pieces:
                    got = b"".join([bytes(p) async for p in pieces])
                assert got == data[start:end], (digest, start, end)
        if cache is not None:
            assert cache.has(sha(layer))  # the whole-layer read filled it
    assert await StoreSource(store, run).blob_size("r", sha(b"nothing")) is None


def image(store: MemoryStore, layers: list[bytes], tars: list[bytes], mt: str) -> tuple[str, str]:
    chunker = Chunker()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
        }
    ).encode()
    cfg = put_bytes(store, config, chunker)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media.OCI_MANIFEST,
            "config": {"mediaType": media.OCI_CONFIG, "digest": cfg, "size": len(config)},
            "layers": [{"mediaType": mt, "digest": sha(x), "size": len(x)} for x in layers],
        }
    ).encode()
    return put_bytes(store, manifest, chunker, "app:v1"), cfg


def test_convert_makes_raw_layers_re_encodable_and_keeps_the_config(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    raw_layer = gzip.compress(tar_bytes[:60_000], mtime=0) + gzip.compress(
        tar_bytes[60_000:], mtime=0
    )
    ingest(store, tmp_path, raw_layer, media.OCI_LAYER_GZIP)
    top, cfg = image(store, [raw_layer], [tar_bytes], media.OCI_LAYER_GZIP)
    before = inspect_image(store, "app:v1")
    assert before["manifests"][0]["layers"][0]["stored"] == "raw"

    result = convert_image(store, None, "app:v1", "app:v1-casd")
    assert result["layers_converted"] == 1
    assert result["digest"] != top
    after = inspect_image(store, "app:v1-casd")
    m = after["manifests"][0]
    assert m["config"] == cfg  # the image id, and so every diff_id, is unchanged
    assert m["layers"][0]["stored"] == "reencodable"
    new_layer = m["layers"][0]["digest"]
    rec = read_record(store, new_layer)
    assert rec is not None
    assert rec.uncompressed == sha(tar_bytes)
    assert gzip.decompress(b"".join(encode_layer(store, rec))) == tar_bytes
    # The same layer converted again (another image sharing it) is not re-encoded: the
    # original's record remembers what it became.
    memo = read_record(store, sha(raw_layer))
    assert memo is not None
    assert memo.converted == {"gzip-members-isal-2": new_layer}
    assert rec.encoding is not None
    assert rec.encoding["lib"] == members.LIB_ISAL
    assert convert_image(store, None, "app:v1", "app:v1-again")["digest"] == result["digest"]
    # Converting again changes nothing.
    assert convert_image(store, None, "app:v1-casd", "app:again")["layers_converted"] == 0
    # libdeflate, asked for, makes other bytes of the same tar; both are remembered (the
    # key of libdeflate level 1 is the one records written before ISA-L came have).
    other = convert_image(store, None, "app:v1", "app:v1-deflate", lib="libdeflate")
    layer2 = inspect_image(store, "app:v1-deflate")["manifests"][0]["layers"][0]["digest"]
    assert other["digest"] != result["digest"]
    assert layer2 != new_layer
    rec2 = read_record(store, layer2)
    assert rec2 is not None
    assert rec2.encoding is not None
    assert rec2.encoding["lib"] == members.LIB_DEFLATE
    assert gzip.decompress(b"".join(encode_layer(store, rec2))) == tar_bytes
    memo = read_record(store, sha(raw_layer))
    assert memo is not None
    assert memo.converted == {"gzip-members-isal-2": new_layer, "gzip-members-1": layer2}
    for lib, level in (("isal", 3), ("isal", 4), ("libdeflate", 0), ("zlib", 1)):
        with pytest.raises(UserError, match=r"--level must be|--lib must be"):
            convert_image(store, None, "app:v1", "app:bad", level=level, lib=lib)


def assert_nothing_converted(store: MemoryStore, raw_layer: bytes, name: str) -> None:
    """A convert that failed left no image named, and the original's record remembers
    no conversion."""
    assert dict(store.list_names()).get(name) is None
    memo = read_record(store, sha(raw_layer))
    assert memo is not None
    assert not memo.converted


@pytest.mark.parametrize("fault", ["other data", "not deflate"])
def test_convert_records_nothing_when_its_members_do_not_give_back_the_tar(
    tmp_path: Path, tar_bytes: bytes, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A new layer digest is made from the deflater's output: convert inflates what it
    made and compares it with the tar before anything names it."""
    store = MemoryStore()
    raw_layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, raw_layer, media.OCI_LAYER_GZIP)
    image(store, [raw_layer], [tar_bytes], media.OCI_LAYER_GZIP)
    cache = LayerCache(str(tmp_path / "cache"))
    real = members._BODIES["isa-l"]

    def faulty(segment: bytes | bytearray | memoryview, level: int) -> bytes:
        seg = bytes(segment)
        if fault == "not deflate":
            return b"\xff" * 16
        # Well-formed deflate of data one byte off: its size is right, its CRC is not.
        return (
            bytes(real(seg[:-1] + bytes([seg[-1] ^ 1]), level)) if seg else bytes(real(seg, level))
        )

    monkeypatch.setitem(members._BODIES, "isa-l", faulty)
    with pytest.raises(LayerError, match="do not give back the layer's tar"):
        convert_image(store, cache, "app:v1", "app:v1-casd")
    assert_nothing_converted(store, raw_layer, "app:v1-casd")
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary file left either
    monkeypatch.setitem(members._BODIES, "isa-l", real)
    assert convert_image(store, cache, "app:v1", "app:v1-casd")["layers_converted"] == 1


def _raw_deflate(segment: bytes, level: int) -> bytes:
    # Valid deflate of the same bytes, as another deflater (or ISA-L, once) makes it.
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(segment) + c.flush()


@pytest.mark.parametrize("otherwise", ["once", "every time"])
def test_convert_names_no_member_the_deflater_does_not_make_again(
    tmp_path: Path, tar_bytes: bytes, monkeypatch: pytest.MonkeyPatch, otherwise: str
) -> None:
    """ISA-L at level 2 once made, inside a daemon, other (valid) bytes for 2 of a 200 MB
    tar's 201 segments than it makes of them every other time. A layer named by such
    bytes would never be made again by a receiver: convert deflates every member twice,
    and encodes again where the two differ."""
    store = MemoryStore()
    raw_layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, raw_layer, media.OCI_LAYER_GZIP)
    image(store, [raw_layer], [tar_bytes], media.OCI_LAYER_GZIP)
    real = members._BODIES["isa-l"]
    calls: dict[bytes, int] = {}

    def flaky(segment: bytes | bytearray | memoryview, level: int) -> bytes:
        seg = bytes(segment)
        n = calls[seg] = calls.get(seg, 0) + 1
        odd = n == 1 if otherwise == "once" else n % 2 == 1
        return _raw_deflate(seg, 9) if odd and seg else bytes(real(seg, level))

    monkeypatch.setitem(members._BODIES, "isa-l", flaky)
    if otherwise == "every time":
        with pytest.raises(LayerError, match="other gzip members of the same tar each of 3"):
            convert_image(store, None, "app:v1", "app:v1-casd")
        assert_nothing_converted(store, raw_layer, "app:v1-casd")
        return
    convert_image(store, None, "app:v1", "app:v1-casd")
    layer = inspect_image(store, "app:v1-casd")["manifests"][0]["layers"][0]["digest"]
    monkeypatch.setitem(members._BODIES, "isa-l", real)
    # What it named is what any host makes of the tar.
    rec = read_record(store, layer)
    assert rec is not None
    assert sha(b"".join(encode_layer(store, rec))) == layer


@pytest.mark.parametrize(
    ("lib", "level", "segment"),
    [
        (members.LIB_ISAL, 2, members.SEGMENT),
        (members.LIB_ISAL, 0, 8192),
        (members.LIB_DEFLATE, 1, members.SEGMENT),
        (members.LIB_DEFLATE, 3, 8192),
    ],
)
def test_a_converted_layer_imported_from_a_registry_stays_re_encodable(
    tmp_path: Path, tar_bytes: bytes, lib: str, level: int, segment: int
) -> None:
    """casd's own gzip members (`oci convert` on another host, pushed to a registry) are
    recognised: deflater, level and segment size found from the first member, the rest
    verified."""
    store = MemoryStore()
    params = members.MembersParams(level, segment=segment, lib=lib)
    enc = members.MembersEncoder(params)
    layer = enc.update(tar_bytes) + enc.finish()
    out = ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP, sha(tar_bytes))
    assert out.stored == "reencodable"
    rec = read_record(store, sha(layer))
    assert rec is not None
    assert rec.encoding == {"codec": members.CODEC, **params.to_dict()}
    assert b"".join(encode_layer(store, rec)) == layer


def test_a_member_series_that_does_not_reproduce_past_its_first_member_is_kept_raw(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    seg = 8192
    pieces = [tar_bytes[i : i + seg] for i in range(0, len(tar_bytes), seg)]
    assert len(pieces) > 2
    # The second member made by zlib: same header, different deflate body.
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    odd = body.compress(pieces[1]) + body.flush()
    second = members.HEADER + odd + struct.pack("<II", zlib.crc32(pieces[1]), len(pieces[1]))
    assert second != members.member(pieces[1], 1)
    layer = b"".join(second if i == 1 else members.member(p, 1) for i, p in enumerate(pieces))
    out = ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP, sha(tar_bytes))
    assert out.stored == "raw"
    assert "differ" in out.note
    rec = read_record(store, sha(layer))
    assert rec is not None
    assert read_blob(store, sha(layer)) == layer


def test_materialize_stores_the_compressed_bytes_as_a_blob(
    tmp_path: Path, tar_bytes: bytes
) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    assert not store.has_blob(sha(layer))
    assert materialize(store, sha(layer)) == {"digest": sha(layer), "created": True}
    assert read_blob(store, sha(layer)) == layer
    assert materialize(store, sha(layer))["created"] is False


def test_inspect_counts_bytes_no_other_blob_holds(tmp_path: Path, tar_bytes: bytes) -> None:
    store = MemoryStore()
    layer = gzip.compress(tar_bytes, mtime=0)
    ingest(store, tmp_path, layer, media.OCI_LAYER_GZIP)
    image(store, [layer], [tar_bytes], media.OCI_LAYER_GZIP)
    alone = inspect_image(store, "app:v1")["manifests"][0]["layers"][0]["unique_bytes"]
    # Every distinct chunk of the tar (a chunk repeated inside the tar counts once).
    assert len(tar_bytes) * 0.99 < alone <= len(tar_bytes)
    # Another blob holding the first half of the tar takes those chunks out of "unique".
    put_bytes(store, tar_bytes[: len(tar_bytes) // 2], Chunker())
    shared = inspect_image(store, "app:v1")["manifests"][0]["layers"][0]["unique_bytes"]
    assert 0 < shared < alone


def test_an_iter_reader_hands_out_exactly_the_pieces_whatever_the_read_sizes() -> None:
    from casd.oci.layers import IterReader

    pieces = [b"", b"abc", b"", b"defghij", b"k" * 100_000, b"xyz"]
    reader = IterReader(iter(pieces))
    got = bytearray()
    for size in (1, 2, 5, 7, 64 * 1024, 3, 1 << 20, 10):
        buf = bytearray(size)
        n = reader.readinto(buf)
        got += buf[:n]
    assert bytes(got) == b"".join(pieces)
    assert reader.readinto(bytearray(10)) == 0


def test_a_layer_is_made_again_here_only_by_a_deflater_and_level_that_make_the_same_bytes() -> None:
    def record(lib: str, level: int) -> LayerRecord:
        encoding = {"codec": members.CODEC, "level": level, "segment": members.SEGMENT, "lib": lib}
        return LayerRecord(
            "sha256:" + "1" * 64,
            10,
            media.OCI_LAYER_GZIP,
            "sha256:" + "2" * 64,
            20,
            encoding=encoding,
        )

    assert can_reencode_here(record(members.LIB_ISAL, 2))
    assert can_reencode_here(record(members.LIB_DEFLATE, 1))
    assert not can_reencode_here(record(members.LIB_ISAL, 3))  # another CPU, other bytes
    assert not can_reencode_here(record("zopfli (1.0)", 1))


@pytest.mark.parametrize("ending", ["checked", "not the layer"])
async def test_a_layer_a_sync_is_writing_is_served_as_it_grows_its_last_byte_once_checked(
    tmp_path: Path, ending: str
) -> None:
    """The OCI API follows a layer's bytes into the cache as a sync writes them (a
    pull-through client gets them as they cross); the last byte waits for the check, so
    a client never gets a whole wrong layer."""
    import trio

    store = MemoryStore()
    layer = bytes(range(256)) * 4000
    encoding = {"codec": members.CODEC, "level": 2, "segment": members.SEGMENT, "lib": members.LIB}
    rec = LayerRecord(
        sha(layer), len(layer), media.OCI_LAYER_GZIP, sha(b"tar"), 3, encoding=encoding
    )
    put_bytes(store, rec.to_json(), Chunker(), media.layer_record_name(rec.digest))
    cache = LayerCache(str(tmp_path / "cache"))

    async def run(fn, *args):  # type: ignore[no-untyped-def]
        return fn(*args)

    source = StoreSource(store, run, cache)
    assert await source.blob_size("r", rec.digest) is None  # nothing of it anywhere yet
    tmp = tmp_path / "cache" / "tmp-growing"
    f = tmp.open("wb")
    g = cache.grow(rec.digest, str(tmp), len(layer))
    assert await source.blob_size("r", rec.digest) == len(layer)
    got: list[bytes] = []
    failed: list[Exception] = []

    async def reader() -> None:
        try:
            async with source.open_blob("r", rec.digest, 0, len(layer)) as pieces:
                async for p in pieces:
                    got.append(bytes(p))
        except LayerError as exc:
            failed.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        for at in range(0, len(layer), 100_000):
            f.write(layer[at : at + 100_000])
            f.flush()
            g.size += len(layer[at : at + 100_000])
            await trio.sleep(0.02)
            assert sum(map(len, got)) == min(g.size, len(layer) - 1)  # it follows
        f.close()
        await trio.sleep(0.05)
        assert b"".join(got) == layer[:-1]  # all but the last byte, until the check
        if ending == "checked":
            cache.adopt(rec.digest, str(tmp))
            # Renamed into the cache, not yet ended: a new reader finds it there.
            async with source.open_blob("r", rec.digest, 0, len(layer)) as pieces:
                assert b"".join([bytes(p) async for p in pieces]) == layer
            cache.grown(rec.digest, g, True)
        else:
            cache.grown(rec.digest, g, False)
    if ending == "checked":
        assert b"".join(got) == layer
        assert not failed
    else:
        assert len(failed) == 1
        assert b"".join(got) == layer[:-1]
    assert cache.growing(rec.digest) is None
