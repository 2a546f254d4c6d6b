"""The index: the store's LMDB environment and typed access to it (storage engine layer).

What every named database holds is specified in ``cachefs.format.schema``; this
module opens them and reads and writes their entries inside a caller's
transaction.  Write transactions are only used in ``with`` blocks; read
transactions are kept short.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias, cast

import lmdb

from cachefs.engine._health import Health
from cachefs.errors import (
    CachefsError,
    CorruptDataError,
    FormatVersionError,
    IndexCorruptError,
    StoreFullError,
)
from cachefs.faults import fault
from cachefs.format.header import SegmentParams
from cachefs.format.schema import (
    ALL_DATABASES,
    CACHE_DATABASES,
    CHUNK,
    COUNTER,
    COUNTER_NAMES,
    INDEX_NAME,
    INO_KEY,
    INO_VALUE,
    MAP_SIZE,
    MAX_DBS,
    NAMESPACE_DATABASES,
    PAGE_KEY,
    REBUILT_TABLES,
    RECIPE_PAGE,
    RECIPES_SINCE,
    ROOT_INODE,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SEALED_SINCE,
    SEGMENT,
    SEGMENT_KEY,
    ChunkEntry,
    ObjectEntry,
    RecipePages,
    SegmentEntry,
    pack_recipe,
    seal,
    unpack_recipe,
    unseal,
)
from cachefs.format.segment import Record, list_segment_files, scan_segment, segment_path, shard_of

log = logging.getLogger(__name__)

#: A named database of the environment (what ``lmdb.Environment.open_db`` returns).
Database: TypeAlias = Any

#: The length of every (unsealed) value of these tables.
_FIXED_SIZES = {
    b"chunks": CHUNK.size,
    b"segments": SEGMENT.size,
    b"counters": COUNTER.size,
    b"parents": INO_VALUE.size,
    b"dirents": INO_VALUE.size,
}

#: The remedy for damage to the index's own structure (its main database).
RESTORE_INDEX = "restore index.lmdb from a backup; segments hold the chunk data"
#: The remedy for a lost table of ``REBUILT_TABLES``.
_REPAIR_REBUILDS = (
    "run `cachefs fsck --repair STORE` (unmounted), which rebuilds it from the segment files "
    f"and the other tables (if another table is lost too: {RESTORE_INDEX})"
)


class Table:
    """A named database whose values are sealed (``format/schema.py``): written
    with their seal, verified on every read.  Damage is IndexCorruptError,
    recorded once (``damaged``)."""

    def __init__(self, index: Index, name: bytes, handle: Database) -> None:
        self.index = index
        self.name = name
        self.handle = handle

    def _open(self, key: bytes, raw: bytes) -> bytes:
        if not self.index.sealed:
            return raw
        value = unseal(key, raw)
        if value is None:
            raise self.index.damaged(
                IndexCorruptError(
                    f"the index entry {self.name.decode()}/{key.hex()} fails its checksum",
                    path=str(self.index.path),
                    hint="run `cachefs fsck --repair STORE` (unmounted)",
                )
            )
        return value

    def _seal(self, key: bytes, value: bytes) -> bytes:
        return seal(key, value) if self.index.sealed else value

    def get(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        raw = txn.get(key, db=self.handle)  # bytes: transactions are made with buffers=False
        return None if raw is None else self._open(key, cast(bytes, raw))

    def get_many(self, txn: lmdb.Transaction, keys: Sequence[bytes]) -> list[bytes | None]:
        """:meth:`get` of each key, in one call (a server's batch: thousands of
        lookups, where a Python call per lookup and per seal is the cost)."""
        get, handle = txn.get, self.handle
        if not self.index.sealed:
            return [cast("bytes | None", get(key, None, handle)) for key in keys]
        out: list[bytes | None] = []
        for key in keys:
            raw = cast("bytes | None", get(key, None, handle))
            value = None if raw is None else unseal(key, raw)
            if value is None and raw is not None:
                value = self._open(key, raw)  # raises: the entry fails its seal
            out.append(value)
        return out

    def put(
        self, txn: lmdb.Transaction, key: bytes, value: bytes, *, overwrite: bool = True
    ) -> bool:
        return bool(txn.put(key, self._seal(key, value), db=self.handle, overwrite=overwrite))

    def delete(self, txn: lmdb.Transaction, key: bytes) -> bool:
        return bool(txn.delete(key, db=self.handle))

    def items(self, txn: lmdb.Transaction, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """The entries whose keys start with ``prefix``, in key order."""
        cursor = txn.cursor(db=self.handle)
        if not cursor.set_range(prefix):
            return
        for key, raw in cast(Iterator[tuple[bytes, bytes]], cursor):
            if not key.startswith(prefix):
                return
            yield key, self._open(key, raw)

    def keys(self, txn: lmdb.Transaction, prefix: bytes = b"") -> Iterator[bytes]:
        return (key for key, _ in self.items(txn, prefix))

    def any(self, txn: lmdb.Transaction, prefix: bytes) -> bool:
        """Whether an entry's key starts with ``prefix``."""
        cursor = txn.cursor(db=self.handle)
        return bool(cursor.set_range(prefix)) and cast(bytes, cursor.key()).startswith(prefix)

    def count(self, txn: lmdb.Transaction) -> int:
        return int(txn.stat(self.handle)["entries"])

    def intact_items(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        """Every entry but those that fail their seal (a repair's recount)."""
        sealed = self.index.sealed
        for key, raw in cast(Iterator[tuple[bytes, bytes]], txn.cursor(db=self.handle)):
            value = unseal(key, raw) if sealed else raw
            if value is not None:
                yield key, value

    def damaged_keys(self, txn: lmdb.Transaction) -> list[bytes]:
        """The keys of the entries that fail their seal (fsck).  A table whose
        tree cannot be walked (its root or a page broken) is IndexCorruptError."""
        if not self.index.sealed:
            return []
        try:
            entries = cast(Iterator[tuple[bytes, bytes]], txn.cursor(db=self.handle))
            return [key for key, raw in entries if unseal(key, raw) is None]
        except lmdb.Error as exc:
            raise IndexCorruptError(
                f"the index {self.index.path} is damaged: its table {_name(self.name)} "
                f"cannot be read ({exc})",
                hint=RESTORE_INDEX,
            ) from None

    def seal_all(self, txn: lmdb.Transaction) -> None:
        """Seal every entry (the upgrade to schema 4, in one transaction)."""
        cursor = txn.cursor(db=self.handle)
        more = cursor.first()
        while more:
            key, value = cast(tuple[bytes, bytes], cursor.item())
            cursor.put(key, seal(key, value))
            more = cursor.next()


class Index:
    """The LMDB environment of a store and its named databases."""

    def __init__(
        self,
        store: Path,
        health: Health | None = None,
        *,
        readonly: bool,
        fsync: bool = True,
        recover: tuple[Path, SegmentParams] | None = None,
    ) -> None:
        """``recover`` (a writer: ``cachefs fsck --repair``; the segment files'
        directory and parameters): record again a lost schema version from the
        entries, and make anew, whole, the ``REBUILT_TABLES`` the index lost."""
        self.path = store / INDEX_NAME
        self.readonly = readonly
        self.health = health
        #: The schema version recorded again at this open (``recover``).
        self.recovered_version: int | None = None
        #: Tables the index had lost, made anew at this open (``recover``).
        self.rebuilt_tables: set[bytes] = set()
        #: Whether values are sealed (schema 4 on; an upgrade seals them).
        self.sealed = False
        #: Handles of the named databases opened so far (``_open_raw``).
        self._handles: dict[bytes, Database] = {}
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
            #: Missing in an index of schema version 1 until a writer opens it,
            #: and in a new one that a reader opens.
            self.meta: Table | None = None
            version = self.schema_version
            if version is not None and version > SCHEMA_VERSION:
                raise FormatVersionError(
                    f"the index {self.path} has schema version {version}; this cachefs "
                    f"reads versions up to {SCHEMA_VERSION}"
                )
            if version is None and _holds_entries(self):
                # Its ``meta`` table's record or the version in it was lost: a
                # writer would take the index for new and seal every value again.
                if not recover or readonly:
                    raise IndexCorruptError(
                        f"the index {self.path} is damaged: it holds entries but records no "
                        "schema version (its table meta, or the version in it, is lost)",
                        hint="run `cachefs fsck --repair STORE` (unmounted), which records "
                        f"it again from what the entries show; or {RESTORE_INDEX}",
                    )
                version = self.recovered_version = _recover_version(self)
            if self.meta is None and not readonly:
                self.meta = self.open_optional(b"meta", create=True)
            self.sealed = version is not None and version >= SEALED_SINCE
            # The tables are made with a new index (one that records no version
            # and holds nothing); missing from one that records its version, the
            # index is damaged (its main database).
            new = version is None
            make = not readonly and new
            if not new and recover is not None and not readonly:
                self.rebuilt_tables = _rebuild_lost(self, *recover)
            self.chunks = self.open_table(b"chunks", make=make, new=new)
            self.objects = self.open_table(b"objects", make=make, new=new)
            self.segments = self.open_table(b"segments", make=make, new=new)
            self.counters = self.open_table(b"counters", make=make, new=new)
            #: Paged recipes (schema 5); None in a read-only open of an older index.
            if version is not None and version >= RECIPES_SINCE:
                self.recipes: Table | None = self.open_table(b"recipes", make=False, new=False)
            else:
                self.recipes = self.open_optional(b"recipes", create=not readonly)
        except BaseException:
            self.env.close()
            raise

    def damaged(self, exc: CorruptDataError) -> CorruptDataError:
        """Record damage met in the index (once); returns ``exc`` to raise."""
        return exc if self.health is None else self.health.damaged(exc)

    def open_table(self, name: bytes, *, make: bool, new: bool) -> Table:
        """A table every index has (made when ``make``; ``new``: the index
        records no version and holds nothing yet)."""
        try:
            return Table(self, name, self.env.open_db(name, create=make))
        except lmdb.NotFoundError as exc:
            if new:  # a reader of an index whose making a crash cut short
                raise CachefsError(
                    f"the index {self.path} is not made yet: it has no table {_name(name)}",
                    hint="open the store once for writing (`cachefs gc STORE`), which makes it",
                ) from None
            raise self.lost_table(name, exc) from None
        except lmdb.IncompatibleError as exc:
            raise self.lost_table(name, exc) from None
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"opening the index database {_name(name)}") from None

    def lost_table(self, name: bytes, exc: lmdb.Error) -> IndexCorruptError:
        """The error of table ``name`` that cannot be opened (``exc``)."""
        rebuilt = name in REBUILT_TABLES and not self.exists(name)  # its record is gone
        return IndexCorruptError(
            f"the index {self.path} is damaged: its table {_name(name)} cannot be opened ({exc})",
            hint=_REPAIR_REBUILDS if rebuilt else RESTORE_INDEX,
        )

    def table_names(self) -> list[bytes]:
        """The names in the main database (the tables, unless it is damaged)."""
        with self.read() as txn:
            return [cast(bytes, name) for name in txn.cursor().iternext(values=False)]

    def open_together(self, names: Sequence[bytes], *, create: bool) -> list[Table | None]:
        """Tables that are made together, one after the other in the order of
        ``names`` (the namespace's, the cache directories'): those missing are
        made (``create``) only after the last one there, and only while none
        holds an entry.  Any other missing one lost its record in the main
        database: IndexCorruptError, and nothing is made (it would be made
        empty, and what it named lost)."""
        found = self.open_databases(names, create=False)
        if all(found):
            return found
        there = [n for n, table in enumerate(found) if table is not None]
        last = there[-1] if there else 0
        missing = [_name(name) for name, table in zip(names, found, strict=True) if not table]
        with self.read() as txn:
            held = [_name(table.name) for table in found if table and table.count(txn)]
        if held or any(table is None for table in found[:last]):
            # A writer may have made them meanwhile (a first mount).
            found = self.open_databases(names, create=False)
            if all(found):
                return found
            detail = f"; {', '.join(held)}, made with it, hold entries" if held else ""
            raise IndexCorruptError(
                f"the index {self.path} is damaged: table {', '.join(missing)} is missing{detail}",
                hint=RESTORE_INDEX,
            )
        return self.open_databases(names, create=True) if create else found

    def _open_raw(self, name: bytes, *, create: bool) -> Database | None:
        """A named database's handle: opened once, then kept (handles live as
        long as the environment)."""
        handle = self._handles.get(name)
        if handle is not None:
            return handle
        try:
            if self.readonly:
                handle = self.env.open_db(name, create=False)
            else:
                # Without a transaction, open_db on a writable environment
                # begins a write one and waits for LMDB's writer lock holding
                # the GIL: a thread inside a write transaction (the mount's
                # loop) then waits for the GIL, and the process for good (a
                # scrub of a busy mount).  One begun here waits without it.
                with self.env.begin(write=True) as txn:  # commits, or aborts if it raises
                    handle = self.env.open_db(name, txn=txn, create=create)
        except lmdb.NotFoundError:
            return None
        except lmdb.IncompatibleError as exc:  # its record in the main database is damaged
            raise self.lost_table(name, exc) from None
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"opening the index database {name.decode()}") from None
        self._handles[name] = handle
        return handle

    def dropped(self, name: bytes) -> None:
        """Named database ``name`` was deleted (its handle with it)."""
        self._handles.pop(name, None)

    def open_optional(self, name: bytes, *, create: bool) -> Table | None:
        """A named database, made when ``create``; None if it is not there."""
        handle = self._open_raw(name, create=create)
        return None if handle is None else Table(self, name, handle)

    def open_databases(self, names: Iterable[bytes], *, create: bool) -> list[Table | None]:
        return [self.open_optional(name, create=create) for name in names]

    def exists(self, name: bytes) -> bool:
        """Whether the named database ``name`` was ever made."""
        with self.read() as txn:
            return txn.get(name) is not None  # named databases are keys of the main one

    @property
    def schema_version(self) -> int | None:
        """The schema version the index records (None: none recorded yet; an
        index of schema version 1 has no ``meta`` database)."""
        # Schema 1 had ``wal_applied`` and no ``meta``; a writer makes ``meta``
        # when it opens the index, then drops ``wal_applied`` in the transaction
        # that records the version.  Both are read in one snapshot, and
        # ``meta`` is looked for again if it was not there.
        for _ in range(2):
            if self.meta is None:
                self.meta = self.open_optional(b"meta", create=False)
            with self.read() as txn:
                applied = txn.get(b"wal_applied") is not None
                raw = (
                    None if self.meta is None else txn.get(SCHEMA_VERSION_KEY, db=self.meta.handle)
                )
            if raw is not None or applied or self.meta is not None:
                break
        if raw is None:
            return 1 if applied else None
        if len(raw) == COUNTER.size:  # before schema 4: not sealed
            return int(COUNTER.unpack(raw)[0])
        value = unseal(SCHEMA_VERSION_KEY, cast(bytes, raw))
        if value is None or len(value) != COUNTER.size:
            raise IndexCorruptError(
                f"the schema version in {self.path} fails its checksum", hint=RESTORE_INDEX
            )
        return int(COUNTER.unpack(value)[0])

    def set_schema_version(self, txn: lmdb.Transaction, version: int = SCHEMA_VERSION) -> None:
        assert self.meta is not None
        value = COUNTER.pack(version)
        if version >= SEALED_SINCE:
            value = seal(SCHEMA_VERSION_KEY, value)
        txn.put(SCHEMA_VERSION_KEY, value, db=self.meta.handle)

    def close(self) -> None:
        self.env.close()

    def sync(self) -> None:
        """Make every commit so far durable (fdatasync)."""
        try:
            _injected("index.sync", "mdb_env_sync")
            self.env.sync(True)
        except lmdb.Error as exc:
            raise lmdb_error(exc, "syncing the index") from None

    def read(self) -> lmdb.Transaction:
        return self.env.begin(write=False, buffers=False)

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed when the block ends (aborted when it raises)."""
        txn = self.env.begin(write=True)
        try:
            yield txn
            _injected("index.commit", "mdb_txn_commit")
        except BaseException:
            txn.abort()
            raise
        txn.commit()

    # --- typed accessors, all within a caller's transaction -----------------

    def get_chunk(self, txn: lmdb.Transaction, digest: bytes) -> ChunkEntry | None:
        raw = self.chunks.get(txn, digest)
        return None if raw is None else ChunkEntry.unpack(raw)

    def put_chunk(self, txn: lmdb.Transaction, digest: bytes, entry: ChunkEntry) -> None:
        self.chunks.put(txn, digest, entry.pack())

    def delete_chunk(self, txn: lmdb.Transaction, digest: bytes) -> None:
        self.chunks.delete(txn, digest)

    def get_object(self, txn: lmdb.Transaction, digest: bytes) -> ObjectEntry | None:
        """An object's entry with its whole recipe (read from its pages if paged)."""
        entry = self.get_object_head(txn, digest)
        if entry is not None and entry.pages is not None:
            pages = entry.pages
            entry.chunks = [
                item
                for page in range(len(pages.starts))
                for item in self.recipe_page(txn, digest, pages, page)
            ]
        return entry

    def get_object_head(self, txn: lmdb.Transaction, digest: bytes) -> ObjectEntry | None:
        """An object's entry, without the entries of a paged recipe (enough to
        change its reference count, or to find the pages of a range)."""
        raw = self.objects.get(txn, digest)
        return None if raw is None else ObjectEntry.unpack(raw)

    def recipe_page(
        self, txn: lmdb.Transaction, digest: bytes, pages: RecipePages, page: int
    ) -> list[tuple[bytes, int]]:
        """The entries of page ``page`` of a paged object's recipe."""
        if self.recipes is None:  # opened before a writer upgraded the index
            raise CachefsError(
                f"the index {self.path} was upgraded while this process read it",
                hint="run the command again",
            )
        raw = self.recipes.get(txn, digest + PAGE_KEY.pack(page))
        if raw is None:
            raise self.damaged(
                CorruptDataError(
                    f"page {page} of the recipe of object {digest.hex()} is missing",
                    path=str(self.path),
                )
            )
        chunks = unpack_recipe(raw)
        if len(chunks) != pages.entries(page):
            raise self.damaged(
                CorruptDataError(
                    f"page {page} of the recipe of object {digest.hex()} holds "
                    f"{len(chunks)} entries, not {pages.entries(page)}",
                    path=str(self.path),
                )
            )
        return chunks

    def put_object(self, txn: lmdb.Transaction, digest: bytes, entry: ObjectEntry) -> None:
        """Write an object's entry; a new recipe of more than ``RECIPE_PAGE``
        entries goes to pages.  (An entry read with ``get_object_head`` writes
        back its head only: a recipe never changes under its key.)"""
        if entry.pages is None and len(entry.chunks) > RECIPE_PAGE:
            assert self.recipes is not None
            entry.pages = RecipePages.of(entry.chunks, RECIPE_PAGE)
            for page in range(len(entry.pages.starts)):
                part = entry.chunks[page * RECIPE_PAGE : (page + 1) * RECIPE_PAGE]
                self.recipes.put(txn, digest + PAGE_KEY.pack(page), pack_recipe(part))
        self.objects.put(txn, digest, entry.pack())

    def delete_object(self, txn: lmdb.Transaction, digest: bytes) -> None:
        """Delete an object's entry, and its recipe's pages."""
        entry = self.get_object_head(txn, digest)
        if entry is not None and entry.pages is not None and self.recipes is not None:
            for page in range(len(entry.pages.starts)):
                self.recipes.delete(txn, digest + PAGE_KEY.pack(page))
        self.objects.delete(txn, digest)

    def get_segment(self, txn: lmdb.Transaction, segment_id: int) -> SegmentEntry | None:
        raw = self.segments.get(txn, SEGMENT_KEY.pack(segment_id))
        return None if raw is None else SegmentEntry.unpack(raw)

    def put_segment(self, txn: lmdb.Transaction, segment_id: int, entry: SegmentEntry) -> None:
        self.segments.put(txn, SEGMENT_KEY.pack(segment_id), entry.pack())

    def delete_segment(self, txn: lmdb.Transaction, segment_id: int) -> None:
        self.segments.delete(txn, SEGMENT_KEY.pack(segment_id))

    def iter_segments(self, txn: lmdb.Transaction) -> Iterator[tuple[int, SegmentEntry]]:
        for key, raw in self.segments.items(txn):
            yield SEGMENT_KEY.unpack(key)[0], SegmentEntry.unpack(raw)

    def segments_at_open(self) -> tuple[dict[int, SegmentEntry], int, set[int]]:
        """For a writer's start-up: the segments' entries, the next segment id
        (0 if its counter is damaged: the files on disk say), and the ids whose
        entries are damaged (their files must be kept as they are for fsck)."""
        published: dict[int, SegmentEntry] = {}
        unreadable: set[int] = set()
        with self.read() as txn:
            for key, raw in cast(
                Iterator[tuple[bytes, bytes]], txn.cursor(db=self.segments.handle)
            ):
                value = unseal(key, raw) if self.sealed else raw
                if value is None:
                    unreadable.add(SEGMENT_KEY.unpack(key)[0])
                else:
                    published[SEGMENT_KEY.unpack(key)[0]] = SegmentEntry.unpack(value)
            try:
                next_id = self.counter(txn, "next_segment_id")
            except IndexCorruptError:
                next_id = 0
        return published, next_id, unreadable

    def iter_chunks(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, ChunkEntry]]:
        for key, raw in self.chunks.items(txn):
            yield key, ChunkEntry.unpack(raw)

    def iter_objects(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, ObjectEntry]]:
        """Every object with its whole recipe; one whose pages are damaged
        comes with an empty recipe (that does not add up to its size)."""
        for key, raw in self.objects.items(txn):
            entry = ObjectEntry.unpack(raw)
            if entry.pages is not None:
                try:
                    entry = self.get_object(txn, key) or entry
                except CorruptDataError:
                    entry.chunks = []
            yield key, entry

    def counter(self, txn: lmdb.Transaction, name: str) -> int:
        raw = self.counters.get(txn, name.encode())
        return 0 if raw is None else int(COUNTER.unpack(raw)[0])

    def counters_dict(self, txn: lmdb.Transaction) -> dict[str, int]:
        return {name: self.counter(txn, name) for name in COUNTER_NAMES}

    def add(self, txn: lmdb.Transaction, name: str, delta: int) -> None:
        value = self.counter(txn, name) + delta
        if value < 0:
            raise CorruptDataError(f"counter {name} would go negative", hint="run `cachefs fsck`")
        self.counters.put(txn, name.encode(), COUNTER.pack(value))

    def set_counter(self, txn: lmdb.Transaction, name: str, value: int) -> None:
        self.counters.put(txn, name.encode(), COUNTER.pack(value))


