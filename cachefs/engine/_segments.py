"""The local segment store: shards, their active segments, appends and mapped reads
(storage engine layer).

Record and file layouts are in ``cachefs.format.segment``.  Each shard appends
to one active segment at a time (``Shard.writer``), rotated when full; its lock
serialises the appends, and ``Shard.pending`` holds the chunks appended but not
yet published, so that concurrent puts of the same new chunk store it once.
A segment appended to since its length was last published is *dirty*; the
publication that names its new records publishes its length too (``snapshot``
then ``published``).  A writer that opens the store cuts every segment back to
its published length and deletes segment files the index does not know
(``recover``).  Reads go through memory maps (``SegmentMaps``) and need no lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from cachefs.errors import CorruptDataError, from_oserror
from cachefs.faults import fault
from cachefs.format.header import SegmentParams
from cachefs.format.schema import ChunkEntry, SegmentEntry
from cachefs.format.segment import (
    RECORD_HEADER,
    Record,
    RecordHead,
    check_record,
    encode_segment_header,
    list_segment_files,
    parse_record,
    segment_path,
    shard_of,
)
from cachefs.fsutil import cached_pages, fsync_dir, start_writeback

log = logging.getLogger(__name__)

#: A segment's writeback is started every this many appended bytes, so that a
#: sync (the end of a large put or upload) waits for the last MiB only.  A
#: large object's chunks spread over every shard's segment: 64 MiB put into 16
#: shards is 4 MiB each, so the step is well under that.
WRITEBACK_STEP = 1 << 20
#: Threads that fdatasync dirty segments together (the device takes the
#: flushes at once instead of one after the other).
SYNC_THREADS = 16


@dataclass(frozen=True)
class Location:
    """Where a chunk appended by this process lies (not yet in the index)."""

    segment_id: int
    offset: int
    stored_len: int
    flags: int


class SegmentWriter:
    """Appends records to one segment file.  Callers serialise appends (shard lock)."""

    def __init__(
        self, path: Path, shard: int, segment_id: int, *, create: bool, sync_dirs: bool = True
    ) -> None:
        self.path = path
        self.shard = shard
        self.segment_id = segment_id
        try:
            if create:
                # Create missing directories top-down; with sync_dirs, make every new
                # directory entry durable so a published segment cannot vanish.
                missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
                for directory in reversed(missing):
                    directory.mkdir(exist_ok=True)
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    head = encode_segment_header(shard, segment_id)
                    if os.pwrite(self.fd, head, 0) != len(head):
                        raise OSError(errno.ENOSPC, "short write of a segment header")
                    self.length = len(head)
                    if sync_dirs:
                        for directory in {path.parent, *(d.parent for d in missing)}:
                            fsync_dir(directory)
                except OSError:
                    os.close(self.fd)
                    path.unlink(missing_ok=True)
                    raise
            else:
                self.fd = os.open(path, os.O_RDWR)
                self.length = os.fstat(self.fd).st_size
        except OSError as exc:
            raise from_oserror(exc, f"opening segment {path}") from None
        self.synced_length = 0 if create else self.length
        #: Where the last ``start_writeback`` ended.
        self.written_back = self.length

    def append(
        self, head: bytes, payload: bytes | memoryview, point: str = "segment.append"
    ) -> int:
        """Write one record; return its offset.  On error nothing is left behind.
        (``point``: the fault point of this step, ``gc.move`` for gc's copies.)"""
        offset = self.length
        want = len(head) + len(payload)
        try:
            fault(point)
            written = os.pwritev(self.fd, [head, payload], offset)
            while written < want:  # short write: finish it
                rest = (head + bytes(payload))[written:]
                written += os.pwrite(self.fd, rest, offset + written)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, offset)
            raise from_oserror(exc, f"appending to segment {self.path}") from None
        self.length = offset + want
        if self.length - self.written_back >= WRITEBACK_STEP:
            start_writeback(self.fd, self.written_back, self.length - self.written_back)
            self.written_back = self.length
        return offset

    def sync(self) -> int:
        """fdatasync; returns the length that is now durable."""
        length = self.length
        if self.synced_length < length:
            try:
                fault("segment.sync")
                os.fdatasync(self.fd)
            except OSError as exc:
                raise from_oserror(exc, f"syncing segment {self.path}") from None
            self.synced_length = length
        return length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: ``madvise`` advice that maps a range's pages in one call (Linux 5.14; the
#: mmap module of Python 3.11 does not name it).
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
#: How far past a record its pages must be cached for ``SegmentMaps.read_into``.
READ_AHEAD = 4 << 20


