"""Limits: stalled and idle clients time out, too much work in flight is refused with BUSY.
Time is trio's autojump clock: minutes pass in milliseconds."""

from __future__ import annotations

import os

import casproto
import pytest
import trio
import trio.testing

from casd.chunking import Chunker, chunk_id
from casd.server import service
from casd.storage.memory import MemoryStore
from tests.casd.server.test_service import _raw_client, serving


async def test_a_stalled_push_is_ended(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    views = list(Chunker().cut(os.urandom(300_000)))
    async with serving(store) as (ctx, stream, _scope):
        peer = await _raw_client(stream)
        await peer.send(casproto.PushBegin(1, "stuck"))
        ids = tuple(chunk_id(v) for v in views)
        await peer.send(casproto.PushRecipe(1, ids, tuple(len(v) for v in views)))
        assert isinstance(await peer.next_event(), casproto.PushWant)
        await peer.send(casproto.Chunk(1, ids[0], casproto.Codec.RAW, bytes(views[0])))
        start = trio.current_time()
        err = await peer.next_event()  # ... and then nothing more
        assert isinstance(err, casproto.Error)
        assert err.code == casproto.ErrorCode.CANCELLED
        assert "sent nothing" in err.message
        assert trio.current_time() - start >= service.PUSH_STALL_S
        assert store.has_chunks([ids[0]]) == [True]  # what arrived is kept
        assert ctx.pushes_running == 0


async def test_an_idle_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(MemoryStore()) as (_ctx, stream, _scope):
        peer = await _raw_client(stream)
        start = trio.current_time()
        assert await peer.next_event() is casproto.CLOSED
        assert trio.current_time() - start >= service.IDLE_TIMEOUT_S


async def test_too_many_pushes_at_once_are_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "MAX_PUSHES", 2)
    async with serving(MemoryStore()) as (_ctx, stream, _scope):
        peer = await _raw_client(stream)
        for rid in (1, 2, 3):
            await peer.send(casproto.PushBegin(rid, None))
        err = await peer.next_event()
        assert isinstance(err, casproto.Error)
        assert (err.rid, err.code) == (3, casproto.ErrorCode.BUSY)
        # The first two are still alive: an empty push completes.
        await peer.send(
            casproto.PushEnd(
                1, 0, "sha256:" + "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )
        )
        done = await peer.next_event()
        assert isinstance(done, casproto.PushDone)
        assert done.rid == 1
