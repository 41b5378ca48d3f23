"""The daemon's connection handling, in-process: a real Session and a real Client joined
by trio's in-memory streams. No sockets, no mocks."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import casproto
import pytest
import trio
import trio.testing

from casd.auth import Scope, TokenTable
from casd.chunking import Chunker, chunk_id, format_digest
from casd.client import Client, open_client_on_stream
from casd.errors import NoSpace, PeerError, PeerRefused
from casd.peer import PeerConnection
from casd.server.service import ServerContext, Session
from casd.storage.memory import MemoryStore
from casd.storage.testing import read_blob


@asynccontextmanager
async def serving(
    store: MemoryStore, tokens: frozenset[str] = frozenset()
) -> AsyncIterator[
    tuple[ServerContext, trio.testing.MemoryStapledStream[object, object], trio.CancelScope]
]:
    """A server Session on one end of an in-memory stream; yields the other end, and the
    cancel scope of the server alone (cancelling it makes the server vanish)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ctx = ServerContext(store=store, tokens=TokenTable.build([(t, Scope.ADMIN) for t in tokens]))
    server_scope = trio.CancelScope()

    async def run_server() -> None:
        with server_scope:
            try:
                await Session(ctx, PeerConnection(server_stream, casproto.Role.SERVER)).run()
            finally:
                await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        yield ctx, client_stream, server_scope
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_for(store: MemoryStore, **kw: object) -> AsyncIterator[Client]:
    async with serving(store) as (_, stream, _n), open_client_on_stream(stream, "mem", **kw) as c:  # type: ignore[arg-type]
        yield c


def chunks(data: bytes) -> list[memoryview]:
    return list(Chunker().cut(data))


async def test_push_then_pull_round_trips() -> None:
    store = MemoryStore()
    data = os.urandom(900_000) + b"x" * 400_000
    async with client_for(store) as c:
        put = await c.push(iter(chunks(data)), name="blob")
        assert put.digest == format_digest(hashlib.sha256(data).digest())
        assert put.chunks_transferred == put.new_chunks > 0
        buf = io.BytesIO()
        got = await c.pull("blob", buf)
        assert buf.getvalue() == data
        assert got.chunks_transferred == len({chunk_id(v) for v in chunks(data)})
    assert read_blob(store, put.digest) == data


async def test_many_requests_share_one_connection() -> None:
    store = MemoryStore()
    blobs = [os.urandom(300_000) for _ in range(4)]
    async with client_for(store) as c:
        results: list[object] = []

        async def put(i: int) -> None:
            results.append(await c.push(iter(chunks(blobs[i])), name=f"b{i}"))

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(put, i)
            nursery.start_soon(c.stats)
        assert sorted(n for n, _ in await c.list_names()) == ["b0", "b1", "b2", "b3"]
        assert (await c.stats())["pushes"] == 4


async def test_unknown_names_are_not_found_and_the_connection_carries_on() -> None:
    async with client_for(MemoryStore()) as c:
        with pytest.raises(PeerRefused) as info:
            await c.stat("nothing")
        assert info.value.code_name == "NOT_FOUND"
        with pytest.raises(PeerRefused) as info:
            await c.tag("bad\tname", format_digest(b"\0" * 32))
        assert info.value.code_name == "INVALID"
        assert await c.list_names() == []


async def _raw_client(stream: trio.abc.Stream) -> PeerConnection:
    peer = PeerConnection(stream, casproto.Role.CLIENT, "raw")
    await peer.send(casproto.Hello(0, 1, ("zstd",), None, "test"))
    assert isinstance(await peer.next_event(), casproto.Welcome)
    return peer


