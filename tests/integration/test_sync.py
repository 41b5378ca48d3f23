"""casctl sync between two real daemons on loopback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.integration.harness import BIN, CutProxy, Daemon, casctl, ok, put_many, real_data

MakeDaemon = Callable[..., Daemon]


def sync(src: Daemon, dst: Daemon, *args: str) -> dict:  # type: ignore[type-arg]
    return ok(casctl(src, "sync", src.address, dst.address, *args, "--json")).json  # type: ignore[no-any-return]


def stats(d: Daemon) -> dict:  # type: ignore[type-arg]
    return ok(casctl(d, "stats", "--json")).json  # type: ignore[no-any-return]


def names(d: Daemon) -> dict[str, str]:
    return {e["name"]: e["digest"] for e in ok(casctl(d, "ls", "--json")).json}


def test_sync_all_then_again_moves_nothing(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    data = {f"app/v{i}": real_data(3_000_000 * (i + 1))[-3_000_000:] for i in range(3)}
    for name, blob in data.items():
        ok(casctl(a, "put", "-", "--name", name, input=blob))
    first = sync(a, b, "--all")
    assert first["blobs"] == first["blobs_copied"] == 3
    assert first["mode"] == "direct"
    assert names(b) == names(a)
    for name, blob in data.items():
        assert ok(casctl(b, "get", name)).out == blob
    again = sync(a, b, "--all")
    assert again["blobs_unchanged"] == 3
    assert again["chunks_fetched"] == 0
    assert {i["action"] for i in again["items"]} == {"unchanged"}


def test_sync_named_blobs_only(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    ok(casctl(a, "put", "-", "--name", "one", input=b"1" * 100_000))
    ok(casctl(a, "put", "-", "--name", "two", input=b"2" * 100_000))
    out = sync(a, b, "two")
    assert [i["name"] for i in out["items"]] == ["two"]
    assert list(names(b)) == ["two"]


def test_resync_after_a_change_moves_only_the_changed_chunks(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    v1 = real_data(20_000_000)
    ok(casctl(a, "put", "-", "--name", "app", input=v1))
    sync(a, b, "app")
    v2 = v1[:7_000_000] + b"one change" + v1[7_000_000:]
    ok(casctl(a, "put", "-", "--name", "app", input=v2))
    out = sync(a, b, "app")
    assert out["blobs_copied"] == 1
    assert out["chunks_fetched"] <= 2
    assert out["wire_bytes"] < 0.03 * len(v2)
    assert ok(casctl(b, "get", "app")).out == v2


def test_dry_run_reports_and_changes_nothing(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    blob = real_data(5_000_000)
    ok(casctl(a, "put", "-", "--name", "x", input=blob))
    out = sync(a, b, "--all", "--dry-run")
    assert out["dry_run"] == 1
    assert [i["action"] for i in out["items"]] == ["would-copy"]
    assert out["bytes_raw_fetched"] == len(blob)  # what would move, uncompressed
    assert out["chunks_fetched"] > 0
    assert names(b) == {}
    assert stats(b)["store_chunks"] == 0


def test_relay_mode_gives_the_same_result(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    v1 = real_data(8_000_000)
    ok(casctl(a, "put", "-", "--name", "r", input=v1))
    out = sync(a, b, "--all", "--via-client")
    assert out["mode"] == "relay"
    assert out["blobs_copied"] == 1
    assert ok(casctl(b, "get", "r")).out == v1
    assert sync(a, b, "--all", "--via-client")["blobs_unchanged"] == 1


def test_stores_with_different_chunk_sizes_still_sync(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    b = make_daemon("b", "--chunker", "8192:32768:131072")
    blob = real_data(6_000_000)
    ok(casctl(a, "put", "-", "--name", "x", input=blob))
    sync(a, b, "x")
    assert ok(casctl(b, "get", "x")).out == blob
    ok(casctl(b, "put", "-", "--name", "back", input=blob[::-1]))
    sync(b, a, "back")
    assert ok(casctl(a, "get", "back")).out == blob[::-1]


def test_refused_auth_and_unreachable_source_are_clear_errors(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a", "--token", "src-secret")
    b = make_daemon("b")
    ok(casctl(a, "put", "-", "--name", "x", "--token", "src-secret", input=b"x" * 1000))
    r = casctl(a, "sync", a.address, b.address, "x")
    assert r.code == 1
    assert f"source {a.address} refused" in r.err
    assert "UNAUTHORIZED" in r.err
    ok(casctl(a, "sync", a.address, b.address, "x", "--src-token", "src-secret"))
    r = casctl(b, "sync", "127.0.0.1:1", b.address, "x")
    assert r.code == 1
    assert "UNREACHABLE" in r.err
    assert "127.0.0.1:1" in r.err
    r = casctl(b, "sync", a.address, b.address, "no-such-name", "--src-token", "src-secret")
    assert r.code == 1
    assert "NOT_FOUND" in r.err


def test_interrupted_sync_resumes_without_moving_chunks_twice(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    blob = real_data(40_000_000)
    ok(casctl(a, "put", "-", "--name", "big", input=blob))
    uninterrupted = sync(a, make_daemon("c"), "big")
    # B reaches A through a relay that breaks the connection after 4 MB from A.
    proxy = CutProxy(a.address, 4_000_000)
    try:
        r = casctl(b, "sync", proxy.address, b.address, "big")
        assert r.code == 1
        assert "UNREACHABLE" in r.err
        assert proxy.cut.is_set()
        stored = stats(b)["store_chunks"]
        assert 0 < stored < uninterrupted["chunks_fetched"]
        assert names(b) == {}  # nothing half-synced is visible
        rerun = sync(a, b, "big")
    finally:
        proxy.close()
    assert ok(casctl(b, "get", "big")).out == blob
    assert rerun["chunks_fetched"] == uninterrupted["chunks_fetched"] - stored
    # Both runs together: at most one WANT batch (2 MiB raw) that arrived but was cut off
    # before it was complete is paid twice, plus the recipe and handshake again.
    both = 4_000_000 + rerun["wire_bytes"]
    assert both <= 1.05 * uninterrupted["wire_bytes"] + 2 * 1024 * 1024


def test_a_noop_sync_of_100_names_costs_a_few_round_trips(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    put_many(a, {f"n{i:03}": os.urandom(2000) for i in range(100)})
    sync(a, b, "--all")
    out = sync(a, b, "--all")
    assert out["blobs_unchanged"] == 100
    assert out["chunks_fetched"] == 0
    # Handshake plus one LIST: a few kilobytes, whatever the number of names.
    assert out["wire_bytes"] < 20_000


def test_a_changed_region_travels_as_a_delta_against_the_old_version(
    make_daemon: MakeDaemon,
) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    v1 = os.urandom(6_000_000)  # incompressible: only a delta can avoid resending chunks
    ok(casctl(a, "put", "-", "--name", "blob", input=v1))
    sync(a, b, "blob")
    v2 = bytearray(v1)
    for at in (1_000_000, 3_000_000, 5_000_000):
        v2[at : at + 100] = os.urandom(100)  # three small overwrites
    ok(casctl(a, "put", "-", "--name", "blob", input=bytes(v2)))
    out = sync(a, b, "blob")
    assert out["chunks_fetched"] >= 3
    assert out["chunks_delta"] == out["chunks_fetched"]
    # Three 100-byte changes: a few kB travel, not three 80 kB chunks.
    assert out["bytes_fetched"] < 20_000
    assert ok(casctl(b, "get", "blob")).out == bytes(v2)
    assert stats(a)["delta_chunks"] >= 3
    # The source's own figures for what it encoded, asked once the chunks came.
    assert out["source_delta_batches"] >= 1
    assert out["source_delta_encode_s"] > 0


def test_a_destination_serving_with_no_delta_asks_for_chunks_only(
    make_daemon: MakeDaemon,
) -> None:
    a, b = make_daemon("a"), make_daemon("b", "--no-delta")
    v1 = os.urandom(3_000_000)
    ok(casctl(a, "put", "-", "--name", "blob", input=v1))
    sync(a, b, "blob")
    v2 = bytearray(v1)
    v2[1_500_000:1_500_100] = os.urandom(100)
    ok(casctl(a, "put", "-", "--name", "blob", input=bytes(v2)))
    out = sync(a, b, "blob")
    assert out["chunks_fetched"] >= 1
    assert out["chunks_delta"] == 0
    assert out["source_delta_batches"] == 0
    assert ok(casctl(b, "get", "blob")).out == bytes(v2)


def test_bitrot_is_found_never_served_and_repaired_from_a_peer(make_daemon: MakeDaemon) -> None:
    a, b = make_daemon("a"), make_daemon("b")
    blob = os.urandom(3_000_000)
    ok(casctl(a, "put", "-", "--name", "x", input=blob))
    sync(a, b, "x")
    assert ok(casctl(b, "fsck", "--deep", "--json")).json["clean"] == 1
    (pack,) = (b.data / "packs").iterdir()
    raw = bytearray(pack.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    pack.write_bytes(bytes(raw))

    found = casctl(b, "fsck", "--json")
    assert found.code == 1
    assert found.json["chunks_damaged"] == 1
    assert len(found.json["damaged"]) == 1
    got = casctl(b, "get", "x")
    assert got.code == 1
    assert "CHUNK_CORRUPT" in got.err
    assert "checksum mismatch" in got.err

    fixed = ok(casctl(b, "fsck", "--repair-from", a.address, "--json")).json
    assert fixed["chunks_repaired"] == 1
    assert fixed["clean"] == 1
    assert ok(casctl(b, "get", "x")).out == blob
    assert ok(casctl(b, "fsck", "--deep")).code == 0


def test_offline_fsck_of_a_store_directory(make_daemon: MakeDaemon) -> None:
    a = make_daemon("a")
    ok(casctl(a, "put", "-", "--name", "x", input=os.urandom(1_000_000)))
    a.stop()
    p = subprocess.run(
        [str(BIN / "casd"), "fsck", "--data", str(a.data), "--deep"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "chunks_damaged=0" in p.stderr
