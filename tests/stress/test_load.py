"""A short load run in CI: 16 clients for 8 s, no errors, bounded daemon memory."""

from __future__ import annotations

from pathlib import Path

from tests.stress.load import RSS_LIMIT, run


def test_sixteen_clients_push_and_pull_without_errors(tmp_path: Path) -> None:
    fig = run(clients=16, seconds=8, work=tmp_path)
    assert fig.errors == 0
    assert fig.pushes >= 16
    assert fig.pulls == fig.pushes
    assert 0 < fig.peak_rss < RSS_LIMIT