class _SegmentFile:
    """A segment file open for reading with ``preadv``, closed once nothing
    holds it (a read that holds it is never left with a descriptor that was
    closed, or reused for another file, under it)."""

    __slots__ = ("cached", "fd", "path")

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptDataError("segment file is missing", path=self.path) from None
        except OSError as exc:
            raise from_oserror(exc, f"opening segment {path}") from None
        #: The range whose pages were found cached last: records inside it
        #: (but for its last ``READ_AHEAD`` bytes) are not asked about.
        self.cached = (0, 0)

    def in_cache(self, start: int, end: int) -> bool | None:
        """Whether the pages of ``[start, end)`` are in the page cache, and
        those ``READ_AHEAD`` past it too: a sequential reader nearing the end
        of what the kernel read ahead reads through the mapping, whose faults
        there start the next read-ahead (a ``preadv`` of cached pages starts
        none that far ahead).  None if the kernel cannot tell.  The kernel is
        asked about a page twice that far, so that the records up to it need
        not ask (``cachestat`` costs a system call)."""
        low, high = self.cached
        if low <= start and end + READ_AHEAD <= high:
            return True
        pages = (end - 1) // mmap.PAGESIZE - start // mmap.PAGESIZE + 1
        cached = cached_pages(self.fd, start, end - start)
        if cached is None or cached < pages:
            return None if cached is None else False
        try:
            size = os.fstat(self.fd).st_size
        except OSError:
            return False  # the mapping's read says what is wrong
        for ahead in (2 * READ_AHEAD, READ_AHEAD):
            probe = min(end + ahead, size) - 1
            if probe < end or cached_pages(self.fd, probe, 1) == 1:
                self.cached = (start, probe + 1)
                return True
        return False

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # not opened; closed at exit
            os.close(self.fd)


