"""The metadata schema: one LMDB environment per store (on-disk format layer).

All metadata lives in ``STORE/index.lmdb`` (a single-file LMDB environment), apart
from the chunk bytes in segments.  Readers never block (LMDB MVCC); one write
transaction runs at a time.  The chunk index and the filesystem namespace are
named databases of the same environment, so that publishing a file's content
and pointing its inode at it is one transaction.  ``engine/_index.py`` opens
them; this module is the one place that says what they hold.

Named databases (integers little-endian unless marked BE; BE keys sort
numerically, so that all the keys of one inode are adjacent).

Every value of every database ends with its *seal* (since schema 4): ``SEAL``
= xxh3-64 of the value, seeded with the xxh3-64 of its key (``seal``).  LMDB
keeps no checksums; the seal makes damage to an entry (a flipped bit in the key
or the value) an error where it is read (``unseal``) instead of a wrong name or
a wrong inode.  The layouts below are of the values without their seal.

``meta``  key: ASCII name; value Q.
    ``schema_version``: SCHEMA_VERSION of the program that wrote the index
    (an index with ``wal_applied`` and no version is of version 1, which had
    no ``meta``).  A program refuses an index with a newer schema version, and
    opens an older one only to upgrade it.  An index that records no version
    is new only while none of its tables holds an entry; one that does lost
    its version (damage, which ``fsck --repair`` records again when the
    entries say it: sealed ones make it the current version, values of the
    unsealed lengths make it 3).

The store's tables (``STORE_DATABASES``) are made with a new index; once it
records its version they are all there (``recipes`` from version 5 on), and
one missing lost its record in LMDB's main database: damage.  The namespace's
tables and the cache directories' are each made together, in the order of
their tuple, when first needed: one missing before one that is there, or
beside one that holds entries, is damage too.  A lost table is never made
anew empty (it would lose what it named).  ``fsck --repair`` makes anew those
that say nothing the rest does not (``REBUILT_TABLES``): ``segments`` from
the chunk entries and the segment files, ``counters`` from a recount, filled
in the transaction that makes them; and ``recipes``, empty, when a lost
version is recorded again as 5 or later and no object's recipe is in pages
(a schema 4 index had none).

``chunks``  key: raw chunk digest (32 bytes)
    value ``CHUNK`` = segment id Q, record offset Q, raw length I, stored length I,
    flags B (the record's flags), 3 pad bytes, reference count Q.
    Invariant: refcount = number of times the chunk appears in the recipes of
    all objects (each distinct object once).  refcount 0 = garbage that ``gc``
    removes; a new object that needs the chunk may revive it first.
    A chunk *held remotely* (since schema 6) has segment id ``REMOTE_SEGMENT``
    and offset, stored length and flags 0: its bytes are only in the store's
    remote tiers (dropped here under ``--local-max-size`` once a read-write
    tier held them, ``engine/_demote.py``).  A read fetches it from the tiers
    (verified) and points the entry at the fresh local record; a put that
    meets it stores it again.  It counts in ``chunks`` and ``chunk_bytes``,
    not in ``stored_bytes`` or any segment's live bytes.

``objects``  key: raw object key (32 bytes)
    value ``OBJECT`` = size Q, reference count Q, chunk count I, then
    ``chunk count`` entries of ``RECIPE_ENTRY`` = chunk digest 32s, raw length I.
    An entry of raw length 0 whose digest field ends in 24 zero bytes is a
    *hole* (since schema 3): zero bytes that nothing stores, as many as the
    digest field's first 8 bytes say (``HOLE``).  (The only chunk of raw
    length 0, the empty object's, has the empty string's digest.)  A dense
    object (no hole) is keyed by the digest of its content.  A *sparse* object
    (one hole or more) is keyed by ``sparse_key``: the store's digest function
    over ``SPARSE_DOMAIN`` and its packed entries, its last 4 bytes replaced
    by ``SPARSE_TAG``, so that storing it never reads its holes.  The digest
    of its content is computed on request and then kept at the end of its
    value (32 bytes after the entries).
    Invariants: size = sum of the entry lengths (holes included); refcount >= 1
    (an object whose last reference goes is deleted, and its chunks'
    refcounts drop).
    A recipe of more than ``RECIPE_PAGE`` entries (since schema 5) is *paged*:
    the value holds, after ``OBJECT``, no entries but ``PAGE_SIZE`` = entries
    per page I, then for each page ``PAGE_START`` = the offset in the object
    where its first entry starts Q (then the content digest, as above); the
    entries are in ``recipes``.  So a range of a large object is read from the
    pages that hold it, never from its whole recipe.  (A paged value is always
    shorter than the inline value of the same count, which tells them apart.)

``recipes``  key: object key (32 bytes) + page number (``PAGE_KEY``, I, BE)
    value: that page's ``RECIPE_ENTRY`` entries, as in ``objects`` (every page
    full but the last).  Invariant: exactly the pages of the paged objects.

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
    their record sizes (header + payload), ``next_segment_id``; for the
    namespace ``next_inode`` and ``inodes`` (inodes in use), and
    ``unlinks_logged``: the journal's sequence number up to which the
    mount's logged unlinks (``NS_UNLINK``) are in the index (replay skips them).

The namespace (created when a store is first mounted):

``inodes``  key: inode number (Q, BE)
    value ``INODE`` = mode I, uid I, gid I, nlink I, size Q, rdev Q,
    atime ns q, mtime ns q, ctime ns q, content digest 32s, then for a
    symlink its target (the rest of the value).
    The content digest names the object (in ``objects``) holding a regular
    file's bytes, of exactly ``size`` bytes; all zeros when the file is empty
    (size 0) or not a regular file.  Each inode with content holds one
    reference to its object (``objects`` refcount), whatever its link count.
    nlink counts directory entries naming the inode, plus for a directory
    its own "." and every subdirectory's "..".  The root directory is inode
    ROOT_INODE.

``dirents``  key: parent inode (Q, BE) + name (1..255 bytes)
    value: child inode (Q).  No entry for "." or "..": a directory's parent
    is kept in ``parents``.

``parents``  key: directory inode (Q, BE); value: parent directory inode (Q).

``xattrs``  key: inode (Q, BE) + name; value: the attribute's bytes.

``orphans``  key: inode (Q, BE); value: empty.
    Inodes whose last directory entry is gone while something (an open file,
    the kernel) still used them.  They are deleted when released, or at the
    next mount if the daemon stopped first.

``caches``  key: directory inode (Q, BE); value: a JSON object.
    The directories marked as caches (``cachefs.fs`` cache directories):
    ``max_size`` (bytes), ``policy`` (``lru``, ``lfu`` or ``arc``) and the
    counters kept across mounts (``hits``, ``misses``, ``evictions``,
    ``bytes_evicted``, ``throttled``, ``throttled_seconds``).  Key
    STORE_SETTINGS (no inode has it) holds store-wide settings:
    ``max_store_size``.  A directory's record goes with the directory.

``cache_state``  key: directory inode (Q, BE); value: ``CACHE_ENTRY`` records
    (inode Q, count Q), one per file of the cache, in the order that rebuilds
    its eviction policy.  Saved at unmount and now and then while mounted;
    advisory: files missing from it are added at mount.

The push queue (created when a store is first opened with write tiers,
``cachefs.remote``):

``pushes``  key ``PUSH_KEY`` = sequence number Q BE, object key 32s, size Q BE;
    value ``PUSH`` = when it was queued (ns since the epoch, Q), then the
    entry the layer above queued with the object, if any (a shared
    directory's entry: JSON, ``cachefs.fs`` ``_shared.py``).
    Objects published while the store had write tiers, to be pushed to them
    (their chunks, their chunk list, and the whole object where the tier
    wants it).  The entry is written in the publishing transaction, so a
    publication and its place in the queue survive a crash together; it is
    deleted once every write tier holds the object.  Key order is queue
    order.  An entry whose object is gone (deleted before it was pushed) is
    dropped.  An older program ignores this database (publications made by
    it are not queued).

Bump SCHEMA_VERSION (and the store format version) for any change that an
older program would misread, and add the step that upgrades the previous
version to ``engine/_upgrade.py``.
"""

