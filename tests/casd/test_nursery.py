"""casd.nursery: failures come out as the CasdError callers catch, not as groups."""

from __future__ import annotations

import pytest
import trio

from casd.errors import ChunkMissing, PeerGone
from casd.nursery import open_nursery


async def test_one_failure_comes_out_as_itself() -> None:
    async def fail() -> None:
        raise PeerGone("gone")

    with pytest.raises(PeerGone):
        async with open_nursery() as n:
            n.start_soon(fail)
            await trio.sleep_forever()


async def test_several_casd_errors_come_out_as_the_first_with_the_rest_noted() -> None:
    async def fail(k: int) -> None:
        raise ChunkMissing(bytes([k]) * 32)  # no checkpoint: both fail before any cancel

    with pytest.raises(ChunkMissing) as info:
        async with open_nursery() as n:
            n.start_soon(fail, 0)
            n.start_soon(fail, 1)
    assert any("also: ChunkMissing" in note for note in info.value.__notes__)


async def test_a_bug_next_to_an_error_stays_a_group() -> None:
    async def fail() -> None:
        raise PeerGone("gone")

    async def bug() -> None:
        raise KeyError("bug")

    with pytest.raises(ExceptionGroup):
        async with open_nursery() as n:
            n.start_soon(fail)
            n.start_soon(bug)
