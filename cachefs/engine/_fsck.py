"""Consistency check and repair (storage engine layer).

``check`` verifies, in order:

1. every segment the index knows exists, and every record in it up to its
   published length passes its checksum (a full scan; damage is listed with
   segment and offset);
2. every chunk index entry points at an intact record holding that chunk:
   same digest and lengths, decompresses to the raw length, and hashes to the
   digest (so a record that is intact but misplaced is caught too);
3. every object's recipe adds up to its size and names only indexed, intact
   chunks, each with its true length;
4. every chunk's reference count equals the number of recipe references, every
   segment's live bytes and records match the index, and the store counters
   match a recount.

Without ``repair`` the store is only read (it may be open for writing by
another process meanwhile: only published bytes are looked at).  The check
reads one snapshot of the index (one read transaction), so that publications
made meanwhile are not mistaken for damage.  Steps 3 and 4 compare the index
with its own invariants as it stands (a lost object's references still count).

With ``repair`` (needs the writer lock) one transaction drops every index entry
whose chunk is damaged or missing, drops every object that needed one of them
(these are listed: their data is lost), and rewrites reference counts, segment
statistics and counters from the recount without them.  Then every segment
holding a damaged record is rewritten without it (as ``gc`` compacts), so a
second check is clean.  What the repair's open recorded again (a lost schema
version, lost tables made anew: ``StoreOptions.recover_index``) is reported
as problems repaired.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from cachefs import tracing
from cachefs.engine._index import Index, inode_numbers, lmdb_error
from cachefs.engine._maintenance import Maintenance
from cachefs.engine._namespace import Namespace
from cachefs.engine._namespace_check import check_namespace, repair_namespace
from cachefs.engine._store import Progress, Store
from cachefs.errors import CachefsError, CorruptDataError, IndexCorruptError
from cachefs.format.digest import Digest
from cachefs.format.schema import (
    ALL_DATABASES,
    COUNTER_NAMES,
    HOLE_MARK,
    PAGE_KEY,
    SCHEMA_VERSION,
    SEGMENT_KEY,
    ChunkEntry,
    RecipePages,
    SegmentEntry,
    sparse_key,
)
from cachefs.format.segment import (
    RECORD_HEADER,
    TAG_ANCILLARY_MIN,
    TAG_CHUNK,
    Record,
    list_segment_files,
    scan_segment,
    shard_of,
)

log = logging.getLogger(__name__)

#: Checks beside a writer before damage is reported as found (``_check_beside_writer``).
_ATTEMPTS = 3


@dataclass
class Problem:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    segments_checked: int = 0
    records_checked: int = 0
    chunks_checked: int = 0
    objects_checked: int = 0
    inodes_checked: int = 0
    lost_objects: list[Digest] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str) -> None:
        self.problems.append(Problem(kind, message))

    def as_dict(self) -> dict[str, object]:
        return {
            "clean": self.clean,
            "repaired": self.repaired,
            "segments_checked": self.segments_checked,
            "records_checked": self.records_checked,
            "chunks_checked": self.chunks_checked,
            "objects_checked": self.objects_checked,
            "inodes_checked": self.inodes_checked,
            "problems": [{"kind": p.kind, "message": p.message} for p in self.problems],
            "notes": self.notes,
            "lost_objects": [str(d) for d in self.lost_objects],
        }


def check_store(
    store: Store, *, repair: bool = False, progress: Progress | None = None
) -> FsckReport:
    """Verify the whole store; with ``repair``, drop what cannot be recovered
    (a store with remote tiers, ``LocalChunks.healer``, first heals the
    damaged chunks they hold, unless index entries are damaged: those are
    dropped first, and what they named is then lost or missing)."""
    if repair and store.chunks.healer is not None and not _damaged_entries(store):
        found = _check_beside_writer(store, progress)
        healed = _heal_damaged(store) if not found.clean else 0
        if healed:
            log.warning("fsck: %d damaged chunks were healed from the remote tiers", healed)
    if not repair:
        damaged = _damaged_entries(store)
        if damaged:
            report = FsckReport()
            _report_damaged(report, damaged)
            report.notes.append(
                "the rest of the check needs the damaged entries gone: run with --repair"
            )
            return report
        return _check_beside_writer(store, progress)
    with store.maintenance() as maintenance:
        damaged = _damaged_entries(store)
        if damaged:
            _drop_damaged(store, damaged)
        report, recount = _check(store, progress)
        _report_damaged(report, damaged)
        if not report.clean:
            try:
                _repair(maintenance, report, recount)
                _repair_namespace(store)
            except lmdb.Error as exc:
                raise lmdb_error(exc, "repairing the index") from None
        for name in sorted(store.index.rebuilt_tables):  # at the open (``recover_index``)
            report.add(
                "lost-table",
                f"the index had lost its table {name.decode()}: made anew from the chunk "
                "entries, the segment files and a recount",
            )
            report.repaired = True
        recovered = store.index.recovered_version  # at the open (``recover_index``)
        if recovered is not None:
            upgraded = f", then upgraded to {SCHEMA_VERSION}" if recovered < SCHEMA_VERSION else ""
            report.add(
                "lost-version",
                f"the index had lost its schema version: recorded {recovered} again from its "
                f"entries{upgraded}",
            )
            report.repaired = True
        maintenance.settle()
        maintenance.sync_index()
    store.audit.record("fsck.repair", clean=report.clean, problems=len(report.problems))
    return report


def _damaged_entries(store: Store) -> dict[bytes, list[bytes]]:
    """The keys of the index entries that fail their seals, by database."""
    tables = [t for t in store.index.open_databases(ALL_DATABASES, create=False) if t is not None]
    with store.index.read() as txn:
        return {table.name: keys for table in tables if (keys := table.damaged_keys(txn))}


def _report_damaged(report: FsckReport, damaged: dict[bytes, list[bytes]]) -> None:
    for name, keys in damaged.items():
        for key in keys:
            report.add("bad-entry", f"index entry {name.decode()}/{key.hex()} fails its checksum")


def _drop_damaged(store: Store, damaged: dict[bytes, list[bytes]]) -> None:
    """Drop the entries that fail their seals, so that the check can go on
    (what they named is then found missing, and repaired as such).  What can
    be rebuilt is: a segment's entry from its file (its live figures are
    recounted after), and the counters that name the next segment and inode
    (from the largest in use); the other counters are recounted after."""
    index = store.index
    tables = {t.name: t for t in index.open_databases(damaged, create=False) if t is not None}
    inodes = index.open_optional(b"inodes", create=False)  # not inside the transaction
    dirents = index.open_optional(b"dirents", create=False)
    on_disk = dict(list_segment_files(store.segments.root))
    with index.write() as txn:
        for name, keys in damaged.items():
            table = tables[name]
            for key in keys:
                table.delete(txn, key)
                log.error("fsck: dropped index entry %s/%s (damaged)", name.decode(), key.hex())
                if name == b"segments":
                    _rebuild_segment(store, txn, SEGMENT_KEY.unpack(key)[0], on_disk)
        # Once every damaged entry is gone (reading the others meets none).
        counters = set(damaged.get(b"counters", ()))
        if b"next_segment_id" in counters:
            ids = [*on_disk, *(i for i, _ in index.iter_segments(txn))]
            index.set_counter(txn, "next_segment_id", max(ids, default=0) + 1)
        if b"next_inode" in counters and inodes is not None:
            index.set_counter(txn, "next_inode", inode_numbers(txn, inodes, dirents)[1])
    index.sync()


def _rebuild_segment(
    store: Store, txn: lmdb.Transaction, segment_id: int, on_disk: dict[int, Path]
) -> None:
    """A segment's entry from its file: published up to its last intact record."""
    path = on_disk.get(segment_id)
    if path is None:
        return  # its chunks are found missing
    params = store.config.segments
    shard = next(
        (n for n in range(params.shard_count) if store.segments.path(n, segment_id) == path), None
    )
    if shard is None:
        return
    end = 0
    for item in scan_segment(path):
        if isinstance(item, Record):
            end = max(end, item.offset + item.size)
    if end:
        store.index.put_segment(txn, segment_id, SegmentEntry(shard, end, 0, 0))
        log.warning("fsck: the entry of segment %d was rebuilt from %s", segment_id, path)


