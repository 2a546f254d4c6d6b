"""What the filesystem tells the parts that follow it (filesystem layer).

Cache directories (``_caches.py``) and trace recording (``_trace.py``) keep
their own books about files; the filesystem does not call them by name, it
emits events to its listeners, each a :class:`FsEvents`.  Every method does
nothing by default: a listener overrides what it needs.  Events are emitted on
the trio thread, after the change they report was made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cachefs.engine import Inode

#: A directory entry: (parent directory inode, name).
Entry = tuple[int, bytes]


class FsEvents:
    """A listener of filesystem events."""

    def looked_up(self, parent: int, name: bytes, inode: Inode) -> None:
        """An existing entry was looked up."""

    def missed(self, parent: int, name: bytes) -> None:
        """A lookup found no entry ``name`` in ``parent``."""

    def opened(self, ino: int, size: int) -> None:
        """An existing regular file was opened (not one just created)."""

    def opened_many(self, files: Sequence[tuple[int, int]]) -> None:
        """:meth:`opened` of each ``(ino, size)``, in order (a server's batch)."""
        for ino, size in files:
            self.opened(ino, size)

    def created(self, parent: int, name: bytes, inode: Inode) -> None:
        """A new inode (of any type) was made with entry ``name``."""

    def linked(self, parent: int, name: bytes, inode: Inode) -> None:
        """A new entry for an existing file."""

    def removed(self, parent: int, name: bytes, inode: Inode) -> None:
        """An entry went (unlink, rmdir); ``inode`` is as it is now (``nlink``
        0: it has no entry left)."""

    def replaced(self, parent: int, name: bytes, inode: Inode) -> None:
        """A rename put another inode at ``name``: ``inode``, the one that was
        there, lost that entry (as in :meth:`removed`)."""

    def renamed(self, moved: Inode, old: Entry, new: Entry, exchanged: Inode | None) -> None:
        """``moved`` went from ``old`` to ``new``; with RENAME_EXCHANGE,
        ``exchanged`` went the other way."""

    def resized(self, ino: int, size: int) -> None:
        """A file's size changed (writes past its end, truncation)."""

    def written(self, ino: int, size: int) -> None:
        """A file's new content is complete: ``fsync``, its last close, or its
        unpublished bytes passing the publish threshold found writes to
        publish (published now, or moments later with others)."""

    def published(self, ino: int, size: int) -> None:
        """A file's new content was published."""

    def closed(self, ino: int) -> None:
        """A file is let go: closed by every handle, its writes published (a
        cache directory may evict it now)."""

    def evicted(self, parent: int, name: bytes, inode: Inode) -> None:
        """A cache directory evicted an entry."""


class Listeners:
    """The listeners of a filesystem.  A listener may be added or removed while
    an event is being delivered (a trace that stops on a write error): the
    delivery goes on to the listeners there were when it began."""

    def __init__(self) -> None:
        self._listeners: tuple[FsEvents, ...] = ()

    def add(self, listener: FsEvents) -> None:
        self._listeners = (*self._listeners, listener)

    def remove(self, listener: FsEvents) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    def __iter__(self) -> Iterator[FsEvents]:
        return iter(self._listeners)


__all__ = ["Entry", "FsEvents", "Listeners"]
