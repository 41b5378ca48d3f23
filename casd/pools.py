"""Process-wide worker pools for work that releases the GIL (deflate, zstd, hashing).

Each is made on first use and lives as long as the process: the work comes in bursts
(a layer to re-encode, a blob to hash) and its threads hold no state between jobs, so a
pool per burst would only pay thread start-up again.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class SharedPool:
    """A ThreadPoolExecutor of ``workers`` threads named ``name-N``, made on first use."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
            return self._pool