from __future__ import annotations

import stat
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import xxhash

from cachefs.errors import CorruptDataError
from cachefs.format.digest import Digest, DigestFunction
from cachefs.format.segment import RECORD_HEADER

#: Version of the LMDB schema.  1: cachefs 0.1 (no ``meta``; a ``wal_applied``
#: database of the engine's staged objects).  2: ``meta``; no ``wal_applied``.
#: 3: recipes may hold holes (sparse objects).  4: every value is sealed.
#: 5: long recipes are stored in pages (``recipes``).  6: chunks may be held
#: remotely (``REMOTE_SEGMENT``).
SCHEMA_VERSION = 6
#: The first schema whose values are sealed.
SEALED_SINCE = 4
#: The first schema that has the ``recipes`` table.
RECIPES_SINCE = 5

INDEX_NAME = "index.lmdb"
MAX_DBS = 32
MAP_SIZE = 1 << 40  # address space only; the file grows as needed

#: The databases of the chunk store, opened with the index.
STORE_DATABASES = (b"meta", b"chunks", b"objects", b"segments", b"counters", b"recipes")
#: The databases of the namespace, made when the store is first mounted.
NAMESPACE_DATABASES = (b"inodes", b"dirents", b"parents", b"xattrs", b"orphans")
#: The databases of cache directories (added after the rest of the namespace).
CACHE_DATABASES = (b"caches", b"cache_state")
#: The push queue of a store with write tiers.
REMOTE_DATABASES = (b"pushes",)
ALL_DATABASES = STORE_DATABASES + NAMESPACE_DATABASES + CACHE_DATABASES + REMOTE_DATABASES

