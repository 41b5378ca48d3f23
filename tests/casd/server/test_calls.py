"""CALL (SPEC §4.5): named operations, their scopes, progress and errors, in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import casproto
import pytest
import trio
import trio.testing

from casd.auth import Scope, TokenTable
from casd.client import Client, open_client_on_stream
from casd.errors import PeerRefused, UserError
from casd.peer import PeerConnection
from casd.server import ops
from casd.server.service import ServerContext, Session
from casd.storage.memory import MemoryStore


@ops.operation("test.echo", Scope.WRITE, "echo the arguments back, with progress")
async def _echo(ctx: ServerContext, args: ops.Document, progress: ops.Progress) -> ops.Document:
    for n in range(3):
        await progress({"step": n}, True)  # type: ignore[call-arg]
    if args.get("fail"):
        raise UserError("asked to fail")
    return {"echo": args, "blobs": ctx.store.stats().blobs}


@asynccontextmanager
async def connected(scope: Scope) -> AsyncIterator[Client]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ctx = ServerContext(store=MemoryStore(), tokens=TokenTable.build([("t", scope)]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Session(ctx, PeerConnection(server_stream, casproto.Role.SERVER)).run)
        async with open_client_on_stream(client_stream, "mem", token="t") as client:  # type: ignore[arg-type]
            yield client
        nursery.cancel_scope.cancel()


async def test_a_call_returns_its_document_after_its_progress() -> None:
    seen: list[dict[str, object]] = []
    async with connected(Scope.WRITE) as c:
        args = {"n": 1, "nested": {"list": (1, "two", None, b"\x00")}}
        result = await c.call("test.echo", args, on_progress=seen.append)
    assert result == {"echo": args, "blobs": 0}
    assert [p["step"] for p in seen] == [0, 1, 2]


async def test_an_unknown_operation_is_unsupported_and_names_the_known_ones() -> None:
    async with connected(Scope.ADMIN) as c:
        with pytest.raises(PeerRefused) as info:
            await c.call("no.such.op")
        assert info.value.code_name == "UNSUPPORTED"
        assert "test.echo" in str(info.value)
        # The connection goes on serving.
        assert (await c.call("test.echo"))["blobs"] == 0


async def test_an_operation_needs_its_scope() -> None:
    async with connected(Scope.READ) as c:
        with pytest.raises(PeerRefused) as info:
            await c.call("test.echo")
        assert info.value.code_name == "FORBIDDEN"
        assert "write token" in str(info.value)


async def test_a_failing_operation_reports_a_user_error_as_invalid() -> None:
    async with connected(Scope.WRITE) as c:
        with pytest.raises(PeerRefused) as info:
            await c.call("test.echo", {"fail": True})
        assert info.value.code_name == "INVALID"
        assert "asked to fail" in str(info.value)


def test_argument_helpers_explain_wrong_types() -> None:
    with pytest.raises(UserError, match="'name' must be text"):
        ops.arg_str({"name": 3}, "name")
    with pytest.raises(UserError, match="must be true or false"):
        ops.arg_bool({"x": "yes"}, "x")
    with pytest.raises(UserError, match="must be a number"):
        ops.arg_number({"x": True}, "x", 1.0)
    assert ops.arg_number({}, "x", 2.5) == 2.5
