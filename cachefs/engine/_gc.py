"""Garbage collection and segment compaction (storage engine layer).

``collect_garbage`` runs in two phases on a store open for writing, holding it
exclusively (``Store.maintenance()``: no put, no publication meanwhile):

1. **Unreferenced chunks** (refcount 0) are deleted from the index and their
   segments' live byte counts drop.  Batches of chunks, one transaction each.
2. **Compaction**: a segment whose live bytes fall below the threshold is
   rewritten -- its live records are copied verbatim (headers and checksums
   hold no location, so a copy is valid as it stands) to the active segment of
   the same shard, the copies are fdatasync'ed, then ONE transaction points the
   chunk index at the copies, publishes the new segment lengths and drops the
   old segment's entry; only then is the old file deleted
   (``Maintenance.move_records``, which says why each state is crash-safe).
   Segments with no live record are deleted outright (entry first, then file).

Segments that hold a record gc must not lose -- one with an unknown critical
tag, or a live record that fails its checksum -- are left in place (the latter
is reported: run ``fsck``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from cachefs import tracing
from cachefs.engine._index import lmdb_error
from cachefs.engine._maintenance import Maintenance
from cachefs.engine._store import Progress, Store
from cachefs.errors import CorruptDataError
from cachefs.format.schema import SegmentEntry
from cachefs.format.segment import (
    TAG_ANCILLARY_MIN,
    TAG_CHUNK,
    Record,
    list_segment_files,
    scan_segment,
)

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
    """Remove unreferenced chunks and compact sparse segments; see the module doc.
    The run is counted in ``Store.activity()``, failed or not, and traced."""
    threshold = store.options.gc_live_threshold if threshold is None else threshold
    report = GcReport()
    with tracing.span("cachefs gc") as span, store.maintenance() as maintenance:
        start = time.monotonic()
        try:
            _collect(maintenance, threshold, report, progress)
        finally:
            maintenance.activity.collected(time.monotonic() - start, report.bytes_reclaimed)
            tracing.set_attribute(span, "cachefs.bytes_reclaimed", report.bytes_reclaimed)
    return report


def _collect(
    maintenance: Maintenance, threshold: float, report: GcReport, progress: Progress | None
) -> None:
    try:
        _drop_unreferenced(maintenance, report)
        _compact(maintenance, threshold, report, progress)
    except lmdb.Error as exc:
        raise lmdb_error(exc, "collecting garbage") from None
    _delete_orphans(maintenance, report)
    maintenance.sync_index()


def _drop_unreferenced(maintenance: Maintenance, report: GcReport) -> None:
    index = maintenance.index
    with index.read() as txn:
        dead = [d for d, e in index.iter_chunks(txn) if e.refcount == 0]
    for start in range(0, len(dead), _BATCH):
        with index.write() as txn:
            segments: dict[int, SegmentEntry] = {}
            for digest in dead[start : start + _BATCH]:
                entry = index.get_chunk(txn, digest)
                if entry is None or entry.refcount != 0:
                    continue
                record_size = entry.record_size
                index.delete_chunk(txn, digest)
                seg = None
                if not entry.remote:
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


def _compact(
    maintenance: Maintenance, threshold: float, report: GcReport, progress: Progress | None
) -> None:
    index = maintenance.index
    with index.read() as txn:
        segments = list(index.iter_segments(txn))
    victims = [
        (segment_id, entry)
        for segment_id, entry in segments
        if entry.live_records == 0 or entry.live_bytes < threshold * entry.length
    ]
    # A victim may be a shard's active segment: seal it (no put runs now), so
    # that its live records move to a new one.
    maintenance.seal({segment_id for segment_id, _ in victims})
    total = sum(entry.length for _, entry in victims)
    done = 0
    for segment_id, entry in victims:
        path = maintenance.segment_path(entry.shard, segment_id)
        if entry.live_records == 0:
            with index.write() as txn:
                index.delete_segment(txn, segment_id)
            maintenance.sync_index()
            report.bytes_reclaimed += maintenance.delete_segment(segment_id, path)
            report.segments_deleted += 1
        else:
            live = _live_records(maintenance, segment_id, path, entry.length, report)
            if live is not None:
                report.records_moved += len(live)
                report.bytes_moved += sum(record.size for record in live)
                report.bytes_reclaimed += maintenance.move_records(
                    segment_id, entry.shard, path, live
                )
                report.segments_compacted += 1
        done += entry.length
        if progress is not None:
            progress(done, total)


def _live_records(
    maintenance: Maintenance, segment_id: int, path: Path, length: int, report: GcReport
) -> list[Record] | None:
    """The records of a segment the index points to, or None if it must stay."""
    index = maintenance.index
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
                maintenance.suspect()
                return None
    return live


def _delete_orphans(maintenance: Maintenance, report: GcReport) -> None:
    """Segment files with no index entry hold nothing published (a crash mid-gc)."""
    with maintenance.index.read() as txn:
        known = {segment_id for segment_id, _ in maintenance.index.iter_segments(txn)}
    active = maintenance.active_segments()
    for segment_id, path in list_segment_files(maintenance.segments_root):
        if segment_id not in known and segment_id not in active:
            log.info("gc: removing unpublished segment %s", path)
            report.bytes_reclaimed += maintenance.delete_segment(segment_id, path)