# --- what a repair's open records again (``recover``) ----------------------


def _rebuild_lost(index: Index, root: Path, params: SegmentParams) -> set[bytes]:
    """Make anew the ``REBUILT_TABLES`` the index lost (their records in the
    main database), whole, in the transaction that makes them: ``segments``
    from the chunk entries (where each record lies, its shard, the live
    figures) and the segment files (a file's length: the end of its last
    intact record, or of the last record a chunk names); ``counters`` from a
    recount of the chunks, the objects and the namespace.  Entries that fail
    their seals are left out (fsck drops them after, and checks the rest).
    Refused (IndexCorruptError), with nothing written, if another table is
    lost too.  Returns the tables made."""
    lost = {name for name in REBUILT_TABLES if not index.exists(name)}
    if not lost:
        return lost
    chunks = index.open_table(b"chunks", make=False, new=False)  # each there, or damage
    objects = index.open_table(b"objects", make=False, new=False)
    if index.exists(b"recipes") or (index.schema_version or 0) >= RECIPES_SINCE:
        index.open_table(b"recipes", make=False, new=False)
    namespace = index.open_together(NAMESPACE_DATABASES, create=False)
    inodes, dirents = namespace[0], namespace[NAMESPACE_DATABASES.index(b"dirents")]
    index.open_together(CACHE_DATABASES, create=False)
    try:
        with index.write() as txn:  # the tables, whole, or nothing
            tables = (chunks, objects, inodes, dirents)
            scan = b"segments" in lost  # the counters need only the files' ids
            segments, counters = _recount(txn, tables, root, params, scan=scan)
            for name in sorted(lost):
                table = Table(index, name, index.env.open_db(name, txn=txn, create=True))
                if name == b"segments":
                    for segment_id, entry in segments.items():
                        table.put(txn, SEGMENT_KEY.pack(segment_id), entry.pack())
                else:
                    for counter, value in counters.items():
                        table.put(txn, counter.encode(), COUNTER.pack(value))
    except lmdb.Error as exc:
        raise lmdb_error(exc, "making lost tables of the index anew") from None
    index.sync()
    log.warning(
        "the index %s had lost its table %s: made anew from the rest (%d segments)",
        index.path,
        ", ".join(map(_name, sorted(lost))),
        len(segments),
    )
    return lost


