"""The GC stress test, short: gc back to back with pushes, tags and rm for 20 s, then
4 SIGKILLs during gc; nothing acknowledged and still named is lost, fsck stays clean.

The full run is ``.venv/bin/python -m tests.stress.gc --seconds 120 --kill-trials 30``.
"""

from __future__ import annotations

from pathlib import Path

from tests.stress.gc import Config, run


def test_gc_interleaved_with_pushes_and_killed_during_gc_loses_nothing(tmp_path: Path) -> None:
    fig = run(Config(seconds=20, kill_trials=4, seed=20261130, workdir=tmp_path, verbose=False))
    assert fig.violations == [], fig.summary()
    assert fig.fsck_failures == 0, fig.summary()
    assert fig.gc_runs >= 10, fig.summary()
    assert fig.gc_blobs_deleted > 0, fig.summary()
    assert fig.gc_chunks_deleted > 0, fig.summary()
    assert fig.gc_packs_rewritten > 0, fig.summary()
    assert fig.pushes_acked > 50, fig.summary()
    assert fig.kills == 4, fig.summary()
    assert fig.kills_during_gc >= 1, fig.summary()
    assert fig.blobs_verified > 0, fig.summary()
