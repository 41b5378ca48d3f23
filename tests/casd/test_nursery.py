"""casd.nursery: failures come out as the CasdError callers catch, not as groups."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from casd.errors import ChunkMissing, PeerGone
from casd.nursery import open_nursery


async def run_all(*tasks: Callable[[], Awaitable[None]]) -> None:
    async with open_nursery() as n:
        for task in tasks:
            n.start_soon(task)


async def test_one_failure_comes_out_as_itself() -> None:
    async def fail() -> None:
        raise PeerGone("gone")

    with pytest.raises(PeerGone):
        await run_all(fail, trio.sleep_forever)


async def test_several_casd_errors_come_out_as_the_first_with_the_rest_noted() -> None:
    def fail(k: int) -> Callable[[], Awaitable[None]]:
        async def task() -> None:
            raise ChunkMissing(bytes([k]) * 32)  # no checkpoint: both fail before any cancel

        return task

    with pytest.raises(ChunkMissing) as info:
        await run_all(fail(0), fail(1))
    assert any("also: ChunkMissing" in note for note in info.value.__notes__)


async def test_a_bug_next_to_an_error_stays_a_group() -> None:
    async def fail() -> None:
        raise PeerGone("gone")

    async def bug() -> None:
        raise KeyError("bug")

    with pytest.raises(ExceptionGroup):
        await run_all(fail, bug)
