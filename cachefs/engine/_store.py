"""The store: a content-addressed, deduplicating, compressed chunk store (storage engine layer).

:class:`Store` opens a store directory and puts its parts together; each part
lives in a module of its own:

* ``_index.py``       the LMDB environment (schema: ``cachefs.format.schema``);
* ``_segments.py``    the local segment files: shards, appends, recovery, maps;
* ``_ingest.py``      the write pipeline: chunking, hashing, compression;
* ``_publish.py``     publication (group commit) and reference counts;
* ``_reads.py``       reads of chunks (the local :class:`ChunkBackend`) and objects;
* ``_maintenance.py`` the lock and the interface of gc and fsck;
* ``_journal.py``     the store's journal, for the layers above;
* ``_activity.py``    the counters of what the store did (``Store.activity()``);
* ``_upgrade.py``     bringing stores of an older layout up to date.

Concurrency invariants:

* One writing process per store: ``STORE/lock`` is flock()ed exclusively.
  Read-only openers take no lock and see the last committed state (LMDB MVCC).
* Within the writer, any number of threads may read and put at once.  Puts
  hold the maintenance lock shared from ingest to publication; gc and fsck
  --repair hold it exclusively (``maintenance()``).
* Reads need no lock.  A read whose segment vanished under it (gc compaction)
  looks the chunk up again once.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb

from cachefs.engine._activity import Activity
from cachefs.engine._audit import DEFAULT_MAX_SIZE as AUDIT_MAX_SIZE
from cachefs.engine._audit import AuditLog
from cachefs.engine._chunker import Chunker, Source
from cachefs.engine._health import HEALTH_NAME, Health
from cachefs.engine._index import Index
from cachefs.engine._ingest import Ingest
from cachefs.engine._journal import Journal
from cachefs.engine._maintenance import Maintenance, MaintenanceLock
from cachefs.engine._publish import PendingObject, Publisher, PublishHook, PublishObserver
from cachefs.engine._pushes import PushQueue
from cachefs.engine._put import put_files
from cachefs.engine._reads import LocalChunks, ObjectReader
from cachefs.engine._segments import SegmentStore
from cachefs.engine._upgrade import check_upgradable, upgrade
from cachefs.engine._workers import Workers
from cachefs.errors import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    DigestMismatchError,
    ReadOnlyError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
    from_oserror,
)
from cachefs.format import journal as journal_format
from cachefs.format.codec import ChunkCodec
from cachefs.format.digest import Digest
from cachefs.format.header import (
    HEADER_NAME,
    Header,
    StoreConfig,
    read_header,
    write_header,
)
from cachefs.format.schema import INDEX_NAME

log = logging.getLogger(__name__)

#: Disk space kept aside so that files can be deleted on a full disk.
RESERVE_NAME = "reserve"
RESERVE_SIZE = 8 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class StoreOptions:
    """Run-time settings (not part of the on-disk format)."""

    #: Bytes of decompressed chunks kept in memory for reads.
    cache_size: int = 64 << 20
    #: fdatasync segments, index and journal at every durable point.  Off only
    #: for throwaway stores (survives a process crash, not a machine crash).
    fsync: bool = True
    #: Worker threads for chunk hashing and compression.
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    #: Segments whose live bytes fall below this fraction are compacted by gc.
    gc_live_threshold: float = 0.5
    #: Open segment mappings kept for reads.
    max_maps: int = 256
    #: Read buffer size of the ingest pipeline.
    buffer_size: int = 4 << 20
    #: Queue new objects for the write tiers (``Store.pushes``; a writer only).
    push: bool = False
    #: A writer records again what the index lost where its entries and the
    #: segment files show it (``cachefs fsck --repair``), instead of refusing
    #: the index: its schema version, its ``segments`` and ``counters`` tables
    #: (made anew, whole, at the open; ``Index.rebuilt_tables``).
    recover_index: bool = False
    #: The audit log's directory (None: ``STORE/audit``) and rotation size.
    audit_dir: Path | None = None
    audit_max_size: int = AUDIT_MAX_SIZE

    def validate(self) -> None:
        if self.cache_size < 0:
            raise ConfigError("cache size must not be negative")
        if self.workers < 1:
            raise ConfigError("need at least one worker thread")
        if not 0.0 <= self.gc_live_threshold <= 1.0:
            raise ConfigError("gc live threshold must be a fraction in [0, 1]")


#: A progress callback of long maintenance work: (done, total), in bytes or items.
Progress = Callable[[int, int], None]


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


class Reserve:
    """``STORE/reserve``: allocated disk space given back when the disk is full,
    because deleting needs room too (LMDB copies pages on write)."""

    def __init__(self, path: Path) -> None:
        self.path = path / RESERVE_NAME
        self.held = False

    def ensure(self) -> bool:
        """Set the reserve aside (again); whether it is in place."""
        try:
            if self.path.stat().st_size >= RESERVE_SIZE:
                self.held = True
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_SIZE)
            finally:
                os.close(fd)
        except OSError:
            self.path.unlink(missing_ok=True)
            self.held = False
            return False
        self.held = True
        return True

    def release(self) -> bool:
        """Give the reserve back to the disk (when full); whether there was one."""
        self.held = False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.warning("the disk is full: released the store's %d MiB reserve", RESERVE_SIZE >> 20)
        return True


class Store:
    """A chunk store on a directory.  Use :meth:`open`; close it (or use ``with``)."""

    def __init__(
        self,
        path: Path,
        header: Header,
        options: StoreOptions,
        *,
        readonly: bool,
        lock_fd: int | None,
    ) -> None:
        self.path = path
        self.config = config = header.config
        self.options = options
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._closed = False
        self.digest_function = config.digest
        self.segments_root = path / "segments"
        self.tmp_root = path / "tmp"
        self._activity = activity = Activity()
        self.health = Health(path / HEALTH_NAME, readonly=readonly)
        self.workers = Workers(options.workers)
        recover = (self.segments_root, config.segments) if options.recover_index else None
        self.index = Index(
            path, self.health, readonly=readonly, fsync=options.fsync, recover=recover
        )
        self.segments = SegmentStore(
            self.segments_root, config.segments, fsync=options.fsync, max_maps=options.max_maps
        )
        codec = ChunkCodec(config.compression)
        self.chunks = LocalChunks(
            self.index,
            self.segments,
            codec,
            self.digest_function,
            self.health,
            self.workers,
            options.cache_size,
            activity,
        )
        self.reader = ObjectReader(self.index, self.chunks, self.health)
        self.publisher = Publisher(
            self.index,
            self.segments,
            self.health,
            self.reader.object_entry,
            activity,
            fsync=options.fsync,
            forget=self.reader.forget,
        )
        #: Cuts content into chunks with the store's parameters.
        self.chunker = Chunker(config.chunking, options.buffer_size)
        self.ingest = Ingest(
            self.digest_function,
            self.chunker,
            codec,
            self.segments,
            self.chunks,
            self.reader,
            self.workers,
            activity,
        )
        self.reserve = Reserve(path)
        #: Security-relevant events (``format/audit.py``); writers record to it.
        audit_dir = options.audit_dir or path / "audit"
        self.audit = AuditLog(audit_dir, max_size=options.audit_max_size, fsync=options.fsync)
        push = options.push and not readonly
        self._maintenance = MaintenanceLock()
        #: The store's journal (writers only): see ``cachefs.format.journal``.
        self.journal: Journal | None = None
        #: New objects to push to the write tiers (``options.push``, writers only).
        self.pushes = self.publisher.pushes = PushQueue(self.index) if push else None
        if not readonly:
            try:
                self._recover(header)
            except BaseException as exc:
                self._release()
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
            header = read_header(path)
            if not (path / INDEX_NAME).exists():
                raise StoreNotFoundError(f"{path} has no index ({INDEX_NAME})")
            return cls(path, header, options, readonly=True, lock_fd=None)
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
            if config is not None and create and config != found.config:
                log.info("store %s exists; using its own configuration", path)
            check_upgradable(path, found.format_version)
            return cls(path, found, options, readonly=False, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def _recover(self, header: Header) -> None:
        """Writer start-up: upgrade an older layout, cut segments back to what
        was published, drop debris, open the journal."""
        # Also records the schema version of a store just made.
        upgrade(self.path, self.index, header.format_version)
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir(exist_ok=True)
        published, next_id, unreadable = self.index.segments_at_open()
        if self.segments.recover(published, next_id, unreadable) or unreadable:
            self.health.suspect()
        self.journal = Journal(self.path / journal_format.DIRECTORY, fsync=self.options.fsync)
        self._activity.journal = self.journal

    def close(self) -> None:
        """Publish nothing new; make what was published durable; release everything."""
        if self._closed:
            return
        self._closed = True
        try:
            self.workers.shutdown()
            if not self.readonly:
                try:
                    self.publisher.publish([], durable=True)  # syncs what durable=False left
                except CachefsError as exc:
                    log.warning("could not sync on close: %s", exc)
        finally:
            self._release()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _release(self) -> None:
        self.workers.shutdown()
        self.segments.close()
        self.chunks.cache.clear()
        if self.journal is not None:
            self.journal.close()
        self.index.close()
        self.audit.close()  # last: what closes before it may still record

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_writable(self) -> None:
        """ReadOnlyError unless the store is open for writing (and not closed)."""
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open read-only")
        if self._closed:
            raise CachefsError(f"store {self.path} is closed")

    # --- writing ---------------------------------------------------------------

    def sync(self) -> None:
        """Make everything published so far durable (after ``durable=False`` puts)."""
        self.check_writable()
        self.publisher.publish([], durable=True)

    def put(
        self,
        source: Source,
        *,
        durable: bool = True,
        on_publish: PublishHook | None = None,
        expect: Digest | None = None,
    ) -> Digest:
        """Store an object and add one reference to it; return its digest.

        ``source`` is bytes, a binary file object or an iterable of byte
        strings; it is read once, in buffers, so it may be larger than memory.
        When this returns with ``durable`` true, the object survives a crash.
        ``on_publish`` runs inside the transaction that publishes the object
        (it shares it with other objects published at the same moment, so it
        must not fail but for a broken index); whatever it writes becomes
        visible atomically with the object.  With ``expect``, content whose
        digest is another is not published (DigestMismatchError).
        """
        return _one(self._put([(lambda: self.ingest.ingest(source), expect, on_publish)], durable))

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
        splice = functools.partial(self.ingest.splice, base, size, changed, read_range)
        return _one(self._put([(splice, None, on_publish)], durable))

    def put_sparse(
        self,
        size: int,
        regions: list[tuple[int, int]],
        read_range: Callable[[int, int], Iterable[bytes | memoryview]],
        *,
        durable: bool = True,
        on_publish: PublishHook | None = None,
    ) -> Digest:
        """A sparse object (``Ingest.ingest_sparse``), stored as :meth:`put` does."""
        sparse = functools.partial(self.ingest.ingest_sparse, size, regions, read_range)
        return _one(self._put([(sparse, None, on_publish)], durable))

    def put_many(
        self,
        items: Iterable[tuple[Source, Digest | None, PublishHook | None]],
        *,
        durable: bool = True,
    ) -> list[Digest | DigestMismatchError]:
        """Store several objects, published together: one transaction and (with
        ``durable``) one fdatasync for all, where :meth:`put` costs one each.
        Each item is ``(source, expect, on_publish)``, as :meth:`put` takes them;
        the result holds, in order, each one's digest, or the DigestMismatchError
        of one whose content is not ``expect`` (that one alone is not published).
        An error of the store itself is raised, and then none is published."""
        ingest = self.ingest.ingest
        return self._put([(functools.partial(ingest, s), e, h) for s, e, h in items], durable)

    def _put(
        self,
        items: list[tuple[Callable[[], PendingObject], Digest | None, PublishHook | None]],
        durable: bool,
    ) -> list[Digest | DigestMismatchError]:
        """Ingest (under the maintenance lock, so that gc cannot collect chunks the
        ingest found) and publish objects, in one publication."""
        self.check_writable()
        results: list[Digest | DigestMismatchError] = []
        objects: list[PendingObject] = []
        with self._maintenance.shared():
            for ingest, expect, on_publish in items:
                pending = ingest()
                if expect is not None and pending.digest != expect:
                    message = f"the content's digest is {pending.digest}, not {expect}"
                    results.append(DigestMismatchError(message))
                    continue
                pending.on_publish = on_publish
                objects.append(pending)
                results.append(pending.digest)
            if objects:
                self.publisher.publish(objects, durable=durable)
        return results

    def put_files(
        self,
        paths: Iterable[Path],
        *,
        durable: bool = True,
        batch_bytes: int = 256 << 20,
        processes: int = 0,
    ) -> Iterator[tuple[Path, Digest | CachefsError]]:
        """Store many files, several at a time, publishing them in groups: yields
        ``(path, digest)`` in the order given once the file's group is published
        (and durable, with ``durable``), or ``(path, error)`` for a file that
        could not be read.  ``processes``: see ``_put.py``."""
        self.check_writable()
        publish = functools.partial(self.publisher.publish, durable=durable)
        with self._maintenance.shared():
            root, workers = self.path, self.options.workers
            yield from put_files(root, self.ingest, publish, paths, workers, processes, batch_bytes)

    # --- references --------------------------------------------------------------

    def ref(self, digest: Digest) -> None:
        """Add a reference to a stored object."""
        with self._referencing("adding a reference") as txn:
            self.publisher.add_ref(txn, digest)

    def unref(self, digest: Digest) -> bool:
        """Drop a reference; when it was the last, the object goes (its chunks
        become garbage for ``gc`` if nothing else uses them).  Returns whether
        the object is gone."""
        with self._referencing("dropping a reference") as txn:
            return self.publisher.drop_ref(txn, digest)

    @contextmanager
    def _referencing(self, what: str) -> Iterator[lmdb.Transaction]:
        self.check_writable()
        publisher = self.publisher
        with self._maintenance.shared(), publisher.commit_lock, publisher.write_txn(what) as txn:
            yield txn
        if self.options.fsync:
            self.index.sync()

    def add_ref(self, txn: lmdb.Transaction, digest: Digest) -> None:
        """:meth:`ref` inside the caller's write transaction (see :meth:`transaction`)."""
        self.publisher.add_ref(txn, digest)

    def drop_ref(self, txn: lmdb.Transaction, digest: Digest) -> bool:
        """:meth:`unref` inside the caller's write transaction (see :meth:`transaction`)."""
        return self.publisher.drop_ref(txn, digest)

    @property
    def dropped(self) -> int:
        """References dropped since the store was opened."""
        return self.publisher.dropped

    @contextmanager
    def transaction(self, what: str) -> Iterator[lmdb.Transaction]:
        """A write transaction on the index, serialised with publications, for a
        layer that keeps records of its own there (the namespace).  ``what``
        names the operation in errors.  Durable at the next :meth:`sync`.

        It takes no store lock (LMDB serialises writers), so that it never waits
        for a long ``gc``; it adds references through a publication or to a stored
        object (:meth:`add_ref`), and drops them with :meth:`drop_ref`."""
        self.check_writable()
        with self.publisher.write_txn(what) as txn:
            yield txn

    # --- reading -------------------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        return self.reader.contains(digest)

    def find_object(self, digest_hash: bytes) -> Digest | None:
        """The digest (with its size) of the stored object ``digest_hash``, or None."""
        with self.index.read() as txn:
            entry = self.index.get_object_head(txn, digest_hash)
        return None if entry is None else Digest(digest_hash, entry.size)

    def recipe(self, digest: Digest) -> list[tuple[bytes, int]]:
        """The chunk digests and lengths that make up an object, in order."""
        return self.reader.recipe(digest)

    def holes(self, digest: Digest) -> list[tuple[int, int]]:
        """The [start, stop) ranges of an object that are holes (sparse objects)."""
        return self.reader.holes(digest)

    def content_digest(
        self, digest: Digest, *, compute: bool = False, stop: Callable[[], bool] | None = None
    ) -> Digest | None:
        """The digest of an object's content: ``digest`` for a dense object; for a
        sparse one the one found before, else None, or with ``compute`` found now
        (every byte read, holes too, unless ``stop`` says to: a worker thread's job)."""
        keep = None if self.readonly else self.publisher.write_txn
        return self.reader.content_digest(digest, self.digest_function, compute, keep, stop)

    def read_chunk(self, digest: bytes) -> bytes | memoryview:
        """A chunk's bytes, verified (a raw chunk is a view on a segment mapping)."""
        return self.chunks.read_chunk(digest)

    def iter_object(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> Iterator[memoryview | bytes]:
        """An object's bytes (or a range's) in pieces: views on segment mappings
        where chunks are raw; chunks ahead decoded in threads (``ObjectReader``)."""
        return self.reader.iter_object(digest, offset, length)

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes | memoryview:
        """A range of an object as one buffer (a FUSE read; ``ObjectReader``)."""
        return self.reader.read_range(digest, offset, length)

    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> bytes:
        """An object's bytes (or a range of them) as one ``bytes``."""
        return b"".join(self.iter_object(digest, offset, length))

    def read_objects(self, digests: Sequence[Digest]) -> list[bytes | CachefsError]:
        """Whole objects of a batch: the bytes or the error of each (``ObjectReader``)."""
        return self.reader.read_objects(digests)

    # --- maintenance, health, space, memory ------------------------------------------

    @contextmanager
    def maintenance(self) -> Iterator[Maintenance]:
        """The store held alone (no put, no publication: gc, fsck --repair)."""
        self.check_writable()
        with self._maintenance.exclusive(), self.publisher.commit_lock:
            self.segments.clear_pending()  # no ingest runs: these belong to abandoned puts
            yield Maintenance(
                self.index,
                self.segments,
                self.publisher,
                self.chunks,
                self.health,
                self._activity,
                fsync=self.options.fsync,
            )

    @property
    def maintenance_pending(self) -> bool:
        """Whether maintenance holds the store or waits for it: a put now waits."""
        return self._maintenance.pending

    def damaged(self, exc: CorruptDataError) -> None:
        """A layer above met damage in the store (the index, read through the
        namespace): the store needs fsck, and the damage counts once."""
        self.health.damaged(exc)

    @property
    def needs_fsck(self) -> bool:
        return self.health.needs_fsck

    @property
    def corruptions(self) -> int:
        return self.health.corruptions

    def freeing(self, operation: Callable[[], T]) -> T:
        """Run an operation that frees space; on a full disk, again without the reserve."""
        try:
            return operation()
        except StoreFullError:
            if not self.reserve.release():
                raise
            return operation()

    def limit_memory(self, limit: int) -> None:
        """Size the caches to ``limit``: chunks 1/8 of it, pages dropped after 1/4 read."""
        self.chunks.cache.capacity = min(self.options.cache_size, limit // 8)
        self.segments.maps.resident_limit = max(1 << 20, limit // 4)

    def shrink(self) -> None:
        """Drop what the in-memory caches hold (memory pressure)."""
        self.chunks.cache.clear()
        self.reader.forget_layouts()
        self.segments.maps.drop_pages()

    def stored_bytes(self) -> int:
        """Bytes of the live records in segments (headers included), as published."""
        with self.index.read() as txn:
            return self.index.counter(txn, "stored_bytes")

    def stats(self) -> StoreStats:
        return _stats(self.index, self.options.gc_live_threshold)

    def disk_free(self) -> int:
        """Bytes available to the store on its filesystem (``statvfs``: ``f_bavail``)."""
        return _disk_free(self.path)

    def activity(self) -> dict[str, float]:
        """What the store did since it was opened, by stable keys (publications,
        ingest, the chunk cache, the journal, gc: each one documented in
        ``cachefs/engine/_activity.py``); cheap: no index read, no system call."""
        return self._activity.snapshot()

    @property
    def on_publish(self) -> PublishObserver | None:
        """Called with (seconds, objects, logical bytes) after each commit that
        published objects, by the thread that committed, out of the store's
        locks; an exception it raises is logged.  None (the default): nothing."""
        return self.publisher.on_publish

    @on_publish.setter
    def on_publish(self, observer: PublishObserver | None) -> None:
        self.publisher.on_publish = observer


def _disk_free(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise from_oserror(exc, f"asking the free space of {path}") from None
    return st.f_bavail * st.f_frsize


def _stats(index: Index, threshold: float) -> StoreStats:
    with index.read() as txn:
        counters = index.counters_dict(txn)
        segments = list(index.iter_segments(txn))
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


def _one(results: list[Digest | DigestMismatchError]) -> Digest:
    """The digest of the one object put, or its error raised."""
    (result,) = results
    if isinstance(result, DigestMismatchError):
        raise result
    return result