def _repair_namespace(store: Store) -> None:
    """After the index repair: files whose objects were dropped lose their content."""
    if not Namespace.exists(store):
        return
    namespace = Namespace(store)
    with store.index.read() as txn:
        found = check_namespace(namespace, txn)
    if found.problems:
        repair_namespace(namespace, found)


@dataclass
class _Recount:
    """What the index should hold once the damage is dropped (what repair writes)."""

    bad_chunks: set[bytes] = field(default_factory=set)
    refs: Counter[bytes] = field(default_factory=Counter)
    segments: dict[int, SegmentEntry] = field(default_factory=dict)
    lost: list[Digest] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    missing_segments: set[int] = field(default_factory=set)
    #: Segments holding damaged records: repair rewrites them without those records.
    damaged_segments: set[int] = field(default_factory=set)
    #: The segments the snapshot named.
    published: dict[int, SegmentEntry] = field(default_factory=dict)
    #: Keys of recipe pages that no object has.
    stray_pages: list[bytes] = field(default_factory=list)


#: Problems that are damage to the index itself (a mount turns read-only on them).
INDEX_PROBLEMS = frozenset({"bad-entry", "bad-recipe", "refcount", "counter", "namespace"})


def scrub_store(
    store: Store, *, rate: int | None = None, progress: Progress | None = None
) -> FsckReport:
    """Verify every segment record and every index entry, as a read-only
    ``check_store`` does, at most ``rate`` bytes a second (None: as fast as it
    goes), and record what is found in the store's health: each problem counts
    as a damaged read, and the store needs fsck (``cachefs scrub``, and the
    background scrub of a mount).  A store with remote tiers first heals the
    damaged chunks they hold (``LocalChunks.healer``) and checks again."""
    with tracing.span("cachefs scrub") as span:
        report = _scrub(store, rate, progress)
        tracing.set_attribute(span, "cachefs.problems", len(report.problems))
    return report


