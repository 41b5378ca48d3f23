"""casctl against a real casd process: what a user does, and what they must be able to rely on."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import BIN, Daemon, casctl, ok, real_data

MIN, MAX = 16 * 1024, 256 * 1024


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "size",
    [0, 1, MIN - 1, MIN, MIN + 1, MAX - 1, MAX, MAX + 1, 3_000_000],
    ids=lambda s: f"{s}B",
)
def test_put_get_round_trip(daemon: Daemon, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    put = ok(casctl(daemon, "put", str(src), "--json")).json
    assert put["digest"] == digest_of(data)
    assert put["size"] == size
    dst = tmp_path / "out.bin"
    get = ok(casctl(daemon, "get", put["digest"], "-o", str(dst), "--json")).json
    assert dst.read_bytes() == data
    assert get["digest"] == put["digest"]
    assert get["chunks"] == put["chunks"]


def test_real_file_round_trip_via_stdin_and_stdout(daemon: Daemon) -> None:
    data = real_data(20_000_000)
    put = ok(casctl(daemon, "put", "-", "--name", "stdlib", "--json", input=data)).json
    assert put["digest"] == digest_of(data)
    assert put["chunks"] > 100
    # Real files compress: zstd on the wire sends fewer bytes than the file has.
    assert put["wire_bytes"] < len(data)
    got = ok(casctl(daemon, "get", "stdlib"))
    assert got.out == data


@pytest.mark.slow
def test_100_mb_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    data = real_data(50_000_000) + os.urandom(50_000_000)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    put = ok(casctl(daemon, "put", str(src), "--json")).json
    assert put["size"] == 100_000_000
    dst = tmp_path / "big.out"
    ok(casctl(daemon, "get", put["digest"], "-o", str(dst)))
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == put["digest"][7:]


def test_second_put_of_an_edited_file_moves_only_changed_chunks(
    daemon: Daemon, tmp_path: Path
) -> None:
    v1 = bytearray(real_data(30_000_000))
    (tmp_path / "v1").write_bytes(v1)
    first = ok(casctl(daemon, "put", str(tmp_path / "v1"), "--json")).json
    v2 = bytearray(v1)
    v2[10_000_000:10_000_010] = b"0123456789"  # overwrite
    del v2[20_000_000:20_000_100]  # delete
    v2[25_000_000:25_000_000] = b"inserted text " * 10  # insert
    (tmp_path / "v2").write_bytes(v2)
    second = ok(casctl(daemon, "put", str(tmp_path / "v2"), "--json")).json
    assert second["digest"] == digest_of(bytes(v2))
    # Each edit touches one or two chunks.
    assert second["chunks_transferred"] <= 6
    assert second["wire_bytes"] < 0.02 * len(v2)
    assert first["chunks_transferred"] > 300


def test_putting_the_same_blob_again_sends_no_chunk(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(real_data(5_000_000))
    ok(casctl(daemon, "put", str(tmp_path / "f")))
    again = ok(casctl(daemon, "put", str(tmp_path / "f"), "--json")).json
    assert again["chunks_transferred"] == 0


def test_seeded_get_fetches_only_what_the_seed_lacks(daemon: Daemon, tmp_path: Path) -> None:
    v1 = real_data(20_000_000)
    v2 = v1[:5_000_000] + b"a small change" + v1[5_000_000:]
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(v2)
    put = ok(casctl(daemon, "put", str(tmp_path / "v2"), "--name", "app", "--json")).json
    out = tmp_path / "got"
    get = ok(
        casctl(daemon, "get", "app", "-o", str(out), "--seed", str(tmp_path / "v1"), "--json")
    ).json
    assert out.read_bytes() == v2
    assert get["chunks_transferred"] <= 2
    assert get["chunks_from_seeds"] >= put["chunks"] - 2
    assert get["wire_bytes"] < 0.02 * len(v2)
    # Without the seed everything travels.
    plain = ok(casctl(daemon, "get", "app", "-o", str(tmp_path / "plain"), "--json")).json
    assert plain["chunks_transferred"] == put["chunks"] - 0  # no repeats in this data


def test_a_seeded_get_fetches_changed_chunks_as_deltas_against_the_seed(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The server holds v1 and v2; the client holds v1. The chunks v1 lacks come encoded
    against v1's chunks at the same place (SPEC §4.3), a few kB for three small edits."""
    v1 = os.urandom(4_000_000)  # incompressible: only a delta avoids resending chunks
    v2 = bytearray(v1)
    for at in (800_000, 2_000_000, 3_200_000):
        v2[at : at + 100] = os.urandom(100)
    (tmp_path / "v1").write_bytes(v1)
    ok(casctl(daemon, "put", str(tmp_path / "v1"), "--name", "app:v1"))
    ok(casctl(daemon, "put", "-", "--name", "app:v2", input=bytes(v2)))
    out = tmp_path / "got"
    get = ok(
        casctl(daemon, "get", "app:v2", "-o", str(out), "--seed", str(tmp_path / "v1"), "--json")
    ).json
    assert out.read_bytes() == bytes(v2)
    assert get["chunks_transferred"] >= 3
    assert get["chunks_delta"] == get["chunks_transferred"]
    assert get["bytes_transferred"] < 20_000