class SegmentMaps:
    """Read access to segments through memory maps, shared by all reader threads.

    A mapping covers the file as it was when mapped; a read past its end maps
    the segment again (appends happen while readers read).  Old mappings stay
    valid for as long as a returned view points into them.  At most
    ``max_maps`` mappings are kept (each holds a file descriptor).

    A record's pages are mapped in one call before it is read
    (``MADV_POPULATE_READ``), not by a page fault every few pages: a cold
    sequential read of 1 GiB through a mount on tmpfs spent a fifth of the
    daemon's time in those faults (perf).

    A reader that copies the bytes anyway (a range of a file made of several
    chunks, joined into one reply) reads a record with :meth:`read_into`
    instead when its pages are all in the page cache (``cachestat``): one
    ``preadv`` into its buffer, no mapping.  Mapping the pages cost more than
    copying them (py-spy of a cold read of 1 GiB through a mount on tmpfs:
    ``MADV_POPULATE_READ`` 23% of the daemon, dropping the pages again 5%,
    the copy into the reply 7%; 0.85-0.88 s against 0.71-0.73 s).  Pages that
    must come from the disk are read through the mapping still: a fault reads
    around it as far as the disk's read-ahead goes (8 MiB here), and ``preadv``
    of the same records, waiting on smaller read-ahead windows, took the cold
    read of 1 GiB on ext4 from 0.9 s to 1.2-1.5 s.  The open files it reads
    from are kept as the mappings are (at most ``max_maps``); a file is closed
    once it is dropped and no read holds it.
    """

    def __init__(self, max_maps: int = 256, resident_limit: int | None = None) -> None:
        self._lock = threading.Lock()
        self._maps: OrderedDict[int, tuple[mmap.mmap, str]] = OrderedDict()
        self._max_maps = max_maps
        #: Bytes read through the maps after which their pages are dropped
        #: from this process (they stay in the page cache): the mapped pages a
        #: process touched count in its resident set.  None: never.
        self.resident_limit = resident_limit
        self._touched = 0
        #: Whether the kernel takes MADV_POPULATE_READ (before 5.14: EINVAL).
        self._populate = True
        #: Whether the kernel says which pages are in its cache (``read_into``).
        self._cachestat = True
        #: Segment files open for ``read_into``, least recently used first.
        self._files: OrderedDict[int, _SegmentFile] = OrderedDict()

    def _map(
        self, segment_id: int, locate: Path | Callable[[], Path], need: int
    ) -> tuple[mmap.mmap, str]:
        with self._lock:
            entry = self._maps.get(segment_id)
            if entry is not None and len(entry[0]) >= need:
                self._maps.move_to_end(segment_id)
                return entry
        path = locate() if callable(locate) else locate
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < need:
                    raise CorruptDataError(
                        f"segment is truncated (size {size}, need {need})", path=str(path)
                    )
                mapping = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        except FileNotFoundError:
            raise CorruptDataError("segment file is missing", path=str(path)) from None
        except OSError as exc:
            raise from_oserror(exc, f"mapping segment {path}") from None
        entry = (mapping, str(path))
        with self._lock:
            self._maps[segment_id] = entry
            self._maps.move_to_end(segment_id)
            while len(self._maps) > self._max_maps:
                self._maps.popitem(last=False)  # closed when its last view dies
        return entry

    def read(
        self, segment_id: int, locate: Path | Callable[[], Path], offset: int, stored_len: int
    ) -> Record:
        """The verified record at ``offset`` of a segment.

        ``locate`` is the segment's path, or a function returning it (called
        only when the segment is not mapped yet).
        """
        need = offset + RECORD_HEADER.size + stored_len
        mapping, name = self._map(segment_id, locate, need)
        if self.resident_limit is not None:
            self._touched += stored_len
            if self._touched > self.resident_limit:
                self.drop_pages()
        if self._populate:
            self._map_pages(mapping, offset, need)
        return parse_record(mapping, offset, need, name)

    def read_into(
        self,
        segment_id: int,
        locate: Path | Callable[[], Path],
        offset: int,
        payload: Sequence[memoryview],
    ) -> RecordHead | None:
        """Read the record at ``offset`` of a segment from the page cache, its
        payload landing in ``payload`` (consecutive buffers, as long as the
        payload in all), and verify it (``check_record``): the header's
        fields.  None if it is not all in the page cache (``cached_pages``), or
        the kernel cannot tell: the caller reads it through the mapping then,
        whose faults read around them as far as the disk's read-ahead goes
        (see the class).  Whatever the buffers hold is unverified unless this
        returns the header."""
        if not self._cachestat:
            return None
        file = self._file(segment_id, locate)
        header = bytearray(RECORD_HEADER.size)
        length = len(header) + sum(len(part) for part in payload)
        cached = file.in_cache(offset, offset + length)
        if cached is None:
            self._cachestat = False
        if not cached:
            return None
        try:
            got = os.preadv(file.fd, [header, *payload], offset)
        except OSError as exc:
            raise from_oserror(exc, f"reading segment {file.path}") from None
        if got < length:
            return None  # truncated: the mapping says so
        return check_record(header, payload, file.path, offset)

    def _file(self, segment_id: int, locate: Path | Callable[[], Path]) -> _SegmentFile:
        with self._lock:
            file = self._files.get(segment_id)
            if file is not None:
                self._files.move_to_end(segment_id)
                return file
        file = _SegmentFile(locate() if callable(locate) else locate)
        with self._lock:
            self._files[segment_id] = file
            while len(self._files) > self._max_maps:
                self._files.popitem(last=False)  # closed when no read holds it
        return file

    def _map_pages(self, mapping: mmap.mmap, start: int, end: int) -> None:
        """Map the pages of ``[start, end)`` in one call; a failure here is
        left to the read itself (the fault reports what is wrong)."""
        aligned = start - start % mmap.PAGESIZE
        try:
            mapping.madvise(MADV_POPULATE_READ, aligned, min(end, len(mapping)) - aligned)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS):
                self._populate = False  # an older kernel: page faults then
        except ValueError:
            pass  # closed meanwhile: the read says so

    def drop_pages(self) -> None:
        """Unmap the pages touched so far from this process (``MADV_DONTNEED``:
        a read maps them again from the page cache; views stay valid)."""
        with self._lock:
            self._touched = 0
            maps = [mapping for mapping, _ in self._maps.values()]
        for mapping in maps:
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                mapping.madvise(mmap.MADV_DONTNEED)

    def forget(self, segment_id: int) -> None:
        with self._lock:
            self._maps.pop(segment_id, None)
            self._files.pop(segment_id, None)

    def close(self) -> None:
        with self._lock:
            self._maps.clear()
            self._files.clear()


