"""The filesystem namespace, kept in the store's index (storage engine layer).

Inodes, directory entries, symlink targets and extended attributes live in
named databases of the same LMDB environment as the chunk index (their keys,
values and invariants: ``cachefs.format.schema``), so that publishing a file's
new content and pointing its inode at it is one transaction.  Every operation
here is one write transaction; nothing here knows about FUSE, open files or
the kernel's lookup counts (that is ``cachefs.fs``).  Checking and repairing
the namespace is ``_namespace_check.py``.
"""

from __future__ import annotations

import errno
import stat
import time
from collections.abc import Iterator

import lmdb

from cachefs.engine._index import Index
from cachefs.engine._store import Store
from cachefs.errors import CorruptDataError, FsError
from cachefs.format.digest import Digest
from cachefs.format.schema import (
    CACHE_DATABASES,
    INO_KEY,
    INO_VALUE,
    NAMESPACE_DATABASES,
    NO_CONTENT,
    ROOT_INODE,
    Inode,
    dirent_key,
)

NAME_MAX = 255
#: The counter of the journal's sequence number up to which logged unlinks
#: are committed (``cachefs.format.schema``).
UNLINKS = "unlinks_logged"

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)


class Namespace:
    """The directory tree of a store.  Methods are thread-safe (LMDB)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        index = store.index
        create = not store.readonly
        found = index.open_together(NAMESPACE_DATABASES, create=create)
        if any(db is None for db in found):
            raise CorruptDataError(
                f"store {store.path} has no namespace yet",
                hint="mount it once (`cachefs mount`) to create its root directory",
            )
        tables = [table for table in found if table is not None]
        self.inodes, self.dirents, self.parents, self.xattrs, self.orphans = tables
        # Missing in a read-only open of a store last mounted before they existed.
        self.caches, self.cache_state = index.open_together(CACHE_DATABASES, create=create)
        if create:
            self._ensure_root()

    @staticmethod
    def exists(store: Store) -> bool:
        """Whether the store has a namespace (it was mounted at least once;
        a table of it is there)."""
        return any(store.index.exists(name) for name in NAMESPACE_DATABASES)

    def _ensure_root(self) -> None:
        with self.store.transaction("creating the root directory") as txn:
            if self.inodes.get(txn, INO_KEY.pack(ROOT_INODE)) is not None:
                return
            now = time.time_ns()
            root = Inode(ROOT_INODE, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, now, now, now)
            self.put_inode(txn, root)
            self.parents.put(txn, INO_KEY.pack(ROOT_INODE), INO_VALUE.pack(ROOT_INODE))
            # A root made again (fsck dropped a damaged one) leaves the other
            # inodes and their numbers as they are: none is given out again.
            index = self.store.index
            index.set_counter(
                txn, "next_inode", max(index.counter(txn, "next_inode"), ROOT_INODE + 1)
            )
            index.add(txn, "inodes", 1)

    # --- reading ---------------------------------------------------------------

    def read(self) -> lmdb.Transaction:
        return self.store.index.read()

    def get(self, ino: int, txn: lmdb.Transaction | None = None) -> Inode:
        if txn is None:
            with self.read() as own:
                return self.get(ino, own)
        raw = self.inodes.get(txn, INO_KEY.pack(ino))
        if raw is None:
            raise FsError(errno.ENOENT, f"no inode {ino}")
        return Inode.unpack(ino, raw)

    def lookup(self, parent: int, name: bytes, txn: lmdb.Transaction | None = None) -> int:
        if txn is None:
            with self.read() as own:
                return self.lookup(parent, name, own)
        raw = self.dirents.get(txn, dirent_key(parent, name))
        if raw is None:
            if len(name) > NAME_MAX:
                raise FsError(errno.ENAMETOOLONG)
            raise FsError(errno.ENOENT)
        return int(INO_VALUE.unpack(raw)[0])

    def parent_of(self, ino: int, txn: lmdb.Transaction) -> int:
        raw = self.parents.get(txn, INO_KEY.pack(ino))
        if raw is None:
            raise CorruptDataError(f"directory inode {ino} has no parent recorded")
        return int(INO_VALUE.unpack(raw)[0])

    def entries(self, ino: int) -> list[tuple[bytes, Inode]]:
        """The entries of a directory, in name order, with their inodes."""
        prefix = INO_KEY.pack(ino)
        out = []
        with self.read() as txn:
            for key, value in self.dirents.items(txn, prefix):
                child = int(INO_VALUE.unpack(value)[0])
                out.append((key[8:], self.get(child, txn)))
        return out

    def counts(self) -> tuple[int, int]:
        """(inodes in use, next inode number)."""
        with self.read() as txn:
            index = self.store.index
            return index.counter(txn, "inodes"), index.counter(txn, "next_inode")

    def iter_inodes(self, txn: lmdb.Transaction) -> Iterator[Inode]:
        for key, raw in self.inodes.items(txn):
            yield Inode.unpack(INO_KEY.unpack(key)[0], raw)

    def iter_dirents(self, txn: lmdb.Transaction) -> Iterator[tuple[int, bytes, int]]:
        for key, value in self.dirents.items(txn):
            yield INO_KEY.unpack(key[:8])[0], key[8:], INO_VALUE.unpack(value)[0]

    def orphan_inodes(self) -> list[int]:
        with self.read() as txn:
            return [INO_KEY.unpack(k)[0] for k in self.orphans.keys(txn)]

    # --- writing ---------------------------------------------------------------

    def put_inode(self, txn: lmdb.Transaction, inode: Inode) -> None:
        self.inodes.put(txn, INO_KEY.pack(inode.ino), inode.pack())

    def _dir(self, txn: lmdb.Transaction, ino: int) -> Inode:
        inode = self.get(ino, txn)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    def _new_entry(self, txn: lmdb.Transaction, parent: int, name: bytes) -> tuple[Inode, bytes]:
        """The directory a new entry goes in, and the entry's key (EEXIST if taken)."""
        dir_inode = self._dir(txn, parent)
        if dir_inode.nlink == 0:
            raise FsError(errno.ENOENT, "the directory was removed")
        key = dirent_key(parent, name)
        if self.dirents.get(txn, key) is not None:
            raise FsError(errno.EEXIST)
        return dir_inode, key

    def _touch_dir(self, txn: lmdb.Transaction, inode: Inode, now: int, nlink: int = 0) -> None:
        inode.mtime_ns = inode.ctime_ns = now
        inode.nlink += nlink
        self.put_inode(txn, inode)

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
        content: Digest | None = None,
        mtime_ns: int | None = None,
        txn: lmdb.Transaction | None = None,
    ) -> Inode:
        """Make a new inode of any type and its entry ``name`` in ``parent``.

        Ownership follows POSIX: the caller's uid; the parent's group (and, for
        a directory, the set-gid bit) when the parent is set-gid.  With ``txn``
        it runs in the caller's write transaction: in a publication's hook,
        ``content`` names the object just published, whose reference the new
        file takes.  ``mtime_ns``: a modification time other than now (a
        file that was made elsewhere).
        """
        _check_name(name)
        if txn is None:
            with self.store.transaction("creating a file") as own:
                return self.create(
                    parent, name, mode, uid, gid, rdev=rdev, target=target, content=content,
                    mtime_ns=mtime_ns, txn=own,
                )  # fmt: skip
        dir_inode, key = self._new_entry(txn, parent, name)
        if dir_inode.mode & stat.S_ISGID:
            gid = dir_inode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.new_inode(txn)
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        size = len(target) if content is None else content.size
        mtime = now if mtime_ns is None else mtime_ns
        inode = Inode(ino, mode, uid, gid, 2 if is_dir else 1, size, rdev, now, mtime, now)
        inode.target = target
        if content is not None:
            inode.content = content.hash
        self.put_inode(txn, inode)
        self.dirents.put(txn, key, INO_VALUE.pack(ino))
        if is_dir:
            self._set_parent(txn, ino, parent)
        self._touch_dir(txn, dir_inode, now, 1 if is_dir else 0)
        return inode

    def new_inode(self, txn: lmdb.Transaction) -> int:
        """The number of a new inode, counted (never given out before)."""
        index = self.store.index
        ino = index.counter(txn, "next_inode")
        index.set_counter(txn, "next_inode", ino + 1)
        index.add(txn, "inodes", 1)
        return ino

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        """A new entry for an existing (non-directory) inode."""
        _check_name(name)
        with self.store.transaction("linking a file") as txn:
            inode = self.get(ino, txn)
            if inode.is_dir:
                raise FsError(errno.EPERM, "hard links to directories are not allowed")
            dir_inode, key = self._new_entry(txn, parent, name)
            if inode.nlink >= 0xFFFFFFFF:
                raise FsError(errno.EMLINK)
            now = time.time_ns()
            inode.nlink += 1
            inode.ctime_ns = now
            self.put_inode(txn, inode)
            self.orphans.delete(txn, INO_KEY.pack(ino))
            self.dirents.put(txn, key, INO_VALUE.pack(ino))
            self._touch_dir(txn, dir_inode, now)
        return inode

    def remove(self, parent: int, name: bytes, *, directory: bool, in_use: bool) -> Inode:
        """Remove an entry (unlink, or rmdir with ``directory``).

        Returns the inode as it is now.  When its last link went: with
        ``in_use`` it is kept as an orphan (see :meth:`release`), otherwise it is
        deleted in the same transaction (content reference dropped).
        """
        with self.store.transaction("removing a file") as txn:
            dir_inode = self._dir(txn, parent)
            key = dirent_key(parent, name)
            raw = self.dirents.get(txn, key)
            if raw is None:
                raise FsError(errno.ENOENT)
            inode = self.get(INO_VALUE.unpack(raw)[0], txn)
            now = time.time_ns()
            if directory:
                if not inode.is_dir:
                    raise FsError(errno.ENOTDIR)
                if self.dirents.any(txn, INO_KEY.pack(inode.ino)):
                    raise FsError(errno.ENOTEMPTY)
                inode.nlink = 0
                self._touch_dir(txn, dir_inode, now, -1)
            else:
                if inode.is_dir:
                    raise FsError(errno.EISDIR)
                inode.nlink -= 1
                self._touch_dir(txn, dir_inode, now)
            self.dirents.delete(txn, key)
            inode.ctime_ns = now
            self._unlinked(txn, inode, in_use)
        return inode

    def _unlinked(self, txn: lmdb.Transaction, inode: Inode, in_use: bool) -> None:
        """Write an inode that just lost a link; orphan or delete it at zero."""
        if inode.nlink > 0:
            self.put_inode(txn, inode)
        elif in_use:
            self.put_inode(txn, inode)
            self.orphans.put(txn, INO_KEY.pack(inode.ino), b"")
        else:
            self._delete(txn, inode)

    def _delete(self, txn: lmdb.Transaction, inode: Inode) -> None:
        key = INO_KEY.pack(inode.ino)
        digest = inode.digest
        if digest is not None:
            self.store.drop_ref(txn, digest)
        self.inodes.delete(txn, key)
        self.orphans.delete(txn, key)
        self.parents.delete(txn, key)
        if self.caches is not None and self.cache_state is not None:
            self.caches.delete(txn, key)
            self.cache_state.delete(txn, key)
        for name in list(self.xattrs.keys(txn, key)):
            self.xattrs.delete(txn, name)
        self.store.index.add(txn, "inodes", -1)

    def release(self, *inos: int) -> list[int]:
        """Delete orphans nothing uses any more (one transaction); returns those
        deleted (an inode that has a link again, or is gone, is left alone)."""
        deleted = []
        with self.store.transaction("deleting released files") as txn:
            for ino in inos:
                raw = self.inodes.get(txn, INO_KEY.pack(ino))
                if raw is None:
                    continue
                inode = Inode.unpack(ino, raw)
                if inode.nlink > 0:
                    continue
                self._delete(txn, inode)
                deleted.append(ino)
        return deleted

    def purge_orphans(self) -> int:
        """Delete every orphan (at mount, when nothing can be using them)."""
        orphans = self.orphan_inodes()
        return len(self.release(*orphans)) if orphans else 0

    def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int,
        *,
        in_use: set[int] | frozenset[int] = frozenset(),
    ) -> Inode | None:
        """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE.

        Returns the inode that was replaced (and lost a link), if any.
        ``in_use`` are inodes that must become orphans rather than be deleted.
        """
        _check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        with self.store.transaction("renaming") as txn:
            src_dir = self._dir(txn, old_parent)
            dst_dir = self._dir(txn, new_parent) if new_parent != old_parent else src_dir
            old_key = dirent_key(old_parent, old_name)
            new_key = dirent_key(new_parent, new_name)
            raw = self.dirents.get(txn, old_key)
            if raw is None:
                raise FsError(errno.ENOENT)
            moved = self.get(INO_VALUE.unpack(raw)[0], txn)
            raw_target = self.dirents.get(txn, new_key)
            target = None if raw_target is None else self.get(INO_VALUE.unpack(raw_target)[0], txn)
            if flags & RENAME_NOREPLACE and target is not None:
                raise FsError(errno.EEXIST)
            if flags & RENAME_EXCHANGE and target is None:
                raise FsError(errno.ENOENT)
            if target is not None and target.ino == moved.ino:
                return None  # same inode: POSIX says do nothing
            # A directory may not move below itself.
            if moved.is_dir:
                self._check_not_ancestor(txn, moved.ino, new_parent)
            if flags & RENAME_EXCHANGE and target is not None and target.is_dir:
                self._check_not_ancestor(txn, target.ino, old_parent)
            now = time.time_ns()
            if flags & RENAME_EXCHANGE:
                assert target is not None
                self.dirents.put(txn, old_key, INO_VALUE.pack(target.ino))
                self.dirents.put(txn, new_key, INO_VALUE.pack(moved.ino))
                if old_parent != new_parent:
                    for inode, parent in ((moved, new_parent), (target, old_parent)):
                        if inode.is_dir:
                            self.parents.put(txn, INO_KEY.pack(inode.ino), INO_VALUE.pack(parent))
                    shift = int(moved.is_dir) - int(target.is_dir)
                    src_dir.nlink -= shift
                    dst_dir.nlink += shift
                for inode in (moved, target):
                    inode.ctime_ns = now
                    self.put_inode(txn, inode)
                self._touch_dirs(txn, src_dir, dst_dir, now)
                return None
            replaced = None
            if target is not None:
                if moved.is_dir and not target.is_dir:
                    raise FsError(errno.ENOTDIR)
                if target.is_dir and not moved.is_dir:
                    raise FsError(errno.EISDIR)
                if target.is_dir:
                    if self.dirents.any(txn, INO_KEY.pack(target.ino)):
                        raise FsError(errno.ENOTEMPTY)
                    target.nlink = 0
                    dst_dir.nlink -= 1
                else:
                    target.nlink -= 1
                target.ctime_ns = now
                self._unlinked(txn, target, target.ino in in_use)
                replaced = target
            self.dirents.delete(txn, old_key)
            self.dirents.put(txn, new_key, INO_VALUE.pack(moved.ino))
            if moved.is_dir and old_parent != new_parent:
                self._set_parent(txn, moved.ino, new_parent)
                src_dir.nlink -= 1
                dst_dir.nlink += 1
            moved.ctime_ns = now
            self.put_inode(txn, moved)
            self._touch_dirs(txn, src_dir, dst_dir, now)
        return replaced

    def _set_parent(self, txn: lmdb.Transaction, ino: int, parent: int) -> None:
        self.parents.put(txn, INO_KEY.pack(ino), INO_VALUE.pack(parent))

    def _touch_dirs(self, txn: lmdb.Transaction, src: Inode, dst: Inode, now: int) -> None:
        self._touch_dir(txn, src, now)
        if dst is not src:
            self._touch_dir(txn, dst, now)

    def _check_not_ancestor(self, txn: lmdb.Transaction, ino: int, dest: int) -> None:
        """EINVAL if directory ``ino`` is ``dest`` or one of its ancestors."""
        current = dest
        while True:
            if current == ino:
                raise FsError(errno.EINVAL, "cannot move a directory below itself")
            if current == ROOT_INODE:
                return
            current = self.parent_of(current, txn)

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        size: int | None = None,
    ) -> Inode:
        """Change attributes; ctime becomes now.  ``size`` only for a file whose
        content is being dropped (0) -- other sizes come with :meth:`set_content`."""
        with self.store.transaction("changing attributes") as txn:
            inode = self.get(ino, txn)
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            if atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            if size is not None:
                if size != 0:
                    raise FsError(errno.EINVAL, "only truncation to 0 is done here")
                self._set_content(txn, inode, None)
            inode.ctime_ns = time.time_ns()
            self.put_inode(txn, inode)
        return inode

    def _set_content(self, txn: lmdb.Transaction, inode: Inode, digest: Digest | None) -> None:
        old = inode.digest
        if old is not None:
            self.store.drop_ref(txn, old)
        inode.content = NO_CONTENT if digest is None else digest.hash
        inode.size = 0 if digest is None else digest.size

    def set_content(
        self, txn: lmdb.Transaction, ino: int, digest: Digest, mtime_ns: int, ctime_ns: int
    ) -> None:
        """Point a file at a just-published object (inside the publishing
        transaction, which added the reference this inode now owns)."""
        raw = self.inodes.get(txn, INO_KEY.pack(ino))
        if raw is None:  # deleted while its content was being stored
            self.store.drop_ref(txn, digest)
            return
        inode = Inode.unpack(ino, raw)
        self._set_content(txn, inode, digest)
        inode.mtime_ns = mtime_ns
        inode.ctime_ns = max(inode.ctime_ns, ctime_ns)
        self.put_inode(txn, inode)

    def clear_content(self, ino: int, mtime_ns: int, ctime_ns: int) -> None:
        """Make a file empty (its published content was truncated to nothing)."""
        with self.store.transaction("truncating a file") as txn:
            inode = self.get(ino, txn)
            self._set_content(txn, inode, None)
            inode.mtime_ns = mtime_ns
            inode.ctime_ns = max(inode.ctime_ns, ctime_ns)
            self.put_inode(txn, inode)

    # --- paths and removals ---------------------------------------------------------

    def path_of(self, ino: int) -> bytes:
        """The path of directory ``ino`` from the root (``b"/a/b"``; ``b"/"``)."""
        parts: list[bytes] = []
        with self.read() as txn:
            current = ino
            while current != ROOT_INODE:
                parent = self.parent_of(current, txn)
                name = None
                for key, value in self.dirents.items(txn, INO_KEY.pack(parent)):
                    if INO_VALUE.unpack(value)[0] == current:
                        name = key[8:]
                        break
                if name is None:
                    raise FsError(errno.ENOENT, f"directory {ino} is not linked")
                parts.append(name)
                current = parent
        return b"/" + b"/".join(reversed(parts))

    def remove_entries(
        self, entries: list[tuple[int, bytes, int, int]], in_use: set[int], *, logged: int = 0
    ) -> list[tuple[int, bytes, Inode]]:
        """Remove the entries ``(parent, name, inode, when)`` (ns; 0: now) in one
        transaction: evicted files, or with ``logged`` (the journal's sequence number
        of the last) logged unlinks (not of directories).  One that no longer names
        that inode is skipped.  Inodes in ``in_use`` left with no link are orphans."""
        removed: list[tuple[int, bytes, Inode]] = []
        with self.store.transaction("removing files") as txn:
            _logged_to(self.store.index, txn, logged)
            for parent, name, ino, when in entries:
                key = dirent_key(parent, name)
                raw = self.dirents.get(txn, key)
                if raw is None or INO_VALUE.unpack(raw)[0] != ino:
                    continue
                inode = self.get(ino, txn)
                if inode.is_dir or not (logged or inode.is_reg):
                    continue
                self.dirents.delete(txn, key)
                directory = self.get(parent, txn)
                now = time.time_ns() if not when else max(when, directory.ctime_ns)
                self._touch_dir(txn, directory, now)  # (not before a change since)
                inode.nlink -= 1
                inode.ctime_ns = max(when or now, inode.ctime_ns)
                self._unlinked(txn, inode, ino in in_use)
                removed.append((parent, name, inode))
        return removed


