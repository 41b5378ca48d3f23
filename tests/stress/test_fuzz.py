"""The live-daemon fuzz of tests/stress/fuzz.py at a size for CI (20,000 frames, well
under a minute on two cores); `python -m tests.stress.fuzz` runs the full 100,000."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stress import fuzz


@pytest.mark.slow
def test_a_live_daemon_survives_hostile_frames_while_a_client_works(tmp_path: Path) -> None:
    report = fuzz.run(20_000, seed=1, workdir=tmp_path, rss_limit_mb=512)
    print(report.summary())  # the figures, with -s or on failure

    assert report.failures == [], report.summary()
    assert report.frames_sent >= 20_000
    assert set(report.sessions) == set(fuzz.SCENARIOS)  # every scenario ran
    assert report.fatal_errors > 0  # ERROR(0) answered the violations...
    assert report.error_frames > report.fatal_errors  # ...ERROR(rid) the bad requests
    assert report.server_closes > 0  # the server closed after violations by itself
    assert report.closes_after_eof > 0
    # The well-behaved client worked the whole time, and every operation succeeded.
    assert report.good_iterations >= 3
    assert report.good_ops == 3 * report.good_iterations
    assert report.daemon_alive
    assert report.stats_ok
    assert report.fsck_ok
    assert report.daemon_exit == 0
    assert report.log_problems == []
    assert report.rss_max_kb < 512 * 1024
