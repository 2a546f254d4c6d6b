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
most per tier.  A pack is made when it goes: its chunks are read from the
store then (``LocalChunks.read_new``), and those the bucket has are left out.

When an object's push begins (``Tiers.push``), :meth:`EarlyPush.settle` takes
its chunks off the waiting list, waits for the packs in flight that hold any
of them and writes the index of the packs sent: the push then sends only
what is still missing.  Nothing here is durable or retried, and nothing
waits for it but that push: a pack that failed, chunks still waiting and
chunks dropped (more than ``EARLY_WAITING`` waiting, or told while the early
push rests after a failure) are the object's push's business as ever.  A
failure does not count against the tier's breaker (the push's own requests
say whether it is down); it makes the early push rest ``EARLY_REST`` seconds.

Chunks of content that is never published go up all the same: their packs
are indexed with the next ones, or not at all (garbage that the bucket's
lifecycle rule removes, as it removes a failed push's).  A pack is never
indexed more than ``INDEX_WITHIN`` seconds after it was written: the
lifecycle rule expires indexes a day before packs, which holds only for an
index written soon after its packs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future

from cachefs.engine import Digest, Store
from cachefs.errors import RemoteError
from cachefs.remote._packs import INDEX_PACKS, PACK_BYTES, PackRecord, PackStore

log = logging.getLogger(__name__)

#: Packs one tier's early push has in flight at most, and chunks that wait
#: for a pack at most (more are left to their object's push).
EARLY_AHEAD, EARLY_WAITING = 4, 1 << 16
#: Chunks told lately, not taken again (an abandoned stream's come twice).
TOLD_KEPT = 1 << 16
#: Seconds the early push rests after a failure.
EARLY_REST = 30.0
#: Seconds after its upload within which a pack may be indexed (else never).
INDEX_WITHIN = 3600.0


class _Flight:
    """A pack on its way: its chunks, and set once it landed or failed."""

    __slots__ = ("chunks", "done", "future")

    def __init__(self, chunks: frozenset[bytes]) -> None:
        self.chunks = chunks
        self.done = threading.Event()
        self.future: Future[None] | None = None


class EarlyPush:
    """One write tier's early push of appended chunks, in packs."""

    def __init__(
        self, name: str, packs: PackStore, store: Store, pool: Executor,
        healthy: Callable[[], bool], sent: Callable[[int, int], None],
        clock: Callable[[], float] = time.time,  # wall time: it runs on in a suspend
    ) -> None:  # fmt: skip
        self.name, self.packs, self.store, self.pool = name, packs, store, pool
        #: Whether the tier is up (its breaker), and what to tell of what
        #: went up, (chunks, bytes), once indexed.
        self._healthy, self._sent, self._clock = healthy, sent, clock
        self._lock = threading.Lock()
        #: Held while an index of landed packs is written: a settle waits for it.
        self._indexing = threading.Lock()
        self._waiting: list[Digest] = []
        self._waiting_bytes = 0
        self._told: OrderedDict[bytes, None] = OrderedDict()
        self._flying: dict[int, _Flight] = {}
        self._numbers = itertools.count()
        #: Packs sent that no index names yet, with when they landed.
        self._landed: list[tuple[float, PackRecord]] = []
        self._resting_until = 0.0
        self._closed = False

    def offer(self, chunks: list[tuple[bytes, int]]) -> None:
        """Chunks just appended to the store (the ingest's thread: quick, never fails)."""
        if not chunks or self._closed or self._resting() or not self._healthy():
            return
        with self._lock:
            if self._closed:
                return
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
        (holding the lock; the task takes it only once it is done)."""
        while (
            not self._closed and len(self._flying) < EARLY_AHEAD
            and self._waiting_bytes >= PACK_BYTES
        ):  # fmt: skip
            # At most PACK_BYTES, as ``pack_groups`` cuts them (a read asks for
            # a whole pack at once); a larger chunk is a pack of its own.
            size = taken = 0
            for digest in self._waiting:
                if taken and size + digest.size > PACK_BYTES:
                    break
                size, taken = size + digest.size, taken + 1
            group, self._waiting = self._waiting[:taken], self._waiting[taken:]
            self._waiting_bytes -= size
            number, flight = next(self._numbers), _Flight(frozenset(d.hash for d in group))
            try:
                flight.future = self.pool.submit(self._send, number, group)
            except RuntimeError:  # the pool is shut down: the tiers are closing
                self._closed = True
                return
            self._flying[number] = flight

    def _send(self, number: int, group: list[Digest]) -> None:
        """Upload one pack of the chunks of ``group`` the bucket lacks and
        this store still has (a worker thread)."""
        record: PackRecord | None = None
        try:
            blobs = []
            for digest in self.packs.missing(group):
                data = self.store.chunks.read_new(digest.hash, digest.size)
                if data is not None:
                    blobs.append((digest, data))
            if blobs:
                record = self.packs.put_pack(blobs)
        except RemoteError as exc:
            self._rest(f"early push of {len(group)} chunks", exc)
        except Exception:  # a bug: logged, and the push sends them
            log.exception("%s: early push of %d chunks failed", self.name, len(group))
        finally:
            with self._lock:
                if record is not None:
                    self._landed.append((self._clock(), record))
                flight = self._flying.pop(number, None)  # None: the pool failed to start it
                full = len(self._landed) >= INDEX_PACKS
                self._launch()
            if flight is not None:
                flight.done.set()
        if full:
            self._index()

    def _resting(self) -> bool:
        return self._clock() < self._resting_until

    def _rest(self, what: str, exc: RemoteError) -> None:
        self._resting_until = self._clock() + EARLY_REST
        with self._lock:
            self._waiting, self._waiting_bytes = [], 0
        log.info("%s: %s failed (the pushes of their objects send them; resting %.0f s): %s",
                 self.name, what, EARLY_REST, exc.message)  # fmt: skip

    def _index(self, chunks: frozenset[bytes] | None = None) -> None:
        """Write the index of the packs landed (if any holds one of
        ``chunks``, when given): their chunks count from now on."""
        with self._indexing:
            with self._lock:
                if chunks is not None and not any(
                    not chunks.isdisjoint(d.hash for d in r.chunks) for _, r in self._landed
                ):
                    return
                landed, self._landed = self._landed, []
            oldest = self._clock() - INDEX_WITHIN
            records = [record for when, record in landed if when >= oldest]
            if not records:
                return
            try:
                self.packs.put_index(records)
            except RemoteError as exc:
                self._rest(f"the index of {len(records)} early packs", exc)
                return
            except Exception:  # a bug: logged, and the pushes send their chunks
                log.exception("%s: writing the index of %d early packs", self.name, len(records))
                return
            sent = [d for record in records for d in record.chunks]
            self._sent(len(sent), sum(d.size for d in sent))

    def settle(self, chunks: set[bytes]) -> None:
        """An object of ``chunks`` is about to be pushed: none of them waits
        any more, the packs in flight with any of them land, and the packs
        sent are indexed (what the push asks for next is what they lack)."""
        ours = frozenset(chunks)
        with self._lock:
            if self._waiting and not ours.isdisjoint(d.hash for d in self._waiting):
                kept = [d for d in self._waiting if d.hash not in ours]
                self._waiting, self._waiting_bytes = kept, sum(d.size for d in kept)
            mine = [f for f in self._flying.values() if not ours.isdisjoint(f.chunks)]
        for flight in mine:
            flight.done.wait()
        self._index(ours)  # waits too for an index of them being written

    def close(self) -> None:
        """Send nothing more (the tiers close): packs not started are
        cancelled, those in flight land, and what landed is indexed."""
        with self._lock:
            self._closed = True
            self._waiting, self._waiting_bytes = [], 0
            flying = list(self._flying.values())
        for flight in flying:
            if flight.future is not None and flight.future.cancel():
                flight.done.set()  # it never runs
            flight.done.wait()
        if self._healthy() and not self._resting():  # never a wait on a tier that is down
            self._index()


__all__ = ["EARLY_AHEAD", "EARLY_WAITING", "EarlyPush"]
