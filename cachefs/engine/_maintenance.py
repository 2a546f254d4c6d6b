"""Maintenance: what gc and fsck --repair may do to a store (storage engine layer).

Puts hold the store's :class:`MaintenanceLock` shared from ingest to
publication, so that a chunk found in the index cannot be collected before the
object that found it is published.  Maintenance (``Store.maintenance()``)
holds it exclusively, with the commit lock: no put and no publication runs
meanwhile.  The exclusive side has priority: once maintenance waits, new puts
wait behind it, so that a steady stream of puts cannot starve gc.  A thread
that holds the lock shared may take it again without waiting (``put_files``
holds it across its yields, and the caller may ``put`` meanwhile); a shared
holder must not wait for another thread's shared acquisition, which would wait
behind the pending maintenance.

:class:`Maintenance` is the interface gc and fsck use while they hold the
store: the index, the segment files, moving records and deleting segments --
the engine's own sequences, so that maintenance never reaches into the store's
parts itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cachefs.engine._activity import Activity
from cachefs.engine._health import Health
from cachefs.engine._index import Index
from cachefs.engine._publish import Publisher
from cachefs.engine._reads import LocalChunks
from cachefs.engine._segments import SegmentStore
from cachefs.format.segment import Record


class MaintenanceLock:
    """A lock held shared by many threads or exclusively by one; a waiting
    exclusive holder goes before shared holders that come after it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._holders: dict[int, int] = {}  # thread -> how many times it holds it shared
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting

    @property
    def pending(self) -> bool:
        """Whether maintenance holds the lock or waits for it (a shared
        acquisition would wait)."""
        return self._exclusive or self._waiting > 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if not self._holders.get(me):  # (a holder again: maintenance waits for it anyway)
                self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._holders[me] = self._holders.get(me, 0) + 1
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if self._holders[me] == 1:
                    del self._holders[me]
                else:
                    self._holders[me] -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Maintenance:
    """The store, held exclusively by gc or fsck --repair."""

    def __init__(
        self,
        index: Index,
        segments: SegmentStore,
        publisher: Publisher,
        chunks: LocalChunks,
        health: Health,
        activity: Activity,
        *,
        fsync: bool,
    ) -> None:
        self.index = index
        #: Where gc counts its runs.
        self.activity = activity
        self._segments = segments
        self._publisher = publisher
        self._chunks = chunks
        self._health = health
        self._fsync = fsync

    def segment_path(self, shard: int, segment_id: int) -> Path:
        return self._segments.path(shard, segment_id)

    @property
    def segments_root(self) -> Path:
        return self._segments.root

    def active_segments(self) -> set[int]:
        """Segments appended to or to be continued: never compacted or deleted."""
        return self._segments.active()

    def seal(self, segment_ids: set[int]) -> None:
        """Stop appending to these segments (so that they can be compacted)."""
        self._segments.seal(segment_ids)

    def read_record(self, segment_id: int, path: Path, offset: int, stored_len: int) -> Record:
        return self._segments.read_record(segment_id, path, offset, stored_len)

    def move_records(self, segment_id: int, shard: int, path: Path, live: list[Record]) -> int:
        """Copy the live records of a sealed segment to its shard's active
        segment, point the index at the copies in one transaction, then delete
        the old file; returns the bytes its deletion freed.

        Crash safety: before the transaction the copies are unpublished bytes
        that the next writer cuts off; after it, the old file is an unpublished
        segment that the next writer deletes.  The index is synced between the
        transaction and the deletion."""
        self._publisher.move_records(segment_id, shard, live)
        self.sync_index()
        return self.delete_segment(segment_id, path)

    def delete_segment(self, segment_id: int, path: Path) -> int:
        """Delete a segment file the index no longer names; the bytes freed."""
        return self._segments.delete(segment_id, path)

    def sync_index(self) -> None:
        """Make the last transaction durable before deleting a file it stopped
        using: the index commits without syncing its meta page, so a machine
        crash could otherwise undo the transaction after the file is gone."""
        if self._fsync:
            self.index.sync()

    def suspect(self) -> None:
        """Maintenance found damage it leaves alone: the store needs fsck."""
        self._health.suspect()

    def settle(self) -> None:
        """After a repair: every chunk the index still names is intact; no
        cached chunk may stand for a dropped one."""
        self._segments.damaged.clear()
        self._chunks.cache.clear()
        self._health.repaired()
