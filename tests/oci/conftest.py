"""Fixtures shared by the OCI bridge's in-process tests."""

from __future__ import annotations

import pytest

from tests.oci.images import make_tar, real_files


@pytest.fixture(scope="module")
def tar_bytes() -> bytes:
    """A 3 MB tar of real Python sources, with the mtimes a build leaves."""
    return make_tar(
        real_files("/usr/lib/python3", 3_000_000, suffixes=(".py",)), mtime=1_700_000_000
    )
