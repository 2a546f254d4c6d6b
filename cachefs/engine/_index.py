"""The index: the store's LMDB environment and typed access to it (storage engine layer).

What every named database holds is specified in ``cachefs.format.schema``; this
module opens them and reads and writes their entries inside a caller's
transaction.  Write transactions are only used in ``with`` blocks; read
transactions are kept short.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import lmdb

from cachefs.errors import (
    CachefsError,
    CorruptDataError,
    FormatVersionError,
    IndexCorruptError,
    StoreFullError,
)
from cachefs.format.schema import (
    COUNTER,
    COUNTER_NAMES,
    INDEX_NAME,
    MAP_SIZE,
    MAX_DBS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SEGMENT_KEY,
    ChunkEntry,
    ObjectEntry,
    SegmentEntry,
)

#: A named database of the environment (what ``lmdb.Environment.open_db`` returns).
Database: TypeAlias = Any


class Index:
    """The LMDB environment of a store and its named databases."""

    def __init__(self, store: Path, *, readonly: bool, fsync: bool = True) -> None:
        self.path = store / INDEX_NAME
        self.readonly = readonly
        try:
            self.env = lmdb.open(
                str(self.path),
                subdir=False,
                map_size=MAP_SIZE,
                max_dbs=MAX_DBS,
                readonly=readonly,
                # Each commit writes its pages then fdatasyncs them before the
                # meta page (so a crash loses at most the last commits, never
                # consistency); durability of the newest commit is sync().
                sync=fsync,
                metasync=False,
                max_readers=512,
                create=not readonly,
                lock=True,
            )
        except lmdb.Error as exc:
            if "already open" in str(exc):
                raise CachefsError(
                    f"the index {self.path} is already open in this process",
                    hint="use the Store object that is already open",
                ) from None
            raise lmdb_error(exc, f"opening the index {self.path}") from None
        try:
            self.chunks = self._open(b"chunks")
            self.objects = self._open(b"objects")
            self.segments = self._open(b"segments")
            self.counters = self._open(b"counters")
            #: Missing in a read-only open of an index of schema version 1.
            self.meta = self.open_optional(b"meta", create=not readonly)
            version = self.schema_version
            if version is not None and version > SCHEMA_VERSION:
                raise FormatVersionError(
                    f"the index {self.path} has schema version {version}; this cachefs "
                    f"reads versions up to {SCHEMA_VERSION}"
                )
        except BaseException:
            self.env.close()
            raise

    def _open(self, name: bytes) -> Database:
        try:
            return self.env.open_db(name, create=not self.readonly)
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"opening the index database {name.decode()}") from None

    def open_optional(self, name: bytes, *, create: bool) -> Database | None:
        """A named database, made when ``create``; None if it is not there."""
        try:
            return self.env.open_db(name, create=create)
        except lmdb.NotFoundError:
            return None
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"opening the index database {name.decode()}") from None

    def open_databases(self, names: Iterable[bytes], *, create: bool) -> list[Database | None]:
        return [self.open_optional(name, create=create) for name in names]

    def exists(self, name: bytes) -> bool:
        """Whether the named database ``name`` was ever made."""
        with self.read() as txn:
            return txn.get(name) is not None  # named databases are keys of the main one

    @property
    def schema_version(self) -> int | None:
        """The schema version the index records (None: none recorded yet; an
        index of schema version 1 has no ``meta`` database)."""
        if self.meta is None:
            return 1
        with self.read() as txn:
            raw = txn.get(SCHEMA_VERSION_KEY, db=self.meta)
        return None if raw is None else int(COUNTER.unpack(raw)[0])

    def set_schema_version(self, txn: lmdb.Transaction, version: int = SCHEMA_VERSION) -> None:
        assert self.meta is not None
        txn.put(SCHEMA_VERSION_KEY, COUNTER.pack(version), db=self.meta)

    def close(self) -> None:
        self.env.close()

    def sync(self) -> None:
        self.env.sync(True)

    def read(self) -> lmdb.Transaction:
        return self.env.begin(write=False, buffers=False)

    def write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)

    # --- typed accessors, all within a caller's transaction -----------------

    def get_chunk(self, txn: lmdb.Transaction, digest: bytes) -> ChunkEntry | None:
        raw = txn.get(digest, db=self.chunks)
        return None if raw is None else ChunkEntry.unpack(raw)

    def put_chunk(self, txn: lmdb.Transaction, digest: bytes, entry: ChunkEntry) -> None:
        txn.put(digest, entry.pack(), db=self.chunks)

    def delete_chunk(self, txn: lmdb.Transaction, digest: bytes) -> None:
        txn.delete(digest, db=self.chunks)

    def get_object(self, txn: lmdb.Transaction, digest: bytes) -> ObjectEntry | None:
        raw = txn.get(digest, db=self.objects)
        return None if raw is None else ObjectEntry.unpack(raw)

    def put_object(self, txn: lmdb.Transaction, digest: bytes, entry: ObjectEntry) -> None:
        txn.put(digest, entry.pack(), db=self.objects)

    def delete_object(self, txn: lmdb.Transaction, digest: bytes) -> None:
        txn.delete(digest, db=self.objects)

    def get_segment(self, txn: lmdb.Transaction, segment_id: int) -> SegmentEntry | None:
        raw = txn.get(SEGMENT_KEY.pack(segment_id), db=self.segments)
        return None if raw is None else SegmentEntry.unpack(raw)

    def put_segment(self, txn: lmdb.Transaction, segment_id: int, entry: SegmentEntry) -> None:
        txn.put(SEGMENT_KEY.pack(segment_id), entry.pack(), db=self.segments)

    def delete_segment(self, txn: lmdb.Transaction, segment_id: int) -> None:
        txn.delete(SEGMENT_KEY.pack(segment_id), db=self.segments)

    def iter_segments(self, txn: lmdb.Transaction) -> Iterator[tuple[int, SegmentEntry]]:
        for key, raw in txn.cursor(db=self.segments):
            yield SEGMENT_KEY.unpack(key)[0], SegmentEntry.unpack(raw)

    def iter_chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, ChunkEntry]]:
        for key, raw in txn.cursor(db=self.chunks):
            yield bytes(key), ChunkEntry.unpack(raw)

    def iter_objects(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, ObjectEntry]]:
        for key, raw in txn.cursor(db=self.objects):
            yield bytes(key), ObjectEntry.unpack(raw)

    def counter(self, txn: lmdb.Transaction, name: str) -> int:
        raw = txn.get(name.encode(), db=self.counters)
        return 0 if raw is None else int(COUNTER.unpack(raw)[0])

    def counters_dict(self, txn: lmdb.Transaction) -> dict[str, int]:
        return {name: self.counter(txn, name) for name in COUNTER_NAMES}

    def add(self, txn: lmdb.Transaction, name: str, delta: int) -> None:
        value = self.counter(txn, name) + delta
        if value < 0:
            raise CorruptDataError(f"counter {name} would go negative", hint="run `cachefs fsck`")
        txn.put(name.encode(), COUNTER.pack(value), db=self.counters)

    def set_counter(self, txn: lmdb.Transaction, name: str, value: int) -> None:
        txn.put(name.encode(), COUNTER.pack(value), db=self.counters)


def lmdb_error(exc: lmdb.Error, what: str) -> CachefsError:
    """Translate an LMDB error into the cachefs hierarchy."""
    if isinstance(exc, lmdb.MapFullError | lmdb.DiskError) or "No space" in str(exc):
        return StoreFullError(f"no space left while {what}")
    if isinstance(exc, lmdb.CorruptedError | lmdb.InvalidError | lmdb.PageNotFoundError):
        return IndexCorruptError(
            f"the index is damaged while {what}: {exc}",
            hint="restore index.lmdb from a backup; segments hold the chunk data",
        )
    if isinstance(exc, lmdb.VersionMismatchError | lmdb.IncompatibleError):
        return CorruptDataError(f"the index was written by an incompatible LMDB: {exc}")
    return CachefsError(f"index error while {what}: {exc}")