def _scrub(store: Store, rate: int | None, progress: Progress | None) -> FsckReport:
    report = check_store(store, progress=_throttled(progress, rate))
    if not report.clean and store.chunks.healer is not None and not store.readonly:
        healed = _heal_damaged(store)
        if healed:
            report = check_store(store)
            report.notes.append(f"{healed} damaged chunks were healed from the remote tiers")
    for problem in report.problems:
        kind = IndexCorruptError if problem.kind in INDEX_PROBLEMS else CorruptDataError
        store.health.damaged(kind(f"scrub found {problem}"))
    if not store.readonly:
        store.audit.record("scrub", clean=report.clean, problems=len(report.problems))
    return report


def _heal_damaged(store: Store) -> int:
    """Heal every chunk whose record fails its checks through the store's
    healer (the remote tiers); how many were healed."""
    healer = store.chunks.healer
    assert healer is not None
    with store.index.read() as txn:
        chunks = list(store.index.iter_chunks(txn))
    healed = 0
    for digest, entry in chunks:
        if entry.remote:
            continue  # not damaged: fetched when read
        try:
            store.chunks.read_entry(digest, entry)
            continue
        except CorruptDataError as exc:
            log.warning("scrub: %s; looking for a copy in the remote tiers", exc)
        try:
            if healer(digest, entry.raw_len) is not None:
                healed += 1
        except CachefsError as exc:
            log.warning("scrub: chunk %s could not be healed: %s", digest.hex(), exc)
    return healed


def _throttled(progress: Progress | None, rate: int | None) -> Progress | None:
    """``progress``, sleeping as needed to keep the check at ``rate`` bytes/s
    (it reports bytes of segments read, and one per index entry)."""
    if rate is None:
        return progress
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        ahead = done / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)

    return report


