"""The push queue: what the write tiers are still to receive (storage engine layer).

A store opened with ``StoreOptions(push=True)`` (a daemon with write tiers)
queues every object that a publication adds to the store, in the publishing
transaction itself (schema: ``pushes`` in ``cachefs.format.schema``): an
object and its place in the queue survive a crash together, and the queue is
taken up again at the next start.  The pusher above (``cachefs.remote``) takes
entries in queue order and deletes each once every write tier holds its
object.  Only new objects are queued: one that was stored already was queued
when it was (or published while the store had no write tier: not pushed).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import lmdb

from cachefs.engine._index import Index, Table, lmdb_error
from cachefs.format.digest import Digest
from cachefs.format.schema import PUSH, PUSH_KEY


@dataclass(frozen=True)
class QueuedPush:
    """An object waiting to be pushed."""

    key: bytes  # its entry's key (done() takes it)
    digest: Digest
    queued_ns: int
    #: What the layer above queued with it (b"": the object alone).
    entry: bytes = b""


class PushQueue:
    """The ``pushes`` database: objects to push, in the order they were published."""

    def __init__(self, index: Index) -> None:
        self.index = index
        table = index.open_optional(b"pushes", create=True)
        assert table is not None  # created: the store is open for writing
        self.table: Table = table
        #: How many entries each object has in the queue (``wait_pushed``).
        self._waiting: Counter[Digest] = Counter()
        with index.read() as txn:
            self._next = self._after_last(txn)
            for key in self.table.keys(txn):
                _, hash_, size = PUSH_KEY.unpack(key)
                self._waiting[Digest(hash_, size)] += 1
        #: Objects being stored from the tiers themselves: not queued.
        self.from_tiers: set[Digest] = set()
        #: Called after a publication that queued objects has committed.
        self.on_queued: Callable[[], None] | None = None
        #: What the current transaction of each thread queued.
        self._local = threading.local()
        self._changed = threading.Condition()

    def _after_last(self, txn: lmdb.Transaction) -> int:
        cursor = txn.cursor(db=self.table.handle)
        return PUSH_KEY.unpack(cursor.key())[0] + 1 if cursor.last() else 0

    def add(self, txn: lmdb.Transaction, digest: Digest, entry: bytes = b"") -> None:
        """Queue ``digest`` (and ``entry``) in the write transaction ``txn``
        (write transactions run one at a time: they number entries in turn);
        not one the tiers gave (``from_tiers``)."""
        if digest in self.from_tiers:
            return
        key = PUSH_KEY.pack(self._next, digest.hash, digest.size)
        self.table.put(txn, key, PUSH.pack(time.time_ns()) + entry)
        self._next += 1
        self._queued().append(digest)
        with self._changed:  # counted before the commit: the pusher only sees it after
            self._waiting[digest] += 1

    def _queued(self) -> list[Digest]:
        queued: list[Digest] | None = getattr(self._local, "queued", None)
        if queued is None:
            queued = self._local.queued = []
        return queued

    def ended(self, committed: bool) -> None:
        """This thread's transaction ended: what it queued is there if it
        committed (tell the pusher).  Numbers of an aborted one are not used
        again: gaps do no harm."""
        queued = self._queued()
        if not queued:
            return
        if not committed:
            with self._changed:
                self._waiting.subtract(queued)
                self._waiting += Counter()  # drop what reached 0
                self._changed.notify_all()
        queued.clear()
        if committed and self.on_queued is not None:
            self.on_queued()

    def add_entry(self, digest: Digest, entry: bytes) -> None:
        """Queue a name for an object (``entry``: what the layer above pushes
        with it, e.g. a shared directory's entry), in a transaction of its own."""
        try:
            with self.index.write() as txn:
                self.add(txn, digest, entry)
        except lmdb.Error as exc:
            self.ended(False)
            raise lmdb_error(exc, "queueing an entry to push") from None
        except BaseException:
            self.ended(False)
            raise
        self.ended(True)

    def peek(self, limit: int) -> list[QueuedPush]:
        """The first ``limit`` entries, oldest first."""
        out = []
        with self.index.read() as txn:
            for key, value in self.table.items(txn):
                _, hash_, size = PUSH_KEY.unpack(key)
                queued = PUSH.unpack_from(value)[0]
                out.append(QueuedPush(key, Digest(hash_, size), queued, value[PUSH.size :]))
                if len(out) == limit:
                    break
        return out

    def done(self, keys: list[bytes]) -> None:
        """Delete entries whose objects every write tier now holds (or that are gone)."""
        if not keys:
            return
        try:
            with self.index.write() as txn:
                for key in keys:
                    self.table.delete(txn, key)
        except lmdb.Error as exc:
            raise lmdb_error(exc, "updating the push queue") from None
        with self._changed:
            for key in keys:
                _, hash_, size = PUSH_KEY.unpack(key)
                self._waiting[Digest(hash_, size)] -= 1
            self._waiting += Counter()  # drop what reached 0
            self._changed.notify_all()

    def wait_pushed(self, digest: Digest, timeout: float) -> bool:
        """Wait until no entry of ``digest`` is in the queue (every write tier
        holds it), at most ``timeout`` seconds; whether that happened."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._waiting[digest], timeout)

    def depth(self) -> tuple[int, float]:
        """How many objects wait, and the age in seconds of the oldest (0 if none)."""
        with self.index.read() as txn:
            count = self.table.count(txn)
            first = next(self.table.items(txn), None)
        if first is None:
            return 0, 0.0
        return count, max(0.0, (time.time_ns() - PUSH.unpack_from(first[1])[0]) / 1e9)


__all__ = ["PushQueue", "QueuedPush"]