def _recount(
    txn: lmdb.Transaction,
    tables: tuple[Table, Table, Table | None, Table | None],
    root: Path,
    params: SegmentParams,
    *,
    scan: bool,
) -> tuple[dict[int, SegmentEntry], dict[str, int]]:
    """The segments' entries and the counters as the chunks, objects, inodes
    and dirents ``tables`` and the segment files say (see ``_rebuild_lost``;
    the files are read only when ``scan``)."""
    chunks, objects, inodes, dirents = tables
    segments: dict[int, SegmentEntry] = {}
    counters = dict.fromkeys(COUNTER_NAMES, 0)
    for key, value in chunks.intact_items(txn):  # damaged ones: fsck drops them
        chunk = ChunkEntry.unpack(value)
        counters["chunks"] += 1
        counters["chunk_bytes"] += chunk.raw_len
        counters["stored_bytes"] += chunk.record_size
        if not chunk.remote:
            entry = segments.setdefault(
                chunk.segment_id, SegmentEntry(shard_of(key, params), 0, 0, 0)
            )
            entry.length = max(entry.length, chunk.offset + chunk.record_size)
            entry.live_bytes += chunk.record_size
            entry.live_records += 1
    for _, value in objects.intact_items(txn):
        obj = ObjectEntry.unpack(value)
        counters["objects"] += 1
        counters["files"] += obj.refcount
        counters["logical_bytes"] += obj.size * obj.refcount
    shards = {segment_path(root, n, 0, params).parent.parent: n for n in range(params.shard_count)}
    files = list(list_segment_files(root))
    for segment_id, path in files if scan else ():
        shard = shards.get(path.parent.parent)
        if shard is None:
            continue  # not where this store keeps segments
        records = scan_segment(path)
        end = max((r.offset + r.size for r in records if isinstance(r, Record)), default=0)
        if end:  # no intact record: a writer's leftover (deleted at its open), or named below
            entry = segments.setdefault(segment_id, SegmentEntry(shard, 0, 0, 0))
            entry.length = max(entry.length, end)
    counters["next_segment_id"] = max([*segments, *(i for i, _ in files)], default=0) + 1
    if inodes is not None:
        counters["inodes"], counters["next_inode"] = inode_numbers(txn, inodes, dirents)
    return segments, counters


