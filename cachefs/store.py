"""The storage engine: a content-addressed, deduplicating, compressed chunk store.

This is the layer everything else stands on; it knows nothing of FUSE.  It owns
the write pipeline (chunk, hash, look up, compress, append, publish), reads,
reference counting, crash recovery and the staged-write path through the WAL.
``gc.py`` and ``fsck.py`` do maintenance on an open :class:`Store`.

Ingest of one object::

    source --read 4 MiB buffers--> FastCDC cut --> per chunk (worker threads):
        digest, index lookup, [compress], append to the shard's segment
    --> recipe (chunk digests in order) --> publish: one LMDB transaction

Publishing is the only step that makes an object visible.  Segment bytes a
publication refers to are fdatasync'ed before its transaction commits, and the
transaction also records each touched segment's published length, so after a
crash a writer cuts every segment back to what was published.  An object is
therefore wholly present or wholly absent, whatever moment a crash hits.

Concurrency invariants:

* One writing process per store: ``STORE/lock`` is flock()ed exclusively.
  Read-only openers take no lock and see the last committed state (LMDB MVCC).
* Within the writer, any number of threads may read and put at once.  Each
  shard has a lock that serialises appends to its active segment; a dict of
  chunks appended but not yet published (``_Shard.pending``) makes concurrent
  puts of the same new chunk store it once.
* Publications are serialised by ``_commit_lock`` and grouped: a thread that
  takes the lock publishes every publication queued so far in one transaction
  (group commit), so concurrent puts share one fdatasync.
* ``gc`` and ``fsck --repair`` take ``_maintenance`` exclusively; puts and
  staged commits hold it shared, so a chunk found by lookup cannot be collected
  before the object that found it is published.
* Reads need no lock.  A read whose segment vanished under it (gc compaction)
  looks the chunk up again once.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import functools
import itertools
import logging
import os
import shutil
import stat
import struct
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import zstandard

from cachefs.chunker import Batch, Chunker, Source, reader_for
from cachefs.digest import Digest
from cachefs.errors import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    ObjectNotFoundError,
    ReadOnlyError,
    StoreLockedError,
    StoreNotFoundError,
    from_oserror,
)
from cachefs.header import HEADER_NAME, StoreConfig, read_header, write_header
from cachefs.index import INDEX_NAME, ChunkEntry, Index, ObjectEntry, SegmentEntry, lmdb_error
from cachefs.segment import (
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    RECORD_HEADER,
    TAG_CHUNK,
    SegmentMaps,
    SegmentWriter,
    encode_record_header,
    list_segment_files,
    record_flags,
    segment_path,
    shard_of,
)
from cachefs.wal import WriteAheadLog

log = logging.getLogger(__name__)

# WAL record kinds logged by staged objects.  Payloads: handle = the sequence
# number of the object's BEGIN record.
WAL_BEGIN = 1  # empty
WAL_WRITE = 2  # handle Q, offset Q, data
WAL_COMMIT = 3  # handle Q
WAL_ABORT = 4  # handle Q
_WAL_HANDLE = struct.Struct("<Q")
_HANDLE_KEY = struct.Struct(">Q")  # wal_applied keys sort numerically
_WAL_WRITE = struct.Struct("<QQ")
_WAL_MAX_WRITE = 16 << 20
_APPLIED = struct.Struct("<32sQ")

#: Disk space kept aside so that files can be deleted on a full disk (``ensure_reserve``).
RESERVE_NAME = "reserve"
RESERVE_SIZE = 8 << 20

#: Objects of up to this size are processed in the calling thread (no pool hop).
_INLINE_LIMIT = 1 << 20
#: Compression is tried on a sample first for chunks of at least this size.
_PROBE_MIN = 16 * 1024
_PROBE_SLICE = 2048
_PROBE_LEVEL = 1
#: Files ingested by one task of ``put_files``.
_FILES_PER_TASK = 16
#: Chunks stored by one worker task (fewer, longer tasks: less GIL traffic).
_TASK_CHUNKS = 8
#: Object layouts (chunk offsets) kept for reads.
_LAYOUTS = 256
#: Chunks looked up together when reading; compressed ones among them are
#: decompressed ahead of the reader, in the worker pool.
_READ_WINDOW = 16


@dataclass(frozen=True)
class StoreOptions:
    """Run-time settings (not part of the on-disk format)."""

    #: Bytes of decompressed chunks kept in memory for reads.
    cache_size: int = 64 << 20
    #: fdatasync segments, index and WAL at every durable point.  Off only for
    #: throwaway stores (survives a process crash, not a machine crash).
    fsync: bool = True
    #: Worker threads for chunk hashing and compression.
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    #: Segments whose live bytes fall below this fraction are compacted by gc.
    gc_live_threshold: float = 0.5
    #: The WAL is checkpointed once it is this large and no staged object is open.
    wal_checkpoint_bytes: int = 64 << 20
    #: Open segment mappings kept for reads.
    max_maps: int = 256
    #: Read buffer size of the ingest pipeline.
    buffer_size: int = 4 << 20

    def validate(self) -> None:
        if self.cache_size < 0:
            raise ConfigError("cache size must not be negative")
        if self.workers < 1:
            raise ConfigError("need at least one worker thread")
        if not 0.0 <= self.gc_live_threshold <= 1.0:
            raise ConfigError("gc live threshold must be a fraction in [0, 1]")


#: A progress callback of long maintenance work: (done, total), in bytes or items.
Progress = Callable[[int, int], None]

#: Called with the publishing transaction and the object's digest; it may
#: record the reference it now owns elsewhere in the index (the namespace).
PublishHook = Callable[[lmdb.Transaction, Digest], None]


@dataclass(frozen=True)
class Location:
    """Where a chunk appended by this process lies (not yet in the index)."""

    segment_id: int
    offset: int
    stored_len: int
    flags: int


@dataclass
class PendingObject:
    """An ingested object waiting to be published."""

    digest: Digest
    chunks: list[tuple[bytes, int]]
    locations: dict[bytes, Location]
    wal_handle: int | None = None
    #: Called inside the publishing transaction, after the object's reference
    #: was added (see :meth:`Store.put`).
    on_publish: PublishHook | None = None


@dataclass
class StoreStats:
    objects: int
    files: int
    logical_bytes: int
    chunks: int
    chunk_bytes: int
    stored_bytes: int
    segments: int
    segment_bytes: int
    segments_below_threshold: int
    live_histogram: list[int]

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.chunk_bytes if self.chunk_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.chunk_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def live_ratio(self) -> float:
        return self.stored_bytes / self.segment_bytes if self.segment_bytes else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "objects": self.objects,
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "dedup_ratio": round(self.dedup_ratio, 4),
            "compression_ratio": round(self.compression_ratio, 4),
            "segments": self.segments,
            "segment_bytes": self.segment_bytes,
            "live_ratio": round(self.live_ratio, 4),
            "segments_below_gc_threshold": self.segments_below_threshold,
            "segment_live_histogram": self.live_histogram,
        }


class _SharedExclusive:
    """A lock held shared by many threads or exclusively by one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Shard:
    def __init__(self, number: int) -> None:
        self.number = number
        self.lock = threading.Lock()
        self.writer: SegmentWriter | None = None
        self.reopen: int | None = None  # segment id to continue appending to
        self.pending: dict[bytes, Location] = {}


