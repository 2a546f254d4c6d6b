"""A local store smaller than its remote tiers: dropping chunks they hold (storage engine layer).

Under ``--local-max-size`` the live records of a store are kept under a size
by making chunks *held remotely* (``format/schema.py``, ``REMOTE_SEGMENT``):
their index entries stay, with their reference counts, so every file and
object is still there; their records become dead bytes that gc compaction
reclaims; a read fetches them back from the tiers (``LocalChunks``).

:func:`drop_held` goes through segments coldest first -- the ones no read of
this process touched, oldest first, then the least recently read -- and asks
the tiers (``held``) which of each segment's chunks they hold; only those are
dropped, so nothing that is not yet pushed (or that a tier lost) ever is.  The
entries change in one transaction per segment, under the commit lock, and only
if they still point where they did when the tiers were asked; then gc deletes
or compacts the emptied segments.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachefs.engine._gc import collect_garbage
from cachefs.engine._store import Store
from cachefs.format.digest import Digest
from cachefs.format.schema import REMOTE_SEGMENT, ChunkEntry

log = logging.getLogger(__name__)

#: Which of these chunks the tiers hold (their digests); asked for one segment at a time.
Held = Callable[[Sequence[Digest]], set[bytes]]


@dataclass
class DropReport:
    chunks: int = 0
    #: Record bytes (headers included) no longer live here.
    stored_bytes: int = 0
    #: What gc reclaimed on disk afterwards.
    bytes_reclaimed: int = 0


def drop_held(store: Store, target: int, held: Held) -> DropReport:
    """Drop chunks that ``held`` says the tiers hold, coldest segments first,
    until the store's live records take at most ``target`` bytes (or no
    more can be dropped); then collect garbage."""
    report = DropReport()
    index = store.index
    with index.read() as txn:
        excess = index.counter(txn, "stored_bytes") - target
        if excess <= 0:
            return report
        by_segment: dict[int, list[tuple[bytes, int]]] = defaultdict(list)
        for digest, entry in index.iter_chunks(txn):
            if entry.refcount and not entry.remote:
                by_segment[entry.segment_id].append((digest, entry.raw_len))
    reads = store.chunks.read_order
    for segment_id in sorted(by_segment, key=lambda s: (reads.get(s, 0), s)):
        if excess <= 0:
            break
        chunks = by_segment[segment_id]
        have = held([Digest(d, n) for d, n in chunks])
        if have:
            count, freed = _drop(store, segment_id, [d for d, _ in chunks if d in have])
            report.chunks += count
            report.stored_bytes += freed
            excess -= freed
    if report.chunks:
        report.bytes_reclaimed = collect_garbage(store).bytes_reclaimed
        log.info(
            "local store over its size: %d chunks (%d bytes) now held only by the remote "
            "tiers; %d bytes reclaimed",
            report.chunks,
            report.stored_bytes,
            report.bytes_reclaimed,
        )
    return report


def _drop(store: Store, segment_id: int, digests: list[bytes]) -> tuple[int, int]:
    """Make these chunks of segment ``segment_id`` held remotely (those still
    recorded there); how many were, and their record bytes."""
    index = store.index
    publisher = store.publisher
    count = freed = 0
    with publisher.commit_lock, publisher.write_txn("dropping chunks the tiers hold") as txn:
        segment = index.get_segment(txn, segment_id)
        for digest in digests:
            entry = index.get_chunk(txn, digest)
            if entry is None or entry.segment_id != segment_id or not entry.refcount:
                continue  # moved, healed or collected since the tiers were asked
            size = entry.record_size
            index.put_chunk(
                txn, digest, ChunkEntry(REMOTE_SEGMENT, 0, entry.raw_len, 0, 0, entry.refcount)
            )
            count += 1
            freed += size
            if segment is not None:
                segment.live_bytes = max(0, segment.live_bytes - size)
                segment.live_records = max(0, segment.live_records - 1)
        if segment is not None:
            index.put_segment(txn, segment_id, segment)
        index.add(txn, "stored_bytes", -freed)
    if store.options.fsync:
        index.sync()
    return count, freed


__all__ = ["DropReport", "drop_held"]
