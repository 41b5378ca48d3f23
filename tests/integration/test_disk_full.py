"""A store on a small tmpfs that fills up: a clear error, a consistent store, and a store
that works again once there is room."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Daemon, casctl, ok

MakeDaemon = Callable[..., Daemon]


def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs; None on success, else why not (to skip visibly)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return None if p.returncode == 0 else f"cannot mount tmpfs: {p.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    if (why := _mount_tmpfs(mnt, "24m")) is not None:
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_full_disk_fails_cleanly_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    d = Daemon(small_disk / "store", tmp_path / "full.log", ["--compress-level", "0"]).start()
    try:
        early = os.urandom(4_000_000)
        ok(casctl(d, "put", "-", "--name", "early", input=early))
        r = casctl(d, "put", "-", "--name", "too-big", input=os.urandom(40_000_000))
        assert r.code == 1
        assert "NO_SPACE" in r.err
        assert "hint:" in r.err
        assert "Traceback" not in r.err
        # Consistent: the earlier blob reads back, nothing partial is visible.
        assert ok(casctl(d, "get", "early")).out == early
        assert [e["name"] for e in ok(casctl(d, "ls", "--json")).json] == ["early"]
        assert ok(casctl(d, "fsck", "--deep", "--json")).json["clean"] == 1
        # Room again: the same push now succeeds (and reuses what it stored before).
        subprocess.run(
            ["mount", "-o", "remount,size=128m", str(small_disk)], check=True, timeout=30
        )
        big = os.urandom(40_000_000)
        ok(casctl(d, "put", "-", "--name", "big", input=big))
        assert ok(casctl(d, "get", "big")).out == big
        assert ok(casctl(d, "fsck", "--json")).json["clean"] == 1
    finally:
        d.kill()
