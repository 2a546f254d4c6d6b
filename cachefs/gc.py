"""Garbage collection and segment compaction (storage engine layer).

``collect_garbage`` runs in two phases on a store open for writing, with puts
held off (``Store._maintenance`` exclusively):

1. **Unreferenced chunks** (refcount 0) are deleted from the index and their
   segments' live byte counts drop.  Batches of chunks, one transaction each.
2. **Compaction**: a segment whose live bytes fall below the threshold is
   rewritten -- its live records are copied verbatim (headers and checksums
   hold no location, so a copy is valid as it stands) to the active segment of
   the same shard, the copies are fdatasync'ed, then ONE transaction points the
   chunk index at the copies, publishes the new segment lengths and drops the
   old segment's entry; only then is the old file deleted.  Segments with no
   live record are deleted outright (entry first, then file).

Crash safety at every step: before the transaction, the copies are unpublished
bytes that the next writer cuts off; after it, the old file is an unpublished
segment that the next writer deletes.  Neither state loses or duplicates a
published chunk.  The index is synced between the transaction and the
deletion, so a machine crash cannot undo a transaction whose old file is gone.

Segments that hold a record gc must not lose -- one with an unknown critical
tag, or a live record that fails its checksum -- are left in place (the latter
is reported: run ``fsck``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from cachefs.errors import CorruptDataError
from cachefs.index import SEGMENT_KEY, SegmentEntry, lmdb_error
from cachefs.segment import (
    RECORD_HEADER,
    TAG_ANCILLARY_MIN,
    TAG_CHUNK,
    Record,
    list_segment_files,
    scan_segment,
    segment_path,
)
from cachefs.store import Location, Progress, Store

log = logging.getLogger(__name__)

_BATCH = 10_000


@dataclass
class GcReport:
    chunks_removed: int = 0
    stored_bytes_removed: int = 0
    segments_compacted: int = 0
    segments_deleted: int = 0
    records_moved: int = 0
    bytes_moved: int = 0
    bytes_reclaimed: int = 0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "chunks_removed": self.chunks_removed,
            "stored_bytes_removed": self.stored_bytes_removed,
            "segments_compacted": self.segments_compacted,
            "segments_deleted": self.segments_deleted,
            "records_moved": self.records_moved,
            "bytes_moved": self.bytes_moved,
            "bytes_reclaimed": self.bytes_reclaimed,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GcReport:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


def collect_garbage(
    store: Store, *, threshold: float | None = None, progress: Progress | None = None
) -> GcReport:
    """Remove unreferenced chunks and compact sparse segments; see the module doc."""
    store._check_writable()
    threshold = store.options.gc_live_threshold if threshold is None else threshold
    report = GcReport()
    with store._maintenance.exclusive(), store._commit_lock:
        for shard in store._shards:
            shard.pending.clear()  # no ingest runs: these belong to abandoned puts
        try:
            _drop_unreferenced(store, report)
            _compact(store, threshold, report, progress)
        except lmdb.Error as exc:
            raise lmdb_error(exc, "collecting garbage") from None
        _delete_orphans(store, report)
    if store.options.fsync:
        store.index.sync()
    return report


def _drop_unreferenced(store: Store, report: GcReport) -> None:
    index = store.index
    with index.read() as txn:
        dead = [d for d, e in index.iter_chunks(txn) if e.refcount == 0]
    for start in range(0, len(dead), _BATCH):
        with index.write() as txn:
            segments: dict[int, SegmentEntry] = {}
            for digest in dead[start : start + _BATCH]:
                entry = index.get_chunk(txn, digest)
                if entry is None or entry.refcount != 0:
                    continue
                record_size = RECORD_HEADER.size + entry.stored_len
                txn.delete(digest, db=index.chunks)
                seg = segments.get(entry.segment_id) or index.get_segment(txn, entry.segment_id)
                if seg is not None:
                    seg.live_bytes = max(0, seg.live_bytes - record_size)
                    seg.live_records = max(0, seg.live_records - 1)
                    segments[entry.segment_id] = seg
                index.add(txn, "chunks", -1)
                index.add(txn, "chunk_bytes", -entry.raw_len)
                index.add(txn, "stored_bytes", -record_size)
                report.chunks_removed += 1
                report.stored_bytes_removed += record_size
            for segment_id, seg in segments.items():
                index.put_segment(txn, segment_id, seg)


def _active_segments(store: Store) -> set[int]:
    active = set()
    for shard in store._shards:
        if shard.writer is not None:
            active.add(shard.writer.segment_id)
        if shard.reopen is not None:
            active.add(shard.reopen)
    return active


def _compact(store: Store, threshold: float, report: GcReport, progress: Progress | None) -> None:
    index = store.index
    params = store.config.segments
    with index.read() as txn:
        segments = list(index.iter_segments(txn))
    victims = [
        (segment_id, entry)
        for segment_id, entry in segments
        if entry.live_records == 0 or entry.live_bytes < threshold * entry.length
    ]
    # A victim may be a shard's active segment: seal it (no put runs now), so
    # that its live records move to a new one.
    store._seal_segments({segment_id for segment_id, _ in victims})
    total = sum(entry.length for _, entry in victims)
    done = 0
    for segment_id, entry in victims:
        path = segment_path(store.segments_root, entry.shard, segment_id, params)
        if entry.live_records == 0:
            with index.write() as txn:
                txn.delete(SEGMENT_KEY.pack(segment_id), db=index.segments)
            _sync_index(store)
            _unlink(store, segment_id, path, report)
            report.segments_deleted += 1
        else:
            _compact_one(store, segment_id, entry, path, report)
        done += entry.length
        if progress is not None:
            progress(done, total)


def _live_records(
    store: Store, segment_id: int, path: Path, length: int, report: GcReport
) -> list[Record] | None:
    """The records of a segment the index points to, or None if it must stay."""
    index = store.index
    live: list[Record] = []
    damaged: set[int] = set()
    with index.read() as txn:
        for item in scan_segment(path, limit=length):
            if isinstance(item, CorruptDataError):
                damaged.add(-1 if item.offset is None else item.offset)
                continue
            if item.tag != TAG_CHUNK:
                if item.tag < TAG_ANCILLARY_MIN:
                    report.skipped.append(f"{path}: holds a record of unknown tag {item.tag}")
                    return None
                continue
            entry = index.get_chunk(txn, item.digest)
            if entry is not None and entry.segment_id == segment_id and entry.offset == item.offset:
                live.append(item)
        if damaged:
            found = {r.offset for r in live}
            expected = {e.offset for _, e in index.iter_chunks(txn) if e.segment_id == segment_id}
            if -1 in damaged or expected - found:
                # Damage in a record the index still points to is not gc's to drop.
                report.skipped.append(f"{path}: damaged live records; run `cachefs fsck`")
                store.needs_fsck = True
                return None
    return live


def _compact_one(
    store: Store, segment_id: int, entry: SegmentEntry, path: Path, report: GcReport
) -> None:
    live = _live_records(store, segment_id, path, entry.length, report)
    if live is not None:
        move_records(store, segment_id, entry.shard, path, live, report)


def move_records(
    store: Store,
    segment_id: int,
    shard_number: int,
    path: Path,
    live: list[Record],
    report: GcReport,
) -> None:
    """Copy ``live`` (the records of a sealed segment that the index points to)
    to the shard's active segment, repoint the index in one transaction, then
    delete the old segment.  Also used by ``fsck --repair``."""
    index = store.index
    shard = store._shards[shard_number]
    moved: dict[bytes, Location] = {}
    with shard.lock:
        for record in live:
            writer = store._writer(shard, record.size)
            offset = writer.append(b"", record.raw)
            with store._dirty_lock:
                store._dirty[writer.segment_id] = writer
            moved[record.digest] = Location(
                writer.segment_id, offset, len(record.payload), record.flags
            )
            report.records_moved += 1
            report.bytes_moved += record.size
    dirty = store._snapshot_dirty(store.options.fsync)
    with index.write() as txn:
        segments: dict[int, SegmentEntry] = {}
        segment = store._publish_lengths(txn, dirty, segments)
        for digest, location in moved.items():
            chunk = index.get_chunk(txn, digest)
            if chunk is None:
                continue
            chunk.segment_id = location.segment_id
            chunk.offset = location.offset
            index.put_chunk(txn, digest, chunk)
            target = segment(location.segment_id, shard_number)
            target.live_bytes += RECORD_HEADER.size + location.stored_len
            target.live_records += 1
        segments.pop(segment_id, None)
        for seg_id, seg_entry in segments.items():
            index.put_segment(txn, seg_id, seg_entry)
        txn.delete(SEGMENT_KEY.pack(segment_id), db=index.segments)
    store._published(dirty)
    _sync_index(store)
    _unlink(store, segment_id, path, report)
    report.segments_compacted += 1


def _sync_index(store: Store) -> None:
    """Make the last transaction durable before deleting a file it stopped using:
    the index commits without syncing its meta page, so a machine crash could
    otherwise undo the transaction after the file is gone."""
    if store.options.fsync:
        store.index.sync()


def _unlink(store: Store, segment_id: int, path: Path, report: GcReport) -> None:
    store.maps.forget(segment_id)
    try:
        size = path.stat().st_size
        path.unlink()
        report.bytes_reclaimed += size
    except FileNotFoundError:
        pass


def _delete_orphans(store: Store, report: GcReport) -> None:
    """Segment files with no index entry hold nothing published (a crash mid-gc)."""
    with store.index.read() as txn:
        known = {segment_id for segment_id, _ in store.index.iter_segments(txn)}
    active = _active_segments(store)
    with store._dirty_lock:
        active |= set(store._dirty)
    for segment_id, path in list_segment_files(store.segments_root):
        if segment_id not in known and segment_id not in active:
            log.info("gc: removing unpublished segment %s", path)
            _unlink(store, segment_id, path, report)
