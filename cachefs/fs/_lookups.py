"""The kernel's references to inodes, and orphans (filesystem layer).

The kernel keeps a count of the lookups of every inode it knows, and tells
the filesystem when it forgets them (``forget``).  An inode whose last link
goes while the kernel still knows it, or while it is open, becomes an orphan
in the namespace; it is deleted when the last of both goes.  Control
directory inodes are counted by the control tree.
"""

from __future__ import annotations

import logging

from cachefs.engine import CachefsError, Namespace
from cachefs.fs._control import ControlTree, is_virtual
from cachefs.fs._files import OpenFiles

log = logging.getLogger(__name__)


class Lookups:
    """Lookup counts of the inodes the kernel knows, and the orphans."""

    def __init__(self, namespace: Namespace, files: OpenFiles, control: ControlTree) -> None:
        self.namespace = namespace
        self.files = files
        self.control = control
        self.counts: dict[int, int] = {}
        #: Inodes that lost their last link while in use (see Namespace.remove).
        self.orphans: set[int] = set()

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
            if ino in self.orphans and not self.files.busy(ino):
                released.append(ino)
        self.release(released)

    def release(self, inos: list[int]) -> None:
        """Delete the orphans among ``inos`` that nothing uses any more."""
        inos = [i for i in inos if i in self.orphans and not self.in_use(i)]
        if not inos:
            return
        try:
            self.namespace.release(*inos)
        except CachefsError as exc:
            log.error("could not delete released inodes %s: %s", inos, exc)
            return
        for ino in inos:
            self.orphans.discard(ino)
            self.files.forget(ino)