def _check_beside_writer(store: Store, progress: Progress | None) -> FsckReport:
    """A check without the store's lock: a writer may go on meanwhile.

    The check reads one snapshot of the index, but segment files are deleted
    by gc once the index no longer names them: a snapshot taken before a
    compaction names segments that are gone by the time they are read.  So
    damage is reported only when a fresh snapshot still names every segment
    the check read; otherwise the check runs again on the fresh one."""
    for _ in range(_ATTEMPTS - 1):
        report, recount = _check(store, progress)
        with store.index.read() as txn:
            named = {segment_id for segment_id, _ in store.index.iter_segments(txn)}
        if report.clean or named >= recount.published.keys():
            break
        log.info("the index changed during the check (gc or a writer): checking again")
    else:
        report, _ = _check(store, progress)
    if store.health.needs_fsck:
        report.notes.append(
            f"the store is marked as needing fsck ({store.health.corruptions} damaged reads "
            "recorded): `cachefs fsck --repair` clears the mark"
        )
    return report


def _check(store: Store, progress: Progress | None) -> tuple[FsckReport, _Recount]:
    report = FsckReport()
    recount = _Recount()
    index = store.index
    # One read transaction for the whole check: a writer may publish meanwhile,
    # and everything must be compared against one snapshot of the index.
    # Named databases must be opened before the transaction that uses them.
    namespace = Namespace(store) if Namespace.exists(store) else None
    with index.read() as txn:
        _check_snapshot(store, txn, report, recount, progress)
        if namespace is not None:
            found = check_namespace(namespace, txn)
            for kind, message in found.problems:
                report.add(kind, message)
            report.inodes_checked = found.inodes
    report.lost_objects = list(recount.lost)
    return report, recount


