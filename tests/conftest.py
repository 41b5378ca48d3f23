"""Shared pytest setup: hypothesis profiles, and keeping the installed packages importable."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Without tests/__init__.py, pytest's default "prepend" import mode puts this directory on
# sys.path, and folders named like packages (tests/casproto/, no __init__.py) would be
# imported as empty namespace packages instead of the editable installs, whose finder
# runs only after sys.path is searched. Nothing here needs the entry.
_HERE = Path(__file__).parent.resolve()
sys.path[:] = [entry for entry in sys.path if not entry or Path(entry).resolve() != _HERE]

# Deterministic by default so a failure reproduces; HYPOTHESIS_PROFILE=deep to hunt.
settings.register_profile("deterministic", derandomize=True, max_examples=50, deadline=None)
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None)
settings.register_profile("deep", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


# casd-gogzip, the helper that makes Go-written (klauspost/pgzip) layers again, is built
# once per session from Debian's Go sources unless one is installed, and every daemon the
# tests start finds it through $CASD_GOGZIP (the environment they inherit). A test that
# needs it without it fails naming what to install; tests of a host without it set
# CASD_GOGZIP="" for their daemons.
GOGZIP_HINT = (
    "`.ci/run` installs golang-go, golang-github-klauspost-pgzip-dev and "
    "golang-github-klauspost-compress-dev"
)
_gogzip_error: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _gogzip_for_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from casd.oci import gogzip

    before = os.environ.get("CASD_GOGZIP")
    found = gogzip.helper()
    if found is None:
        try:
            found = str(gogzip.build(tmp_path_factory.mktemp("gogzip") / gogzip.HELPER))
        except OSError as exc:
            _gogzip_error.append(f"{exc} ({GOGZIP_HINT})")
            found = ""
    os.environ["CASD_GOGZIP"] = found
    yield
    if before is None:
        os.environ.pop("CASD_GOGZIP", None)
    else:
        os.environ["CASD_GOGZIP"] = before


@pytest.fixture(scope="session")
def gogzip_helper(_gogzip_for_daemons: None) -> str:
    """The path of casd-gogzip; fails the test (never skips) when it could not be built."""
    if _gogzip_error or not os.environ.get("CASD_GOGZIP"):
        pytest.fail(f"casd-gogzip is not available: {' '.join(_gogzip_error)}", pytrace=False)
    return os.environ["CASD_GOGZIP"]