async def test_a_lying_digest_is_refused_and_nothing_becomes_visible() -> None:
    store = MemoryStore()
    data = os.urandom(200_000)
    views = chunks(data)
    async with serving(store) as (_, stream, _n):
        peer = await _raw_client(stream)
        await peer.send(casproto.PushBegin(1, "liar"))
        ids = tuple(chunk_id(v) for v in views)
        await peer.send(casproto.PushRecipe(1, ids, tuple(len(v) for v in views)))
        want = await peer.next_event()
        assert isinstance(want, casproto.PushWant)
        await peer.send_many(
            [
                casproto.Chunk(1, i, casproto.Codec.RAW, bytes(v))
                for i, v in zip(ids, views, strict=True)
            ]
        )
        await peer.send(casproto.PushEnd(1, len(data), format_digest(b"\1" * 32)))
        err = await peer.next_event()
        assert isinstance(err, casproto.Error)
        assert err.code == casproto.ErrorCode.DIGEST_MISMATCH
        assert store.list_names() == []
        assert store.stats().blobs == 0
        assert all(store.has_chunks(list(ids)))  # kept for a retry
        await peer.send(casproto.Stats(2))
        assert isinstance(await peer.next_event(), casproto.StatsResult)


async def test_chunk_bytes_that_do_not_match_their_id_are_refused() -> None:
    store = MemoryStore()
    views = chunks(os.urandom(100_000))
    async with serving(store) as (_, stream, _n):
        peer = await _raw_client(stream)
        await peer.send(casproto.PushBegin(1, None))
        cid = chunk_id(views[0])
        await peer.send(casproto.PushRecipe(1, (cid,), (len(views[0]),)))
        assert isinstance(await peer.next_event(), casproto.PushWant)
        forged = bytes(len(views[0]))
        await peer.send(casproto.Chunk(1, cid, casproto.Codec.RAW, forged))
        await peer.send(casproto.PushEnd(1, len(forged), format_digest(b"\0" * 32)))
        err = await peer.next_event()
        assert isinstance(err, casproto.Error)
        assert err.code == casproto.ErrorCode.CHUNK_CORRUPT
        assert store.has_chunks([cid]) == [False]


async def test_garbage_gets_a_fatal_error_frame_and_a_close() -> None:
    async with serving(MemoryStore()) as (ctx, stream, _n):
        peer = await _raw_client(stream)
        await stream.send_all(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
        err = await peer.next_event()
        assert isinstance(err, casproto.Error)
        assert err.rid == 0
        assert err.code == casproto.ErrorCode.MALFORMED
        assert ctx.stats.errors == 1


async def test_a_wrong_token_is_refused() -> None:
    async with serving(MemoryStore(), tokens=frozenset({"right"})) as (_, stream, _n):
        with pytest.raises(PeerRefused) as info:
            async with open_client_on_stream(stream, "mem", token="wrong"):
                pass  # pragma: no cover
        assert info.value.code_name == "UNAUTHORIZED"


async def test_disk_full_fails_the_push_cleanly() -> None:
    full = {"on": True}
    store = MemoryStore(fail_on_put=lambda cid: NoSpace("disk full") if full["on"] else None)
    data = os.urandom(300_000)
    async with client_for(store) as c:
        with pytest.raises(PeerRefused) as info:
            await c.push(iter(chunks(data)), name="big")
        assert info.value.code_name == "NO_SPACE"
        assert await c.list_names() == []
        full["on"] = False
        await c.push(iter(chunks(data)), name="big")
        assert [n for n, _ in await c.list_names()] == ["big"]


async def test_cancelling_a_push_ends_it_with_cancelled() -> None:
    async with serving(MemoryStore()) as (_, stream, _n):
        peer = await _raw_client(stream)
        await peer.send(casproto.PushBegin(7, None))
        await peer.send(casproto.Cancel(7))
        err = await peer.next_event()
        assert isinstance(err, casproto.Error)
        assert err.code == casproto.ErrorCode.CANCELLED


async def test_a_server_that_closes_mid_request_is_reported() -> None:
    raised = False
    async with (
        serving(MemoryStore()) as (_, stream, server_scope),
        open_client_on_stream(stream, "mem") as c,
    ):
        server_scope.cancel()  # the server goes away
        with pytest.raises(PeerError):
            await c.stats()
        raised = True
    assert raised