CHUNK = struct.Struct("<QQIIB3xQ")
OBJECT = struct.Struct("<QQI")
RECIPE_ENTRY = struct.Struct("<32sI")
HOLE = struct.Struct("<Q24x")
#: Recipes of more entries than this are stored in pages of this many entries.
RECIPE_PAGE = 16384
PAGE_SIZE = struct.Struct("<I")
PAGE_START = struct.Struct("<Q")
PAGE_KEY = struct.Struct(">I")
_HOLE_PAD = bytes(24)
#: What a sparse object's key is the digest of, before its packed entries.
SPARSE_DOMAIN = b"cachefs sparse object 1\0"
#: The last bytes of every sparse object's key (in place of the digest's own).
SPARSE_TAG = b"\0SPR"
_xxh3 = xxhash.xxh3_64_intdigest
#: The largest file: 16 TiB less 4 KiB, ext4's largest (4 KiB blocks), so that
#: the spools in ``STORE/tmp`` can hold any offset of it on the usual
#: filesystems.  Holes cost nothing, whatever their length.
MAX_FILE_SIZE = (1 << 44) - (1 << 12)
SEGMENT = struct.Struct("<IQQQ")
SEGMENT_KEY = struct.Struct(">Q")
COUNTER = struct.Struct("<Q")
INODE = struct.Struct("<IIIIQQqqq32s")
assert INODE.size == 88
#: The times an inode holds: signed 64-bit nanoseconds (years 1678 to 2262).
INODE_TIMES = range(-(1 << 63), 1 << 63)
INO_KEY = struct.Struct(">Q")
INO_VALUE = struct.Struct("<Q")
CACHE_ENTRY = struct.Struct("<QQ")
PUSH_KEY = struct.Struct(">Q32sQ")
PUSH = struct.Struct("<Q")
#: The segment id of a chunk held remotely (no segment has it).
REMOTE_SEGMENT = (1 << 64) - 1
#: The first bytes of a held-remotely chunk's value (its segment id).
REMOTE_MARK = struct.Struct("<Q").pack(REMOTE_SEGMENT)


def held_remotely(value: bytes | memoryview | None) -> bool:
    """Whether a ``chunks`` value (unsealed; None: no entry) is of a chunk held
    remotely, without unpacking it."""
    return value is not None and value[: len(REMOTE_MARK)] == REMOTE_MARK


SCHEMA_VERSION_KEY = b"schema_version"
#: Tables an index can lose and ``fsck --repair`` make anew, whole (see above).
REBUILT_TABLES = (b"segments", b"counters")
COUNTER_NAMES = (
    "objects",
    "files",
    "logical_bytes",
    "chunks",
    "chunk_bytes",
    "stored_bytes",
    "next_segment_id",
)

ROOT_INODE = 1
#: Key of the store-wide settings in ``caches``.
STORE_SETTINGS = 0
#: The content digest of an inode without content.
NO_CONTENT = bytes(32)


