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
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from cachefs.engine import CachefsError, Namespace
from cachefs.fs._control import ControlTree, is_virtual
from cachefs.fs._files import OpenFiles

log = logging.getLogger(__name__)

#: Seconds a released orphan waits to be deleted with the others of the moment.
RELEASE_DELAY = 0.02
#: Released orphans deleted at once however recent.
_RELEASE_BATCH = 1024


class Lookups:
    """Lookup counts of the inodes the kernel knows, and the orphans."""

    def __init__(self, namespace: Namespace, files: OpenFiles, control: ControlTree) -> None:
        self.namespace = namespace
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

    def release(self, inos: list[int]) -> None:
        """Delete the orphans among ``inos`` that nothing uses any more (soon,
        with others, while the filesystem runs)."""
        inos = [i for i in inos if i in self.orphans and not self.in_use(i)]
        if not inos:
            return
        if self.nursery is None:
            self._delete(inos)
            return
        if not self._released:
            try:
                self.nursery.start_soon(self._release_later)
            except RuntimeError:  # the filesystem stopped running
                self.nursery = None
                self._delete(inos)
                return
        self._released.update(dict.fromkeys(inos))
        if len(self._released) >= _RELEASE_BATCH:
            self.flush()

    async def _release_later(self) -> None:
        await trio.sleep(RELEASE_DELAY)
        self.flush()

    def flush(self) -> None:
        """Delete the released orphans now (before gc, at a sync)."""
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
