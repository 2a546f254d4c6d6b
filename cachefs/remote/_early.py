"""The early push: chunks of content being written go up before it is published (remote layer).

A large file written into the mount is ingested as it arrives (``cachefs.fs``'s
streams): its chunks are cut, hashed and appended while the writer goes on,
but only its publication (``fsync``, the last ``close``) queues it to be
pushed.  Waiting for that leaves the bucket idle while the file is written,
and the push starts from nothing when the writer is done.  So while a
:class:`Pusher <cachefs.remote.Pusher>` runs, the store's ingest tells
:class:`EarlyPush` of every chunk it appends (``Ingest.on_appended``), and
each write tier that keeps packs (``_packs.py``) gets them in packs as soon as
a pack's worth (``PACK_BYTES``) has come, ``EARLY_AHEAD`` packs in flight at
most.  A pack is made when it goes: its chunks are read from the store then
(``LocalChunks.read_new``), and those the bucket has are left out.

When an object's push begins (``Tiers.push``), :meth:`EarlyPush.settle` takes
its chunks off the waiting list, waits for the packs in flight that hold any
of them and writes the index of the packs sent: the push then sends only
what is still missing.  Nothing here is durable or retried, and nothing
waits for it but that push: a pack that failed, chunks still waiting and
chunks dropped (more than ``EARLY_WAITING`` waiting) are the object's push's
business as ever.  Chunks of content that is never published go up all the
same, in packs that an index names or not: garbage that the bucket's
lifecycle rule removes (the README's example), as it removes a failed push's.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait

from cachefs.engine import Digest, Store
from cachefs.errors import RemoteError
from cachefs.remote._packs import INDEX_PACKS, PACK_BYTES, PackRecord, PackStore

log = logging.getLogger(__name__)

#: Packs one tier's early push has in flight at most, and chunks that wait
#: for a pack at most (more are left to their object's push).
EARLY_AHEAD, EARLY_WAITING = 4, 1 << 16
#: Chunks told lately, not taken again (an abandoned stream's come twice).
TOLD_KEPT = 1 << 16


class EarlyPush:
    """One write tier's early push of appended chunks, in packs."""

    def __init__(
        self, name: str, packs: PackStore, store: Store, pool: Executor,
        admit: Callable[[], bool], failed: Callable[[RemoteError], None],
        sent: Callable[[int, int], None],
    ) -> None:  # fmt: skip
        self.name, self.packs, self.store, self.pool = name, packs, store, pool
        #: Whether the tier takes a request now (its breaker); tell it of a failure.
        self._admit, self._failed = admit, failed
        #: Told of what went up: (chunks, bytes).
        self._sent = sent
        self._lock = threading.Lock()
        self._waiting: list[Digest] = []
        self._waiting_bytes = 0
        self._told: OrderedDict[bytes, None] = OrderedDict()
        #: Packs in flight, with the chunks each was made of.
        self._flying: dict[Future[None], frozenset[bytes]] = {}
        #: Packs sent that no index names yet.
        self._landed: list[PackRecord] = []
        self._closed = False

    def offer(self, chunks: list[tuple[bytes, int]]) -> None:
        """Chunks just appended to the store (the ingest's thread: quick, never fails)."""
        if not chunks or self._closed or not self._admit():
            return
        with self._lock:
            for digest, size in chunks:
                if digest in self._told:
                    continue
                self._told[digest] = None
                if len(self._told) > TOLD_KEPT:
                    self._told.popitem(last=False)
                if len(self._waiting) < EARLY_WAITING:
                    self._waiting.append(Digest(digest, size))
                    self._waiting_bytes += size
            self._launch()

    def _launch(self) -> None:
        """Send a pack for each pack's worth waiting, as room in flight allows
        (holding the lock)."""
        while (
            not self._closed and len(self._flying) < EARLY_AHEAD
            and self._waiting_bytes >= PACK_BYTES
        ):  # fmt: skip
            size = taken = 0
            for taken, digest in enumerate(self._waiting, 1):  # noqa: B007
                size += digest.size
                if size >= PACK_BYTES:
                    break
            group, self._waiting = self._waiting[:taken], self._waiting[taken:]
            self._waiting_bytes -= size
            try:
                future = self.pool.submit(self._send, group)
            except RuntimeError:  # the pool is shut down: the pusher stops
                self._closed = True
                return
            self._flying[future] = frozenset(d.hash for d in group)
            future.add_done_callback(self._done)

    def _send(self, group: list[Digest]) -> None:
        """Upload one pack of the chunks of ``group`` the bucket lacks and
        this store still has (a worker thread)."""
        try:
            blobs = []
            for digest in self.packs.missing(group):
                data = self.store.chunks.read_new(digest.hash, digest.size)
                if data is not None:
                    blobs.append((digest, data))
            if not blobs:
                return
            record = self.packs.put_pack(blobs)
        except RemoteError as exc:
            self._failed(exc)
            log.info("%s: early push of %d chunks failed (their objects' pushes send them): %s",
                     self.name, len(group), exc.message)  # fmt: skip
            return
        with self._lock:
            self._landed.append(record)
            full = len(self._landed) >= INDEX_PACKS
            records, self._landed = (self._landed, []) if full else ([], self._landed)
        self._sent(len(blobs), sum(d.size for d, _ in blobs))
        if records:
            self._index(records)

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._flying.pop(future, None)
            self._launch()
        if not future.cancelled() and future.exception() is not None:
            log.error("%s: early push failed", self.name, exc_info=future.exception())

    def _index(self, records: list[PackRecord]) -> None:
        """Write the index of packs sent: their chunks count from now on."""
        try:
            self.packs.put_index(records)
        except RemoteError as exc:
            self._failed(exc)
            log.info("%s: the index of %d early packs was not written (their chunks go again): %s",
                     self.name, len(records), exc.message)  # fmt: skip

    def settle(self, chunks: set[bytes]) -> None:
        """An object of ``chunks`` is about to be pushed: none of them waits
        any more, the packs in flight with any of them land, and the packs
        sent are indexed (what the push asks for next is what they lack)."""
        with self._lock:
            if self._waiting and not chunks.isdisjoint(d.hash for d in self._waiting):
                kept = [d for d in self._waiting if d.hash not in chunks]
                self._waiting, self._waiting_bytes = kept, sum(d.size for d in kept)
            mine = [f for f, held in self._flying.items() if not chunks.isdisjoint(held)]
        wait(mine)
        with self._lock:
            ours = any(not chunks.isdisjoint(d.hash for d in r.chunks) for r in self._landed)
            records, self._landed = (self._landed, []) if ours else ([], self._landed)
        if records:
            self._index(records)

    def close(self) -> None:
        """Send nothing more (the pusher stops); what flies is cancelled or lands."""
        with self._lock:
            self._closed = True
            self._waiting, self._waiting_bytes = [], 0
            flying = list(self._flying)
        for future in flying:
            future.cancel()
        wait(flying)


__all__ = ["EARLY_AHEAD", "EARLY_WAITING", "EarlyPush"]
