"""Chunk leases: what protects chunks stored (or found present) before their blob commits.

A push learns which chunks the store already holds, stores the rest, and commits the
blob at the end. Between the two, garbage collection must not delete any of those chunks:
otherwise the commit fails (BlobIncomplete), or a chunk the push relied on as "already
held" is gone. So whatever stores chunks ahead of a commit takes a :class:`Lease` on every
chunk id it wants **before** it asks the store which of them it holds, and releases the
lease once the blob committed (or the attempt is abandoned).

The garbage collector deletes chunks only inside :meth:`LeaseTable.frozen`, which blocks
new leases for as long as it is held: a chunk id leased before the freeze is excluded
from deletion, and a lease taken after it sees the deletion when it asks ``has_chunks``
next (and then sends the chunk again). Leases live in memory: a restart ends every push,
so there is nothing to protect across one.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class LeaseTable:
    """Reference counts of leased chunk ids. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[bytes, int] = {}

    def lease(self, ids: Iterable[bytes] = ()) -> Lease:
        """A new lease, holding ``ids`` at once."""
        lease = Lease(self)
        lease.add(ids)
        return lease

    def _add(self, ids: list[bytes]) -> None:
        with self._lock:
            counts = self._counts
            for i in ids:
                counts[i] = counts.get(i, 0) + 1

    def _drop(self, ids: Iterable[bytes]) -> None:
        with self._lock:
            counts = self._counts
            for i in ids:
                n = counts.get(i, 0) - 1
                if n > 0:
                    counts[i] = n
                else:
                    counts.pop(i, None)

    def is_leased(self, chunk_id: bytes) -> bool:
        return chunk_id in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    @contextmanager
    def frozen(self) -> Iterator[frozenset[bytes]]:
        """Block new leases (and releases) while held; yields the ids leased now.

        Whoever deletes chunks does so inside this block and spares every id it yields.
        Keep the block short: lease takers wait for it.
        """
        with self._lock:
            yield frozenset(self._counts)


class Lease:
    """A set of chunk ids held by one transfer. Release it once, when it is done.

    Usable as a context manager. A lease that is dropped without being released is
    released when it is garbage collected, so a failed transfer cannot pin chunks forever.
    """

    def __init__(self, table: LeaseTable) -> None:
        self._table = table
        self._ids: set[bytes] = set()
        # The finalizer holds the set, not the lease: it runs once, at release or at
        # collection, whichever comes first.
        self._finalizer = weakref.finalize(self, table._drop, self._ids)

    def add(self, ids: Iterable[bytes]) -> None:
        """Hold ``ids`` too (ids already held are held once)."""
        if not self._finalizer.alive:
            raise RuntimeError("lease used after release")
        fresh = [i for i in dict.fromkeys(ids) if i not in self._ids]
        if fresh:
            self._table._add(fresh)
            self._ids.update(fresh)

    def __len__(self) -> int:
        return len(self._ids)

    def release(self) -> None:
        """Let go of every id. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# Stores without a table of their own (test doubles, wrappers) get one here, per object.
_fallback: weakref.WeakKeyDictionary[Any, LeaseTable] = weakref.WeakKeyDictionary()
_fallback_lock = threading.Lock()


def leases_for(store: object) -> LeaseTable:
    """The lease table of ``store``: its ``leases`` attribute, or one kept for it here."""
    table = getattr(store, "leases", None)
    if isinstance(table, LeaseTable):
        return table
    with _fallback_lock:
        try:
            table = _fallback.get(store)
            if table is None:
                table = _fallback[store] = LeaseTable()
        except TypeError:  # not weakly referenceable: a table of its own, unshared
            return LeaseTable()
        return table
