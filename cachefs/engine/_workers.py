"""The worker threads of a store (storage engine layer).

Hashing, compression and decompression release the GIL, so a pool of threads
uses every core for them.  The pool is made on first use and shared by ingest
and reads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class Workers:
    """A lazily made thread pool."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="cachefs-chunk")
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
