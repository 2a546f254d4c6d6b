"""Publication: making ingested objects visible, and reference counts (storage engine layer).

Publishing is the only step that makes an object visible.  Segment bytes a
publication refers to are fdatasync'ed before its transaction commits, and the
transaction also records each touched segment's published length, so after a
crash a writer cuts every segment back to what was published.  An object is
therefore wholly present or wholly absent, whatever moment a crash hits.

Publications are serialised by ``commit_lock`` and grouped: a thread that takes
the lock publishes every publication queued so far in one transaction (group
commit), so concurrent puts share one fdatasync.  Moving records (gc
compaction, fsck repair) is a publication too: copies are synced, then one
transaction points the index at them (:meth:`Publisher.move_records`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lmdb

from cachefs import tracing
from cachefs.engine._activity import Activity
from cachefs.engine._health import Health
from cachefs.engine._index import Index, lmdb_error
from cachefs.engine._pushes import PushQueue
from cachefs.engine._segments import Dirty, Location, SegmentStore
from cachefs.errors import CachefsError, CorruptDataError
from cachefs.format.digest import Digest
from cachefs.format.schema import ChunkEntry, ObjectEntry, SegmentEntry, chunk_uses
from cachefs.format.segment import RECORD_HEADER, Record, shard_of

log = logging.getLogger(__name__)

#: Called with the publishing transaction and the object's digest; it may
#: record the reference it now owns elsewhere in the index (the namespace).
PublishHook = Callable[[lmdb.Transaction, Digest], None]
#: Told of each publication once it is committed: (seconds, objects, logical
#: bytes); see ``Store.on_publish``.
PublishObserver = Callable[[float, int, int], None]
#: Gets (or makes) the entry of a segment being published: (segment id, shard).
SegmentGetter = Callable[[int, int], SegmentEntry]


@dataclass
class PendingObject:
    """An ingested object waiting to be published."""

    digest: Digest
    chunks: list[tuple[bytes, int]]
    locations: dict[bytes, Location]
    #: Called inside the publishing transaction, after the object's reference
    #: was added (see ``Store.put``).
    on_publish: PublishHook | None = None


class _Ticket:
    __slots__ = ("done", "durable", "error", "objects")

    def __init__(self, objects: list[PendingObject], durable: bool) -> None:
        self.objects = objects
        self.durable = durable
        self.done = False
        self.error: BaseException | None = None


class Publisher:
    """Group commit of publications, and the references objects hold."""

    def __init__(
        self,
        index: Index,
        segments: SegmentStore,
        health: Health,
        object_entry: Callable[..., ObjectEntry],
        activity: Activity,
        *,
        fsync: bool,
        forget: Callable[[Digest], None],
    ) -> None:
        self.index = index
        #: The checked index entry of an object (ObjectNotFoundError if absent).
        self.object_entry = object_entry
        #: Told of an object that went (the reader's kept layouts of it go too).
        self.forget = forget
        self.segments = segments
        self.health = health
        self.activity = activity
        self.fsync = fsync
        self.commit_lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self._queue_lock = threading.Lock()
        #: References dropped since the store was opened (whether gc may find
        #: garbage that it did not find last time).
        self.dropped = 0
        #: Where new objects are queued for the write tiers (None: no tiers).
        self.pushes: PushQueue | None = None
        #: Told of each publication (``Store.on_publish``).
        self.on_publish: PublishObserver | None = None

    # --- publishing -----------------------------------------------------------

    def publish(self, objects: list[PendingObject], *, durable: bool) -> None:
        """Make ``objects`` visible, atomically each (group commit with other threads).

        The thread that commits traces the commit (``cachefs publish``, inside
        a traced request), counts
        the publication in ``activity`` and then, out of the commit lock, tells
        ``on_publish`` of it."""
        ticket = _Ticket(objects, durable)
        with self._queue_lock:
            self._queue.append(ticket)
        committed: tuple[float, int, int] | None = None
        with self.commit_lock:
            if not ticket.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                published = [o for t in batch for o in t.objects]
                attributes = {"cachefs.objects": len(published)}
                try:
                    start = time.monotonic()
                    with tracing.child_span("cachefs publish", attributes=attributes):
                        self._commit(published, durable=any(t.durable for t in batch))
                except BaseException as exc:
                    for t in batch:
                        t.error = exc
                    raise
                finally:
                    for t in batch:
                        t.done = True
                if published:
                    size = sum(o.digest.size for o in published)
                    committed = (time.monotonic() - start, len(published), size)
                    self.activity.published(*committed)
        if ticket.error is not None:
            raise ticket.error
        observer = self.on_publish
        if committed is not None and observer is not None:
            try:
                observer(*committed)
            except Exception:  # an observer's bug: the objects are published all the same
                log.exception("the observer of publications failed")

    def publish_lengths(
        self, txn: lmdb.Transaction, dirty: Dirty, segments: dict[int, SegmentEntry]
    ) -> SegmentGetter:
        """Load the entries of dirty segments into ``segments`` with their new
        lengths; return a getter for further entries (all written by the caller)."""

        def segment(segment_id: int, shard: int) -> SegmentEntry:
            entry = segments.get(segment_id)
            if entry is None:
                entry = self.index.get_segment(txn, segment_id) or SegmentEntry(shard, 0, 0, 0)
                segments[segment_id] = entry
            return entry

        for segment_id, (writer, length) in dirty.items():
            entry = segment(segment_id, writer.shard)
            entry.length = max(entry.length, length)
        self.index.set_counter(
            txn,
            "next_segment_id",
            max(self.index.counter(txn, "next_segment_id"), self.segments.next_segment_id),
        )
        return segment

    def _commit(self, objects: list[PendingObject], *, durable: bool) -> None:
        sync = durable and self.fsync
        dirty = self.segments.snapshot(sync)
        try:
            with self.index.write() as txn:
                segments: dict[int, SegmentEntry] = {}
                segment = self.publish_lengths(txn, dirty, segments)
                deltas: Counter[str] = Counter()
                for obj in objects:
                    self._publish_one(txn, obj, segment, deltas)
                for name, delta in deltas.items():
                    self.index.add(txn, name, delta)
                for segment_id, entry in segments.items():
                    self.index.put_segment(txn, segment_id, entry)
        except BaseException as exc:
            if self.pushes is not None:
                self.pushes.ended(False)
            if isinstance(exc, lmdb.Error):
                raise lmdb_error(exc, "publishing objects") from None
            raise
        if self.pushes is not None:
            self.pushes.ended(True)
        failure: CachefsError | None = None
        if sync:
            try:
                self.index.sync()
            except CachefsError as exc:  # committed all the same: the callers must know
                exc.committed = True
                failure = exc
        self.segments.forget_pending(d for obj in objects for d in obj.locations)
        self.segments.published(dirty)
        if failure is not None:
            raise failure

    def _publish_one(
        self,
        txn: lmdb.Transaction,
        obj: PendingObject,
        segment: SegmentGetter,
        deltas: Counter[str],
    ) -> None:
        """Publish one object in ``txn``; counter changes are added to ``deltas``."""
        index = self.index
        key = obj.digest.hash
        existing = index.get_object_head(txn, key)
        if existing is not None and existing.size == obj.digest.size:
            existing.refcount += 1
            index.put_object(txn, key, existing)
            # Chunks of it that were lost, or held remotely, have just been stored again.
            for digest, fresh in obj.locations.items():
                entry = index.get_chunk(txn, digest)
                if entry is not None and not self.segments.usable(entry):
                    self._relocate(entry, fresh, digest, segment, deltas)
                    index.put_chunk(txn, digest, entry)
        else:
            if existing is not None:
                raise CorruptDataError(
                    f"object {obj.digest.hex} is indexed with size {existing.size}, "
                    f"not {obj.digest.size}"
                )
            lengths = dict(obj.chunks)
            for digest, count in chunk_uses(obj.chunks).items():
                entry = index.get_chunk(txn, digest)
                location = obj.locations.get(digest)
                if entry is not None:
                    if location is not None and not self.segments.usable(entry):
                        self._relocate(entry, location, digest, segment, deltas)
                    entry.refcount += count
                    index.put_chunk(txn, digest, entry)
                    continue
                if location is None:
                    raise CachefsError(
                        f"chunk {digest.hex()} vanished before its object was published",
                        hint="this is a bug in cachefs; please report it",
                    )
                raw_len = lengths[digest]
                record_size = RECORD_HEADER.size + location.stored_len
                index.put_chunk(
                    txn,
                    digest,
                    ChunkEntry(
                        location.segment_id,
                        location.offset,
                        raw_len,
                        location.stored_len,
                        location.flags,
                        count,
                    ),
                )
                seg = segment(location.segment_id, shard_of(digest, self.segments.params))
                seg.live_bytes += record_size
                seg.live_records += 1
                deltas["chunks"] += 1
                deltas["chunk_bytes"] += raw_len
                deltas["stored_bytes"] += record_size
            index.put_object(txn, key, ObjectEntry(obj.digest.size, 1, obj.chunks))
            deltas["objects"] += 1
            if self.pushes is not None:
                self.pushes.add(txn, obj.digest)
        deltas["files"] += 1
        deltas["logical_bytes"] += obj.digest.size
        if obj.on_publish is not None:
            # Counted before the hook, which may drop the reference again (and
            # with it the object): its counters must not go below zero meanwhile.
            for name in ("objects", "files", "logical_bytes"):
                self.index.add(txn, name, deltas.pop(name, 0))
            obj.on_publish(txn, obj.digest)

    def _relocate(
        self,
        entry: ChunkEntry,
        location: Location,
        digest: bytes,
        segment: SegmentGetter,
        deltas: Counter[str],
    ) -> None:
        """Point an index entry whose record was lost, or that is held
        remotely, at a fresh copy."""
        shard = shard_of(digest, self.segments.params)
        remote = entry.remote
        if not remote:
            old = segment(entry.segment_id, shard)
            old.live_bytes = max(0, old.live_bytes - entry.record_size)
            old.live_records = max(0, old.live_records - 1)
        new = segment(location.segment_id, shard)
        new.live_bytes += RECORD_HEADER.size + location.stored_len
        new.live_records += 1
        deltas["stored_bytes"] += RECORD_HEADER.size + location.stored_len - entry.record_size
        entry.segment_id, entry.offset = location.segment_id, location.offset
        entry.stored_len, entry.flags = location.stored_len, location.flags
        if not remote:
            log.warning(
                "chunk %s was lost or damaged and is stored again (gc or fsck --repair drops "
                "the damaged record)",
                digest.hex(),
            )

    def replace_chunks(self, locations: dict[bytes, Location]) -> int:
        """Point the index entries of damaged (or held-remotely) chunks at the
        fresh copies appended at ``locations`` (the caller holds the commit
        lock), in one publication; how many were (a chunk no longer indexed
        is not: its copy is garbage for gc)."""
        dirty = self.segments.snapshot(self.fsync)
        replaced = 0
        with self.write_txn("storing healed or fetched chunks") as txn:
            segments: dict[int, SegmentEntry] = {}
            segment = self.publish_lengths(txn, dirty, segments)
            deltas: Counter[str] = Counter()
            for digest, location in locations.items():
                entry = self.index.get_chunk(txn, digest)
                if entry is None:
                    continue
                self._relocate(entry, location, digest, segment, deltas)
                self.index.put_chunk(txn, digest, entry)
                replaced += 1
            for name, delta in deltas.items():
                self.index.add(txn, name, delta)
            for segment_id, seg in segments.items():
                self.index.put_segment(txn, segment_id, seg)
        if self.fsync:
            self.index.sync()
        self.segments.forget_pending(locations)
        self.segments.published(dirty)
        return replaced

    def move_records(self, segment_id: int, shard: int, live: list[Record]) -> None:
        """Copy ``live`` (the records of a sealed segment that the index points
        to) to the shard's active segment, then in one transaction point the
        index at the copies, publish the new lengths and drop the old segment's
        entry (the caller holds the commit lock, and deletes the old file once
        the index is synced)."""
        moved = self.segments.copy_records(shard, live)
        dirty = self.segments.snapshot(self.fsync)
        index = self.index
        with index.write() as txn:
            segments: dict[int, SegmentEntry] = {}
            segment = self.publish_lengths(txn, dirty, segments)
            for digest, location in moved.items():
                chunk = index.get_chunk(txn, digest)
                if chunk is None:
                    continue
                chunk.segment_id = location.segment_id
                chunk.offset = location.offset
                index.put_chunk(txn, digest, chunk)
                target = segment(location.segment_id, shard)
                target.live_bytes += RECORD_HEADER.size + location.stored_len
                target.live_records += 1
            segments.pop(segment_id, None)
            for seg_id, seg_entry in segments.items():
                index.put_segment(txn, seg_id, seg_entry)
            index.delete_segment(txn, segment_id)
        self.segments.published(dirty)

    # --- references ---------------------------------------------------------------

    @contextmanager
    def write_txn(self, what: str) -> Iterator[lmdb.Transaction]:
        try:
            with self.index.write() as txn:
                yield txn
        except lmdb.Error as exc:
            raise lmdb_error(exc, what) from None

    def add_ref(self, txn: lmdb.Transaction, digest: Digest) -> None:
        """Add a reference to a stored object, inside the caller's transaction."""
        entry = self.object_entry(txn, digest, head=True)
        entry.refcount += 1
        self.index.put_object(txn, digest.hash, entry)
        self.index.add(txn, "files", 1)
        self.index.add(txn, "logical_bytes", digest.size)

    def drop_ref(self, txn: lmdb.Transaction, digest: Digest) -> bool:
        """Drop a reference inside the caller's transaction; when it was the
        last, the object goes (its chunks become garbage for ``gc`` if nothing
        else uses them).  Returns whether the object is gone."""
        entry = self.object_entry(txn, digest, head=True)
        self.dropped += 1
        self.index.add(txn, "files", -1)
        self.index.add(txn, "logical_bytes", -digest.size)
        if entry.refcount > 1:
            entry.refcount -= 1
            self.index.put_object(txn, digest.hash, entry)
            return False
        if entry.pages is not None:  # its chunks lose a reference: the whole recipe
            entry = self.object_entry(txn, digest)
        self.index.delete_object(txn, digest.hash)
        self.index.add(txn, "objects", -1)
        self.forget(digest)  # (a cache: forgotten even if the transaction fails)
        for chunk, count in entry.chunk_uses().items():
            chunk_entry = self.index.get_chunk(txn, chunk)
            if chunk_entry is None:
                self.health.suspect()
                continue
            chunk_entry.refcount = max(0, chunk_entry.refcount - count)
            self.index.put_chunk(txn, chunk, chunk_entry)
        return True
