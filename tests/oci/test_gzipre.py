"""Reproducing gzip streams: which producers zlib re-encodes byte-exact, and robustness."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casd.oci.gzipre import (
    GzipEncoder,
    GzipParams,
    GzipProbe,
    LayerFormatError,
    candidates,
    decompress,
    find_params,
    parse_header,
)
from tests.oci.images import require_tool


def sample(n: int, seed: int = 0) -> bytes:
    """Text-like data with some noise: compresses differently at every level."""
    text = Path(tarfile.__file__).read_bytes()
    noise = blake3.blake3(seed.to_bytes(4, "little")).digest(length=n // 8 + 1)
    out = bytearray()
    i = 0
    while len(out) < n:
        out += text[(i * 7919) % len(text) :][:5000] + noise[i * 64 : i * 64 + 64]
        i += 1
    return bytes(out[:n])


def probe(stream: bytes, step: int = 100_000) -> tuple[GzipProbe, bytes]:
    p = GzipProbe()
    out = []
    for i in range(0, len(stream), step):
        out.extend(p.feed(stream[i : i + step]))
    p.finish()
    return p, b"".join(out)


def reencodes(stream: bytes, data: bytes, params: GzipParams) -> bool:
    enc = GzipEncoder(params)
    return enc.update(data) + enc.finish() == stream


def assert_classified(stream: bytes, data: bytes) -> GzipProbe:
    """The probe decodes right, and says reproducible exactly when re-encoding is exact."""
    p, out = probe(stream)
    assert out == data
    assert p.uncompressed_size == len(data)
    if p.params is not None:
        assert p.reason == ""
        assert reencodes(stream, data, p.params)
        assert GzipParams.from_dict(json.loads(json.dumps(p.params.to_dict()))) == p.params
    else:
        assert p.reason
    return p


DATA = sample(1_200_000)  # more than the probe's 1 MiB prefix


@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("mtime", [0, 1_700_000_000])
def test_python_gzip_streams_are_reproduced(level: int, mtime: int) -> None:
    stream = gzip.compress(DATA, compresslevel=level, mtime=mtime)
    p = assert_classified(stream, DATA)
    assert p.params is not None, p.reason
    assert p.params.level == level


@pytest.mark.parametrize("level", [1, 6, 9])
def test_gzipfile_with_filename_and_tarfile_gz(level: int) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(
        filename="layer.tar", mode="wb", compresslevel=level, fileobj=buf, mtime=7
    ) as f:
        for i in range(0, len(DATA), 10_000):  # many small writes
            f.write(DATA[i : i + 10_000])
    p = assert_classified(buf.getvalue(), DATA)
    assert p.params is not None, p.reason
    assert b"layer.tar\0" in p.params.header

    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz", compresslevel=level) as tf:
        info = tarfile.TarInfo("data")
        info.size = len(DATA)
        tf.addfile(info, io.BytesIO(DATA))
    p, out = probe(tbuf.getvalue())
    assert p.params is not None, p.reason
    assert reencodes(tbuf.getvalue(), out, p.params)


def test_small_and_empty_members_are_reproduced() -> None:
    for data in (b"", b"x", sample(3000), bytes(2_000_000)):
        for level in (1, 6, 9):
            p = assert_classified(gzip.compress(data, level, mtime=0), data)
            assert p.params is not None, (len(data), level, p.reason)


def test_zlib_settings_beyond_the_defaults() -> None:
    """memLevel 9, a small window, Z_FILTERED, level 0: found by the wider search."""
    data = DATA[:1_500_000]
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    settings_ = [(6, 15, 9, 0), (9, 12, 8, 0), (6, 15, 8, 1), (1, 15, 4, 0), (0, 15, 8, 0)]
    for level, wbits, mem, strategy in settings_:
        params = GzipParams(header, level, wbits, mem, strategy)
        enc = GzipEncoder(params)
        stream = enc.update(data) + enc.finish()
        p = assert_classified(stream, data)
        assert p.params is not None, (params, p.reason)
        assert reencodes(stream, data, p.params)


@settings(max_examples=30)
@given(
    level=st.integers(0, 9),
    splits=st.lists(st.integers(0, 300_000), max_size=8),
    size=st.integers(0, 600_000),
)
def test_encoder_output_is_independent_of_the_input_split(
    level: int, splits: list[int], size: int
) -> None:
    data = DATA[:size]
    params = GzipParams(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", level, 15, 8, 0)
    whole = GzipEncoder(params)
    ref = whole.update(data) + whole.finish()
    enc = GzipEncoder(params)
    out, pos = [], 0
    for n in splits:
        out.append(enc.update(memoryview(data)[pos : pos + n]))
        pos += n
    out.append(enc.update(data[pos:]))
    out.append(enc.finish())
    assert b"".join(out) == ref
    assert gzip.decompress(ref) == data


def test_gnu_gzip_streams_are_classified_consistently() -> None:
    """GNU gzip has its own deflate, so whether zlib reproduces it depends on the data:
    with gzip 1.12 / zlib 1.2.13 a highly repetitive input under ``-9`` came out equal to
    zlib level 9 memLevel 9, this sample under every option did not. So only assert that
    the answer holds up: "reproducible" exactly when re-encoding is byte-exact."""
    gz = require_tool("gzip")
    for args in (["-n"], ["-9", "-n"], ["-1", "-n"], []):
        stream = subprocess.run([gz, "-c", *args], input=DATA, capture_output=True, check=True)
        p = assert_classified(stream.stdout, DATA)
        print(f"\ngzip {' '.join(args)}: {p.params or p.reason}")


def test_pigz_streams_are_classified_consistently() -> None:
    pigz = require_tool("pigz")
    for args in (["-n"], ["-n", "-p", "1"], ["-n", "-9"]):
        stream = subprocess.run([pigz, "-c", *args], input=DATA, capture_output=True, check=True)
        p = assert_classified(stream.stdout, DATA)
        print(f"\npigz {' '.join(args)}: {p.params or p.reason}")


def test_a_go_gzip_layer_from_umoci_is_classified(tmp_path: Path) -> None:
    umoci = require_tool("umoci")
    src = tmp_path / "rootfs" / "app"
    src.mkdir(parents=True)
    (src / "data.bin").write_bytes(DATA[:400_000])
    (src / "tarfile.py").write_bytes(Path(tarfile.__file__).read_bytes())
    layout = tmp_path / "L"
    for cmd in (
        ["init", "--layout", str(layout)],
        ["new", "--image", f"{layout}:t"],
        ["insert", "--image", f"{layout}:t", str(src), "/app"],
    ):
        subprocess.run([umoci, *cmd], check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    layer = (blobs / manifest["layers"][-1]["digest"][7:]).read_bytes()
    p, out = probe(layer, step=4096)
    # umoci 0.4.7's layer tar ends right after the last file's bytes (no padding, no
    # end-of-archive blocks; GNU tar says "Unexpected EOF"), so check the bytes directly.
    assert b"app/data.bin" in out[:4096]
    assert DATA[:400_000] in out
    if p.params is not None:
        assert reencodes(layer, out, p.params)
    print(f"\numoci layer: {p.params or p.reason}")


# --- not reproducible, and broken -----------------------------------------------------------


def test_multi_member_and_trailing_data_are_not_reproducible() -> None:
    a, b = DATA[:100_000], DATA[100_000:200_000]
    two = gzip.compress(a, mtime=0) + gzip.compress(b, mtime=0)
    p, out = probe(two, step=7777)
    assert out == a + b
    assert p.params is None
    assert "2 members" in p.reason
    for tail in (bytes(1), bytes(100), b"garbage!"):
        p, out = probe(gzip.compress(a, mtime=0) + tail)
        assert out == a
        assert p.params is None
        assert "follow" in p.reason


def test_a_late_mismatch_is_found_by_the_stream_verifier() -> None:
    data = DATA
    # Same prefix, then another compressor: the probe must not trust the prefix alone.
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = comp.compress(data[:2_000_000]) + comp.flush(zlib.Z_FULL_FLUSH)
    body += comp.compress(data[2_000_000:]) + comp.flush()
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    stream = (
        header + body + zlib.crc32(data).to_bytes(4, "little") + len(data).to_bytes(4, "little")
    )
    assert gzip.decompress(stream) == data
    params = find_params(stream[:400_000], data[:1_000_000])
    assert params is not None  # the prefix looks like level 6...
    p = assert_classified(stream, data)
    assert p.params is None  # ...but the whole stream is not
    assert "differs from byte" in p.reason


@settings(max_examples=60)
@given(data=st.data())
def test_corrupt_streams_raise_layer_format_error(data: st.DataObject) -> None:
    stream = bytearray(gzip.compress(DATA[:50_000], 6, mtime=0))
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        stream = stream[: data.draw(st.integers(0, len(stream) - 1))]
    else:
        stream = bytearray(data.draw(st.binary(max_size=2000)))
    step = data.draw(st.integers(1, 20_000))
    try:
        p, out = probe(bytes(stream), step)
    except LayerFormatError:
        return
    # Flipped bits that survive decoding (e.g. in MTIME or OS) still decode to the data,
    # and a flip in the reserved flags or CRC never gets here.
    assert out == DATA[:50_000]
    if p.params is not None:
        assert reencodes(bytes(stream), out, p.params)


def test_decompress_and_header_parsing() -> None:
    stream = gzip.compress(DATA[:300_000], mtime=0)
    assert (
        b"".join(decompress(stream[i : i + 999] for i in range(0, len(stream), 999)))
        == (DATA[:300_000])
    )
    with pytest.raises(LayerFormatError):
        list(decompress([stream[:-3]]))
    with pytest.raises(LayerFormatError):
        list(decompress([b"PK\x03\x04 not gzip"]))
    with pytest.raises(LayerFormatError):
        list(decompress([]))
    assert parse_header(b"\x1f\x8b\x08") is None
    named = io.BytesIO()
    with gzip.GzipFile(filename="x.tar", mode="wb", fileobj=named, mtime=1):
        pass
    assert parse_header(named.getvalue()) == 10 + len("x.tar") + 1
    with pytest.raises(LayerFormatError):
        parse_header(b"\x1f\x8b\x07\x00")
    with pytest.raises(LayerFormatError):
        GzipParams.from_dict({"header": "00", "level": 6})
    assert candidates(2)[0][0] == 9
    assert candidates(4)[0][0] == 1


def test_encoder_throughput() -> None:
    """Reported, not asserted: MB/s of re-encoding per level."""
    data = DATA
    report = []
    for level in (1, 6, 9):
        enc = GzipEncoder(GzipParams(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", level, 15, 8, 0))
        start = time.perf_counter()
        for i in range(0, len(data), 1 << 20):
            enc.update(data[i : i + (1 << 20)])
        enc.finish()
        report.append(f"level {level}: {len(data) / (time.perf_counter() - start) / 1e6:.0f} MB/s")
    print("\nGzipEncoder " + ", ".join(report))
