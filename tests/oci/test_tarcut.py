"""Tar-member-aware chunking: lossless, stream == buffer, headers start chunks, reuse."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casd.chunking import Chunker, ChunkerParams, chunk_id
from casd.oci.tarcut import TarCutter

CHUNKER = Chunker()
CUTTER = TarCutter(CHUNKER)


class ShortReader(io.RawIOBase):
    """Returns at most the next of ``sizes`` bytes per read (cycling)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = data
        self._pos = 0
        self._sizes = sizes or [len(data) + 1]
        self._i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._sizes[self._i % len(self._sizes)], len(self._data) - self._pos)
        self._i += 1
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def noise(seed: int, n: int) -> bytes:
    """Deterministic content: half random, half repetitive (so FastCDC cuts inside)."""
    raw = blake3.blake3(seed.to_bytes(8, "little")).digest(length=n // 2 + 1)
    return (raw + b"casd tar text " * (n // 28 + 1))[:n]


member = st.one_of(
    st.tuples(st.just("file"), st.integers(0, 300_000)),
    st.tuples(st.just("small"), st.integers(0, 2000)),
    st.tuples(st.just("dir"), st.just(0)),
    st.tuples(st.just("symlink"), st.just(0)),
)


def build_tar(members: list[tuple[str, int]], fmt: int, long_names: bool, pax: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, (kind, size) in enumerate(members):
            name = f"m{i}" + ("/" + "n" * 120 if long_names and i % 2 else "")
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000 + i
            if pax and fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "é" * (i % 3), "casd.test": str(i)}
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = "target/" + "l" * (150 if long_names else 5)
                tf.addfile(info)
            else:
                info.size = size
                tf.addfile(info, io.BytesIO(noise(i, size)))
    return buf.getvalue()


def chunks_of(data: bytes) -> list[bytes]:
    return [bytes(c) for c in CUTTER.cut(data)]


def stream_chunks(data: bytes, sizes: list[int], window: int) -> list[bytes]:
    # Keep the views and convert at the end: they must stay valid after further iteration.
    views = list(CUTTER.cut_stream(ShortReader(data, sizes), window=window))
    return [bytes(v) for v in views]


def starts(chunks: list[bytes]) -> set[int]:
    out, off = set(), 0
    for c in chunks:
        out.add(off)
        off += len(c)
    return out


def check(data: bytes, sizes: list[int], window: int) -> list[bytes]:
    chunks = chunks_of(data)
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= CHUNKER.params.max for c in chunks)
    assert stream_chunks(data, sizes, window) == chunks
    return chunks


read_sizes = st.lists(st.integers(1, 200_000), max_size=5)
windows = st.sampled_from([1024 * 1024, 8 * 1024 * 1024])


@settings(max_examples=40)
@given(
    members=st.lists(member, max_size=12),
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    long_names=st.booleans(),
    pax=st.booleans(),
    sizes=read_sizes,
    window=windows,
)
def test_tars_are_cut_losslessly_at_member_headers(
    members: list[tuple[str, int]],
    fmt: int,
    long_names: bool,
    pax: bool,
    sizes: list[int],
    window: int,
) -> None:
    data = build_tar(members, fmt, long_names, pax)
    chunks = check(data, sizes, window)
    cut_at = starts(chunks)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        infos = tf.getmembers()
    assert len(infos) == len(members)
    for info in infos:
        assert info.offset in cut_at  # the header group (extended headers included)
        if info.size:
            assert info.offset_data in cut_at  # data apart from its header


@settings(max_examples=40)
@given(data=st.binary(max_size=600_000), sizes=read_sizes, window=windows)
def test_arbitrary_bytes_are_cut_like_plain_fastcdc(
    data: bytes, sizes: list[int], window: int
) -> None:
    chunks = check(data, sizes, window)
    if data[:512] != bytes(512):  # not even a tar header: plain FastCDC throughout
        assert chunks == [bytes(c) for c in CHUNKER.cut(data)]


@settings(max_examples=40)
@given(
    members=st.lists(member, min_size=1, max_size=6),
    cut=st.floats(0, 1),
    garbage=st.binary(max_size=3000),
    sizes=read_sizes,
)
def test_truncated_and_damaged_tars_lose_nothing(
    members: list[tuple[str, int]], cut: float, garbage: bytes, sizes: list[int]
) -> None:
    data = build_tar(members, tarfile.PAX_FORMAT, True, True)
    truncated = data[: int(len(data) * cut)]
    check(truncated, sizes, 1024 * 1024)
    mid = len(data) // 2
    check(data[:mid] + garbage + data[mid:], sizes, 1024 * 1024)
    check(data + garbage, sizes, 1024 * 1024)


def _reseal(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def test_pax_size_and_base256_sizes_are_honoured() -> None:
    """A pax ``size=`` record overrides a zero ustar size; GNU base-256 sizes read right."""
    files = [noise(1, 70_000), noise(2, 5000), noise(3, 40_000)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, body in enumerate(files):
            info = tarfile.TarInfo(f"f{i}")
            info.size = len(body)
            if i == 0:
                info.pax_headers = {"size": str(len(body))}
            tf.addfile(info, io.BytesIO(body))
    data = bytearray(buf.getvalue())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        infos = tf.getmembers()
    # Member 0: zero in the ustar size field, the real size only in the pax record.
    h0 = infos[0].offset_data - 512
    data[h0 + 124 : h0 + 136] = b"00000000000\0"
    header0 = bytearray(data[h0 : h0 + 512])
    _reseal(header0)
    data[h0 : h0 + 512] = header0
    # Member 1: its size in GNU base-256.
    h1 = infos[1].offset
    header1 = bytearray(data[h1 : h1 + 512])
    header1[124:136] = b"\x80" + len(files[1]).to_bytes(11, "big")
    _reseal(header1)
    data[h1 : h1 + 512] = header1
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        assert [tf.extractfile(m).read() for m in tf.getmembers()] == files  # type: ignore[union-attr]
    chunks = check(bytes(data), [1000], 1024 * 1024)
    cut_at = starts(chunks)
    for info in infos:
        assert info.offset in cut_at
        assert info.offset_data in cut_at


def test_chunk_views_stay_valid_and_large_members_stream() -> None:
    big = noise(7, 5_000_000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"big{i}")
            info.size = len(big)
            tf.addfile(info, io.BytesIO(big))
    data = buf.getvalue()
    check(data, [65536, 1, 300_000], 1024 * 1024)
    # Inside a large member the cuts are FastCDC's own: the file's chunks repeat per copy.
    ids = [chunk_id(c) for c in chunks_of(data)]
    inner = [chunk_id(c) for c in CHUNKER.cut(big)][:-1]  # the last one ends at padding
    assert sum(1 for i in ids if i in set(inner)) >= 3 * len(inner)


def test_small_chunker_params() -> None:
    cutter = TarCutter(Chunker(ChunkerParams(min=1024, avg=4096, max=16384)))
    data = build_tar(
        [("file", 100_000), ("dir", 0), ("file", 3000)], tarfile.PAX_FORMAT, True, True
    )
    views = list(cutter.cut_stream(ShortReader(data, [777]), window=65536))
    assert b"".join(views) == data
    assert [bytes(v) for v in views] == [bytes(v) for v in cutter.cut(data)]


# --- measured on real files --------------------------------------------------------------


def _real_root() -> Path:
    for cand in sorted(Path("/usr/lib").glob("python3*")):
        if (cand / "json").is_dir():
            return cand
    pytest.fail("no /usr/lib/python3* tree to measure on: this test needs Debian's python3")


def _real_tar(root: Path, files: list[Path], version: int) -> bytes:
    """A layer of real files; version 2 has fresh mtimes on every member and a few files
    changed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, path in enumerate(files):
            info = tf.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime = 1_700_000_000 + version * 86_400 + i % 7
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                body = path.read_bytes()
                if version == 2 and i % 97 == 0:
                    body = body.replace(b"def ", b"def  ", 3)  # a few files change
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _reuse(old: list[memoryview], new: list[memoryview]) -> float:
    have = {chunk_id(c) for c in old}
    total = sum(len(c) for c in new)
    return sum(len(c) for c in new if chunk_id(c) in have) / total


def test_tar_cutting_keeps_more_chunks_across_a_rebuild() -> None:
    root = _real_root()
    files: list[Path] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("__pycache__", "test", "site-packages")
        )
        files.append(Path(dirpath))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
                continue
            files.append(path)
            size += path.stat().st_size
        if size > 20_000_000:
            break
    v1, v2 = _real_tar(root, files, 1), _real_tar(root, files, 2)
    plain = _reuse(list(CHUNKER.cut(v1)), list(CHUNKER.cut(v2)))
    tar1, tar2 = list(CUTTER.cut(v1)), list(CUTTER.cut(v2))
    tarcut = _reuse(tar1, tar2)
    n_plain = sum(1 for _ in CHUNKER.cut(v2))
    print(
        f"\n{len(files)} members, {len(v2) / 1e6:.1f} MB: reuse plain FastCDC {plain:.1%} "
        f"({n_plain} chunks), tar-aware {tarcut:.1%} ({len(tar2)} chunks)"
    )
    assert tarcut > plain + 0.1