class _ChunkCache:
    """LRU of decompressed chunks, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


class _Ticket:
    __slots__ = ("done", "durable", "error", "objects")

    def __init__(self, objects: list[PendingObject], durable: bool) -> None:
        self.objects = objects
        self.durable = durable
        self.done = False
        self.error: BaseException | None = None


class Store:
    """A chunk store on a directory.  Use :meth:`open`; close it (or use ``with``)."""

    def __init__(
        self,
        path: Path,
        config: StoreConfig,
        options: StoreOptions,
        *,
        readonly: bool,
        lock_fd: int | None,
    ) -> None:
        self.path = path
        self.config = config
        self.options = options
        self.readonly = readonly
        self._lock_fd = lock_fd
        self.digest_function = config.digest
        self.chunker = Chunker(config.chunking, options.buffer_size)
        self.index = Index(path, readonly=readonly, fsync=options.fsync)
        self.maps = SegmentMaps(options.max_maps)
        self.cache = _ChunkCache(options.cache_size)
        #: References dropped since the store was opened (whether gc may find
        #: garbage that it did not find last time).
        self.dropped = 0
        self._layouts: OrderedDict[Digest, tuple[list[tuple[bytes, int]], list[int]]] = (
            OrderedDict()
        )
        self._layouts_lock = threading.Lock()
        self.segments_root = path / "segments"
        self.tmp_root = path / "tmp"
        #: Set when damage was met; the store should be checked with fsck.
        self.needs_fsck = False
        self.corruptions = 0
        #: Digests of staged objects published by WAL replay when opening.
        self.replayed: list[Digest] = []
        self._local = threading.local()
        self._shards = [_Shard(n) for n in range(config.segments.shard_count)]
        self._dirty: dict[int, SegmentWriter] = {}
        self._dirty_lock = threading.Lock()
        self._sealed: list[SegmentWriter] = []
        self._next_segment_id = 1
        self._segment_id_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self._queue_lock = threading.Lock()
        self._maintenance = _SharedExclusive()
        self._pool: ThreadPoolExecutor | None = None
        self._open_staged: set[int] = set()
        self._staged_lock = threading.Lock()
        self.wal: WriteAheadLog | None = None
        #: Segments found missing or cut short when opening: segment id -> bytes
        #: left.  Chunks whose records lie beyond are not deduplicated against
        #: (a put stores them again) until fsck --repair settles the index.
        self._damaged: dict[int, int] = {}
        self._closed = False
        if not readonly:
            try:
                self._recover()
            except BaseException as exc:
                self._release_files()
                self.index.close()
                if isinstance(exc, OSError):
                    raise from_oserror(exc, f"recovering store {path}") from None
                raise

    # --- opening and closing -------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        create: bool = False,
        config: StoreConfig | None = None,
        options: StoreOptions | None = None,
    ) -> Store:
        """Open the store at ``path``; with ``create``, make it first if missing.

        Raises StoreNotFoundError, StoreLockedError (another writer),
        FormatVersionError (newer store; nothing is modified), CorruptDataError.
        """
        path = Path(path).absolute()
        options = options or StoreOptions()
        options.validate()
        if readonly:
            if create:
                raise ConfigError("cannot create a store read-only")
            config_found = read_header(path)
            if not (path / INDEX_NAME).exists():
                raise StoreNotFoundError(f"{path} has no index ({INDEX_NAME})")
            return cls(path, config_found, options, readonly=True, lock_fd=None)
        if create:
            if config is not None:
                config.validate()
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise from_oserror(exc, f"creating store directory {path}") from None
        # Refuse what must be refused before the lock file is created, so that a
        # refused store or directory is left exactly as it was.
        if (path / HEADER_NAME).exists() or not create:
            read_header(path)  # raises the precise "not found" / "too new" error
        else:
            _check_empty(path)
        lock_fd = _lock_store(path)
        try:
            if not (path / HEADER_NAME).exists():
                if not create:
                    raise StoreNotFoundError(f"no store at {path}")
                _check_empty(path)
                write_header(path, config or StoreConfig())
            found = read_header(path)
            if config is not None and create and config != found:
                log.info("store %s exists; using its own configuration", path)
            return cls(path, found, options, readonly=False, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def close(self) -> None:
        """Publish nothing new; make what was published durable; release everything."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if not self.readonly:
                try:
                    self._publish([], durable=True)  # syncs what durable=False left
                    self._maybe_checkpoint(force=not self._open_staged)
                except CachefsError as exc:
                    # Keeping the log is safe: replay skips what was published.
                    log.warning("could not sync or checkpoint on close: %s", exc)
        finally:
            self._release_files()
            self.maps.close()
            self.cache.clear()
            self.index.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _release_files(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for writer in [shard.writer for shard in self._shards if shard.writer] + self._sealed:
            writer.close()
        if self.wal is not None:
            self.wal.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open read-only")
        if self._closed:
            raise CachefsError(f"store {self.path} is closed")

    def _recover(self) -> None:
        """Writer start-up: cut segments back to what was published, drop debris, replay WAL."""
        self.segments_root.mkdir(exist_ok=True)
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir(exist_ok=True)
        with self.index.read() as txn:
            published = dict(self.index.iter_segments(txn))
            next_id = self.index.counter(txn, "next_segment_id")
        highest = max(published, default=0)
        present = set()
        for segment_id, path in list_segment_files(self.segments_root):
            highest = max(highest, segment_id)
            present.add(segment_id)
            entry = published.get(segment_id)
            if entry is None:
                log.info("removing unpublished segment %s", path)
                path.unlink()
                present.discard(segment_id)
                continue
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
                self.needs_fsck = True
                self._damaged[segment_id] = size
        for segment_id in published.keys() - present:
            log.error("segment %d is missing: its chunks are lost (run `cachefs fsck`)", segment_id)
            self.needs_fsck = True
            self._damaged[segment_id] = 0
        for segment_id, entry in published.items():
            if segment_id in self._damaged:
                continue  # never append inside a damaged segment's published range
            if segment_id in present and entry.length < self.config.segments.max_size:
                shard = self._shards[entry.shard]
                if shard.reopen is None or segment_id > shard.reopen:
                    shard.reopen = segment_id
        self._next_segment_id = max(next_id, highest + 1)
        self.wal = WriteAheadLog(self.path / "wal", fsync=self.options.fsync)
        self._replay_wal()

    # --- the write pipeline ---------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "comp", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(
                level=self.config.compression.level, write_checksum=False
            )
            self._local.comp = comp
        return comp

    def _probe_compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "probe", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=_PROBE_LEVEL, write_checksum=False)
            self._local.probe = comp
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec: zstandard.ZstdDecompressor | None = getattr(self._local, "dec", None)
        if dec is None:
            dec = zstandard.ZstdDecompressor()
            self._local.dec = dec
        return dec

    def _encode(self, view: memoryview, probe: bool) -> tuple[int, bytes | memoryview]:
        """Choose raw or zstd for a chunk: (compression, payload).

        With ``probe`` (the previous chunk of the object did not compress), a
        sample is tried first.
        """
        n = len(view)
        keep = 1.0 - self.config.compression.min_saving
        comp = self._compressor()
        if probe and n >= _PROBE_MIN:
            # A cheap look at three slices: incompressible data (already
            # compressed, random) is stored raw without compressing it all.
            step = (n - _PROBE_SLICE) // 2
            sample = b"".join(view[i : i + _PROBE_SLICE] for i in (0, step, n - _PROBE_SLICE))
            if len(self._probe_compressor().compress(sample)) > len(sample) * 0.98:
                return COMPRESSION_NONE, view
        packed = comp.compress(view)
        if len(packed) <= n * keep:
            return COMPRESSION_ZSTD, packed
        return COMPRESSION_NONE, view

    def _allocate_segment_id(self) -> int:
        with self._segment_id_lock:
            segment_id = self._next_segment_id
            self._next_segment_id += 1
            return segment_id

    def _writer(self, shard: _Shard, need: int) -> SegmentWriter:
        """The shard's active segment, rotated when ``need`` more bytes would overflow it."""
        writer = shard.writer
        max_size = self.config.segments.max_size
        if writer is None and shard.reopen is not None:
            path = segment_path(
                self.segments_root, shard.number, shard.reopen, self.config.segments
            )
            writer = SegmentWriter(path, shard.number, shard.reopen, create=False)
            shard.reopen = None
            shard.writer = writer
        if writer is not None and writer.length + need > max_size:
            with self._dirty_lock:
                if writer.segment_id in self._dirty:
                    self._sealed.append(writer)
                else:
                    writer.close()
            writer = None
        if writer is None:
            segment_id = self._allocate_segment_id()
            path = segment_path(self.segments_root, shard.number, segment_id, self.config.segments)
            writer = SegmentWriter(
                path, shard.number, segment_id, create=True, sync_dirs=self.options.fsync
            )
            shard.writer = writer
        return writer

    def _seal_segments(self, segment_ids: set[int]) -> None:
        """Stop appending to these segments (caller holds ``_maintenance`` exclusively)."""
        for shard in self._shards:
            with shard.lock:
                if shard.reopen in segment_ids:
                    shard.reopen = None
                writer = shard.writer
                if writer is not None and writer.segment_id in segment_ids:
                    shard.writer = None
                    with self._dirty_lock:
                        self._dirty.pop(writer.segment_id, None)
                    writer.close()

    def _usable(self, entry: ChunkEntry) -> bool:
        """Whether a chunk's record lies in bytes that still exist (see ``_damaged``)."""
        left = self._damaged.get(entry.segment_id)
        return left is None or entry.offset + RECORD_HEADER.size + entry.stored_len <= left

    def _store_chunk(
        self, view: memoryview, probe: bool = True
    ) -> tuple[bytes, int, Location | None, int | None]:
        """Digest a chunk and make sure it is stored.

        Returns (digest, raw length, location if appended by this process,
        compression used if it was encoded now).
        """
        digest = self.digest_function.hash(view)
        shard = self._shards[shard_of(digest, self.config.segments)]
        location = shard.pending.get(digest)
        if location is not None:
            return digest, len(view), location, None
        with self.index.read() as txn:
            raw = txn.get(digest, db=self.index.chunks)
        if raw is not None and (not self._damaged or self._usable(ChunkEntry.unpack(raw))):
            return digest, len(view), None, None
        compression, payload = self._encode(view, probe)
        flags = record_flags(compression, self.digest_function.ident)
        head = encode_record_header(TAG_CHUNK, flags, len(view), digest, payload)
        with shard.lock:
            location = shard.pending.get(digest)
            if location is None:
                writer = self._writer(shard, len(head) + len(payload))
                offset = writer.append(head, payload)
                location = Location(writer.segment_id, offset, len(payload), flags)
                shard.pending[digest] = location
                with self._dirty_lock:
                    self._dirty[writer.segment_id] = writer
        return digest, len(view), location, compression

    def _pool_get(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._segment_id_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.options.workers, thread_name_prefix="cachefs-chunk"
                    )
        return self._pool

    def _batches(self, source: Source) -> Iterator[Batch]:
        """The chunks of any source, in batches (see ``Chunker.batches``)."""
        if isinstance(source, bytes | bytearray | memoryview):
            return self.chunker.view_batches(memoryview(source).cast("B"))
        size_hint = None
        fileno = getattr(source, "fileno", None)
        if fileno is not None:
            with suppress(OSError, ValueError, AttributeError):
                st = os.fstat(fileno())
                if stat.S_ISREG(st.st_mode):
                    size_hint = max(0, st.st_size - source.tell())  # type: ignore[union-attr]
        return self.chunker.batches(reader_for(source), size_hint)

    def _store_chunks(self, views: list[memoryview]) -> list[tuple[bytes, int, Location | None]]:
        """Store consecutive chunks of one object.  The first chunk, and any after
        one that did not compress, is probed on a sample first; a chunk after one
        that compressed is compressed straight away (no probe on compressible data)."""
        stored = []
        probe = True
        for view in views:
            digest, raw_len, location, compression = self._store_chunk(view, probe)
            if compression is not None:
                probe = compression == COMPRESSION_NONE
            stored.append((digest, raw_len, location))
        return stored

    def _ingest(self, source: Source) -> PendingObject:
        """Chunk, digest and store every chunk of a source; nothing is published yet.

        The calling thread reads and cuts; a lane of its own computes the
        whole-object digest (one hash call per buffer, in order); worker
        threads store the chunks, several per task.  Few, long GIL-free calls
        keep every core busy: many short ones would queue for the GIL.
        """
        batches = self._batches(source)
        first = next(batches)
        second = next(batches, None)
        if second is None and len(first.chunks) == 1:
            # One chunk: its digest is the object's digest; no second hash.
            digest, raw_len, location, _ = self._store_chunk(first.chunks[0])
            locations = {} if location is None else {digest: location}
            return PendingObject(Digest(digest, raw_len), [(digest, raw_len)], locations)
        inline = second is None and len(first.span) <= _INLINE_LIMIT
        whole = self.digest_function.new()
        size = 0
        results: list[tuple[bytes, int, Location | None]] = []
        in_flight: deque[Future[list[tuple[bytes, int, Location | None]]]] = deque()
        hashed: deque[Future[object]] = deque()
        # The whole-object hash is sequential: its own lane, a thread that takes
        # the buffers in order, so that the reading thread only reads and cuts.
        lane = None if inline else ThreadPoolExecutor(1, thread_name_prefix="cachefs-hash")

        def drain(keep: int, keep_hashed: int) -> None:
            while len(in_flight) > keep:
                results.extend(in_flight.popleft().result())
            while len(hashed) > keep_hashed:
                hashed.popleft().result()

        try:
            for batch in itertools.chain([first], [] if second is None else [second], batches):
                size += len(batch.span)
                if lane is None:
                    results.extend(self._store_chunks(batch.chunks))
                    whole.update(batch.span)
                    continue
                pool = self._pool_get()
                hashed.append(lane.submit(whole.update, batch.span))
                tasks = 0
                for i in range(0, len(batch.chunks), _TASK_CHUNKS):
                    group = batch.chunks[i : i + _TASK_CHUNKS]
                    in_flight.append(pool.submit(self._store_chunks, group))
                    tasks += 1
                # Finish the previous batch: its buffer is reused for the next but one.
                drain(tasks, 1)
            drain(0, 0)
        except BaseException:
            outstanding: list[Future[Any]] = [*in_flight, *hashed]
            for fut in outstanding:
                fut.cancel()
            for fut in outstanding:
                with suppress(BaseException):
                    fut.result()
            raise
        finally:
            if lane is not None:
                lane.shutdown(wait=True)
        chunks = [(digest, raw_len) for digest, raw_len, _ in results]
        locations = {digest: loc for digest, _, loc in results if loc is not None}
        return PendingObject(Digest(whole.digest(), size), chunks, locations)

    # --- publishing -----------------------------------------------------------

    def _publish(self, objects: list[PendingObject], *, durable: bool) -> None:
        """Make ``objects`` visible, atomically each (group commit with other threads)."""
        ticket = _Ticket(objects, durable)
        with self._queue_lock:
            self._queue.append(ticket)
        with self._commit_lock:
            if not ticket.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    self._commit(
                        [o for t in batch for o in t.objects],
                        durable=any(t.durable for t in batch),
                    )
                except BaseException as exc:
                    for t in batch:
                        t.error = exc
                    raise
                finally:
                    for t in batch:
                        t.done = True
        if ticket.error is not None:
            raise ticket.error

    def _snapshot_dirty(self, sync: bool) -> dict[int, tuple[SegmentWriter, int]]:
        """Segments appended to since last published, with the length to publish
        (fdatasync'ed first when ``sync``)."""
        with self._dirty_lock:
            dirty = list(self._dirty.values())
        return {w.segment_id: (w, w.sync() if sync else w.length) for w in dirty}

    def _publish_lengths(
        self,
        txn: lmdb.Transaction,
        dirty: dict[int, tuple[SegmentWriter, int]],
        segments: dict[int, SegmentEntry],
    ) -> Callable[[int, int], SegmentEntry]:
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
            max(self.index.counter(txn, "next_segment_id"), self._next_segment_id),
        )
        return segment

    def _published(self, dirty: dict[int, tuple[SegmentWriter, int]]) -> None:
        """After commit: segments with nothing newer (and, with fsync, synced) are
        clean; close sealed ones.  An unsynced segment stays dirty, so that the
        next durable commit syncs it."""
        with self._dirty_lock:
            for segment_id, (writer, length) in dirty.items():
                synced = not self.options.fsync or writer.synced_length >= length
                if writer.length == length and synced:
                    self._dirty.pop(segment_id, None)
            still_sealed = []
            for writer in self._sealed:
                if writer.segment_id in self._dirty:
                    still_sealed.append(writer)
                else:
                    writer.close()
            self._sealed = still_sealed

    def _commit(self, objects: list[PendingObject], *, durable: bool) -> None:
        sync = durable and self.options.fsync
        dirty = self._snapshot_dirty(sync)
        try:
            with self.index.write() as txn:
                segments: dict[int, SegmentEntry] = {}
                segment = self._publish_lengths(txn, dirty, segments)
                deltas: Counter[str] = Counter()
                for obj in objects:
                    self._publish_one(txn, obj, segment, deltas)
                for name, delta in deltas.items():
                    self.index.add(txn, name, delta)
                for segment_id, entry in segments.items():
                    self.index.put_segment(txn, segment_id, entry)
        except lmdb.Error as exc:
            raise lmdb_error(exc, "publishing objects") from None
        if sync:
            self.index.sync()
        # Published chunks are in the index now; forget them as pending.
        for obj in objects:
            for digest in obj.locations:
                shard = self._shards[shard_of(digest, self.config.segments)]
                shard.pending.pop(digest, None)
        self._published(dirty)

    def _publish_one(
        self,
        txn: lmdb.Transaction,
        obj: PendingObject,
        segment: Callable[[int, int], SegmentEntry],
        deltas: Counter[str],
    ) -> None:
        """Publish one object in ``txn``; counter changes are added to ``deltas``."""
        index = self.index
        key = obj.digest.hash
        existing = index.get_object(txn, key)
        if existing is not None and existing.size == obj.digest.size:
            existing.refcount += 1
            index.put_object(txn, key, existing)
            if self._damaged:  # chunks of it that were lost have just been stored again
                for digest, fresh in obj.locations.items():
                    entry = index.get_chunk(txn, digest)
                    if entry is not None and not self._usable(entry):
                        self._relocate(entry, fresh, digest, segment, deltas)
                        index.put_chunk(txn, digest, entry)
        else:
            if existing is not None:
                raise CorruptDataError(
                    f"object {obj.digest.hex} is indexed with size {existing.size}, "
                    f"not {obj.digest.size}"
                )
            lengths = dict(obj.chunks)
            for digest, count in Counter(d for d, _ in obj.chunks).items():
                entry = index.get_chunk(txn, digest)
                location = obj.locations.get(digest)
                if entry is not None:
                    if location is not None and self._damaged and not self._usable(entry):
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
                seg = segment(location.segment_id, shard_of(digest, self.config.segments))
                seg.live_bytes += record_size
                seg.live_records += 1
                deltas["chunks"] += 1
                deltas["chunk_bytes"] += raw_len
                deltas["stored_bytes"] += record_size
            index.put_object(txn, key, ObjectEntry(obj.digest.size, 1, obj.chunks))
            deltas["objects"] += 1
        deltas["files"] += 1
        deltas["logical_bytes"] += obj.digest.size
        if obj.wal_handle is not None:
            txn.put(
                _HANDLE_KEY.pack(obj.wal_handle),
                _APPLIED.pack(obj.digest.hash, obj.digest.size),
                db=index.wal_applied,
            )
        if obj.on_publish is not None:
            obj.on_publish(txn, obj.digest)

    def _relocate(
        self,
        entry: ChunkEntry,
        location: Location,
        digest: bytes,
        segment: Callable[[int, int], SegmentEntry],
        deltas: Counter[str],
    ) -> None:
        """Point an index entry whose record was lost at a fresh copy."""
        shard = shard_of(digest, self.config.segments)
        old = segment(entry.segment_id, shard)
        old.live_bytes = max(0, old.live_bytes - RECORD_HEADER.size - entry.stored_len)
        old.live_records = max(0, old.live_records - 1)
        new = segment(location.segment_id, shard)
        new.live_bytes += RECORD_HEADER.size + location.stored_len
        new.live_records += 1
        deltas["stored_bytes"] += location.stored_len - entry.stored_len
        entry.segment_id, entry.offset = location.segment_id, location.offset
        entry.stored_len, entry.flags = location.stored_len, location.flags
        log.warning("chunk %s was lost and is stored again", digest.hex())

    # --- public write API -------------------------------------------------------

    def sync(self) -> None:
        """Make everything published so far durable (after ``durable=False`` puts)."""
        self._check_writable()
        self._publish([], durable=True)

    def put(
        self, source: Source, *, durable: bool = True, on_publish: PublishHook | None = None
    ) -> Digest:
        """Store an object and add one reference to it; return its digest.

        ``source`` is bytes, a binary file object or an iterable of byte
        strings; it is read once, in buffers, so it may be larger than memory.
        When this returns with ``durable`` true, the object survives a crash.
        ``on_publish`` runs inside the transaction that publishes the object
        (it shares it with other objects published at the same moment, so it
        must not fail but for a broken index); whatever it writes becomes
        visible atomically with the object.
        """
        return self._put_pending(lambda: self._ingest(source), durable, on_publish)

    def _put_pending(
        self,
        ingest: Callable[[], PendingObject],
        durable: bool,
        on_publish: PublishHook | None,
    ) -> Digest:
        """Ingest (under the maintenance lock, so that gc cannot collect chunks the
        ingest found) and publish one object."""
        self._check_writable()
        with self._maintenance.shared():
            pending = ingest()
            pending.on_publish = on_publish
            self._publish([pending], durable=durable)
        return pending.digest

    def put_revision(
        self,
        base: Digest,
        size: int,
        changed: list[tuple[int, int]],
        read_range: Callable[[int, int], Iterable[bytes | memoryview]],
        *,
        durable: bool = True,
        on_publish: PublishHook | None = None,
    ) -> Digest:
        """Store a new revision of the object ``base`` and add a reference to it.

        The new content is ``size`` bytes; it may differ from ``base`` only in
        the sorted, disjoint ranges ``changed`` (bytes past the end of ``base``
        must be in them); ``read_range(start, stop)`` yields its bytes.  Only the
        region around each change is chunked again: the content-defined cuts
        fall again on the base's chunk boundaries shortly after a change, and
        from there the base's chunks are taken as they are, without chunking,
        digesting or looking them up.  The whole-object digest still reads every
        byte.  See :meth:`put` for ``durable`` and ``on_publish``.
        """
        return self._put_pending(
            lambda: self._splice(base, size, changed, read_range), durable, on_publish
        )

    def _splice(
        self,
        base: Digest,
        size: int,
        changed: list[tuple[int, int]],
        read_range: Callable[[int, int], Iterable[bytes | memoryview]],
    ) -> PendingObject:
        chunks, starts = self._layout(base)
        resume = {
            start + length: i + 1
            for i, (start, (_, length)) in enumerate(zip(starts, chunks, strict=True))
        }
        ranges = [(s, min(e, size)) for s, e in changed if s < min(e, size)]
        range_ends = [e for _, e in ranges]
        whole = self.digest_function.new()
        out: list[tuple[bytes, int]] = []
        locations: dict[bytes, Location] = {}
        position = 0
        base_index = 0  # chunks[base_index] starts at position while reusing
        while position < size:
            # The next change at or after position (ranges end past it).
            r = bisect.bisect_right(range_ends, position)
            next_change = ranges[r][0] if r < len(ranges) else size
            while (
                base_index < len(chunks)
                and starts[base_index] == position
                and position + chunks[base_index][1] <= min(next_change, size)
            ):
                digest, length = chunks[base_index]
                whole.update(self.read_chunk(digest))
                out.append((digest, length))
                position += length
                base_index += 1
            if position >= size:
                break
            # Cut again from here until a cut lands on a base boundary past the
            # change and outside every changed range.
            reader = reader_for(read_range(position, size))
            resynced = False
            for batch in self.chunker.batches(reader, size - position):
                views = []
                end = position
                for view in batch.chunks:
                    views.append(view)
                    end += len(view)
                    if end > next_change and end in resume and end < size:
                        r = bisect.bisect_right(range_ends, end)
                        if r >= len(ranges) or ranges[r][0] >= end:
                            resynced = True
                            break
                for digest, length, location in self._store_chunks(views):
                    out.append((digest, length))
                    if location is not None:
                        locations[digest] = location
                for view in views:
                    whole.update(view)
                    position += len(view)
                if resynced:
                    base_index = resume[position]
                    break
            if not resynced:
                break
        if position != size:
            raise CachefsError(
                f"a revision of {base} came out {position} bytes long, not {size}",
                hint="the content changed while it was being stored; this is a bug",
            )
        return PendingObject(Digest(whole.digest(), size), out, locations)

    def put_files(
        self, paths: Iterable[Path], *, durable: bool = True, batch_bytes: int = 256 << 20
    ) -> Iterator[tuple[Path, Digest | CachefsError]]:
        """Store many files, several at a time, publishing them in groups.

        Yields ``(path, digest)`` in the order given once the file's group is
        published (and durable, with ``durable``), or ``(path, error)`` for a
        file that could not be read.
        """
        self._check_writable()

        def ingest(group: list[Path]) -> list[PendingObject | CachefsError]:
            results: list[PendingObject | CachefsError] = []
            for path in group:
                try:
                    with open(path, "rb", buffering=0) as f:
                        results.append(self._ingest(f))
                except OSError as exc:  # this file could not be read; the others go on
                    results.append(from_oserror(exc, f"reading {path}"))
            return results

        with (
            self._maintenance.shared(),
            ThreadPoolExecutor(self.options.workers, thread_name_prefix="cachefs-put") as files,
        ):
            # Files go to the threads in groups: a hand-over between threads costs
            # more than ingesting a small file does.
            window: deque[tuple[list[Path], Future[list[PendingObject | CachefsError]]]] = deque()
            ready: list[tuple[Path, PendingObject | CachefsError]] = []
            ready_bytes = 0

            def flush() -> Iterator[tuple[Path, Digest | CachefsError]]:
                nonlocal ready, ready_bytes
                objects = [r for _, r in ready if isinstance(r, PendingObject)]
                if objects:
                    self._publish(objects, durable=durable)
                for path, result in ready:
                    yield path, result.digest if isinstance(result, PendingObject) else result
                ready, ready_bytes = [], 0

            def collect(keep: int) -> Iterator[tuple[Path, Digest | CachefsError]]:
                nonlocal ready_bytes
                while len(window) > keep:
                    group, fut = window.popleft()
                    for path, result in zip(group, fut.result(), strict=True):
                        ready.append((path, result))
                        if isinstance(result, PendingObject):
                            ready_bytes += result.digest.size
                    if ready_bytes >= batch_bytes or len(ready) >= 4096:
                        yield from flush()

            remaining = iter(paths)
            while group := list(itertools.islice(remaining, _FILES_PER_TASK)):
                window.append((group, files.submit(ingest, group)))
                yield from collect(2 * self.options.workers)
            yield from collect(0)
            yield from flush()

    def ref(self, digest: Digest) -> None:
        """Add a reference to a stored object."""
        self._check_writable()
        with (
            self._maintenance.shared(),
            self._commit_lock,
            self._write_txn("adding a reference") as txn,
        ):
            self.add_ref(txn, digest)
        if self.options.fsync:
            self.index.sync()

    def unref(self, digest: Digest) -> bool:
        """Drop a reference; when it was the last, the object goes (its chunks
        become garbage for ``gc`` if nothing else uses them).  Returns whether
        the object is gone."""
        self._check_writable()
        with (
            self._maintenance.shared(),
            self._commit_lock,
            self._write_txn("dropping a reference") as txn,
        ):
            gone = self.drop_ref(txn, digest)
        if self.options.fsync:
            self.index.sync()
        return gone

    def add_ref(self, txn: lmdb.Transaction, digest: Digest) -> None:
        """:meth:`ref` inside the caller's write transaction."""
        entry = self._object_entry(txn, digest)
        entry.refcount += 1
        self.index.put_object(txn, digest.hash, entry)
        self.index.add(txn, "files", 1)
        self.index.add(txn, "logical_bytes", digest.size)

    def drop_ref(self, txn: lmdb.Transaction, digest: Digest) -> bool:
        """:meth:`unref` inside the caller's write transaction."""
        entry = self._object_entry(txn, digest)
        self.dropped += 1
        self.index.add(txn, "files", -1)
        self.index.add(txn, "logical_bytes", -digest.size)
        if entry.refcount > 1:
            entry.refcount -= 1
            self.index.put_object(txn, digest.hash, entry)
            return False
        txn.delete(digest.hash, db=self.index.objects)
        self.index.add(txn, "objects", -1)
        for chunk, count in Counter(d for d, _ in entry.chunks).items():
            chunk_entry = self.index.get_chunk(txn, chunk)
            if chunk_entry is None:
                self.needs_fsck = True
                continue
            chunk_entry.refcount = max(0, chunk_entry.refcount - count)
            self.index.put_chunk(txn, chunk, chunk_entry)
        return True

    @contextmanager
    def transaction(self, what: str) -> Iterator[lmdb.Transaction]:
        """A write transaction on the index, serialised with publications, for a
        layer that keeps records of its own there (the namespace).  ``what``
        names the operation in errors.  Durable at the next :meth:`sync`.

        It takes no store lock (LMDB serialises writers), so that it never waits
        for a long ``gc``; it must only add references through a publication
        and may drop them with :meth:`drop_ref`."""
        self._check_writable()
        with self._write_txn(what) as txn:
            yield txn

    @contextmanager
    def _write_txn(self, what: str) -> Iterator[lmdb.Transaction]:
        try:
            with self.index.write() as txn:
                yield txn
        except lmdb.Error as exc:
            raise lmdb_error(exc, what) from None

    # --- reads ------------------------------------------------------------------

    def _object_entry(self, txn: lmdb.Transaction, digest: Digest) -> ObjectEntry:
        entry = self.index.get_object(txn, digest.hash)
        if entry is None or entry.size != digest.size:
            raise ObjectNotFoundError(f"object {digest} is not in the store {self.path}")
        if sum(n for _, n in entry.chunks) != entry.size:
            self.needs_fsck = True
            raise CorruptDataError(
                f"the recipe of object {digest} does not add up to its size",
                path=str(self.path / INDEX_NAME),
            )
        return entry

    def contains(self, digest: Digest) -> bool:
        with self.index.read() as txn:
            entry = self.index.get_object(txn, digest.hash)
        return entry is not None and entry.size == digest.size

    def recipe(self, digest: Digest) -> list[tuple[bytes, int]]:
        """The chunk digests and lengths that make up an object, in order."""
        with self.index.read() as txn:
            return self._object_entry(txn, digest).chunks

    def read_chunk(self, digest: bytes, entry: ChunkEntry | None = None) -> memoryview | bytes:
        """A chunk's bytes, verified.  A raw chunk is a view on the segment mapping.

        ``entry`` is the chunk's index entry when the caller has just looked it up.
        """
        for attempt in (0, 1):
            if entry is None or attempt:
                with self.index.read() as txn:
                    entry = self.index.get_chunk(txn, digest)
            if entry is None:
                raise CorruptDataError(
                    f"chunk {digest.hex()} is referenced but missing from the index",
                    path=str(self.path / INDEX_NAME),
                )
            try:
                return self._read_entry(digest, entry)
            except CorruptDataError:
                if attempt == 0 and not self._segment_file(digest, entry).exists():
                    continue  # compacted away under us: look it up again
                self.needs_fsck = True
                self.corruptions += 1
                raise
        raise AssertionError("unreachable")

    def _segment_file(self, digest: bytes, entry: ChunkEntry) -> Path:
        # A chunk's records always live in its digest's shard (gc compacts within shards).
        shard = shard_of(digest, self.config.segments)
        return segment_path(self.segments_root, shard, entry.segment_id, self.config.segments)

    def _where(self, digest: bytes, entry: ChunkEntry) -> str:
        return str(self._segment_file(digest, entry))

    def _read_entry(self, digest: bytes, entry: ChunkEntry) -> memoryview | bytes:
        record = self.maps.read(
            entry.segment_id,
            functools.partial(self._segment_file, digest, entry),
            entry.offset,
            entry.stored_len,
        )
        if (
            record.digest != digest
            or record.raw_len != entry.raw_len
            or record.tag != TAG_CHUNK
            or record.digest_id != self.digest_function.ident
        ):
            raise CorruptDataError(
                f"record does not hold chunk {digest.hex()}",
                path=self._where(digest, entry),
                offset=entry.offset,
            )
        if record.compression == COMPRESSION_NONE:
            if len(record.payload) != entry.raw_len:
                raise CorruptDataError(
                    "raw record has the wrong length",
                    path=self._where(digest, entry),
                    offset=entry.offset,
                )
            return record.payload
        if record.compression != COMPRESSION_ZSTD:
            raise CorruptDataError(
                f"record uses unknown compression {record.compression}",
                path=self._where(digest, entry),
                offset=entry.offset,
            )
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        try:
            data = self._decompressor().decompress(record.payload, max_output_size=entry.raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptDataError(
                f"cannot decompress chunk {digest.hex()}: {exc}",
                path=self._where(digest, entry),
                offset=entry.offset,
            ) from None
        if len(data) != entry.raw_len:
            raise CorruptDataError(
                f"chunk {digest.hex()} decompressed to {len(data)} bytes, not {entry.raw_len}",
                path=self._where(digest, entry),
                offset=entry.offset,
            )
        self.cache.put(digest, data)
        return data

    def iter_object(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> Iterator[memoryview | bytes]:
        """The bytes of an object (or of a range of it) as a sequence of pieces.

        Pieces are views on segment mappings where chunks are stored raw: no copy
        is made in Python.  Chunks ahead of the reader are verified and
        decompressed in worker threads (a window of a few chunks), so a large
        read uses every core; memory stays bounded whatever the object's size.
        """
        if offset < 0 or (length is not None and length < 0):
            raise ConfigError("offset and length must not be negative")
        end = digest.size if length is None else min(digest.size, offset + length)
        chunks, starts = self._layout(digest)
        wanted = []  # (chunk digest, start, stop, size) of the chunks that overlap the range
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while i < len(chunks) and starts[i] < end:
            chunk, size = chunks[i]
            position = starts[i]
            if position + size > offset:
                start, stop = max(0, offset - position), min(size, end - position)
                wanted.append((chunk, start, stop, size))
            i += 1
        for window_start in range(0, len(wanted), _READ_WINDOW):
            window = wanted[window_start : window_start + _READ_WINDOW]
            with self.index.read() as txn:
                entries = [self.index.get_chunk(txn, chunk) for chunk, *_ in window]
            # Compressed chunks are verified and decompressed ahead, in the pool;
            # raw ones cost only their checksum and are read here.
            ahead: dict[int, Future[memoryview | bytes]] = {}
            if len(window) > 2:
                pool = self._pool_get()
                for i, ((chunk, *_), entry) in enumerate(zip(window, entries, strict=True)):
                    if entry is not None and entry.flags & COMPRESSION_MASK != COMPRESSION_NONE:
                        ahead[i] = pool.submit(self.read_chunk, chunk, entry)
            try:
                for i, ((chunk, start, stop, size), entry) in enumerate(
                    zip(window, entries, strict=True)
                ):
                    fut = ahead.pop(i, None)
                    data = self.read_chunk(chunk, entry) if fut is None else fut.result()
                    if len(data) != size:
                        self.needs_fsck = True
                        raise CorruptDataError(
                            f"object {digest}: chunk {chunk.hex()} holds {len(data)} bytes, "
                            f"its recipe says {size}",
                            path=str(self.path / INDEX_NAME),
                        )
                    yield data if (start, stop) == (0, size) else memoryview(data)[start:stop]
            finally:
                for fut in ahead.values():
                    fut.cancel()

    def _layout(self, digest: Digest) -> tuple[list[tuple[bytes, int]], list[int]]:
        """An object's chunks and where each starts (cached: a file read in
        small pieces must not decode its whole recipe for every piece)."""
        with self._layouts_lock:
            layout = self._layouts.get(digest)
            if layout is not None:
                self._layouts.move_to_end(digest)
                return layout
        with self.index.read() as txn:
            chunks = self._object_entry(txn, digest).chunks
        starts = list(itertools.accumulate((size for _, size in chunks), initial=0))[:-1]
        with self._layouts_lock:
            self._layouts[digest] = (chunks, starts)
            if len(self._layouts) > _LAYOUTS:
                self._layouts.popitem(last=False)
        return chunks, starts

    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> bytes:
        """An object's bytes (or a range of them) as one ``bytes``."""
        return b"".join(self.iter_object(digest, offset, length))

    get = iter_object

    # --- staged writes through the WAL ---------------------------------------------

    def stage(self) -> StagedObject:
        """Begin an object written piecewise; see :class:`StagedObject`."""
        self._check_writable()
        assert self.wal is not None
        # Under the lock, so that no checkpoint can drop the BEGIN record before
        # the handle counts as open.
        with self._staged_lock:
            handle = self.wal.append(WAL_BEGIN, b"")
            self._open_staged.add(handle)
        try:
            return StagedObject(self, handle)
        except BaseException:
            with self._staged_lock:
                self._open_staged.discard(handle)
            self.wal.append(WAL_ABORT, _WAL_HANDLE.pack(handle))
            raise

    def _replay_wal(self) -> None:
        assert self.wal is not None
        records = self.wal.replay()
        if not records:
            return
        writes: dict[int, list[tuple[int, bytes]]] = {}
        committed: list[int] = []
        for record in records:
            if record.kind == WAL_BEGIN:
                writes[record.seq] = []
            elif record.kind == WAL_WRITE:
                handle, offset = _WAL_WRITE.unpack_from(record.payload)
                if handle in writes:
                    writes[handle].append((offset, record.payload[_WAL_WRITE.size :]))
            elif record.kind == WAL_COMMIT:
                committed.append(_WAL_HANDLE.unpack(record.payload)[0])
            elif record.kind == WAL_ABORT:
                writes.pop(_WAL_HANDLE.unpack(record.payload)[0], None)
            else:
                log.warning("write-ahead log: skipping record of unknown kind %d", record.kind)
        with self.index.read() as txn:
            applied = {
                _HANDLE_KEY.unpack(bytes(k))[0] for k, _ in txn.cursor(db=self.index.wal_applied)
            }
        for handle in committed:
            if handle in applied or handle not in writes:
                continue
            spool = self.tmp_root / f"replay-{handle}"
            with open(spool, "w+b") as f:
                for offset, data in writes.pop(handle):
                    f.seek(offset)
                    f.write(data)
                f.flush()
                f.seek(0)
                pending = self._ingest(f)
            spool.unlink()
            pending.wal_handle = handle
            self._publish([pending], durable=True)
            self.replayed.append(pending.digest)
            log.info("write-ahead log: published staged object %s", pending.digest)
        dropped = [h for h in writes if h not in committed]
        if dropped:
            log.warning(
                "write-ahead log: discarded %d staged object(s) never committed", len(dropped)
            )
        self._maybe_checkpoint(force=True)

    def _maybe_checkpoint(self, *, force: bool = False) -> None:
        wal = self.wal
        if wal is None:
            return
        with self._staged_lock:
            if self._open_staged:
                return
            if not force and wal.size < self.options.wal_checkpoint_bytes:
                return
            if wal.size <= 32 and wal.next_seq == wal.base_seq:
                return
            # What the log holds must be durable elsewhere before the log goes.
            self._publish([], durable=True)
            wal.checkpoint()
            base = wal.base_seq
        # Only markers of handles the checkpoint dropped: a staged object
        # published since then still needs its marker until the next one.
        with self._commit_lock, self._write_txn("checkpointing the WAL") as txn:
            cursor = txn.cursor(db=self.index.wal_applied)
            while cursor.first() and _HANDLE_KEY.unpack(cursor.key())[0] < base:
                cursor.delete()

    # --- space reserve ----------------------------------------------------------------

    def ensure_reserve(self) -> bool:
        """Set aside ``STORE/reserve`` (``RESERVE_SIZE`` bytes of allocated disk):
        on a full disk, deleting still needs room (LMDB copies pages on write).
        Returns whether the reserve is in place."""
        path = self.path / RESERVE_NAME
        try:
            if path.stat().st_size >= RESERVE_SIZE:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_SIZE)
            finally:
                os.close(fd)
        except OSError:
            path.unlink(missing_ok=True)
            return False
        return True

    def release_reserve(self) -> bool:
        """Give the reserve back to the disk (when full); whether there was one."""
        try:
            (self.path / RESERVE_NAME).unlink()
        except FileNotFoundError:
            return False
        log.warning("the disk is full: released the store's %d MiB reserve", RESERVE_SIZE >> 20)
        return True

    # --- memory ---------------------------------------------------------------------

    def limit_memory(self, limit: int) -> None:
        """Size the in-memory caches for a process that should stay within
        ``limit`` bytes: decompressed chunks get at most an eighth of it, and
        segment pages are dropped from the process after a quarter of it was
        read through the maps."""
        self.cache.capacity = min(self.options.cache_size, limit // 8)
        self.maps.resident_limit = max(1 << 20, limit // 4)

    def shrink(self) -> None:
        """Drop what the in-memory caches hold (memory pressure)."""
        self.cache.clear()
        with self._layouts_lock:
            self._layouts.clear()
        self.maps.drop_pages()

    # --- statistics -------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self.index.read() as txn:
            counters = self.index.counters_dict(txn)
            segments = list(self.index.iter_segments(txn))
        threshold = self.options.gc_live_threshold
        histogram = [0] * 10
        below = 0
        segment_bytes = 0
        for _, entry in segments:
            segment_bytes += entry.length
            ratio = entry.live_bytes / entry.length if entry.length else 0.0
            histogram[min(9, int(ratio * 10))] += 1
            if ratio < threshold:
                below += 1
        return StoreStats(
            objects=counters["objects"],
            files=counters["files"],
            logical_bytes=counters["logical_bytes"],
            chunks=counters["chunks"],
            chunk_bytes=counters["chunk_bytes"],
            stored_bytes=counters["stored_bytes"],
            segments=len(segments),
            segment_bytes=segment_bytes,
            segments_below_threshold=below,
            live_histogram=histogram,
        )


class StagedObject:
    """An object written piecewise (at any offsets) and published on commit.

    Every write goes to the WAL before it is acknowledged, so after :meth:`sync`
    (or :meth:`commit`) it survives a crash: a committed object whose ingest was
    cut short is published when the store is next opened for writing.  The
    bytes are also kept in a spool file, which ingest reads on commit.
    """

    def __init__(self, store: Store, handle: int) -> None:
        self.store = store
        self.handle = handle
        self._spool = store.tmp_root / f"staged-{handle}"
        try:
            self._fd = os.open(self._spool, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise from_oserror(exc, "creating the spool file of a staged object") from None
        self._last_seq = handle
        self._position = 0
        self._done = False

    def write(self, data: bytes | memoryview, offset: int | None = None) -> int:
        """Write ``data`` at ``offset`` (default: after the previous write)."""
        if self._done:
            raise CachefsError("staged object is already committed or aborted")
        assert self.store.wal is not None
        position = self._position if offset is None else offset
        view = memoryview(data).cast("B")
        for start in range(0, max(len(view), 1), _WAL_MAX_WRITE):
            piece = view[start : start + _WAL_MAX_WRITE]
            self._last_seq = self.store.wal.append(
                WAL_WRITE, _WAL_WRITE.pack(self.handle, position + start) + bytes(piece)
            )
        try:
            os.pwrite(self._fd, view, position)
        except OSError as exc:
            raise from_oserror(exc, "writing a staged object") from None
        self._position = position + len(view)
        return len(view)

    def sync(self) -> None:
        """Make every write so far durable (group commit with other writers)."""
        assert self.store.wal is not None
        self.store.wal.commit(self._last_seq)

    def commit(self, *, durable: bool = True) -> Digest:
        """Publish the object (one reference) and return its digest."""
        store = self.store
        assert store.wal is not None
        if self._done:
            raise CachefsError("staged object is already committed or aborted")
        self._done = True
        seq = store.wal.append(WAL_COMMIT, _WAL_HANDLE.pack(self.handle))
        store.wal.commit(seq)
        try:
            with store._maintenance.shared():
                with open(self._fd, "rb", buffering=0, closefd=False) as f:
                    pending = store._ingest(f)
                pending.wal_handle = self.handle
                store._publish([pending], durable=durable)
        finally:
            self._release()
        store._maybe_checkpoint()
        return pending.digest

    def abort(self) -> None:
        """Forget the object."""
        if self._done:
            return
        self._done = True
        assert self.store.wal is not None
        self.store.wal.append(WAL_ABORT, _WAL_HANDLE.pack(self.handle))
        self._release()

    def _release(self) -> None:
        os.close(self._fd)
        self._spool.unlink(missing_ok=True)
        with self.store._staged_lock:
            self.store._open_staged.discard(self.handle)

    def __enter__(self) -> StagedObject:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._done:
            self.abort()


def _check_empty(path: Path) -> None:
    if any(p.name not in ("lock", RESERVE_NAME) for p in path.iterdir()):
        raise ConfigError(
            f"{path} is not empty and not a cachefs store",
            hint="choose an empty or new directory for a new store",
        )


def _lock_store(path: Path) -> int:
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise from_oserror(exc, f"opening the lock of store {path}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreLockedError(f"store {path} is open for writing by another process") from None
        raise from_oserror(exc, f"locking store {path}") from None
    return fd


__all__ = ["StagedObject", "Store", "StoreOptions", "StoreStats"]