def inode_numbers(txn: lmdb.Transaction, inodes: Table, dirents: Table | None) -> tuple[int, int]:
    """The inodes that are there (intact entries) and the next number to give
    out: past every intact inode and every inode an intact entry of a
    directory names (a damaged key must not push it far out, nor a damaged
    value let its number be given out again while a name still points at it)."""
    count, highest = 0, ROOT_INODE
    for key, _ in inodes.intact_items(txn):
        count += 1
        highest = max(highest, INO_KEY.unpack(key)[0])
    for _, value in () if dirents is None else dirents.intact_items(txn):
        highest = max(highest, INO_VALUE.unpack(value)[0])
    return count, highest + 1


def _holds_entries(index: Index) -> bool:
    """Whether a table of the index holds an entry (a new index holds none,
    nor one whose making a crash cut short).  A name in the main database
    that is no table of this version's counts as entries (it is not opened:
    each open table keeps one of the ``MAX_DBS`` handles)."""
    for name in index.table_names():
        if name not in ALL_DATABASES:
            return True
        try:
            handle = index.env.open_db(name, create=False)
        except lmdb.IncompatibleError:
            return True  # a plain entry of the main database
        except lmdb.NotFoundError as exc:  # listed, not found: a damaged main database
            raise index.lost_table(name, exc) from None
        except lmdb.Error as exc:
            raise lmdb_error(exc, f"opening the index database {_name(name)}") from None
        with index.read() as txn:
            if txn.stat(handle)["entries"]:
                return True
    return False


