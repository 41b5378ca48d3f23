"""StoreConformance: the suite every store implementation must pass.

Subclass it in a test module and implement ``make_store``; pytest collects the inherited
``test_*`` methods (dulwich's ObjectStoreTests and restic's backend/test pattern).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casd.chunking import EMPTY_DIGEST, Chunker, chunk_id, format_digest
from casd.errors import BlobIncomplete, BlobMissing, ChunkCorrupt, ChunkMissing, InvalidRef
from casd.storage.interface import ChunkIn, Codec, Collectable, Recipe, Store


def make_chunk(data: bytes) -> ChunkIn:
    return ChunkIn(chunk_id(data), data)


def store_blob(
    store: Store, data: bytes, name: str | None = None, chunker: Chunker | None = None
) -> Recipe:
    """Chunk (with ``chunker``, the default one if None), store and commit ``data`` the
    way the daemon does; returns its recipe."""
    views = list((chunker or Chunker()).cut(data)) if data else []
    chunks = [make_chunk(bytes(v)) for v in views]
    store.put_chunks(chunks)
    recipe = Recipe(
        format_digest(hashlib.sha256(data).digest()),
        len(data),
        tuple(c.id for c in chunks),
        tuple(len(c.data) for c in chunks),
    )
    store.commit_blob(recipe, name)
    return recipe


def read_blob(store: Store, digest: str) -> bytes:
    recipe = store.get_recipe(digest)
    return b"".join(store.get_chunk(i) for i in recipe.ids)


class StoreConformance:
    """Contracts of casd.storage.interface.Store, as executable specifications."""

    def make_store(self) -> Iterator[Store]:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        yield from self.make_store()

    # chunks ------------------------------------------------------------------------

    def test_put_then_get_returns_the_same_bytes(self, store: Store) -> None:
        data = os.urandom(70_000)
        c = make_chunk(data)
        assert store.has_chunks([c.id]) == [False]
        result = store.put_chunks([c])
        assert result.new_chunks == 1
        assert result.new_raw_bytes == len(data)
        assert store.has_chunks([c.id]) == [True]
        assert store.get_chunk(c.id) == data

    def test_put_is_idempotent(self, store: Store) -> None:
        c = make_chunk(b"x" * 5000)
        assert store.put_chunks([c, c]).new_chunks == 1
        assert store.put_chunks([c]).new_chunks == 0
        assert store.stats().chunks == 1

    def test_compressible_chunks_are_kept_smaller(self, store: Store) -> None:
        c = make_chunk(b"casd " * 20_000)
        result = store.put_chunks([c])
        assert result.new_stored_bytes < result.new_raw_bytes // 10
        stored = store.get_stored(c.id)
        assert stored.codec == Codec.ZSTD
        assert stored.raw_size == 100_000
        assert store.get_chunk(c.id) == c.data

    def test_incompressible_chunks_are_kept_raw(self, store: Store) -> None:
        c = make_chunk(os.urandom(50_000))
        store.put_chunks([c])
        assert store.get_stored(c.id).codec == Codec.RAW

    def test_precompressed_chunk_is_accepted(self, store: Store) -> None:
        from casd import zstd

        data = b"abc" * 30_000
        c = ChunkIn(chunk_id(data), data, Codec.ZSTD, zstd.compress(data, 1))
        store.put_chunks([c])
        assert store.get_chunk(c.id) == data

    def test_chunk_whose_bytes_do_not_hash_to_its_id_is_refused(self, store: Store) -> None:
        good = make_chunk(b"good" * 100)
        bad = ChunkIn(chunk_id(b"something else"), b"good" * 100)
        with pytest.raises(ChunkCorrupt):
            store.put_chunks([good, bad])
        # The batch is all-or-nothing: the good chunk did not land either.
        assert store.has_chunks([good.id, bad.id]) == [False, False]

    def test_lying_compressed_form_is_refused(self, store: Store) -> None:
        from casd import zstd

        data = b"a" * 10_000
        c = ChunkIn(chunk_id(data), data, Codec.ZSTD, zstd.compress(b"b" * 10_000, 1))
        with pytest.raises(ChunkCorrupt):
            store.put_chunks([c])

    def test_unknown_chunk_is_missing(self, store: Store) -> None:
        with pytest.raises(ChunkMissing) as info:
            store.get_chunk(b"\x01" * 32)
        assert info.value.chunk_id == b"\x01" * 32

    # Inherited by one class per store: hypothesis sees one function run by several
    # executors, which is intended here (each makes its own fresh store per example).
    @settings(suppress_health_check=[HealthCheck.differing_executors])
    @given(st.lists(st.binary(min_size=0, max_size=3000), max_size=8))
    def test_any_batch_round_trips(self, data: list[bytes]) -> None:
        # A fresh store per example: hypothesis and function fixtures do not mix.
        for store in self.make_store():
            chunks = [make_chunk(d) for d in data]
            store.put_chunks(chunks)
            for c in chunks:
                assert store.get_chunk(c.id) == c.data
            assert store.stats().chunks == len({c.id for c in chunks})
            # Many at once, in any order and with repeats, as one by one.
            ids = [c.id for c in chunks] + [c.id for c in reversed(chunks)]
            assert store.get_chunks(ids) == [store.get_chunk(i) for i in ids]
            assert store.get_stored_many(ids) == [store.get_stored(i) for i in ids]
            # What they take as stored, counted without reading them.
            assert store.stored_bytes(ids) == sum(len(store.get_stored(i).payload) for i in ids)

    def test_get_chunks_of_an_unknown_chunk_is_missing(self, store: Store) -> None:
        c = make_chunk(b"known" * 100)
        store.put_chunks([c])
        with pytest.raises(ChunkMissing) as info:
            store.get_chunks([c.id, b"\x01" * 32, c.id])
        assert info.value.chunk_id == b"\x01" * 32
        with pytest.raises(ChunkMissing):
            store.stored_bytes([c.id, b"\x01" * 32])
        with pytest.raises(ChunkMissing) as info:
            store.get_stored_many([c.id, b"\x01" * 32])
        assert info.value.chunk_id == b"\x01" * 32

    # blobs -------------------------------------------------------------------------

    def test_blob_round_trip_and_stat(self, store: Store) -> None:
        data = os.urandom(600_000)
        recipe = store_blob(store, data, name="v1")
        assert store.has_blob(recipe.digest)
        assert store.get_recipe(recipe.digest) == recipe
        assert read_blob(store, recipe.digest) == data
        assert store.resolve("v1") == recipe.digest
        assert store.resolve(recipe.digest) == recipe.digest
        assert list(store.iter_blobs()) == [(recipe.digest, len(data))]

    def test_empty_blob(self, store: Store) -> None:
        recipe = store_blob(store, b"", name="empty")
        assert recipe.digest == EMPTY_DIGEST
        assert read_blob(store, store.resolve("empty")) == b""

    def test_blob_with_missing_chunks_cannot_be_committed(self, store: Store) -> None:
        recipe = Recipe(format_digest(b"\x00" * 32), 10, (b"\x02" * 32,), (10,))
        with pytest.raises(BlobIncomplete):
            store.commit_blob(recipe, "x")
        assert not store.has_blob(recipe.digest)
        with pytest.raises(BlobMissing):
            store.resolve("x")

    def test_commit_is_idempotent_and_moves_the_name(self, store: Store) -> None:
        a = store_blob(store, b"a" * 100_000, name="n")
        b = store_blob(store, b"b" * 100_000, name="n")
        assert store.resolve("n") == b.digest
        assert store.commit_blob(a, "n") is False
        assert store.resolve("n") == a.digest

    # names -------------------------------------------------------------------------

    def test_tag_untag_list(self, store: Store) -> None:
        r = store_blob(store, b"hello world")
        store.tag("app/v1", r.digest)
        store.tag("app/v2", r.digest)
        store.tag("other", r.digest)
        assert store.list_names("app/") == [("app/v1", r.digest), ("app/v2", r.digest)]
        assert store.names_of(r.digest) == ["app/v1", "app/v2", "other"]
        store.untag("app/v1")
        assert [n for n, _ in store.list_names()] == ["app/v2", "other"]
        with pytest.raises(BlobMissing):
            store.untag("app/v1")

    def test_tag_of_unknown_blob_fails(self, store: Store) -> None:
        with pytest.raises(BlobMissing):
            store.tag("x", format_digest(b"\x03" * 32))

    @pytest.mark.parametrize("bad", ["", "sha256:abc", "a\x00b", "x" * 256, "tab\there"])
    def test_invalid_names_are_refused(self, store: Store, bad: str) -> None:
        r = store_blob(store, b"data")
        with pytest.raises(InvalidRef):
            store.tag(bad, r.digest)

    @pytest.mark.parametrize("bad", ["sha256:XYZ", "sha256:" + "A" * 64, "md5:" + "0" * 32])
    def test_invalid_digests_are_refused(self, store: Store, bad: str) -> None:
        with pytest.raises(InvalidRef):
            store.tag("ok", bad)

    # checking ----------------------------------------------------------------------

    def test_a_healthy_store_checks_clean(self, store: Store) -> None:
        store_blob(store, os.urandom(400_000), name="a")
        store_blob(store, b"text " * 50_000, name="b")
        for deep in (False, True):
            result = store.check(deep=deep)
            assert result.clean, result
            assert result.blobs == 2
            assert result.names == 2
            assert result.chunks_checked == result.chunks == store.stats().chunks

    def test_rewrite_replaces_a_chunk_and_refuses_a_forgery(self, store: Store) -> None:
        c = make_chunk(os.urandom(30_000))
        store.put_chunks([c])
        assert store.rewrite_chunks([c]) == 1
        assert store.get_chunk(c.id) == c.data
        with pytest.raises(ChunkCorrupt):
            store.rewrite_chunks([ChunkIn(c.id, b"forged")])
        assert store.get_chunk(c.id) == c.data

    # garbage collection (Collectable) ------------------------------------------------

    def test_commit_records_a_time_and_a_second_commit_refreshes_it(self, store: Store) -> None:
        import time

        assert isinstance(store, Collectable)
        before = time.time()
        r = store_blob(store, os.urandom(100_000))
        (first,) = store.blob_times([r.digest])
        assert first is not None
        assert before - 1 <= first <= time.time() + 1
        assert dict(store.iter_blob_times()) == {r.digest: first}
        time.sleep(0.01)
        assert store.commit_blob(r) is False
        (second,) = store.blob_times([r.digest])
        assert second is not None
        assert second > first
        assert store.get_recipe(r.digest) == r
        assert store.blob_times([format_digest(b"\x05" * 32)]) == [None]

    def test_iter_chunk_ids_lists_every_chunk(self, store: Store) -> None:
        assert isinstance(store, Collectable)
        chunks = [make_chunk(os.urandom(n)) for n in (10, 5000, 70_000)]
        store.put_chunks(chunks)
        assert sorted(store.iter_chunk_ids()) == sorted(c.id for c in chunks)

    def test_delete_garbage_removes_names_blobs_and_chunks(self, store: Store) -> None:
        assert isinstance(store, Collectable)
        keep = store_blob(store, os.urandom(200_000), name="keep")
        drop = store_blob(store, os.urandom(200_000), name=".oci/layer/x")
        before = store.stats()
        result = store.delete_garbage(
            names=[(".oci/layer/x", drop.digest)], blobs=[drop.digest], chunks=list(drop.ids)
        )
        assert (result.names, result.blobs, result.chunks) == (1, 1, len(set(drop.ids)))
        assert result.raw_bytes == drop.size
        assert not store.has_blob(drop.digest)
        assert store.has_chunks(list(drop.ids)) == [False] * len(drop.ids)
        assert store.list_names() == [("keep", keep.digest)]
        assert read_blob(store, keep.digest) == read_blob(store, keep.digest)
        after = store.stats()
        assert after.chunks == before.chunks - result.chunks
        assert after.stored_bytes == before.stored_bytes - result.stored_bytes
        assert after.raw_bytes == before.raw_bytes - result.raw_bytes
        assert store.check(deep=True).clean

    def test_delete_garbage_spares_named_blobs_leased_chunks_and_moved_names(
        self, store: Store
    ) -> None:
        assert isinstance(store, Collectable)
        a = store_blob(store, os.urandom(100_000), name="a")
        b = store_blob(store, os.urandom(100_000), name="b")
        orphan = make_chunk(os.urandom(3000))
        store.put_chunks([orphan])
        with store.leases.lease([orphan.id]):
            result = store.delete_garbage(
                names=[("b", a.digest)],  # b points elsewhere: stays
                blobs=[a.digest],  # named: stays
                chunks=[orphan.id],  # leased: stays
            )
        assert (result.names, result.blobs, result.chunks) == (0, 0, 0)
        assert (result.blobs_named, result.chunks_leased) == (1, 1)
        assert store.resolve("a") == a.digest
        assert store.resolve("b") == b.digest
        assert store.has_chunks([orphan.id]) == [True]
        # Released: now it goes.
        assert store.delete_garbage(chunks=[orphan.id]).chunks == 1

    def test_delete_garbage_dry_run_changes_nothing(self, store: Store) -> None:
        assert isinstance(store, Collectable)
        r = store_blob(store, os.urandom(100_000))
        stats = store.stats()
        result = store.delete_garbage(blobs=[r.digest], chunks=list(r.ids), dry_run=True)
        assert (result.blobs, result.chunks) == (1, len(set(r.ids)))
        assert store.stats() == stats
        assert store.has_blob(r.digest)

    def test_exclusive_is_reentrant(self, store: Store) -> None:
        assert isinstance(store, Collectable)
        with store.exclusive():
            r = store_blob(store, b"inside", name="in")
            store.tag("also", r.digest)
            store.untag("also")
        assert store.resolve("in") == r.digest

    def test_rewriting_every_retired_pack_keeps_every_chunk(self, store: Store) -> None:
        assert isinstance(store, Collectable)
        blobs = {store_blob(store, os.urandom(150_000), name=f"n{i}").digest for i in range(3)}
        dead = store_blob(store, os.urandom(150_000))
        store.delete_garbage(blobs=[dead.digest], chunks=list(dead.ids))
        packs = [p.number for p in store.pack_stats() if not p.active]
        results = store.rewrite_packs(packs)
        assert len(results) == len(packs)
        for d in blobs:
            data = read_blob(store, d)
            assert format_digest(hashlib.sha256(data).digest()) == d
        assert store.check(deep=True).clean