def test_a_put_with_a_base_sends_changed_chunks_as_deltas(daemon: Daemon, tmp_path: Path) -> None:
    v1 = os.urandom(4_000_000)
    v2 = bytearray(v1)
    for at in (800_000, 2_000_000, 3_200_000):
        v2[at : at + 100] = os.urandom(100)
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(bytes(v2))
    ok(casctl(daemon, "put", str(tmp_path / "v1"), "--name", "app"))
    put = ok(
        casctl(
            daemon,
            "put",
            str(tmp_path / "v2"),
            "--name",
            "app",
            "--base",
            str(tmp_path / "v1"),
            "--json",
        )
    ).json
    assert put["chunks_transferred"] >= 3
    assert put["chunks_delta"] == put["chunks_transferred"]
    assert put["bytes_transferred"] < 20_000
    assert ok(casctl(daemon, "get", "app")).out == bytes(v2)


def test_get_to_an_existing_file_replaces_it_only_when_verified(
    daemon: Daemon, tmp_path: Path
) -> None:
    target = tmp_path / "keep"
    target.write_bytes(b"precious")
    r = casctl(daemon, "get", "no-such-name", "-o", str(target))
    assert r.code == 1
    assert target.read_bytes() == b"precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".casctl-get-")]


def test_names_stat_ls_tag_rm(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"alpha" * 1000)
    d = ok(casctl(daemon, "put", str(tmp_path / "a"), "--name", "app/v1")).text.strip()
    ok(casctl(daemon, "tag", "app/latest", "app/v1"))
    stat = ok(casctl(daemon, "stat", "app/latest", "--json")).json
    assert stat["digest"] == d
    assert stat["size"] == 5000
    assert stat["names"] == ["app/latest", "app/v1"]
    ls = ok(casctl(daemon, "ls", "app/", "--json")).json
    assert ls == [{"name": "app/latest", "digest": d}, {"name": "app/v1", "digest": d}]
    ok(casctl(daemon, "rm", "app/v1"))
    assert [e["name"] for e in ok(casctl(daemon, "ls", "--json")).json] == ["app/latest"]
    stats = ok(casctl(daemon, "stats", "--json")).json
    assert stats["store_blobs"] == 1
    assert stats["store_names"] == 1


def test_errors_are_one_actionable_line(daemon: Daemon, tmp_path: Path) -> None:
    r = casctl(daemon, "get", "missing", "-o", str(tmp_path / "x"))
    assert r.code == 1
    assert r.err.startswith("casctl: error: server refused: no blob named or addressed 'missing'")
    assert "Traceback" not in r.err

    r = casctl(daemon, "tag", "bad\tname", "missing")
    assert r.code == 1
    assert "Traceback" not in r.err

    r = casctl("127.0.0.1:1", "ls")
    assert r.code == 1
    assert "cannot connect to casd at 127.0.0.1:1" in r.err
    assert "hint:" in r.err
    r = casctl("127.0.0.1:1", "sync", daemon.address, "127.0.0.1:1", "x")  # no DST
    assert r.code == 1
    assert "cannot connect to casd at 127.0.0.1:1" in r.err
    assert "hint:" in r.err

    r = casctl(daemon, "put", str(tmp_path / "does-not-exist"))
    assert r.code == 1
    assert "cannot read" in r.err


