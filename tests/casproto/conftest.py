"""Fixtures for the casproto tests."""

from __future__ import annotations

import pytest
from casproto_testing import ConnectionPair


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def pair(request: pytest.FixtureRequest) -> ConnectionPair:
    """A client and server after the handshake (zstd negotiated), frames delivered whole
    or one byte at a time."""
    conns = ConnectionPair(bytewise=request.param)
    conns.handshake()
    return conns
