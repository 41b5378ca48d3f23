"""Garbage collection (casd.gc): what it keeps, what it deletes, leases, pack rewrites."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from casd import gc
from casd.chunking import Chunker, format_digest
from casd.errors import BlobIncomplete, StoreError
from casd.ingest import BlobIngest
from casd.oci.media import OCI_CONFIG, OCI_MANIFEST, layer_record_name
from casd.storage import disk as disk_mod
from casd.storage.disk import DiskStore, encode_recipe
from casd.storage.interface import Recipe
from casd.storage.memory import MemoryStore
from casd.storage.testing import make_chunk, read_blob, store_blob


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[gc.GcStore]:
    if request.param == "memory":
        yield gc.collectable(MemoryStore())
    else:
        s = DiskStore(tmp_path / "s")
        try:
            yield gc.collectable(s)
        finally:
            s.close()


def sha(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).digest())


def run_gc(store: object, **kw: float | bool) -> gc.GcReport:
    kw.setdefault("grace_s", 0)
    return gc.collect(store, **kw)  # type: ignore[arg-type]


def verify(store: gc.GcStore, digest: str) -> None:
    assert sha(read_blob(store, digest)) == digest


# --- roots and reachability ------------------------------------------------------------


def test_unnamed_old_blobs_go_named_ones_and_shared_chunks_stay(store: gc.GcStore) -> None:
    shared = os.urandom(300_000)
    kept = store_blob(store, shared + os.urandom(300_000), name="keep")
    gone = store_blob(store, shared + os.urandom(300_000), name="tmp")
    store.untag("tmp")
    unique = set(gone.ids) - set(kept.ids)
    assert unique
    assert set(gone.ids) & set(kept.ids)

    report = run_gc(store)

    assert report.blobs_scanned == 2
    assert report.blobs_deleted == 1
    assert report.chunks_deleted == len(unique)
    assert report.bytes_freed > 0
    assert not store.has_blob(gone.digest)
    assert store.has_chunks(sorted(unique)) == [False] * len(unique)
    verify(store, kept.digest)
    assert store.stats().chunks == len(set(kept.ids))
    assert store.check(deep=True).clean
    # A second run finds nothing more.
    again = run_gc(store)
    assert (again.blobs_deleted, again.chunks_deleted) == (0, 0)


def test_the_grace_period_spares_recent_blobs_named_or_not(store: gc.GcStore) -> None:
    r = store_blob(store, os.urandom(100_000))
    report = gc.collect(store, grace_s=3600)
    assert report.blobs_deleted == 0
    assert report.blobs_recent == 1
    verify(store, r.digest)
    # An hour later it goes.
    report = gc.collect(store, grace_s=3600, now=time.time() + 3601)
    assert report.blobs_deleted == 1
    assert not store.has_blob(r.digest)


def test_dry_run_counts_and_changes_nothing(store: gc.GcStore) -> None:
    r = store_blob(store, os.urandom(200_000))
    store_blob(store, os.urandom(200_000), name="keep")
    stats = store.stats()
    report = run_gc(store, dry_run=True)
    assert report.dry_run
    assert report.blobs_deleted == 1
    assert report.chunks_deleted == len(set(r.ids))
    assert report.bytes_freed > 0
    assert store.stats() == stats
    assert store.has_blob(r.digest)


def test_orphan_chunks_go_unless_leased(store: gc.GcStore) -> None:
    a, b = make_chunk(os.urandom(5000)), make_chunk(os.urandom(5000))
    store.put_chunks([a, b])
    lease = store.leases.lease([a.id])
    report = run_gc(store)
    assert report.chunks_deleted == 1
    assert report.chunks_leased == 1
    assert store.has_chunks([a.id, b.id]) == [True, False]
    lease.release()
    assert run_gc(store).chunks_deleted == 1
    assert store.stats().chunks == 0


def oci_image(store: gc.GcStore, name: str, seed: bytes) -> dict[str, str]:
    """An image the way the OCI bridge keeps it: manifest (named), config, a gzip layer
    held as its uncompressed content plus a layer record under .oci/layer/<D>."""
    content = store_blob(store, hashlib.sha256(seed).digest() * 20_000)
    config = store_blob(store, json.dumps({"architecture": "amd64", "seed": seed.hex()}).encode())
    layer_digest = sha(b"compressed " + seed)  # never stored itself
    record = json.dumps(
        {"casd_oci_layer": 1, "digest": layer_digest, "uncompressed": content.digest}
    ).encode()
    rec = store_blob(store, record, name=layer_record_name(layer_digest))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": 1234,
                }
            ],
        }
    ).encode()
    m = store_blob(store, manifest, name=name)
    return {
        "manifest": m.digest,
        "config": config.digest,
        "record": rec.digest,
        "content": content.digest,
        "layer": layer_digest,
    }


def test_an_image_keeps_its_config_layers_and_layer_records(store: gc.GcStore) -> None:
    img = oci_image(store, "app:v1", b"one")
    other = oci_image(store, "app:v2", b"two")
    report = run_gc(store)
    assert report.blobs_deleted == 0
    assert report.names_removed == 0
    for d in (img["manifest"], img["config"], img["record"], img["content"]):
        verify(store, d)

    store.untag("app:v1")
    report = run_gc(store)
    assert report.blobs_deleted == 4  # manifest, config, record, content
    assert report.names_removed == 1  # its .oci/layer/<D>
    for d in (img["manifest"], img["config"], img["record"], img["content"]):
        assert not store.has_blob(d)
    assert [n for n, _ in store.list_names()] == [layer_record_name(other["layer"]), "app:v2"]
    for d in (other["manifest"], other["config"], other["record"], other["content"]):
        verify(store, d)
    assert store.check(deep=True).clean


def test_a_recent_layer_record_survives_before_its_manifest_arrives(store: gc.GcStore) -> None:
    content = store_blob(store, os.urandom(50_000))
    record = json.dumps({"casd_oci_layer": 1, "uncompressed": content.digest}).encode()
    store_blob(store, record, name=layer_record_name(sha(b"layer")))
    report = gc.collect(store, grace_s=3600)  # an import in progress
    assert (report.blobs_deleted, report.names_removed) == (0, 0)
    report = gc.collect(store, grace_s=3600, now=time.time() + 7200)  # abandoned
    assert (report.blobs_deleted, report.names_removed) == (2, 1)


def test_an_unreadable_reachable_manifest_stops_the_collection(tmp_path: Path) -> None:
    with DiskStore(tmp_path / "s") as store:
        doc = json.dumps({"schemaVersion": 2, "manifests": []}).encode() + b" " * 100
        r = store_blob(store, doc, name="idx")
        store.delete_garbage(chunks=list(r.ids))  # damage: the recipe's chunk is gone
        with pytest.raises(gc.GcUnreadable):
            run_gc(store)
        assert store.has_blob(r.digest)


# --- records written before commit times existed ----------------------------------------


def test_recipes_without_a_time_read_as_old(tmp_path: Path) -> None:
    with DiskStore(tmp_path / "s") as store:
        data = os.urandom(100_000)
        r = store_blob(store, data)
        # Rewrite the record the way a store without commit times held it.
        with store._env.begin(write=True) as txn:
            txn.put(bytes.fromhex(r.digest[7:]), encode_recipe(r), db=store._blobs)
        assert store.get_recipe(r.digest) == r
        assert store.blob_times([r.digest]) == [0.0]
        assert gc.collect(store, grace_s=10**9).blobs_deleted == 1  # time 0 is long ago


# --- concurrency: leases and the sweep's catch-up ------------------------------------------


def test_a_push_in_flight_keeps_chunks_it_found_present(store: gc.GcStore) -> None:
    data = os.urandom(400_000)
    views = [bytes(v) for v in Chunker().cut(data)]
    ids = tuple(make_chunk(v).id for v in views)
    store.put_chunks([make_chunk(v) for v in views])  # orphans, e.g. from an earlier try
    ingest = BlobIngest(store, "pushed")
    wanted = ingest.want(ids, tuple(len(v) for v in views))
    assert not any(wanted)  # all present: the push will send none of them
    report = run_gc(store)
    assert report.chunks_deleted == 0
    assert report.chunks_leased == len(set(ids))
    ingest.finish(len(data), sha(data))
    verify(store, sha(data))
    # Finished: the lease is gone, and the chunks are kept by the blob now.
    assert len(store.leases) == 0
    assert run_gc(store).chunks_deleted == 0


def test_without_a_lease_a_commit_after_gc_fails_cleanly(store: gc.GcStore) -> None:
    data = os.urandom(200_000)
    views = [bytes(v) for v in Chunker().cut(data)]
    chunks = [make_chunk(v) for v in views]
    store.put_chunks(chunks)
    run_gc(store)
    recipe = Recipe(sha(data), len(data), tuple(c.id for c in chunks), tuple(map(len, views)))
    with pytest.raises(BlobIncomplete):
        store.commit_blob(recipe, "x")
    assert not store.has_blob(recipe.digest)


def test_the_sweep_catches_up_with_commits_and_tags_after_the_mark(store: gc.GcStore) -> None:
    old = store_blob(store, os.urandom(200_000))  # garbage when marked...
    doomed = store_blob(store, os.urandom(200_000))
    with gc.Collector(store, grace_s=0) as c:
        c.mark()
        # ...then, before the sweep: a tag rescues it, a new push lands, a re-push of
        # another unnamed blob refreshes its time.
        store.tag("rescued", old.digest)
        new = store_blob(store, os.urandom(200_000))
        assert store.commit_blob(doomed) is False
        c.sweep()
        report = c.finish()
    assert report.blobs_deleted == 0
    for d in (old.digest, new.digest, doomed.digest):
        verify(store, d)
    assert store.check(deep=True).clean


def test_one_collection_at_a_time(store: gc.GcStore) -> None:
    with gc.Collector(store), pytest.raises(gc.GcBusy):
        gc.collect(store)
    run_gc(store)  # the guard is released


def test_concurrent_pushes_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_mod, "PACK_TARGET", 512 * 1024)
    store = DiskStore(tmp_path / "s")
    base = os.urandom(2_000_000)
    committed: list[tuple[str, bytes]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def pusher(k: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                # Shares most chunks with the base and with other pushes.
                at = (k * 7919 + i * 104_729) % 1_500_000
                data = base[at : at + 400_000] + os.urandom(50_000)
                name = f"p{k}/{i % 3}"
                ingest = BlobIngest(store, name)
                views = [bytes(v) for v in Chunker().cut(data)]
                ids = tuple(make_chunk(v).id for v in views)
                wanted = ingest.want(ids, tuple(len(v) for v in views))
                for v, cid, w in zip(views, ids, wanted, strict=True):
                    if w:
                        ingest.add_chunk(cid, 0, v)
                ingest.finish(len(data), sha(data))
                committed.append((name, data))
                if i % 4 == 3:
                    store.untag(name)
                i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pusher, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    reports = []
    try:
        deadline = time.monotonic() + 30
        while (len(reports) < 6 or len(committed) < 40) and time.monotonic() < deadline:
            reports.append(gc.collect(store, grace_s=0, min_live=0.9))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert sum(r.blobs_deleted for r in reports) > 0
    assert sum(r.packs_rewritten for r in reports) > 0
    names = dict(store.list_names())
    latest: dict[str, bytes] = {}
    for name, data in committed:
        latest[name] = data
    for name, digest in names.items():
        assert digest == sha(latest[name])
        assert read_blob(store, digest) == latest[name]
    assert store.check(deep=True).clean
    store.close()


# --- pack rewrites (DiskStore) ---------------------------------------------------------------


def small_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DiskStore:
    monkeypatch.setattr(disk_mod, "PACK_TARGET", 256 * 1024)
    return DiskStore(tmp_path / "s")


def test_mostly_dead_packs_are_rewritten_and_every_live_chunk_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_packs(tmp_path, monkeypatch)
    keep = {}
    for i in range(12):
        data = os.urandom(300_000)
        r = store_blob(store, data, name=f"n{i}")
        if i % 4 == 0:
            keep[r.digest] = data
        else:
            store.untag(f"n{i}")
    before = store.pack_stats()
    report = run_gc(store, min_live=0.5)
    assert report.blobs_deleted == 9
    assert report.packs_rewritten > 0
    assert report.pack_bytes_after < report.pack_bytes_before / 2
    assert report.pack_bytes_before == sum(p.file_bytes for p in before)
    for digest, data in keep.items():
        assert read_blob(store, digest) == data
    assert store.check(deep=True).clean
    after = store.pack_stats()
    assert all(p.live_records > 0 for p in after if not p.active)
    store.close()
    with DiskStore(tmp_path / "s") as again:
        for digest, data in keep.items():
            assert read_blob(again, digest) == data
        assert again.check(deep=True).clean


def test_a_crash_before_the_index_switch_leaves_the_old_pack_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_packs(tmp_path, monkeypatch)
    data = os.urandom(600_000)
    r = store_blob(store, data, name="keep")
    store_blob(store, os.urandom(600_000))
    store._abandon_writer()
    run_gc(store, min_live=0.0)  # delete the garbage, rewrite nothing

    victim = [p.number for p in store.pack_stats() if not p.active and p.live_records]
    store._current_writer()  # the copies' pack exists: the next write txn is the switch
    real_env = store._env

    class CrashingEnv:
        def __getattr__(self, name: str) -> object:
            return getattr(real_env, name)

        def begin(self, *a: object, write: bool = False, **kw: object) -> object:
            if write:
                raise StoreError("simulated crash between the append and the index commit")
            return real_env.begin(*a, write=write, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(store, "_env", CrashingEnv())
    with pytest.raises(StoreError):
        store.rewrite_packs(victim)
    monkeypatch.undo()
    store.close()
    with DiskStore(tmp_path / "s") as store2:
        assert read_blob(store2, r.digest) == data
        assert store2.check(deep=True).clean


def test_a_crash_after_the_index_switch_leaves_a_dead_pack_the_next_gc_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_packs(tmp_path, monkeypatch)
    data = os.urandom(600_000)
    r = store_blob(store, data, name="keep")
    store._abandon_writer()
    numbers = [p.number for p in store.pack_stats() if not p.active]
    pack_files = sorted(os.listdir(tmp_path / "s" / "packs"))
    saved = {f: (tmp_path / "s" / "packs" / f).read_bytes() for f in pack_files}
    store.rewrite_packs(numbers)
    store.close()
    # Put the old files back: as if the process died right before the unlink.
    for f, content in saved.items():
        (tmp_path / "s" / "packs" / f).write_bytes(content)
    with DiskStore(tmp_path / "s") as store2:
        assert read_blob(store2, r.digest) == data
        dead = [p for p in store2.pack_stats() if p.live_records == 0]
        assert {p.number for p in dead} >= set(numbers)
        report = run_gc(store2, min_live=0.0)
        assert report.packs_rewritten >= len(numbers)
        assert not set(os.listdir(tmp_path / "s" / "packs")) & set(pack_files)
        assert read_blob(store2, r.digest) == data
        assert store2.check(deep=True).clean


def test_reads_during_a_rewrite_follow_the_moved_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = small_packs(tmp_path, monkeypatch)
    data = os.urandom(900_000)
    r = store_blob(store, data, name="keep")
    store._abandon_writer()
    old = {cid: store._lookup(cid) for cid in r.ids}
    store.rewrite_packs([p.number for p in store.pack_stats() if not p.active])
    # A reader that looked up a location before the rewrite, and reads after the old
    # pack is gone, gets the chunk from its new place.
    for cid, loc in old.items():
        _, payload = store._read(cid, loc)
        assert payload == store.get_stored(cid).payload
    assert read_blob(store, r.digest) == data
    store.close()


def test_a_damaged_record_keeps_its_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = small_packs(tmp_path, monkeypatch)
    r = store_blob(store, os.urandom(200_000), name="keep")
    store._abandon_writer()
    loc = store._lookup(r.ids[0])
    path = tmp_path / "s" / "packs" / f"{loc.pack:08x}.pack"
    with open(path, "r+b") as f:
        f.seek(loc.offset + 60)
        f.write(b"\xff\xfe")
    (result,) = store.rewrite_packs([loc.pack])
    assert not result.removed
    assert "damaged" in result.reason
    assert path.exists()
    store.close()


# --- a model-checked run: put, tag, untag, gc, reopen -----------------------------------------

BLOBS = st.builds(
    lambda seed, reps: (hashlib.sha256(seed).digest() * 2048)[:40_000] * reps,
    st.binary(min_size=1, max_size=2),
    st.integers(1, 3),
)
NAMES = st.sampled_from(["a", "b", "c/d"])


class GcMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self._old_target = disk_mod.PACK_TARGET
        disk_mod.PACK_TARGET = 96 * 1024
        self.store = DiskStore(self.dir + "/s")
        self.blobs: dict[str, bytes] = {}  # every committed blob gc may not have deleted
        self.names: dict[str, str] = {}

    @rule(data=BLOBS, name=st.none() | NAMES)
    def put(self, data: bytes, name: str | None) -> None:
        r = store_blob(self.store, data, name)
        self.blobs[r.digest] = data
        if name is not None:
            self.names[name] = r.digest

    @precondition(lambda self: self.blobs)
    @rule(name=NAMES, pick=st.integers(0, 100))
    def tag(self, name: str, pick: int) -> None:
        digest = sorted(self.blobs)[pick % len(self.blobs)]
        self.store.tag(name, digest)
        self.names[name] = digest

    @precondition(lambda self: self.names)
    @rule(pick=st.integers(0, 100))
    def untag(self, pick: int) -> None:
        name = sorted(self.names)[pick % len(self.names)]
        self.store.untag(name)
        del self.names[name]

    @rule(min_live=st.sampled_from([0.0, 0.5, 1.0]), dry=st.booleans())
    def collect(self, min_live: float, dry: bool) -> None:
        report = gc.collect(self.store, grace_s=0, min_live=min_live, dry_run=dry)
        named = set(self.names.values())
        assert report.blobs_deleted == len(set(self.blobs) - named)
        if not dry:
            self.blobs = {d: b for d, b in self.blobs.items() if d in named}
            live = {c for d in self.blobs for c in self.store.get_recipe(d).ids}
            assert self.store.stats().chunks == len(live)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = DiskStore(self.dir + "/s")

    @invariant()
    def matches_the_model(self) -> None:
        assert dict(self.store.list_names()) == self.names
        assert dict(self.store.iter_blobs()) == {d: len(b) for d, b in self.blobs.items()}
        for digest, data in self.blobs.items():
            assert read_blob(self.store, digest) == data

    def teardown(self) -> None:
        assert self.store.check(deep=True).clean
        self.store.close()
        disk_mod.PACK_TARGET = self._old_target
        shutil.rmtree(self.dir, ignore_errors=True)


TestGcMachine = GcMachine.TestCase
TestGcMachine.settings = settings(max_examples=20, stateful_step_count=20, deadline=None)
