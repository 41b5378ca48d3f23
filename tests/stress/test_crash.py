"""The crash stress test, short: SIGKILL a busy casd 8 times, restart, lose nothing.

The full run is ``.venv/bin/python tests/stress/crash.py --trials 100`` (see crash.py).
"""

from __future__ import annotations

from pathlib import Path

from tests.stress.crash import Config, run


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    # Every trial pulls and hashes every blob acknowledged so far (sample covers them all).
    fig = run(Config(trials=8, seed=20261129, workdir=tmp_path, sample=10_000, verbose=False))
    assert fig.kills == 8
    assert fig.trials == 8
    assert fig.violations == [], fig.summary()
    assert fig.losses == 0, fig.summary()
    assert fig.fsck_failures == 0, fig.summary()
    assert fig.pushes_acked > 0, fig.summary()
    assert fig.blobs_verified > 0, fig.summary()
