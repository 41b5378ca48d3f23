"""Shared pytest setup: hypothesis profiles, and keeping the installed packages importable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
