"""Fixtures that start real daemons; see harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Daemon


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:  # type: ignore[valid-type]
    started: list[Daemon] = []

    def make(name: str = "d", *args: str) -> Daemon:
        d = Daemon(tmp_path / f"{name}-data", tmp_path / f"{name}.log", list(args))
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.kill()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:  # type: ignore[valid-type]
    return make_daemon()  # type: ignore[no-any-return]
