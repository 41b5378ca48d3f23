"""DiskStore: the conformance suite, plus what only a durable store must do."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from casd.chunking import Chunker, ChunkerParams
from casd.errors import ChunkCorrupt, ChunkerParamsMismatch, NoSpace, StoreFormatError
from casd.storage import packfile
from casd.storage.disk import DiskStore
from casd.storage.testing import StoreConformance, make_chunk, read_blob, store_blob


class TestDiskStore(StoreConformance):
    def make_store(self) -> Iterator[DiskStore]:
        with tempfile.TemporaryDirectory() as d:
            store = DiskStore(os.path.join(d, "store"))
            try:
                yield store
            finally:
                store.close()


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    data = os.urandom(300_000) + b"z" * 300_000
    with DiskStore(tmp_path / "s") as store:
        recipe = store_blob(store, data, name="keep")
        stats = store.stats()
    with DiskStore(tmp_path / "s") as store:
        assert store.resolve("keep") == recipe.digest
        assert read_blob(store, recipe.digest) == data
        assert store.stats().chunks == stats.chunks
        assert store.stats().raw_bytes == stats.raw_bytes


def test_a_flipped_byte_in_a_pack_fails_the_read(tmp_path: Path) -> None:
    data = os.urandom(40_000)
    with DiskStore(tmp_path / "s") as store:
        c = make_chunk(data)
        store.put_chunks([c])
    (pack,) = (tmp_path / "s" / "packs").iterdir()
    raw = bytearray(pack.read_bytes())
    raw[-1000] ^= 0x40
    pack.write_bytes(bytes(raw))
    with DiskStore(tmp_path / "s") as store:
        with pytest.raises(ChunkCorrupt, match="checksum mismatch"):
            store.get_chunk(c.id)
        with pytest.raises(ChunkCorrupt):
            store.get_stored(c.id)


def test_a_flipped_byte_fails_a_read_of_many_and_names_the_chunk(tmp_path: Path) -> None:
    chunks = [make_chunk(os.urandom(40_000)) for _ in range(5)]
    with DiskStore(tmp_path / "s") as store:
        store.put_chunks(chunks)
        ids = [c.id for c in chunks]
        assert store.get_chunks(ids) == [c.data for c in chunks]  # one read for all five
    (pack,) = (tmp_path / "s" / "packs").iterdir()
    raw = bytearray(pack.read_bytes())
    raw[-1000] ^= 0x40  # inside the last record
    pack.write_bytes(bytes(raw))
    with DiskStore(tmp_path / "s") as store:
        assert store.get_chunks(ids[:4]) == [c.data for c in chunks[:4]]
        with pytest.raises(ChunkCorrupt, match="checksum mismatch") as info:
            store.get_chunks(ids)
        assert info.value.chunk_id == ids[4]


def test_a_truncated_pack_fails_the_read(tmp_path: Path) -> None:
    with DiskStore(tmp_path / "s") as store:
        c = make_chunk(os.urandom(40_000))
        store.put_chunks([c])
    (pack,) = (tmp_path / "s" / "packs").iterdir()
    os.truncate(pack, pack.stat().st_size - 10)
    with DiskStore(tmp_path / "s") as store, pytest.raises(ChunkCorrupt, match="truncated"):
        store.get_chunk(c.id)


def test_chunker_parameters_are_recorded_and_checked(tmp_path: Path) -> None:
    other = ChunkerParams(min=8192, avg=32768, max=131072)
    DiskStore(tmp_path / "s", params=other).close()
    with pytest.raises(ChunkerParamsMismatch, match="cuts chunks with"):
        DiskStore(tmp_path / "s")
    with DiskStore(tmp_path / "s", params=None) as store:
        assert store.params == other


def test_a_non_empty_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "important.txt").write_text("do not touch")
    with pytest.raises(StoreFormatError, match="not empty"):
        DiskStore(tmp_path)
    assert (tmp_path / "important.txt").read_text() == "do not touch"


def test_open_without_create_requires_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match="not a casd store"):
        DiskStore(tmp_path / "missing", create=False)


def test_unindexed_bytes_from_a_crash_are_ignored(tmp_path: Path) -> None:
    # A crash between the pack append and the index commit leaves a tail nobody indexes.
    with DiskStore(tmp_path / "s") as store:
        store_blob(store, os.urandom(100_000), name="kept")
    (pack,) = (tmp_path / "s" / "packs").iterdir()
    with open(pack, "ab") as f:
        f.write(b"half a record from a dead process")
    with DiskStore(tmp_path / "s") as store:
        assert read_blob(store, store.resolve("kept"))
        more = store_blob(store, os.urandom(100_000), name="more")
        assert len(list((tmp_path / "s" / "packs").iterdir())) == 2  # never appends after a restart
        assert read_blob(store, more.digest)


def test_packs_roll_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("casd.storage.disk.PACK_TARGET", 100_000)
    with DiskStore(tmp_path / "s", level=0) as store:
        chunks = [make_chunk(os.urandom(60_000)) for _ in range(5)]
        for c in chunks:
            store.put_chunks([c])
        # A pack takes appends until it passes the target: two 60 kB chunks per pack.
        assert len(list((tmp_path / "s" / "packs").iterdir())) == 3
        assert all(store.get_chunk(c.id) == c.data for c in chunks)


def test_disk_full_fails_cleanly_and_the_store_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DiskStore(tmp_path / "s") as store:
        before = make_chunk(os.urandom(10_000))
        store.put_chunks([before])
        real_writev = os.writev

        def full(fd: int, bufs: list[bytes]) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(packfile.os, "writev", full)
        lost = make_chunk(os.urandom(10_000))
        with pytest.raises(NoSpace, match="disk full"):
            store.put_chunks([lost])
        assert store.has_chunks([lost.id]) == [False]
        monkeypatch.setattr(packfile.os, "writev", real_writev)
        store.put_chunks([lost])  # space is back: a new pack takes the write
        assert store.get_chunk(lost.id) == lost.data
        assert store.get_chunk(before.id) == before.data


def test_check_finds_a_flipped_byte_and_rewrite_repairs_it(tmp_path: Path) -> None:
    data = os.urandom(500_000)
    with DiskStore(tmp_path / "s") as store:
        recipe = store_blob(store, data, name="x")
    (pack,) = (tmp_path / "s" / "packs").iterdir()
    raw = bytearray(pack.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    pack.write_bytes(bytes(raw))
    with DiskStore(tmp_path / "s") as store:
        result = store.check()
        assert not result.clean
        assert len(result.damaged) == 1
        assert result.blobs_damaged == [recipe.digest]
        (bad,) = result.damaged
        good = [make_chunk(bytes(v)) for v in Chunker().cut(data)]
        store.rewrite_chunks([c for c in good if c.id == bad])
        assert store.check(deep=True).clean
        assert read_blob(store, recipe.digest) == data


def test_check_finds_recipes_whose_chunks_are_gone(tmp_path: Path) -> None:
    with DiskStore(tmp_path / "s") as store:
        recipe = store_blob(store, os.urandom(200_000), name="x")
        with store._env.begin(write=True) as txn:  # an index that lost an entry
            txn.delete(recipe.ids[0], db=store._chunks)
        result = store.check()
        assert result.blobs_incomplete == [recipe.digest]
        assert recipe.ids[0] in result.missing
