"""A nursery that surfaces one failure as itself, not wrapped in an ExceptionGroup.

trio wraps every error that leaves a nursery in an ExceptionGroup. casd's tasks fail for
one reason at a time (a peer gone, a refused request), and callers catch CasdError, so
when a group holds exactly one real error it is re-raised as that error. When every real
error is a CasdError (two halves of a batch that both found the same bad chunk), the
first is raised: the caller handles it like any other, and the rest are on its notes.
Anything else (a bug next to another error, or only Cancelled) propagates unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from casd.errors import CasdError


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(_leaves(e))
        return out
    return [exc]


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0]  # noqa: B904 - the group is the context; the leaf keeps its cause
        if real and all(isinstance(e, CasdError) for e in real):
            for other in real[1:]:
                real[0].add_note(f"also: {type(other).__name__}: {other}")
            raise real[0]  # noqa: B904
        raise