class Shard:
    """One shard: its lock, its active segment and its unpublished chunks."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.lock = threading.Lock()
        self.writer: SegmentWriter | None = None
        self.reopen: int | None = None  # segment id to continue appending to
        self.pending: dict[bytes, Location] = {}


#: Segments appended to since last published: id -> (writer, length to publish).
Dirty = dict[int, tuple[SegmentWriter, int]]


class SegmentStore:
    """The segment files of a store, for the one writing process (and readers)."""

    def __init__(self, root: Path, params: SegmentParams, *, fsync: bool, max_maps: int) -> None:
        self.root = root
        self.params = params
        self.fsync = fsync
        self.maps = SegmentMaps(max_maps)
        self.shards = [Shard(n) for n in range(params.shard_count)]
        self._dirty: dict[int, SegmentWriter] = {}
        self._dirty_lock = threading.Lock()
        self._sealed: list[SegmentWriter] = []
        self._next_id = 1
        self._id_lock = threading.Lock()
        self._syncing = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="cachefs-sync")
        #: Segments found missing or cut short when opening: segment id -> bytes
        #: left.  Chunks whose records lie beyond are not deduplicated against
        #: (a put stores them again) until fsck --repair settles the index.
        self.damaged: dict[int, int] = {}

    # --- opening ------------------------------------------------------------------

    def recover(
        self, published: dict[int, SegmentEntry], next_id: int, unreadable: set[int] | None = None
    ) -> bool:
        """Writer start-up: cut segments back to their published lengths, delete
        unpublished ones, note missing or short ones (returns whether any was:
        the store then needs fsck), and pick each shard's segment to go on with.
        Segments whose entries are ``unreadable`` (damaged) are left as they are."""
        self.root.mkdir(exist_ok=True)
        highest = max(published, default=0)
        present = set()
        for segment_id, path in list_segment_files(self.root):
            highest = max(highest, segment_id)
            if unreadable and segment_id in unreadable:
                continue  # fsck --repair rebuilds its entry from the file
            entry = published.get(segment_id)
            if entry is None:
                log.info("removing unpublished segment %s", path)
                path.unlink()
                continue
            present.add(segment_id)
            size = path.stat().st_size
            if size > entry.length:
                log.info("segment %s: cutting %d unpublished bytes", path, size - entry.length)
                with open(path, "r+b") as f:
                    f.truncate(entry.length)
                    os.fsync(f.fileno())
            elif size < entry.length:
                log.error(
                    "segment %s is shorter (%d) than published (%d): data was lost",
                    path,
                    size,
                    entry.length,
                )
                self.damaged[segment_id] = size
        for segment_id in published.keys() - present:
            log.error("segment %d is missing: its chunks are lost (run `cachefs fsck`)", segment_id)
            self.damaged[segment_id] = 0
        for segment_id, entry in published.items():
            if segment_id in self.damaged:
                continue  # never append inside a damaged segment's published range
            if segment_id in present and entry.length < self.params.max_size:
                shard = self.shards[entry.shard]
                if shard.reopen is None or segment_id > shard.reopen:
                    shard.reopen = segment_id
        self._next_id = max(next_id, highest + 1)
        return bool(self.damaged)

    def close(self) -> None:
        self._syncing.shutdown()  # first: no sync may meet a closed descriptor
        for writer in [s.writer for s in self.shards if s.writer] + self._sealed:
            writer.close()
        self.maps.close()

    # --- where things are ------------------------------------------------------------

    def path(self, shard: int, segment_id: int) -> Path:
        return segment_path(self.root, shard, segment_id, self.params)

    def chunk_path(self, digest: bytes, segment_id: int) -> Path:
        """The segment file of a chunk's record: always in its digest's shard
        (gc compacts within shards)."""
        return self.path(shard_of(digest, self.params), segment_id)

    def shard(self, digest: bytes) -> Shard:
        return self.shards[shard_of(digest, self.params)]

    @property
    def next_segment_id(self) -> int:
        return self._next_id

    def usable(self, entry: ChunkEntry) -> bool:
        """Whether a chunk's record lies in bytes that still exist (see
        ``damaged``): not when it is held remotely."""
        if entry.remote:
            return False
        left = self.damaged.get(entry.segment_id)
        return left is None or entry.offset + RECORD_HEADER.size + entry.stored_len <= left

    def active(self) -> set[int]:
        """Segments being appended to or to be continued, and dirty ones."""
        found = set()
        for shard in self.shards:
            if shard.writer is not None:
                found.add(shard.writer.segment_id)
            if shard.reopen is not None:
                found.add(shard.reopen)
        with self._dirty_lock:
            found |= set(self._dirty)
        return found

    # --- appending ---------------------------------------------------------------------

    def _writer(self, shard: Shard, need: int) -> SegmentWriter:
        """The shard's active segment, rotated when ``need`` more bytes would
        overflow it (caller holds the shard's lock)."""
        writer = shard.writer
        if writer is None and shard.reopen is not None:
            writer = SegmentWriter(
                self.path(shard.number, shard.reopen), shard.number, shard.reopen, create=False
            )
            shard.reopen = None
            shard.writer = writer
        if writer is not None and writer.length + need > self.params.max_size:
            with self._dirty_lock:
                if writer.segment_id in self._dirty:
                    self._sealed.append(writer)
                else:
                    writer.close()
            writer = None
        if writer is None:
            with self._id_lock:
                segment_id = self._next_id
                self._next_id += 1
            writer = SegmentWriter(
                self.path(shard.number, segment_id),
                shard.number,
                segment_id,
                create=True,
                sync_dirs=self.fsync,
            )
            shard.writer = writer
        return writer

    def _append(
        self, shard: Shard, head: bytes, payload: bytes | memoryview, point: str = "segment.append"
    ) -> tuple[int, int]:
        writer = self._writer(shard, len(head) + len(payload))
        offset = writer.append(head, payload, point)
        with self._dirty_lock:
            self._dirty[writer.segment_id] = writer
        return writer.segment_id, offset

    def append_chunk(
        self, shard: Shard, digest: bytes, flags: int, head: bytes, payload: bytes | memoryview
    ) -> tuple[Location, bool]:
        """Append a chunk's record unless another thread just did; its location
        stays pending until published.  Whether this call appended it."""
        with shard.lock:
            location = shard.pending.get(digest)
            if location is not None:
                return location, False
            segment_id, offset = self._append(shard, head, payload)
            location = Location(segment_id, offset, len(payload), flags)
            shard.pending[digest] = location
        return location, True

    def copy_records(self, shard_number: int, records: Iterable[Record]) -> dict[bytes, Location]:
        """Append verbatim copies of records (headers and checksums hold no
        location, so a copy is valid as it stands) to a shard's active segment."""
        shard = self.shards[shard_number]
        moved: dict[bytes, Location] = {}
        with shard.lock:
            for record in records:
                segment_id, offset = self._append(shard, b"", record.raw, "gc.move")
                moved[record.digest] = Location(
                    segment_id, offset, len(record.payload), record.flags
                )
        return moved

    def forget_pending(self, digests: Iterable[bytes]) -> None:
        """Published chunks are in the index now."""
        for digest in digests:
            self.shard(digest).pending.pop(digest, None)

    def clear_pending(self) -> None:
        """No ingest runs (maintenance): what is pending belongs to abandoned puts."""
        for shard in self.shards:
            shard.pending.clear()

    # --- publishing lengths --------------------------------------------------------------

    def snapshot(self, sync: bool) -> Dirty:
        """Dirty segments with the length to publish (fdatasync'ed first when ``sync``)."""
        with self._dirty_lock:
            dirty = list(self._dirty.values())
        if not sync:
            return {w.segment_id: (w, w.length) for w in dirty}
        if len(dirty) == 1:
            return {dirty[0].segment_id: (dirty[0], dirty[0].sync())}
        # Several (a large object spreads over every shard): synced together,
        # all of them finished (failed or not) before the first error is raised.
        try:
            futures = [self._syncing.submit(SegmentWriter.sync, w) for w in dirty]
        except RuntimeError:  # the pool is shut down (closing, interpreter exit)
            return {w.segment_id: (w, w.sync()) for w in dirty}
        wait(futures)
        return {w.segment_id: (w, f.result()) for w, f in zip(dirty, futures, strict=True)}

    def published(self, dirty: Dirty) -> None:
        """After commit: segments with nothing newer (and, with fsync, synced) are
        clean; close sealed ones.  An unsynced segment stays dirty, so that the
        next durable commit syncs it."""
        with self._dirty_lock:
            for segment_id, (writer, length) in dirty.items():
                synced = not self.fsync or writer.synced_length >= length
                if writer.length == length and synced:
                    self._dirty.pop(segment_id, None)
            still_sealed = []
            for writer in self._sealed:
                if writer.segment_id in self._dirty:
                    still_sealed.append(writer)
                else:
                    writer.close()
            self._sealed = still_sealed

    def seal(self, segment_ids: set[int]) -> None:
        """Stop appending to these segments (no ingest may run: maintenance)."""
        for shard in self.shards:
            with shard.lock:
                if shard.reopen in segment_ids:
                    shard.reopen = None
                writer = shard.writer
                if writer is not None and writer.segment_id in segment_ids:
                    shard.writer = None
                    with self._dirty_lock:
                        self._dirty.pop(writer.segment_id, None)
                    writer.close()

    # --- reading and deleting ---------------------------------------------------------------

    def read_record(
        self, segment_id: int, locate: Path | Callable[[], Path], offset: int, stored_len: int
    ) -> Record:
        """The verified record at ``offset`` of a segment (see ``SegmentMaps.read``)."""
        return self.maps.read(segment_id, locate, offset, stored_len)

    def delete(self, segment_id: int, path: Path) -> int:
        """Delete a segment file nothing refers to; returns the bytes freed."""
        self.maps.forget(segment_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size