def _logged_to(index: Index, txn: lmdb.Transaction, logged: int) -> None:
    """Record that the unlinks logged up to ``logged`` are in the index (``UNLINKS``)."""
    if logged > index.counter(txn, UNLINKS):
        index.set_counter(txn, UNLINKS, logged)


def hold(namespace: Namespace, digest: Digest) -> int:
    """Keep a stored object while it is read by its digest (an object open
    under ``/.cachefs/cas``), whatever happens meanwhile to the files with
    its content: a new orphan (an inode in no directory) takes a reference
    to it.  Returns the orphan's number; :meth:`Namespace.release` lets the
    object go, and so does the next mount (which deletes every orphan).
    ObjectNotFoundError if the object is not stored."""
    with namespace.store.transaction("keeping an open object") as txn:
        namespace.store.add_ref(txn, digest)
        ino = namespace.new_inode(txn)
        now = time.time_ns()
        inode = Inode(ino, stat.S_IFREG | 0o444, 0, 0, 0, digest.size, 0, now, now, now)
        inode.content = digest.hash
        namespace.put_inode(txn, inode)
        namespace.orphans.put(txn, INO_KEY.pack(ino), b"")
    return ino


def unlinks_logged(namespace: Namespace) -> int:
    """The journal's sequence number up to which the unlinks it logged are in
    the index (:meth:`Namespace.remove_entries` with ``logged``)."""
    with namespace.read() as txn:
        return namespace.store.index.counter(txn, UNLINKS)


def unlinks_logged_below(namespace: Namespace, seq: int) -> None:
    """Record that the unlinks logged up to ``seq`` are in the index, where it
    recorded more: a journal whose tail a crash of the machine lost, and which
    keeps records it cannot yet drop, numbers its next records from ``seq +
    1``; those above ``seq`` that the index counted are gone with that tail."""
    with namespace.store.transaction("renumbering the logged unlinks") as txn:
        if namespace.store.index.counter(txn, UNLINKS) > seq:
            namespace.store.index.set_counter(txn, UNLINKS, seq)


__all__ = ["Namespace", "hold", "unlinks_logged", "unlinks_logged_below"]
