"""Whole files stored and read in one step, for the servers (filesystem layer).

A cache server (``cachefs.server``) keeps what clients upload as files of the
namespace, in a cache directory: the budget, the policy, the hit and miss
figures, the quota, fsck and ``ls`` are those of every other file.  It does not
write them as the kernel does (open, writes logged to the journal, a spool,
publication at close): a blob arrives whole, or as a stream, with its digest.
So a file is stored in one step -- ingested straight from its source and
published in the transaction that also makes its directory entry
(:meth:`StoredFiles.store_file`) -- and the filesystem is told afterwards
(:meth:`StoredFiles.added`), as it would be of a file created and written
through the mount.  Files that arrive together (a batch of small blobs) are
published together (:meth:`StoredFiles.store_files`: one transaction and one
fdatasync for all), and their directories are made in one transaction
(:meth:`StoredFiles.directories`).

Threads.  The lookups (:meth:`~StoredFiles.lookup`,
:meth:`~StoredFiles.lookup_path` and :meth:`~StoredFiles.find_files`, the
latter two in one :meth:`~StoredFiles.reading` transaction) and
:meth:`~StoredFiles.store_files` may run in any thread (they read and write
the index only: the servers call them from
their worker threads, where ingest belongs).  Everything else runs on the
filesystem's trio thread.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import lmdb

from cachefs.engine import (
    ROOT_INODE,
    CachefsError,
    Digest,
    FsError,
    Inode,
    Namespace,
    PublishHook,
    Source,
    Store,
)
from cachefs.format.schema import INO_KEY, INO_VALUE, INODE, INODE_TIMES
from cachefs.fs._caches import CacheDirs, Reservation
from cachefs.fs._events import Listeners
from cachefs.fs._lookups import Lookups

#: Mode of the files and directories the servers make.
FILE_MODE = stat.S_IFREG | 0o644
DIRECTORY_MODE = stat.S_IFDIR | 0o755


@dataclass(frozen=True)
class FileAttrs:
    """What stored files are made with, where ``FILE_MODE``, root and now
    will not do (a file of another machine's shared directory)."""

    permissions: int  # the mode's permission bits
    uid: int
    gid: int
    mtime_ns: int


class StoredFiles:
    """Files a server stores whole, in directories of the namespace."""

    def __init__(
        self,
        store: Store,
        namespace: Namespace,
        caches: CacheDirs,
        listeners: Listeners,
        *,
        rename: Callable[[int, bytes, int, bytes], None],
        unlink: Callable[[int, bytes], None],
        changed: Callable[[int, bytes], None],
        unlinks: Lookups | None = None,
    ) -> None:
        """``rename`` and ``unlink`` are the filesystem's own (replacing an
        entry, removing one: with its events); ``changed`` tells a mount's
        kernel that an entry changed behind its back (it looks it up again);
        ``unlinks``: the unlinks not yet committed (``Lookups``): their names
        are not there, and are committed before a name is made again."""
        self.store = store
        self.namespace = namespace
        self.caches = caches
        self.listeners = listeners
        self._rename = rename
        self._unlink = unlink
        self._changed = changed
        self._unlinked = (lambda p, n: False) if unlinks is None else unlinks.is_unlinked
        self._pending: Callable[[], Collection[tuple[int, bytes]]] = (
            frozenset if unlinks is None else unlinks.pending
        )
        self._settle = (lambda p, n: None) if unlinks is None else unlinks.settle_from_thread
        #: The unlinks not committed when each open transaction of
        #: :meth:`reading` began (its lookups count those names as gone).
        self._gone: dict[lmdb.Transaction, Collection[tuple[int, bytes]]] = {}

    # --- any thread ------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[lmdb.Transaction]:
        """A read transaction, for many lookups that see one state.  The
        unlinks not committed are taken first: committed after, they are gone
        from the index but no longer pending, and the transaction, older,
        still holds their names."""
        gone = self._pending()
        with self.namespace.read() as txn:
            self._gone[txn] = gone
            try:
                yield txn
            finally:
                del self._gone[txn]

    def _gone_in(self, txn: lmdb.Transaction | None) -> Callable[[int, bytes], bool]:
        """Whether an entry is unlinked, for lookups in ``txn`` (of :meth:`reading`)."""
        gone = None if txn is None else self._gone.get(txn)
        if gone is None:
            return self._unlinked
        return lambda p, n: (p, n) in gone or self._unlinked(p, n)  # (or unlinked since)

    def lookup_path(
        self, parts: Sequence[bytes], txn: lmdb.Transaction | None = None
    ) -> int | None:
        """The inode at ``parts`` below the root, or None when there is none."""
        ino = ROOT_INODE
        unlinked = self._gone_in(txn)
        try:
            for part in parts:
                if unlinked(ino, part):
                    return None
                ino = self.namespace.lookup(ino, part, txn)
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        return ino

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        """The regular file ``name`` of directory ``parent``, or None."""
        if self._unlinked(parent, name):
            return None
        try:
            inode = self.namespace.get(self.namespace.lookup(parent, name))
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        return inode if inode.is_reg else None

    def find_files(
        self, entries: Sequence[tuple[int, bytes]], txn: lmdb.Transaction
    ) -> list[tuple[int, int, bytes] | None]:
        """For each ``(directory, name)``, the regular file there as ``(ino,
        size, content)``, or None: many lookups at the cost of few Python calls
        (a server asked about thousands of blobs at once reads the namespace's
        records itself, ``format/schema.py``)."""
        key, value, unpack = INO_KEY.pack, INO_VALUE.unpack, INODE.unpack_from
        dirents = self.namespace.dirents.get_many(txn, [key(p) + name for p, name in entries])
        inos = [None if raw is None else value(raw)[0] for raw in dirents]
        inodes = iter(self.namespace.inodes.get_many(txn, [key(i) for i in inos if i is not None]))
        out: list[tuple[int, int, bytes] | None] = []
        unlinked = self._gone_in(txn)
        for (parent, name), ino in zip(entries, inos, strict=True):
            found = None
            raw = None if ino is None else next(inodes)
            if ino is not None and raw is not None and not unlinked(parent, name):
                mode, _, _, _, size, _, _, _, _, content = unpack(raw)
                if stat.S_ISREG(mode):
                    found = (ino, size, content)
            out.append(found)
        return out

    def store_file(
        self,
        parent: int,
        name: bytes,
        source: Source,
        *,
        expect: Digest | None = None,
        durable: bool = True,
        attrs: FileAttrs | None = None,
    ) -> Inode | None:
        """Ingest ``source`` and publish it as the new file ``name`` of
        ``parent`` in one transaction; returns the file, or None when an entry
        ``name`` was there already (it is left as it was).  With ``expect``,
        content of another digest is refused (DigestMismatchError) and nothing
        is published; a directory that went meanwhile is FsError(ENOENT).  Tell
        the filesystem afterwards (:meth:`added`).  Without ``durable`` it is
        durable at the store's next sync."""
        (result,) = self.store_files([(parent, name, source, expect)], durable=durable, attrs=attrs)
        if isinstance(result, CachefsError):
            raise result
        return result

    def store_files(
        self,
        files: Sequence[tuple[int, bytes, Source, Digest | None]],
        *,
        durable: bool = True,
        attrs: FileAttrs | None = None,
    ) -> list[Inode | CachefsError | None]:
        """:meth:`store_file` of several files ``(parent, name, source,
        expect)``, published together (one transaction, one fdatasync): for
        each, in order, the file, None, or the error that refused it
        (DigestMismatchError, FsError).  An error of the store itself (full,
        read-only) is raised and stores none.  Each file is made with
        ``attrs`` if given (in the same transaction: never seen without)."""
        if attrs is not None and attrs.mtime_ns not in INODE_TIMES:
            # Refused here: the hooks below share a transaction, and must not fail.
            raise FsError(errno.EINVAL, f"a modification time out of range: {attrs.mtime_ns} ns")
        made: list[Inode | CachefsError | None] = [None] * len(files)
        namespace, store = self.namespace, self.store
        for parent, name, _, _ in files:
            self._settle(parent, name)  # an unlink of that name first (waited for)
        mode, uid, gid, mtime_ns = (
            (FILE_MODE, 0, 0, None)
            if attrs is None
            else (stat.S_IFREG | stat.S_IMODE(attrs.permissions), attrs.uid, attrs.gid,
                  attrs.mtime_ns)
        )  # fmt: skip

        def hook(i: int, parent: int, name: bytes) -> PublishHook:
            def create(txn: lmdb.Transaction, digest: Digest) -> None:
                # Runs in a transaction other publications share: it must not fail.
                try:
                    made[i] = namespace.create(
                        parent, name, mode, uid, gid, content=digest, mtime_ns=mtime_ns, txn=txn
                    )
                except FsError as exc:
                    store.drop_ref(txn, digest)  # the reference nobody took
                    if exc.errno != errno.EEXIST:  # EEXIST: the same name, stored meanwhile
                        made[i] = exc

            return create

        results = store.put_many(
            (
                (source, expect, hook(i, parent, name))
                for i, (parent, name, source, expect) in enumerate(files)
            ),
            durable=durable,
        )
        for i, result in enumerate(results):
            if isinstance(result, CachefsError):
                made[i] = result
        return made

    # --- the trio thread ---------------------------------------------------------------

    def directory(self, parts: Sequence[bytes]) -> int:
        """The directory at ``parts`` below the root, made where missing."""
        return self.directories([parts])[0]

    def directories(self, paths: Sequence[Sequence[bytes]]) -> list[int]:
        """The directories at each of ``paths`` below the root; those missing
        are made, all in one transaction."""
        made: list[tuple[int, bytes, Inode]] = []
        out = []
        namespace = self.namespace
        with self.store.transaction("making directories") as txn:
            for parts in paths:
                ino = ROOT_INODE
                for part in parts:
                    try:
                        ino = namespace.lookup(ino, part, txn)
                    except FsError as exc:
                        if exc.errno != errno.ENOENT:
                            raise
                        inode = namespace.create(ino, part, DIRECTORY_MODE, 0, 0, txn=txn)
                        made.append((ino, part, inode))
                        ino = inode.ino
                out.append(ino)
        for parent, name, inode in made:
            for listener in self.listeners:
                listener.created(parent, name, inode)
        return out

    def mark_cache(
        self, directory: int, max_size: int | None, policy: str, shared: str | None = None
    ) -> None:
        """Make ``directory`` a cache (unless it is one), or set its budget, and
        share it as ``shared`` through the remote tiers (None: not shared)."""
        cache = self.caches.dirs.get(directory)
        if max_size is not None or cache is None or cache.shared != shared:
            size = max_size or self.caches.dirs[directory].max_size
            share = "" if shared is None else f" shared={shared}"
            self.caches.mark(directory, f"max_size={size} policy={policy}{share}".encode())

    async def make_room(self, parent: int, size: int, hold: bool = True) -> Reservation:
        """Wait until a new file of ``size`` bytes fits in ``parent``'s cache
        (ENOSPC when it cannot).  With ``hold`` the room is held for it until
        released (on this thread, once the file is :meth:`added` or was not
        stored), so that files stored at once do not all count on the same
        room: for bytes in hand, not for bytes a client has still to send
        (one that stalled would hold the room as long as it liked)."""
        return await self.caches.make_room_in(parent, size, hold=hold)

    def added(self, parent: int, name: bytes, inode: Inode) -> None:
        """File ``inode`` was stored as ``name`` in ``parent`` (:meth:`store_file`)."""
        for listener in self.listeners:
            listener.created(parent, name, inode)
            listener.written(inode.ino, inode.size)
            listener.published(inode.ino, inode.size)

    def replace(self, parent: int, temporary: bytes, name: bytes) -> None:
        """Put the file stored as ``temporary`` in the place of ``name``."""
        self._rename(parent, temporary, parent, name)
        self._changed(parent, name)

    def move(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> bool:
        """Move a file to ``new_name`` of ``new_parent``, in the place of what
        is there -- unless that is a file of the same content: then the file is
        removed instead.  Whether it moved."""
        moving = self.lookup(parent, name)
        there = self.lookup(new_parent, new_name)
        if moving is not None and there is not None and there.digest == moving.digest:
            self.remove(parent, name)
            return False
        self._rename(parent, name, new_parent, new_name)
        self._changed(new_parent, new_name)
        return True

    def remove(self, parent: int, name: bytes) -> None:
        """Remove an entry, if it is there."""
        try:
            self._unlink(parent, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return
        self._changed(parent, name)

    def hit(self, inode: Inode) -> None:
        """A stored file was read (a cache hit)."""
        self.hits([(inode.ino, inode.size)])

    def hits(self, files: Sequence[tuple[int, int]]) -> None:
        """Stored files ``(ino, size)`` were used (cache hits)."""
        for listener in self.listeners:
            listener.opened_many(files)

    def miss(self, parent: int, name: bytes) -> None:
        """A file was asked for and is not there (a cache miss)."""
        for listener in self.listeners:
            listener.missed(parent, name)