def test_token_is_required_when_configured(make_daemon: callable, tmp_path: Path) -> None:  # type: ignore[valid-type]
    d = make_daemon("secure", "--token", "s3cret")
    r = casctl(d, "ls")
    assert r.code == 1
    assert "UNAUTHORIZED" in r.err
    r = casctl(d, "ls", "--token", "wrong")
    assert r.code == 1
    assert "token refused" in r.err
    ok(casctl(d, "ls", "--token", "s3cret"))
    ok(casctl(d, "ls", env={"CASD_TOKEN": "s3cret"}))
    r = casctl(d, "sync", d.address, d.address, "x", "--token", "wrong")
    assert r.code == 1
    assert "token refused" in r.err


def test_non_loopback_listen_needs_a_token(tmp_path: Path) -> None:
    p = subprocess.run(
        [str(BIN / "casd"), "serve", "--data", str(tmp_path / "d"), "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1
    assert "refusing to listen on non-loopback address 0.0.0.0 without a token" in p.stderr


def test_sigterm_stops_the_daemon_gracefully(daemon: Daemon) -> None:
    assert daemon.stop() == 0
    assert "casd stopped" in daemon.log.read_text()


def _wait_for(cond: callable, timeout: float = 30) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _start_stdin_put(daemon: Daemon, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "casctl"), "--server", daemon.address, "put", "-", "--json", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # also closes the pipes


def _store_chunks(daemon: Daemon) -> int:
    return int(ok(casctl(daemon, "stats", "--json")).json["store_chunks"])


def test_interrupted_put_rerun_resends_no_stored_chunk(daemon: Daemon, tmp_path: Path) -> None:
    data = real_data(60_000_000)
    (tmp_path / "f").write_bytes(data)
    proc = _start_stdin_put(daemon)
    assert proc.stdin is not None
    proc.stdin.write(data[:40_000_000])
    proc.stdin.flush()
    # Chunks are made durable in batches while the push runs; wait until some landed.
    _wait_for(lambda: _store_chunks(daemon) > 50)
    _reap(proc)
    stored = _store_chunks(daemon)
    assert ok(casctl(daemon, "ls", "--json")).json == []  # nothing visible
    rerun = ok(casctl(daemon, "put", str(tmp_path / "f"), "--json")).json
    assert rerun["digest"] == digest_of(data)
    assert rerun["chunks_transferred"] == _store_chunks(daemon) - stored
    assert rerun["chunks_transferred"] < rerun["chunks"] - 50


def test_kill_9_mid_push_keeps_earlier_blobs_and_hides_the_partial_one(
    make_daemon: callable,
    tmp_path: Path,  # type: ignore[valid-type]
) -> None:
    d: Daemon = make_daemon("crash")
    early = real_data(8_000_000)
    ok(casctl(d, "put", "-", "--name", "early", input=early))
    proc = _start_stdin_put(d, "--name", "partial")
    assert proc.stdin is not None
    proc.stdin.write(os.urandom(30_000_000))
    proc.stdin.flush()
    _wait_for(lambda: _store_chunks(d) > 50)
    d.kill()
    _reap(proc)
    d.start()
    got = ok(casctl(d, "get", "early"))
    assert got.out == early
    assert [e["name"] for e in ok(casctl(d, "ls", "--json")).json] == ["early"]
    assert ok(casctl(d, "stats", "--json")).json["store_blobs"] == 1
    assert casctl(d, "stat", "partial").code == 1


def test_token_scopes_limit_what_a_client_may_do(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# token scope\nreader read\nwriter write\nboss admin\nplain\n")
    d = make_daemon("scoped", "--token-file", str(tokens))
    ok(casctl(d, "put", "-", "--name", "x", "--token", "writer", input=b"data" * 1000))
    ok(casctl(d, "get", "x", "--token", "reader"))
    ok(casctl(d, "ls", "--token", "reader"))
    r = casctl(d, "put", "-", "--name", "y", "--token", "reader", input=b"nope")
    assert r.code == 1
    assert "FORBIDDEN" in r.err
    assert "needs a write token" in r.err
    r = casctl(d, "rm", "x", "--token", "reader")
    assert r.code == 1
    assert "FORBIDDEN" in r.err
    assert casctl(d, "fsck", "--token", "writer").code == 1
    ok(casctl(d, "fsck", "--token", "boss"))
    ok(casctl(d, "fsck", "--token", "plain"))  # no scope given: admin
    assert [e["name"] for e in ok(casctl(d, "ls", "--json", "--token", "reader")).json] == ["x"]