def _recover_version(index: Index) -> int:
    """Record again the schema version of an index that lost it, from its
    entries: any sealed one makes it this version's (every schema after
    the first sealed one only allows more), and entries that fail their
    seals are damage that fsck finds after; none sealed, the last unsealed
    one (3; the writer's upgrade then seals them) -- if the values of the
    tables whose values have one length have that length unsealed.
    Anything else is refused (IndexCorruptError) with nothing written:
    another table lost (but ``segments`` and ``counters``, which
    ``_rebuild_lost`` makes anew after), entries that cannot tell, or a
    sealed index that lost ``recipes`` while an object's recipe is in pages."""
    sealed = unsealed = paged = 0
    for name in index.table_names():
        if name not in ALL_DATABASES:
            raise _cannot_tell(index, f"its main database names {_name(name)}")
        try:
            handle = index.env.open_db(name, create=False)
        except (lmdb.NotFoundError, lmdb.IncompatibleError) as exc:
            raise index.lost_table(name, exc) from None
        size = _FIXED_SIZES.get(name)
        with index.read() as txn:
            for key, raw in cast(Iterator[tuple[bytes, bytes]], txn.cursor(db=handle)):
                value = unseal(key, raw)
                if value is not None:
                    sealed += 1
                    paged += name == b"objects" and ObjectEntry.unpack(value).pages is not None
                elif size is not None and len(raw) == size:
                    unsealed += 1
    if not sealed and not unsealed:
        raise _cannot_tell(index, "no entry shows whether its values are sealed")
    version = SCHEMA_VERSION if sealed else SEALED_SINCE - 1
    for name in (b"chunks", b"objects"):  # each there, or damage (the others are rebuilt)
        index.open_table(name, make=False, new=False)
    index.open_together(NAMESPACE_DATABASES, create=False)
    index.open_together(CACHE_DATABASES, create=False)
    make_recipes = version >= RECIPES_SINCE and not index.exists(b"recipes")
    if make_recipes and paged:
        raise _cannot_tell(index, f"its table recipes is lost ({paged} objects need it)")
    try:
        with index.write() as txn:  # all of it, or nothing
            index.meta = Table(index, b"meta", index.env.open_db(b"meta", txn=txn, create=True))
            if make_recipes:  # a schema 4 index had none
                index.env.open_db(b"recipes", txn=txn, create=True)
            index.set_schema_version(txn, version)
    except lmdb.Error as exc:
        index.meta = None
        raise lmdb_error(exc, "recording the index's schema version") from None
    index.sync()
    log.warning(
        "the index %s had lost its schema version; recorded %d again (%d entries sealed, "
        "%d unsealed)",
        index.path,
        version,
        sealed,
        unsealed,
    )
    return version