@dataclass
class ChunkEntry:
    segment_id: int
    offset: int
    raw_len: int
    stored_len: int
    flags: int
    refcount: int

    @property
    def remote(self) -> bool:
        """Whether the chunk is held remotely (no local record)."""
        return self.segment_id == REMOTE_SEGMENT

    @property
    def record_size(self) -> int:
        """The bytes its record takes in a segment (0 when held remotely)."""
        return 0 if self.remote else RECORD_HEADER.size + self.stored_len

    def pack(self) -> bytes:
        return CHUNK.pack(
            self.segment_id, self.offset, self.raw_len, self.stored_len, self.flags, self.refcount
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ChunkEntry:
        return cls(*_fixed(CHUNK, raw, "chunk"))


SEAL = struct.Struct("<Q")


def _fixed(layout: struct.Struct, raw: bytes | memoryview, what: str) -> tuple[Any, ...]:
    """``raw`` unpacked; CorruptDataError unless it is exactly ``layout``'s size."""
    if len(raw) != layout.size:
        raise CorruptDataError(
            f"an index {what} entry of {len(raw)} bytes, not {layout.size}",
            hint="run `cachefs fsck --repair STORE` (unmounted)",
        )
    return layout.unpack(raw)


def seal(key: bytes, value: bytes) -> bytes:
    """``value`` with its seal, as stored under ``key``."""
    return value + SEAL.pack(_xxh3(value, _xxh3(key)))


def unseal(key: bytes, raw: bytes) -> bytes | None:
    """The value of a sealed entry; None if the entry fails its seal."""
    if len(raw) < SEAL.size:
        return None
    value = raw[: -SEAL.size]
    if SEAL.unpack_from(raw, len(raw) - SEAL.size)[0] != _xxh3(value, _xxh3(key)):
        return None
    return value


#: The chunk digest that marks a hole in an in-memory recipe: (HOLE_MARK, length).
HOLE_MARK = b""


@dataclass
class RecipePages:
    """Where the pages of a paged recipe start (see ``objects``)."""

    #: Entries in all, and in each page (the last may hold fewer).
    count: int
    per_page: int
    #: The offset in the object of each page's first entry.
    starts: list[int]

    @classmethod
    def of(cls, chunks: list[tuple[bytes, int]], per_page: int) -> RecipePages:
        starts, position = [], 0
        for i, (_, length) in enumerate(chunks):
            if i % per_page == 0:
                starts.append(position)
            position += length
        return cls(len(chunks), per_page, starts)

    def entries(self, page: int) -> int:
        """How many entries page ``page`` holds."""
        return min(self.per_page, self.count - page * self.per_page)


@dataclass
class ObjectEntry:
    size: int
    refcount: int
    #: (chunk digest, raw length); a hole is (HOLE_MARK, length).  Empty in an
    #: entry read without its paged recipe (``Index.get_object_head``).
    chunks: list[tuple[bytes, int]]
    #: A sparse object's content digest, once computed (None: not yet, or dense).
    content: bytes | None = None
    #: A paged recipe's pages (None: the entries are in the value).
    pages: RecipePages | None = None

    def pack(self) -> bytes:
        """The value in ``objects`` (of a paged recipe: without its entries)."""
        if self.pages is None:
            parts = [OBJECT.pack(self.size, self.refcount, len(self.chunks))]
            parts.append(pack_recipe(self.chunks))
        else:
            parts = [OBJECT.pack(self.size, self.refcount, self.pages.count)]
            parts.append(PAGE_SIZE.pack(self.pages.per_page))
            parts.extend(PAGE_START.pack(start) for start in self.pages.starts)
        if self.content is not None:
            parts.append(self.content)
        return b"".join(parts)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ObjectEntry:
        """An entry from its value (of a paged recipe: without its entries)."""
        size, refcount, count = _fixed(OBJECT, raw[: OBJECT.size], "object")
        end = OBJECT.size + count * RECIPE_ENTRY.size
        if len(raw) in (end, end + 32):
            content = bytes(raw[end:]) if len(raw) > end else None
            return cls(size, refcount, unpack_recipe(memoryview(raw)[OBJECT.size : end]), content)
        if len(raw) < OBJECT.size + PAGE_SIZE.size:
            raise CorruptDataError("object recipe has the wrong length in the index")
        (per_page,) = PAGE_SIZE.unpack_from(raw, OBJECT.size)
        if per_page < 2 or count <= per_page:
            raise CorruptDataError("object recipe has the wrong length in the index")
        pages = -(-count // per_page)
        end = OBJECT.size + PAGE_SIZE.size + pages * PAGE_START.size
        if len(raw) not in (end, end + 32):
            raise CorruptDataError("object recipe has the wrong length in the index")
        starts = [
            s
            for (s,) in PAGE_START.iter_unpack(memoryview(raw)[end - pages * PAGE_START.size : end])
        ]
        content = bytes(raw[end:]) if len(raw) > end else None
        return cls(size, refcount, [], content, RecipePages(count, per_page, starts))

    @property
    def sparse(self) -> bool:
        return any(digest == HOLE_MARK for digest, _ in self.chunks)

    def chunk_uses(self) -> Counter[bytes]:
        return chunk_uses(self.chunks)


def chunk_uses(chunks: list[tuple[bytes, int]]) -> Counter[bytes]:
    """How many times each stored chunk appears in a recipe (holes are not chunks)."""
    return Counter(digest for digest, _ in chunks if digest != HOLE_MARK)


def sparse_key(function: DigestFunction, chunks: list[tuple[bytes, int]]) -> bytes:
    """The key of a sparse object with this recipe (see ``objects``)."""
    return function.hash(SPARSE_DOMAIN + pack_recipe(chunks))[: -len(SPARSE_TAG)] + SPARSE_TAG


def may_be_sparse(key: bytes) -> bool:
    """Whether an object key may name a sparse object (a dense object's digest
    ends as a sparse key does once in 2**32: a hint, to skip looking up the
    recipes of the others)."""
    return key.endswith(SPARSE_TAG)


def unpack_recipe(raw: bytes | memoryview) -> list[tuple[bytes, int]]:
    """Recipe entries from their packed form (``pack_recipe``)."""
    if len(raw) % RECIPE_ENTRY.size:
        raise CorruptDataError("a recipe page has the wrong length in the index")
    return [
        (HOLE_MARK, HOLE.unpack(digest)[0])
        if length == 0 and digest.endswith(_HOLE_PAD)
        else (digest, length)
        for digest, length in RECIPE_ENTRY.iter_unpack(raw)
    ]


def pack_recipe(chunks: list[tuple[bytes, int]]) -> bytes:
    """Recipe entries as stored (holes as ``HOLE`` entries of raw length 0)."""
    return b"".join(
        RECIPE_ENTRY.pack(HOLE.pack(length), 0)
        if digest == HOLE_MARK
        else RECIPE_ENTRY.pack(digest, length)
        for digest, length in chunks
    )


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
        return cls(*_fixed(SEGMENT, raw, "segment"))


@dataclass
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    content: bytes = NO_CONTENT
    target: bytes = b""

    def pack(self) -> bytes:
        return (
            INODE.pack(
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.rdev,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.content,
            )
            + self.target
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes | memoryview) -> Inode:
        fields = _fixed(INODE, raw[: INODE.size], "inode")
        mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, content = fields
        return cls(
            ino,
            mode,
            uid,
            gid,
            nlink,
            size,
            rdev,
            atime,
            mtime,
            ctime,
            content,
            bytes(raw[INODE.size :]),
        )

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def digest(self) -> Digest | None:
        """The object holding the file's bytes (None when it has none)."""
        if self.content == NO_CONTENT:
            return None
        return Digest(self.content, self.size)


def dirent_key(parent: int, name: bytes) -> bytes:
    """The ``dirents`` key of entry ``name`` in directory ``parent``."""
    return INO_KEY.pack(parent) + name


__all__ = [
    "CACHE_ENTRY",
    "HOLE_MARK",
    "INODE_TIMES",
    "INO_KEY",
    "INO_VALUE",
    "MAX_FILE_SIZE",
    "NO_CONTENT",
    "PAGE_KEY",
    "RECIPE_PAGE",
    "REMOTE_MARK",
    "REMOTE_SEGMENT",
    "ROOT_INODE",
    "SCHEMA_VERSION",
    "STORE_SETTINGS",
    "ChunkEntry",
    "Inode",
    "ObjectEntry",
    "RecipePages",
    "SegmentEntry",
    "chunk_uses",
    "dirent_key",
    "held_remotely",
    "may_be_sparse",
    "pack_recipe",
    "seal",
    "sparse_key",
    "unpack_recipe",
    "unseal",
]