def _check_snapshot(
    store: Store,
    txn: lmdb.Transaction,
    report: FsckReport,
    recount: _Recount,
    progress: Progress | None,
) -> None:
    index = store.index
    params = store.config.segments
    published = recount.published = dict(index.iter_segments(txn))
    chunk_count = index.counter(txn, "chunks")
    total = sum(e.length for e in published.values()) + chunk_count
    done = 0

    # 1. Segments: presence and a full checksum scan.
    on_disk = dict(list_segment_files(store.segments.root))
    for segment_id, path in sorted(on_disk.items()):
        if segment_id not in published:
            report.notes.append(f"unpublished segment {path} (removed by the next writer)")
    # Live bytes and records as the index has them (the invariant checked) ...
    indexed: dict[int, SegmentEntry] = {}
    for segment_id, seg_entry in sorted(published.items()):
        path = store.segments.path(seg_entry.shard, segment_id)
        if segment_id not in on_disk:
            report.add("missing-segment", f"segment {segment_id} ({path}) is missing")
            recount.missing_segments.add(segment_id)
            continue
        report.segments_checked += 1
        for item in scan_segment(path, limit=seg_entry.length):
            if isinstance(item, CorruptDataError):
                report.add("damaged-record", item.message)
                recount.damaged_segments.add(segment_id)
                continue
            report.records_checked += 1
            if item.tag != TAG_CHUNK and item.tag < TAG_ANCILLARY_MIN:
                report.notes.append(f"{path}: record of unknown tag {item.tag} at {item.offset}")
        done += seg_entry.length
        if progress is not None:
            progress(done, total)
        indexed[segment_id] = SegmentEntry(seg_entry.shard, seg_entry.length, 0, 0)
        # ... and as they will be once damaged chunks are dropped.
        recount.segments[segment_id] = SegmentEntry(seg_entry.shard, seg_entry.length, 0, 0)

    # 2. Every chunk index entry against its record.
    counters = dict.fromkeys(COUNTER_NAMES, 0)  # recount of the index as it is
    kept = dict.fromkeys(COUNTER_NAMES, 0)  # recount after repair
    for chunk_digest, chunk in index.iter_chunks(txn):
        report.chunks_checked += 1
        done += 1
        if progress is not None and report.chunks_checked % 1024 == 0:
            progress(done, total)
        record_size = chunk.record_size
        counters["chunks"] += 1
        counters["chunk_bytes"] += chunk.raw_len
        counters["stored_bytes"] += record_size
        if chunk.remote:  # its bytes are in the remote tiers: nothing here to check
            kept["chunks"] += 1
            kept["chunk_bytes"] += chunk.raw_len
            continue
        where = f"chunk {chunk_digest.hex()} (segment {chunk.segment_id} offset {chunk.offset})"
        seg = published.get(chunk.segment_id)
        if seg is None or chunk.segment_id in recount.missing_segments:
            report.add("missing-chunk", f"{where}: its segment is gone")
            recount.bad_chunks.add(chunk_digest)
            continue
        live = indexed[chunk.segment_id]
        live.live_bytes += record_size
        live.live_records += 1
        problem = _verify_chunk(store, seg, chunk_digest, chunk)
        if problem is None and shard_of(chunk_digest, params) != seg.shard:
            problem = "stored in the wrong shard"
        if problem is not None:
            report.add("damaged-chunk", f"{where}: {problem}")
            recount.bad_chunks.add(chunk_digest)
            continue
        live = recount.segments[chunk.segment_id]
        live.live_bytes += record_size
        live.live_records += 1
        kept["chunks"] += 1
        kept["chunk_bytes"] += chunk.raw_len
        kept["stored_bytes"] += record_size

    # 3. Objects and their recipes.
    refs: Counter[bytes] = Counter()  # references in the index as it is
    for key, obj in index.iter_objects(txn):
        report.objects_checked += 1
        obj_digest = Digest(key, obj.size)
        uses = obj.chunk_uses()
        refs.update(uses)
        counters["objects"] += 1
        counters["files"] += obj.refcount
        counters["logical_bytes"] += obj.size * obj.refcount
        lost = False
        if sum(n for _, n in obj.chunks) != obj.size:
            report.add("bad-recipe", f"object {obj_digest}: chunk lengths do not add up")
            lost = True
        elif obj.pages is not None and obj.pages != RecipePages.of(obj.chunks, obj.pages.per_page):
            report.add("bad-recipe", f"object {obj_digest}: its pages do not start where it says")
            lost = True
        if obj.sparse and sparse_key(store.digest_function, obj.chunks) != key:
            report.add("bad-recipe", f"object {obj_digest}: its recipe is not the one named")
            lost = True
        for part, n in obj.chunks:
            if part == HOLE_MARK:
                continue
            part_entry = index.get_chunk(txn, part)
            if part in recount.bad_chunks or part_entry is None:
                lost = True
            elif part_entry.raw_len != n:
                report.add(
                    "bad-recipe",
                    f"object {obj_digest}: chunk {part.hex()} has {part_entry.raw_len} bytes, "
                    f"the recipe says {n}",
                )
                lost = True
                break
        if lost:
            report.add("lost-object", f"object {obj_digest} needs damaged or missing chunks")
            recount.lost.append(obj_digest)
            continue
        recount.refs.update(uses)
        kept["objects"] += 1
        kept["files"] += obj.refcount
        kept["logical_bytes"] += obj.size * obj.refcount

    _stray_pages(index, txn, report, recount)

    # 4. Reference counts, segment statistics, counters (against the index as it is).
    for chunk_digest, chunk in index.iter_chunks(txn):
        if chunk.refcount != refs.get(chunk_digest, 0):
            report.add(
                "refcount",
                f"chunk {chunk_digest.hex()}: reference count {chunk.refcount}, "
                f"but {refs.get(chunk_digest, 0)} references",
            )
    for segment_id, live in indexed.items():
        seg_entry = published[segment_id]
        if (seg_entry.live_bytes, seg_entry.live_records) != (live.live_bytes, live.live_records):
            report.add(
                "segment-stats",
                f"segment {segment_id}: live {seg_entry.live_bytes} bytes / "
                f"{seg_entry.live_records} records, recount {live.live_bytes} / "
                f"{live.live_records}",
            )
    stored = index.counters_dict(txn)
    for name in COUNTER_NAMES:
        if name != "next_segment_id" and stored[name] != counters[name]:
            report.add("counter", f"counter {name} is {stored[name]}, recount {counters[name]}")
    kept["next_segment_id"] = stored["next_segment_id"]
    recount.counters = kept
    if progress is not None:
        progress(total, total)


