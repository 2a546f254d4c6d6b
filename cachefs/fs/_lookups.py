"""The kernel's references to inodes, and orphans (filesystem layer).

The kernel keeps a count of the lookups of every inode it knows, and tells
the filesystem when it forgets them (``forget``).  An inode whose last link
goes while the kernel still knows it, or while it is open, becomes an orphan
in the namespace; it is deleted when the last of both goes.  Control
directory inodes are counted by the control tree.

While the filesystem runs, released orphans are deleted ``RELEASE_DELAY``
seconds later, together with the others released meanwhile: one transaction
(and one sync of the index) for many, not one per file, which was a third
of the daemon's time in ``rm``.  Nothing can reach an orphan nobody uses, and
orphans a crash leaves are deleted at the next mount (:meth:`purge`).

Unlinks are committed the same way (:meth:`unlink_later`): the entry's
removal is logged to the journal (``NS_UNLINK``: replayed at the next mount
if the daemon dies first), answered at once, and committed to the index with
the others of the moment, before the orphans released with them: on a disk,
one sync for many instead of one each.  Until then the index still has the
entry.  Attributes are given as the unlinks made them (:meth:`attributes`:
links, times); whatever else would see the entry commits them first (a
lookup of that name, a listing of its directory, a change of that name or of
that inode, or of a directory; a checkpoint of the journal, a sync, gc:
:meth:`settle`, :meth:`changing`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import trio

from cachefs.engine import CachefsError, FsError, Inode, Namespace
from cachefs.fs._control import ControlTree, is_virtual
from cachefs.fs._files import OpenFiles
from cachefs.fs._journal import FileJournal

log = logging.getLogger(__name__)

#: Seconds a released orphan waits to be deleted with the others of the moment.
RELEASE_DELAY = 0.02
#: Released orphans deleted at once however recent.
_RELEASE_BATCH = 1024


class Lookups:
    """Lookup counts of the inodes the kernel knows, and the orphans."""

    def __init__(
        self, namespace: Namespace, files: OpenFiles, control: ControlTree, journal: FileJournal
    ) -> None:
        self.namespace = namespace
        self.journal = journal
        journal.settle = self.settled  # before a checkpoint drops their records
        self.files = files
        self.control = control
        self.counts: dict[int, int] = {}
        #: Inodes that lost their last link while in use (see Namespace.remove).
        self.orphans: set[int] = set()
        #: Where deferred deletions run (set while the filesystem runs).
        self.nursery: trio.Nursery | None = None
        #: Orphans released, to be deleted (in order).
        self._released: dict[int, None] = {}
        #: Told of each orphan the kernel forgets, before it is counted as
        #: unused (the file I/O drops what it kept of it for the kernel).
        self.forgotten: Callable[[int], None] = lambda ino: None
        #: Unlinks answered but not committed: entry -> (inode, when); how
        #: many are in each directory and of each inode, and the last when.
        self._unlinked: dict[tuple[int, bytes], tuple[int, int]] = {}
        self._unlinked_in: Counter[int] = Counter()
        self._unlinked_at: dict[int, int] = {}
        self._logged = 0  # the journal's sequence number of the last
        self._token: trio.lowlevel.TrioToken | None = None  # of the thread they are on
        self._waiting = False  # a flush is on its way

    def purge(self) -> None:
        """Delete every orphan (at mount: nothing can be using them)."""
        purged = self.namespace.purge_orphans()
        if purged:
            log.info("deleted %d files unlinked while open, or just before the last stop", purged)

    def remember(self, ino: int, count: int = 1) -> None:
        self.counts[ino] = self.counts.get(ino, 0) + count

    def in_use(self, ino: int) -> bool:
        """Whether the kernel knows the inode or it is open."""
        return ino in self.counts or self.files.busy(ino)

    def forget(self, pairs: list[tuple[int, int]]) -> None:
        """The kernel dropped ``count`` lookups of each inode; orphans it no
        longer knows (and nothing has open) are deleted, in one transaction."""
        released = []
        for ino, count in pairs:
            if is_virtual(ino):
                self.control.forget(ino, count)
                continue
            left = self.counts.get(ino, 0) - count
            if left > 0:
                self.counts[ino] = left
                continue
            self.counts.pop(ino, None)
            if ino in self.orphans:
                self.forgotten(ino)
                if not self.files.busy(ino):
                    released.append(ino)  # (release skips what is no longer an orphan)
        self.release(released)

    def unlink(self, parent: int, name: bytes, *, directory: bool) -> Inode:
        """Remove the entry ``name`` of ``parent`` (rmdir: ``directory``);
        returns its inode as it is now.  A file's removal is committed with the
        others of the moment (:meth:`unlink_later`); a directory's at once,
        after them (its checks need what is committed).  The caller has told
        :meth:`changing` of that entry (the filesystem's checks do)."""
        ino = self.namespace.lookup(parent, name)
        inode = None if directory else self.unlink_later(parent, name, ino)
        if inode is None:
            self.flush()
            in_use = self.in_use(ino)
            inode = self.namespace.store.freeing(
                lambda: self.namespace.remove(parent, name, directory=directory, in_use=in_use)
            )
        return inode

    def unlink_later(self, parent: int, name: bytes, ino: int) -> Inode | None:
        """Log the removal of entry ``name`` of ``parent`` (inode ``ino``), to
        be committed with the others of the moment; the inode as it is now.
        None: it must be removed at once (a directory, which the removal
        refuses; a journal that cannot take the record; no nursery to wait in)."""
        inode = self.namespace.get(ino)
        if inode.is_dir or self.nursery is None:
            return None
        try:
            now = time.time_ns()
            self._logged = self.journal.unlinked(parent, name, ino, now)
        except CachefsError as exc:
            log.warning("unlink committed at once (the journal: %s)", exc.message)
            return None
        self._token = trio.lowlevel.current_trio_token()
        self._unlinked[parent, name] = ino, now
        self._unlinked_in.update((parent, ino))
        self._unlinked_at[parent] = self._unlinked_at[ino] = now
        inode = self.attributes(inode)
        self._later()  # (which may commit them now)
        return inode

    def attributes(self, inode: Inode) -> Inode:
        """``inode`` as its unlinks not yet committed make it: a file has fewer
        links, and they changed its ctime, and a directory's times."""
        if self._unlinked and inode.ino in self._unlinked_in:
            at = self._unlinked_at[inode.ino]
            if inode.is_dir:
                inode.mtime_ns = inode.ctime_ns = max(inode.ctime_ns, at)
            else:
                inode.nlink -= self._unlinked_in[inode.ino]
                inode.ctime_ns = max(inode.ctime_ns, at)
        return inode

    def settle(self, ino: int, name: bytes | None = None) -> None:
        """Commit the unlinks before what depends on them is seen: in
        directory ``ino`` (its listing), or with ``name``, that entry of
        directory ``ino`` (a lookup).  (Attributes: :meth:`attributes`.)"""
        if not self._unlinked:
            return
        if (ino, name) in self._unlinked if name is not None else ino in self._unlinked_in:
            self.commit_unlinks()

    def changing(self, ino: int, name: bytes | None = None) -> None:
        """Commit the unlinks before a change: of entry ``name`` of directory
        ``ino`` (made, renamed, replaced, removed), that name's; of file ``ino``
        (its attributes, links or content), its own; of a directory, or of an
        entry that names one (its times; emptiness; made a cache or moved into
        one, which counts what is below it), all.  (A file replaced by a
        rename: :meth:`replacing`.)"""
        if not self._unlinked:
            return
        pending = ino in self._unlinked_in if name is None else (ino, name) in self._unlinked
        # (an open file is no directory: a write needs no read of the index here)
        maybe_dir = name is not None or self.files.get(ino) is None
        if pending or (maybe_dir and self._is_dir(ino, name)):
            self.commit_unlinks()

    def replacing(self, ino: int) -> None:
        """Commit the unlinks before a rename replaces ``ino``, if one of its
        other names waits (a file may lose its last name then: an orphan, or
        deleted, which the rename must see) or one in it (a directory)."""
        if self._unlinked and ino in self._unlinked_in:
            self.commit_unlinks()

    def _is_dir(self, ino: int, name: bytes | None) -> bool:
        """Whether ``ino`` (with ``name``: its entry ``name``) is a directory."""
        try:
            found = ino if name is None else self.namespace.lookup(ino, name)
            return self.namespace.get(found).is_dir
        except FsError:
            return False  # not there (a new name), or the change fails on its own

    def is_unlinked(self, parent: int, name: bytes) -> bool:
        """Whether entry ``name`` of ``parent`` is unlinked, not yet committed
        (any thread: a server's lookups count it as gone)."""
        return (parent, name) in self._unlinked

    def pending(self) -> frozenset[tuple[int, bytes]]:
        """The entries unlinked, not yet committed, now (any thread)."""
        return frozenset(self._unlinked.copy())

    def settle_from_thread(self, parent: int, name: bytes) -> None:
        """:meth:`settle` of an entry from any thread (a server about to make
        that name again): done on the filesystem's trio thread, waited for."""
        if (parent, name) not in self._unlinked or self._token is None:
            return
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:  # a worker thread
            trio.from_thread.run_sync(self.settle, parent, name, trio_token=self._token)
        else:
            self.settle(parent, name)

    def unlinks_of(self, ino: int) -> int:
        """How many entries of inode ``ino`` are unlinked but not committed."""
        return self._unlinked_in[ino] if self._unlinked else 0

    def settled(self) -> bool:
        """Commit the unlinks answered so far; whether none is left uncommitted."""
        try:
            self.commit_unlinks()
        except CachefsError:
            return False
        return True

    def commit_unlinks(self) -> None:
        """Commit the unlinks answered so far (one transaction), with the
        journal's sequence number up to which they are in the index.  If that
        fails, they stay to be committed (and in the journal) and the error is
        logged and raised: what needed them fails with it."""
        if not self._unlinked:
            return
        entries = [(parent, name, *done) for (parent, name), done in self._unlinked.items()]
        in_use = {ino for _, _, ino, _ in entries if self.in_use(ino)}
        namespace, logged = self.namespace, self._logged
        try:
            removed = namespace.store.freeing(
                lambda: namespace.remove_entries(entries, in_use, logged=logged)
            )
        except CachefsError as exc:
            log.error("could not commit %d unlinks (tried again later): %s", len(entries), exc)
            raise
        self._unlinked.clear()
        self._unlinked_in.clear()
        self._unlinked_at.clear()
        for _, _, inode in removed:  # (those an unlink not yet answered for left at 0)
            if inode.nlink == 0 and inode.ino in in_use:
                self.orphans.add(inode.ino)

    def release(self, inos: list[int]) -> None:
        """Delete the orphans among ``inos`` that nothing uses any more (soon,
        with others, while the filesystem runs)."""
        inos = [i for i in inos if i in self.orphans and not self.in_use(i)]
        if not inos:
            return
        self._released.update(dict.fromkeys(inos))
        self._later()

    def _later(self) -> None:
        """Flush in ``RELEASE_DELAY`` seconds (now: a full batch, or a
        filesystem that is not running)."""
        if max(len(self._released), len(self._unlinked)) >= _RELEASE_BATCH or not self.nursery:
            self.flush()
        elif not self._waiting:
            try:
                self.nursery.start_soon(self._release_later)
            except RuntimeError:  # the filesystem stopped running
                self.nursery = None
                self.flush()
            else:
                self._waiting = True

    async def _release_later(self) -> None:
        try:
            await trio.sleep(RELEASE_DELAY)
        finally:
            self._waiting = False
        self.flush()

    def flush(self) -> None:
        """Commit the unlinks and delete the released orphans now (before gc,
        at a sync); an error is logged (and the unlinks tried again later)."""
        with contextlib.suppress(CachefsError):
            self.commit_unlinks()
        inos = [i for i in self._released if i in self.orphans and not self.in_use(i)]
        self._released.clear()
        if inos:
            self._delete(inos)

    def _delete(self, inos: list[int]) -> None:
        try:
            self.namespace.release(*inos)
        except CachefsError as exc:
            log.error("could not delete released inodes %s: %s", inos, exc)
            return
        for ino in inos:
            self.orphans.discard(ino)
            self.files.forget(ino)
