"""casd-gogzip: Go's pgzip made again, byte for byte, from a layer's tar.

Layers here are written by the real umoci (Debian's, built with the same pgzip and
compress versions as the helper); the helper is built by tests/conftest.py."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casd.oci import gogzip, media
from casd.oci.gzipre import LayerFormatError
from casd.oci.layers import make_encoder, read_record
from casd.storage.memory import MemoryStore
from tests.oci.images import build_layout_umoci
from tests.oci.test_layers import ingest, sha

STDLIB = Path(os.__file__).parent
#: pgzip's default header: no name, mtime 0, OS "unknown".
GO_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 255])


@pytest.fixture(scope="module")
def umoci_layer(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A layer as umoci writes it: about 3 MB of real Python sources."""
    tmp = tmp_path_factory.mktemp("umoci")
    shutil.copytree(STDLIB / "email", tmp / "root/usr/lib/email")
    shutil.copytree(STDLIB / "json", tmp / "root/usr/lib/json")
    image = build_layout_umoci(tmp / "layout", "v1", [tmp / "root"])
    (digest,) = image.layer_digests
    return (tmp / "layout/blobs/sha256" / digest[7:]).read_bytes()


def test_the_importer_finds_umocis_settings_and_the_whole_layer_comes_out_the_same(
    tmp_path: Path, umoci_layer: bytes, gogzip_helper: str
) -> None:
    tar = gzip.decompress(umoci_layer)
    params = gogzip.find_params(umoci_layer[: 4 << 20], tar[: 16 << 20])
    assert params is not None
    assert (params.level, params.block) == (-1, 256 * 1024)  # pgzip's default, umoci's blocks
    assert params.header == umoci_layer[:10]
    assert gogzip.encode(params, tar) == umoci_layer

    store = MemoryStore()
    out = ingest(store, tmp_path, umoci_layer, media.OCI_LAYER_GZIP, sha(tar))
    assert out.stored == "reencodable", out.note
    rec = read_record(store, sha(umoci_layer))
    assert rec is not None
    assert rec.raw is None
    assert (rec.encoding or {}).get("codec") == gogzip.CODEC
    assert not store.has_blob(sha(umoci_layer))  # only the tar is kept


@settings(max_examples=25)  # a helper process each
@given(cuts=st.lists(st.integers(min_value=0, max_value=400_000), max_size=6))
def test_the_output_does_not_depend_on_how_the_tar_is_handed_over(
    cuts: list[int], gogzip_helper: str
) -> None:
    data = (b"casd " * 20_000 + bytes(range(256)) * 400)[:400_000]
    params = gogzip.PgzipParams(-1, 64 * 1024, GO_HEADER)
    enc = make_encoder({"codec": gogzip.CODEC, **params.to_dict()})
    out, at = [], 0
    for cut in sorted(cuts):
        out.append(enc.update(data[at:cut] if cut > at else b""))
        at = max(at, cut)
    out.append(enc.update(data[at:]))
    out.append(enc.finish())
    stream = b"".join(out)
    assert stream == gogzip.encode(params, data)
    assert gzip.decompress(stream) == data


def test_a_zlib_layer_is_not_taken_for_go(tar_bytes: bytes, gogzip_helper: str) -> None:
    layer = gzip.compress(tar_bytes, mtime=0)
    assert gogzip.find_params(layer[: 4 << 20], tar_bytes) is None


def test_without_the_helper_a_go_layer_is_kept_raw_and_says_why(
    tmp_path: Path, umoci_layer: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASD_GOGZIP", "")
    assert gogzip.helper() is None
    store = MemoryStore()
    tar = gzip.decompress(umoci_layer)
    out = ingest(store, tmp_path, umoci_layer, media.OCI_LAYER_GZIP, sha(tar))
    assert out.stored == "raw"
    assert gogzip.HELPER in out.note
    with pytest.raises(gogzip.HelperMissing, match=r"python -m casd\.oci\.gogzip build"):
        gogzip.PgzipEncoder(gogzip.PgzipParams(-1, 256 * 1024, umoci_layer[:10]))


def test_an_encoder_given_up_on_stops_its_helper(gogzip_helper: str) -> None:
    enc = gogzip.PgzipEncoder(gogzip.PgzipParams(-1, 256 * 1024, GO_HEADER))
    enc.update(b"x" * 1_000_000)
    proc = enc._proc
    enc.close()
    assert proc.poll() is not None
    # Dropped without a word (an import whose check failed half way): the same.
    enc = gogzip.PgzipEncoder(gogzip.PgzipParams(-1, 256 * 1024, GO_HEADER))
    enc.update(b"x" * 1_000_000)
    proc = enc._proc
    del enc
    assert proc.wait(timeout=10) is not None


def test_a_helper_that_fails_is_an_error_not_a_layer(tmp_path: Path) -> None:
    broken = tmp_path / "casd-gogzip"
    broken.write_text("#!/bin/sh\necho 'no such library' >&2\nexit 3\n")
    broken.chmod(0o755)
    enc = gogzip.PgzipEncoder(gogzip.PgzipParams(-1, 256 * 1024, GO_HEADER), str(broken))

    def feed() -> None:
        enc.update(b"x" * 4_000_000)
        enc.finish()

    with pytest.raises(LayerFormatError, match="no such library"):
        feed()


@pytest.mark.parametrize(
    "bad",
    [
        {"level": 11, "block": 262144, "header": "1f8b08000000000000ff"},
        {"level": -1, "block": 1024, "header": "1f8b08000000000000ff"},
        {"level": -1, "block": 262144, "header": "1f8b"},
        {"level": -1, "block": 262144},
    ],
)
def test_parameters_out_of_range_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(LayerFormatError):
        gogzip.PgzipParams.from_dict(bad)


def test_a_go_layer_comes_whole_only_where_its_bytes_cross_sooner_than_it_is_made() -> None:
    from casd.blobdelta import Link
    from casd.oci.layers import LayerRecord
    from casd.oci.sync import whole_is_faster

    params = gogzip.PgzipParams(-1, 256 * 1024, GO_HEADER)
    # 40 MB of gzip for 120 MB of tar: the helper takes about 1.3 s.
    go = LayerRecord(
        "sha256:" + "a" * 64,
        40_000_000,
        media.OCI_LAYER_GZIP,
        "sha256:" + "b" * 64,
        120_000_000,
        encoding={"codec": gogzip.CODEC, **params.to_dict()},
    )
    gbit, fast_ethernet = Link(117e6, 0.3), Link(11.7e6, 0.3)
    assert whole_is_faster(go, gbit)  # 0.34 s on the wire
    assert not whole_is_faster(go, fast_ethernet)  # 3.4 s on the wire
    assert not whole_is_faster(go, None)  # nothing measured: the fewest bytes
    members = dataclasses.replace(
        go, encoding={"codec": "gzip-members", "level": 1, "segment": 1 << 20, "lib": "x"}
    )
    assert not whole_is_faster(members, gbit)  # converted: always its tar's chunks


def test_the_layer_choice_takes_the_faster_of_the_two_link_figures() -> None:
    from casd.blobdelta import Link
    from casd.server.service import _fastest

    assert _fastest(None, 0.0) is None
    assert _fastest(None, 50e6) == Link(50e6, 1.0)
    # A receiver busy landing layers slows its own figure, not the sender's kernel's.
    assert _fastest(Link(20e6, 0.4), 110e6) == Link(110e6, 0.4)
    assert _fastest(Link(20e6, 0.4), 0.0) == Link(20e6, 0.4)