def _verify_chunk(
    store: Store, segment: SegmentEntry, digest: bytes, entry: ChunkEntry
) -> str | None:
    """None if the chunk's record is intact and holds the chunk, else what is wrong.

    The engine's own read path checks the record (checksum, tag, digest, digest
    function, lengths, decompression); fsck adds a re-hash of the content.
    """
    if entry.offset + RECORD_HEADER.size + entry.stored_len > segment.length:
        return "lies past the published end of its segment"
    try:
        data = store.chunks.read_entry(digest, entry)
    except CorruptDataError as exc:
        return exc.message
    if store.digest_function.hash(data) != digest:
        return "content does not match its digest"
    return None


def _stray_pages(
    index: Index, txn: lmdb.Transaction, report: FsckReport, recount: _Recount
) -> None:
    """Pages of paged recipes that no object has (``recipes``)."""
    if index.recipes is None:
        return
    for page_key in index.recipes.keys(txn):
        key, page = page_key[: -PAGE_KEY.size], page_key[-PAGE_KEY.size :]
        (number,) = PAGE_KEY.unpack(page)
        head = index.get_object_head(txn, key)
        if head is None or head.pages is None or number >= len(head.pages.starts):
            report.add("bad-recipe", f"page {number} of a recipe of {key.hex()}: no object has it")
            recount.stray_pages.append(page_key)


def _repair(maintenance: Maintenance, report: FsckReport, recount: _Recount) -> None:
    index = maintenance.index
    with index.write() as txn:
        for digest in recount.bad_chunks:
            index.delete_chunk(txn, digest)
        for lost in recount.lost:
            index.delete_object(txn, lost.hash)
            log.error("fsck: object %s lost data and was removed", lost)
        if index.recipes is not None:
            for page_key in recount.stray_pages:
                index.recipes.delete(txn, page_key)
        for digest, entry in index.iter_chunks(txn):
            refs = recount.refs.get(digest, 0)
            if entry.refcount != refs:
                entry.refcount = refs
                index.put_chunk(txn, digest, entry)
        for segment_id in recount.missing_segments:
            index.delete_segment(txn, segment_id)
        for segment_id, live in recount.segments.items():
            index.put_segment(txn, segment_id, live)
        for name, value in recount.counters.items():
            index.set_counter(txn, name, value)
    # Stop appending to segments that are gone or damaged (a shard may have
    # been about to continue one of them).
    maintenance.seal(recount.missing_segments | recount.damaged_segments)
    maintenance.sync_index()
    # Copy the intact records of damaged segments elsewhere and delete them,
    # so that no damaged bytes stay published and a second check is clean.  The
    # records to keep are found through the index (all verified above), not by
    # a scan, which a damaged segment header would stop.
    damaged = recount.damaged_segments - recount.missing_segments
    keep: dict[int, list[ChunkEntry]] = {segment_id: [] for segment_id in damaged}
    with index.read() as txn:
        for _, chunk in index.iter_chunks(txn):
            if chunk.segment_id in keep:
                keep[chunk.segment_id].append(chunk)
        found = {segment_id: index.get_segment(txn, segment_id) for segment_id in damaged}
    for segment_id in sorted(damaged):
        seg = found[segment_id]
        if seg is None:
            continue
        path = maintenance.segment_path(seg.shard, segment_id)
        records = [
            maintenance.read_record(segment_id, path, c.offset, c.stored_len)
            for c in keep[segment_id]
        ]
        maintenance.move_records(segment_id, seg.shard, path, records)
    report.repaired = True
