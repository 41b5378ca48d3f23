"""A shared pool is one pool per process, made when first asked for."""

from __future__ import annotations

import threading

from casd.pools import SharedPool


def test_a_shared_pool_is_made_once_even_when_first_asked_for_at_once() -> None:
    shared = SharedPool(2, "casd-test")
    got: list[object] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        got.append(shared.get())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in got}) == 1
    pool = shared.get()
    names = {pool.submit(lambda: threading.current_thread().name).result() for _ in range(20)}
    assert names
    assert all(n.startswith("casd-test") for n in names)