def _cannot_tell(index: Index, why: str) -> IndexCorruptError:
    return IndexCorruptError(
        f"the index {index.path} lost its schema version, which cannot be recorded again: {why}",
        hint=RESTORE_INDEX,
    )


def _injected(point: str, call: str) -> None:
    """A fault injected at ``point`` raised as LMDB reports a failed ``call``."""
    try:
        fault(point)
    except OSError as exc:
        raise lmdb.Error(f"{call}: {exc.strerror}") from None


def _name(name: bytes) -> str:
    """A table's name, as printed (a damaged one may be any bytes)."""
    return name.decode(errors="backslashreplace")


def lmdb_error(exc: lmdb.Error, what: str) -> CachefsError:
    """Translate an LMDB error into the cachefs hierarchy."""
    if isinstance(exc, lmdb.MapFullError | lmdb.DiskError) or "No space" in str(exc):
        return StoreFullError(f"no space left while {what}")
    # MDB_BAD_TXN: LMDB met a broken page earlier in the transaction (a table's
    # root past the end of the file, seen in the flip experiment) and refuses to
    # go on; cachefs never uses a transaction again after an error of its own.
    damage = lmdb.CorruptedError | lmdb.InvalidError | lmdb.PageNotFoundError | lmdb.BadTxnError
    if isinstance(exc, damage):
        return IndexCorruptError(
            f"the index is damaged while {what}: {exc}",
            hint=RESTORE_INDEX,
        )
    if isinstance(exc, lmdb.VersionMismatchError | lmdb.IncompatibleError):
        return CorruptDataError(f"the index was written by an incompatible LMDB: {exc}")
    return CachefsError(f"index error while {what}: {exc}")
