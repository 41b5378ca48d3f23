"""Named operations a client runs with CALL (SPEC §4.5): ``gc``, ``oci.import``, ...

Each operation is an async function of the server context, its argument document and a
progress callback, returning a result document. Modules that own an operation register
it here with :func:`operation`; the daemon imports them through :func:`load_builtin`.
The table, not the session code, says which scope each operation needs.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from casd.auth import Scope
from casd.errors import UserError
from casd.nursery import open_nursery

if TYPE_CHECKING:
    from casd.server.service import ServerContext


class Progress(Protocol):
    """How an operation reports while it runs: ``await progress(counters)`` sends a
    CALL_PROGRESS (at most a few a second unless ``force``); ``await progress.data(piece)``
    sends the next piece of the operation's byte stream as CALL_DATA, for operations that
    stream (it waits while the connection is busy: the receiver paces the stream)."""

    async def __call__(
        self, progress: dict[str, int | float | str], force: bool = False
    ) -> None: ...

    async def data(self, piece: bytes) -> None: ...


Document = dict[str, Any]
Run = Callable[["ServerContext", Document, Progress], Awaitable[Document]]


@dataclass(frozen=True)
class Operation:
    name: str
    scope: Scope
    run: Run
    summary: str


OPERATIONS: dict[str, Operation] = {}

# Modules whose import registers operations.
_BUILTIN_MODULES = ("casd.gc", "casd.oci.ops", "casd.blobdelta", "casd.chunkdelta")


def operation(name: str, scope: Scope, summary: str) -> Callable[[Run], Run]:
    """Register ``fn`` as the operation ``name``, which needs ``scope``."""

    def register(fn: Run) -> Run:
        if name in OPERATIONS:
            raise RuntimeError(f"operation {name!r} registered twice")
        OPERATIONS[name] = Operation(name, scope, fn, summary)
        return fn

    return register


def load_builtin() -> dict[str, Operation]:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside the module
                raise
    return OPERATIONS


def lookup(name: str) -> Operation | None:
    return load_builtin().get(name)


class Unsupported(UserError):
    """The server has no operation of that name."""


# --- argument helpers: turn a bad document into an error the user can act on ---------


def arg_str(args: Document, key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str):
        raise UserError(f"argument {key!r} must be text")
    return value


def arg_opt_str(args: Document, key: str) -> str | None:
    value = args.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"argument {key!r} must be text")
    return value


def arg_bool(args: Document, key: str, default: bool = False) -> bool:
    value = args.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"argument {key!r} must be true or false")
    return value


def arg_number(args: Document, key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"argument {key!r} must be a number")
    return float(value)


# --- streaming operations -------------------------------------------------------------


class ThreadClock:
    """The thread CPU seconds of the calls made through it (an operation's work in worker
    threads, so waiting for the GIL or a busy core does not count)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        c0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.seconds += time.thread_time() - c0


async def stream_steps(
    run: Callable[..., Awaitable[Any]],
    step: Callable[[], bytes | None],
    progress: Progress,
    clock: ThreadClock,
) -> int:
    """Call ``step`` (through ``run``, timed by ``clock``) until it returns None, sending
    each piece it makes as CALL_DATA while the next one is made (two in hand at most);
    the bytes sent."""
    pieces_in, pieces_out = trio.open_memory_channel[bytes](2)
    sent = 0

    async def produce() -> None:
        async with pieces_in:
            while (piece := await run(clock, step)) is not None:
                if piece:
                    await pieces_in.send(piece)

    async with open_nursery() as nursery, pieces_out:
        nursery.start_soon(produce)
        async for piece in pieces_out:
            await progress.data(piece)
            sent += len(piece)
    return sent
