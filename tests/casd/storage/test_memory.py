from __future__ import annotations

from collections.abc import Iterator

from casd.storage.memory import MemoryStore
from casd.storage.testing import StoreConformance


class TestMemoryStore(StoreConformance):
    def make_store(self) -> Iterator[MemoryStore]:
        yield MemoryStore()


def test_fail_on_put_hook_fails_the_batch() -> None:
    from casd.errors import NoSpace
    from casd.storage.testing import make_chunk

    store = MemoryStore(fail_on_put=lambda cid: NoSpace("full"))
    c = make_chunk(b"data")
    try:
        store.put_chunks([c])
    except NoSpace:
        pass
    else:  # pragma: no cover
        raise AssertionError("the hook did not fire")
    assert store.has_chunks([c.id]) == [False]
