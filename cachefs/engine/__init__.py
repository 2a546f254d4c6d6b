"""The storage engine: cachefs as a Python library (no trio, no FUSE).

A :class:`Store` is a directory of deduplicated, compressed, checksummed
objects addressed by their digests::

    from cachefs.engine import Store

    with Store.open("/var/lib/cachefs/store", create=True) as store:
        digest = store.put(b"hello")            # or a file object, or an iterable
        assert store.read(digest) == b"hello"
        for piece in store.iter_object(digest):  # zero-copy views where possible
            ...

What it offers:

* :class:`Store`, :class:`StoreOptions` (run-time settings), :class:`StoreStats`;
  ``Store.put_files`` of many files, with worker processes for the small ones
  (:func:`default_put_processes`: how many unless told);
* the store's parameters and names from ``cachefs.format``: :class:`StoreConfig`
  and its parts, :class:`Digest`, :class:`DigestFunction`;
* maintenance: :func:`collect_garbage` (:class:`GcReport`) and
  :func:`check_store` (fsck, :class:`FsckReport`), :func:`scrub_store`,
  :func:`heal_chunk` (a damaged chunk stored again from a good copy),
  :func:`restore_chunks` (chunks held remotely stored here again) and
  :func:`drop_held` (chunks the remote tiers hold dropped here, coldest first);
* the filesystem namespace kept in the same index: :class:`Namespace`,
  :class:`Inode`, :class:`ExtendedAttributes`, :class:`CacheRecords`;
* what the store did, for metrics: ``Store.activity()`` (counters that only
  grow), ``Store.on_publish`` (a :class:`PublishObserver` told of each
  publication) and ``Store.disk_free()``;
* the store's :class:`Journal` (``Store.journal``), its :class:`PushQueue`
  (``Store.pushes``: what the write tiers are still to receive), and
  :class:`ChunkBackend`, the seam where storage tiers plug in;
* the errors of ``cachefs.errors`` (every one a :class:`CachefsError` with an
  errno, an exit code and a hint), and ``lmdb_error``, which turns an error of
  the LMDB library into one of them.

``cachefs.aio.AsyncStore`` wraps a store for trio programs.
"""

from cachefs.engine._audit import AuditLog
from cachefs.engine._backend import ChunkBackend
from cachefs.engine._cache_records import CacheRecords
from cachefs.engine._chunker import KnownChunks, Source
from cachefs.engine._demote import DropReport, drop_held
from cachefs.engine._fsck import INDEX_PROBLEMS, FsckReport, check_store, scrub_store
from cachefs.engine._gc import GcReport, collect_garbage
from cachefs.engine._heal import heal_chunk, restore_chunks
from cachefs.engine._index import lmdb_error
from cachefs.engine._journal import Journal
from cachefs.engine._namespace import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Namespace,
    hold,
    unlinks_logged,
    unlinks_logged_below,
)
from cachefs.engine._namespace_check import NamespaceCheck
from cachefs.engine._publish import PublishHook, PublishObserver
from cachefs.engine._pushes import PushQueue, QueuedPush
from cachefs.engine._put import default_processes as default_put_processes
from cachefs.engine._store import Progress, Store, StoreOptions, StoreStats
from cachefs.engine._xattrs import ExtendedAttributes
from cachefs.errors import (
    BadDigestError,
    CachefsError,
    ConfigError,
    CorruptDataError,
    DigestMismatchError,
    FormatVersionError,
    FsError,
    IndexCorruptError,
    NotFoundError,
    ObjectNotFoundError,
    ReadOnlyError,
    StoreFullError,
    StoreLockedError,
    StoreNotFoundError,
)
from cachefs.format.digest import BLAKE3, SHA256, Digest, DigestFunction
from cachefs.format.header import ChunkingParams, CompressionParams, SegmentParams, StoreConfig
from cachefs.format.schema import ROOT_INODE, Inode

__all__ = [
    "BLAKE3",
    "INDEX_PROBLEMS",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_INODE",
    "SHA256",
    "AuditLog",
    "BadDigestError",
    "CacheRecords",
    "CachefsError",
    "ChunkBackend",
    "ChunkingParams",
    "CompressionParams",
    "ConfigError",
    "CorruptDataError",
    "Digest",
    "DigestFunction",
    "DigestMismatchError",
    "DropReport",
    "ExtendedAttributes",
    "FormatVersionError",
    "FsError",
    "FsckReport",
    "GcReport",
    "IndexCorruptError",
    "Inode",
    "Journal",
    "KnownChunks",
    "Namespace",
    "NamespaceCheck",
    "NotFoundError",
    "ObjectNotFoundError",
    "Progress",
    "PublishHook",
    "PublishObserver",
    "PushQueue",
    "QueuedPush",
    "ReadOnlyError",
    "SegmentParams",
    "Source",
    "Store",
    "StoreConfig",
    "StoreFullError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreOptions",
    "StoreStats",
    "check_store",
    "collect_garbage",
    "default_put_processes",
    "drop_held",
    "heal_chunk",
    "hold",
    "lmdb_error",
    "restore_chunks",
    "scrub_store",
    "unlinks_logged",
    "unlinks_logged_below",
]
