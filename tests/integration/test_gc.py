"""`casctl gc` against a real casd: what rm leaves behind is freed, the rest verifies."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from tests.integration.harness import Daemon, casctl, ok


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_gc_frees_the_unique_chunks_of_a_removed_name(daemon: Daemon, tmp_path: Path) -> None:
    shared = os.urandom(2_000_000)
    keep = shared + os.urandom(2_000_000)
    drop = shared + os.urandom(3_000_000)
    for name, data in (("keep", keep), ("drop", drop)):
        (tmp_path / name).write_bytes(data)
        ok(casctl(daemon, "put", str(tmp_path / name), "--name", name))
    before = ok(casctl(daemon, "stats", "--json")).json
    ok(casctl(daemon, "rm", "drop"))

    # Within the default grace period the unnamed blob stays.
    dry = ok(casctl(daemon, "gc", "--dry-run", "--json")).json
    assert dry["blobs_deleted"] == 0
    assert dry["blobs_recent"] == 2

    dry = ok(casctl(daemon, "gc", "--grace", "0", "--dry-run", "--json")).json
    assert dry["dry_run"] == 1
    assert dry["blobs_deleted"] == 1
    assert ok(casctl(daemon, "stats", "--json")).json["store_chunks"] == before["store_chunks"]

    report = ok(casctl(daemon, "gc", "--grace", "0", "--min-live", "0.9", "--json")).json
    assert report["blobs_scanned"] == 2
    assert report["blobs_deleted"] == 1
    assert report["chunks_deleted"] == dry["chunks_deleted"] > 0
    # Random bytes rest raw; the chunk across the shared/unique seam is unique too.
    assert 3_000_000 <= report["bytes_freed"] <= 3_000_000 + 256 * 1024
    assert report["packs_rewritten"] >= 1
    assert report["pack_bytes_after"] < report["pack_bytes_before"] - 2_900_000
    for key in ("names_removed", "seconds"):
        assert key in report

    after = ok(casctl(daemon, "stats", "--json")).json
    assert after["store_blobs"] == 1
    assert after["store_chunks"] == before["store_chunks"] - report["chunks_deleted"]
    r = casctl(daemon, "stat", digest_of(drop))
    assert r.code == 1
    assert "NOT_FOUND" in r.err

    out = tmp_path / "out"
    ok(casctl(daemon, "get", "keep", "-o", str(out)))
    assert out.read_bytes() == keep
    fsck = ok(casctl(daemon, "fsck", "--deep", "--json")).json
    assert fsck["clean"] == 1

    # Human output, and nothing left to do.
    r = ok(casctl(daemon, "gc", "--grace", "0"))
    assert "gc: 0 of 1 blobs deleted" in r.err


def test_gc_needs_an_admin_token(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("w write\na admin\n")
    d = make_daemon("t", "--token-file", str(tokens))
    r = casctl(d, "--token", "w", "gc")
    assert r.code == 1
    assert "FORBIDDEN" in r.err
    ok(casctl(d, "--token", "a", "gc", "--grace", "0"))


def test_gc_survives_a_restart_of_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    blobs = {f"n{i}": os.urandom(300_000 * (i + 1)) for i in range(4)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        ok(casctl(daemon, "put", str(tmp_path / name), "--name", name))
    ok(casctl(daemon, "rm", "n1", "n3"))
    ok(casctl(daemon, "gc", "--grace", "0", "--min-live", "1"))
    daemon.stop()
    daemon.start()
    for name in ("n0", "n2"):
        out = tmp_path / f"{name}.out"
        ok(casctl(daemon, "get", name, "-o", str(out)))
        assert out.read_bytes() == blobs[name]
    assert ok(casctl(daemon, "fsck", "--deep", "--json")).json["clean"] == 1
