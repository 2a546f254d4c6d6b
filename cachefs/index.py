"""The metadata schema: one LMDB environment per store (storage engine layer).

All metadata lives in ``STORE/index.lmdb`` (a single-file LMDB environment), apart
from the chunk bytes in segments.  Readers never block (LMDB MVCC); one write
transaction runs at a time.  The filesystem namespace (inodes, directory
entries, xattrs, file chunk lists) will live in further named databases of this
same environment, so that publishing a file and updating the chunk index happen
in one transaction; ``MAX_DBS`` leaves room for them.

Named databases (integers little-endian unless marked BE; BE keys sort
numerically):

``chunks``  key: raw chunk digest (32 bytes)
    value ``CHUNK`` = segment id Q, record offset Q, raw length I, stored length I,
    flags B (the record's flags), 3 pad bytes, reference count Q.
    Invariant: refcount = number of times the chunk appears in the recipes of
    all objects (each distinct object once).  refcount 0 = garbage that ``gc``
    removes; a new object that needs the chunk may revive it first.

``objects``  key: raw object digest (32 bytes)
    value ``OBJECT`` = size Q, reference count Q, chunk count I, then
    ``chunk count`` entries of ``RECIPE_ENTRY`` = chunk digest 32s, raw length I.
    Invariants: size = sum of the entry lengths; refcount >= 1 (an object whose
    last reference goes is deleted, and its chunks' refcounts drop).

``segments``  key: segment id (Q, BE)
    value ``SEGMENT`` = shard I, published length Q, live bytes Q, live records Q.
    published length: every byte before it is complete and referenced records
    lie within it; a writer that opens the store truncates anything after it
    (the torn or unpublished tail of a crashed writer).  live bytes / records:
    the records (header + payload) that the chunk index points into.
    A segment file with no entry here holds nothing published and is deleted.

``counters``  key: ASCII name; value Q.
    ``objects`` distinct objects, ``files`` sum of object refcounts,
    ``logical_bytes`` sum of size x refcount over objects, ``chunks`` index
    entries, ``chunk_bytes`` sum of their raw lengths, ``stored_bytes`` sum of
    their record sizes (header + payload), ``next_segment_id``.

``wal_applied``  key: WAL handle (Q, BE); value: object digest 32s + size Q.
    A staged object whose WAL handle is here has been published; replay skips
    it.  Entries are dropped when the WAL is checkpointed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from cachefs.errors import CachefsError, CorruptDataError, IndexCorruptError, StoreFullError

INDEX_NAME = "index.lmdb"
MAX_DBS = 32
MAP_SIZE = 1 << 40  # address space only; the file grows as needed

CHUNK = struct.Struct("<QQIIB3xQ")
OBJECT = struct.Struct("<QQI")
RECIPE_ENTRY = struct.Struct("<32sI")
SEGMENT = struct.Struct("<IQQQ")
SEGMENT_KEY = struct.Struct(">Q")
COUNTER = struct.Struct("<Q")

COUNTER_NAMES = (
    "objects",
    "files",
    "logical_bytes",
    "chunks",
    "chunk_bytes",
    "stored_bytes",
    "next_segment_id",
)


@dataclass
class ChunkEntry:
    segment_id: int
    offset: int
    raw_len: int
    stored_len: int
    flags: int
    refcount: int

    def pack(self) -> bytes:
        return CHUNK.pack(
            self.segment_id, self.offset, self.raw_len, self.stored_len, self.flags, self.refcount
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ChunkEntry:
        return cls(*CHUNK.unpack(raw))


@dataclass
class ObjectEntry:
    size: int
    refcount: int
    chunks: list[tuple[bytes, int]]  # (chunk digest, raw length)

    def pack(self) -> bytes:
        parts = [OBJECT.pack(self.size, self.refcount, len(self.chunks))]
        parts.extend(RECIPE_ENTRY.pack(d, n) for d, n in self.chunks)
        return b"".join(parts)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ObjectEntry:
        size, refcount, count = OBJECT.unpack_from(raw, 0)
        if len(raw) != OBJECT.size + count * RECIPE_ENTRY.size:
            raise CorruptDataError("object recipe has the wrong length in the index")
        chunks = list(RECIPE_ENTRY.iter_unpack(memoryview(raw)[OBJECT.size :]))
        return cls(size, refcount, chunks)


@dataclass
class SegmentEntry:
    shard: int
    length: int
    live_bytes: int
    live_records: int

    def pack(self) -> bytes:
        return SEGMENT.pack(self.shard, self.length, self.live_bytes, self.live_records)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> SegmentEntry:
        return cls(*SEGMENT.unpack(raw))


class Index:
    """The LMDB environment and its named databases."""

    def __init__(self, store: Path, *, readonly: bool, fsync: bool = True) -> None:
        path = store / INDEX_NAME
        self.readonly = readonly
        try:
            self.env = lmdb.open(
                str(path),
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
            self.chunks = self.env.open_db(b"chunks", create=not readonly)
            self.objects = self.env.open_db(b"objects", create=not readonly)
            self.segments = self.env.open_db(b"segments", create=not readonly)
            self.counters = self.env.open_db(b"counters", create=not readonly)
            self.wal_applied = self.env.open_db(b"wal_applied", create=not readonly)
        except lmdb.Error as exc:
            if "already open" in str(exc):
                raise CachefsError(
                    f"the index {path} is already open in this process",
                    hint="use the Store object that is already open",
                ) from None
            raise lmdb_error(exc, f"opening the index {path}") from None

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

    def get_object(self, txn: lmdb.Transaction, digest: bytes) -> ObjectEntry | None:
        raw = txn.get(digest, db=self.objects)
        return None if raw is None else ObjectEntry.unpack(raw)

    def put_object(self, txn: lmdb.Transaction, digest: bytes, entry: ObjectEntry) -> None:
        txn.put(digest, entry.pack(), db=self.objects)

    def get_segment(self, txn: lmdb.Transaction, segment_id: int) -> SegmentEntry | None:
        raw = txn.get(SEGMENT_KEY.pack(segment_id), db=self.segments)
        return None if raw is None else SegmentEntry.unpack(raw)

    def put_segment(self, txn: lmdb.Transaction, segment_id: int, entry: SegmentEntry) -> None:
        txn.put(SEGMENT_KEY.pack(segment_id), entry.pack(), db=self.segments)

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
