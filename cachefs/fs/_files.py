"""Open files and handles (filesystem layer).

A regular file being written has an :class:`OpenFile`: its published content
(``base``, an object in the store) plus a *spool*, a sparse file in
``STORE/tmp`` holding what was written since.  Offsets below ``base_limit``
read from the base unless an extent in ``dirty`` says the spool has them;
offsets at or past it read from the spool (holes read as zeros).  Truncation
lowers ``base_limit`` and cuts the spool.  An ``OpenFile`` lives while the
file has open handles or a publication in flight (:class:`OpenFiles`); its
``lock`` is held while publishing, so writes wait and never race the
composition of the content being stored.  Reads never wait: they see the spool
and base, which only change under the lock.  A spool has no name, unless the
journal logs the file's writes by reference to it (``name_spool``): it then has
one in ``STORE/journal/spools`` until its content is published.

A handle is one of: :class:`FileHandle` (a regular file), :class:`DirHandle`
(a directory, stored or of the control directory), :class:`ContentHandle` (a
control file whose content is fixed at open), :class:`CommandHandle`
(``/.cachefs/control``: a request written, then its answer read) and
:class:`ObjectHandle` (a stored object under ``/.cachefs/cas``).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from cachefs.engine import Digest, Inode
from cachefs.errors import from_oserror
from cachefs.faults import fault

if TYPE_CHECKING:
    from cachefs.fs._streams import Stream

log = logging.getLogger(__name__)

#: Pieces in which content is read from the spool and the base.
PIECE = 4 << 20

#: Reads ``length`` bytes of an object from ``offset``, in pieces.
ObjectRange = Callable[[Digest, int, int], Iterator[bytes | memoryview]]
#: Reads ``length`` bytes of an object from ``offset`` as one buffer.
RangeReader = Callable[[Digest, int, int], bytes | memoryview]


@dataclass
class OpenFile:
    """A regular file with open handles or unpublished writes."""

    ino: int
    base: Digest | None
    size: int
    base_limit: int
    spool: int | None = None  # file descriptor
    dirty: list[tuple[int, int]] = field(default_factory=list)  # [start, end) below base_limit
    changed: bool = False
    unpublished: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    opens: int = 0
    #: Of the opens, those for writing.
    writers: int = 0
    publishing: int = 0
    #: Released, waiting to be published with others (it may be evicted meanwhile).
    waiting: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    #: The content generation handles saw when they opened (for keep_cache).
    generation: int = 0
    #: Where the spool is made.
    spool_dir: Path | None = None
    #: Its ingest as it is written (``_streams.py``), and whether it may have one.
    stream: Stream | None = None
    streamable: bool = True
    #: The spool's number and name while it has one (``name_spool``), and
    #: whether it had one: a file made with ``O_TMPFILE`` can be linked once.
    spool_id: int | None = None
    spool_path: Path | None = None
    spool_was_named: bool = False
    #: What the publication under way put in the inode, in its transaction
    #: (a one-tuple: the content may be none), if it got that far.
    committing: tuple[Digest | None] | None = None

    # --- extents ------------------------------------------------------------------

    def mark_dirty(self, start: int, end: int) -> None:
        """Record that the spool holds [start, end) (clipped to base_limit)."""
        end = min(end, self.base_limit)
        if start >= end:
            return
        extents = self.dirty
        i = bisect.bisect_left(extents, (start, start))
        if i > 0 and extents[i - 1][1] >= start:
            i -= 1
        j = i
        while j < len(extents) and extents[j][0] <= end:
            start = min(start, extents[j][0])
            end = max(end, extents[j][1])
            j += 1
        extents[i:j] = [(start, end)]

    def cut(self, size: int) -> None:
        """Forget everything at and past ``size`` (truncation)."""
        self.base_limit = min(self.base_limit, size)
        self.dirty = [(s, min(e, size)) for s, e in self.dirty if s < size]

    def ranges(self, offset: int, end: int) -> Iterator[tuple[bool, int, int]]:
        """(from_spool, start, stop) pieces covering [offset, end)."""
        position = offset
        limit = min(end, self.base_limit)
        i = bisect.bisect_right(self.dirty, (position, 1 << 63)) - 1
        i = max(i, 0)
        while position < limit:
            while i < len(self.dirty) and self.dirty[i][1] <= position:
                i += 1
            if i < len(self.dirty) and self.dirty[i][0] <= position:
                stop = min(self.dirty[i][1], limit)
                yield True, position, stop
            else:
                stop = limit if i >= len(self.dirty) else min(self.dirty[i][0], limit)
                yield False, position, stop
            position = stop
        if position < end:
            yield True, position, end

    @property
    def unpublished_bytes(self) -> int:
        """Bytes that only the spool holds."""
        return sum(stop - start for start, stop in self.dirty) + self.size - self.base_limit

    @property
    def journal_bytes(self) -> int:
        """Bytes that carrying the file over into a new journal would log."""
        return 0 if self.spool_id is not None else self.unpublished_bytes

    # --- the spool ---------------------------------------------------------------

    def spool_fd(self) -> int:
        """The spool's descriptor, made on first use (scratch space with no
        name, so it goes with the descriptor: ``_scratch_file``)."""
        if self.spool is None:
            assert self.spool_dir is not None, "an OpenFile made without a spool directory"
            try:
                self.spool = _scratch_file(self.spool_dir, f"file-{self.ino}")
            except OSError as exc:
                raise from_oserror(exc, "creating a spool file") from None
        return self.spool

    def name_spool(self, path: Path, spool: int) -> bool:
        """Give the spool the name ``path`` (a hard link to it), so that it
        outlives the daemon and the journal may log writes by reference to it;
        False when it cannot have one (a spool made without ``O_TMPFILE``,
        another file system): the journal then logs the bytes."""
        fd = self.spool_fd()
        try:
            # linkat(2) following the /proc link (plain link(2) would not).
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory)
            finally:
                os.close(directory)
        except OSError as exc:
            log.debug(
                "inode %d: the spool cannot have a name (%s): writes logged whole", self.ino, exc
            )
            return False
        self.spool_id, self.spool_path = spool, path
        self.spool_was_named = True
        return True

    def unname_spool(self) -> None:
        """The journal needs the spool's name no longer (its content is published)."""
        path, self.spool_id, self.spool_path = self.spool_path, None, None
        if path is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # scratch space, removed at the next checkpoint
            log.warning("could not remove the spool %s: %s", path, exc)

    def apply_write(self, offset: int, data: bytes | memoryview) -> int:
        try:
            fault("spool.write")
            written = os.pwrite(self.spool_fd(), data, offset)
        except OSError as exc:
            raise from_oserror(exc, "writing to a spool file") from None
        self.mark_dirty(offset, offset + written)
        self.size = max(self.size, offset + written)
        return written

    def cut_spool(self, size: int) -> None:
        """Drop what the spool holds at and past ``size`` (it is never grown:
        past its end it reads as zeros, so truncating up costs nothing)."""
        if self.spool is None:
            return
        try:
            if os.fstat(self.spool).st_size > size:
                os.ftruncate(self.spool, size)
        except OSError as exc:
            raise from_oserror(exc, "truncating a spool file") from None

    def read_spool(self, start: int, stop: int) -> bytes:
        if self.spool is None:
            return bytes(stop - start)
        try:
            data = os.pread(self.spool, stop - start, start)
        except OSError as exc:
            raise from_oserror(exc, "reading a spool file") from None
        if len(data) < stop - start:  # a hole at the end of the spool
            data += bytes(stop - start - len(data))
        return data

    def read(self, offset: int, end: int, read_range: RangeReader) -> bytes | memoryview:
        """Bytes [offset, end) of the file as it is now."""
        if not self.changed:
            return self._base_range(offset, end, read_range)
        pieces = [
            self.read_spool(start, stop)
            if from_spool
            else self._base_range(start, stop, read_range)
            for from_spool, start, stop in self.ranges(offset, end)
        ]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _base_range(self, start: int, stop: int, read_range: RangeReader) -> bytes | memoryview:
        return (
            bytes(stop - start) if self.base is None else read_range(self.base, start, stop - start)
        )

    def _base(self, start: int, stop: int, read_base: ObjectRange) -> Iterator[bytes | memoryview]:
        if self.base is None:
            yield bytes(stop - start)
        else:
            yield from read_base(self.base, start, stop - start)

    def compose(
        self, read_base: ObjectRange, offset: int = 0, end: int | None = None
    ) -> Iterator[bytes | memoryview]:
        """The file's current content (or a range of it), in pieces (for ingest,
        in a worker thread: the caller holds the lock)."""
        end = self.size if end is None else end
        for from_spool, start, stop in list(self.ranges(offset, end)):
            for piece_start in range(start, stop, PIECE):
                piece_stop = min(stop, piece_start + PIECE)
                if from_spool:
                    yield self.read_spool(piece_start, piece_stop)
                else:
                    yield from self._base(piece_start, piece_stop, read_base)

    def data_regions(self) -> Iterator[tuple[int, int]]:
        """The [start, stop) regions of the spool that hold data: the dirty
        extents below ``base_limit``, then what past it is not a hole."""
        yield from self.dirty
        if self.spool is not None:
            yield from _data_regions(self.spool, self.base_limit, self.size)

    def holes(self, base_holes: list[tuple[int, int]], minimum: int) -> list[tuple[int, int]]:
        """The [start, stop) holes of the file as it is now that are at least
        ``minimum`` bytes long, in order: the base's holes (``base_holes``)
        that no write covered, and past ``base_limit`` what the spool has no
        data for."""
        found: list[tuple[int, int]] = []

        def add(start: int, stop: int) -> None:
            if start >= stop:
                return
            if found and found[-1][1] >= start:
                found[-1] = (found[-1][0], max(found[-1][1], stop))
            else:
                found.append((start, stop))

        for hole_start, hole_stop in base_holes:
            position, stop = hole_start, min(hole_stop, self.base_limit)
            i = max(0, bisect.bisect_right(self.dirty, (position, 1 << 63)) - 1)
            for dirty_start, dirty_stop in self.dirty[i:]:
                if dirty_start >= stop:
                    break
                if dirty_stop > position:
                    add(position, min(dirty_start, stop))
                    position = max(position, dirty_stop)
            add(position, stop)
        position = self.base_limit
        if self.spool is not None:
            for data_start, data_stop in _data_regions(self.spool, self.base_limit, self.size):
                add(position, data_start)
                position = data_stop
        add(position, self.size)
        return [(start, stop) for start, stop in found if stop - start >= minimum]

    def stored(self, digest: Digest | None) -> None:
        """The file's content is ``digest`` now: nothing is unpublished."""
        self.base = digest
        self.base_limit = self.size
        self.dirty.clear()
        if self.spool is not None:
            os.ftruncate(self.spool, 0)
        self.unname_spool()
        self.changed = False
        self.unpublished = 0

    def emptied(self) -> None:
        """The file's content was dropped (truncated to nothing)."""
        self.base = None
        self.base_limit = 0
        self.dirty.clear()
        if self.spool is not None:
            os.ftruncate(self.spool, 0)
        self.size = 0
        self.unpublished = 0
        self.changed = False
        self.generation += 1

    def close(self) -> None:
        if not self.changed:  # else the journal may need it at the next start
            self.unname_spool()
        if self.spool is not None:
            os.close(self.spool)
            self.spool = None
            self.spool_was_named = False


#: Whether ``O_TMPFILE`` may work where the spools are (a file system without
#: it fails the first try; the spools are then made and unlinked at once).
_tmpfile = {"usable": hasattr(os, "O_TMPFILE")}


def _scratch_file(directory: Path, name: str) -> int:
    """A new file in ``directory`` with no name: one call with ``O_TMPFILE``
    (no directory entry made and removed per file), else ``name`` made and
    unlinked at once."""
    if _tmpfile["usable"]:
        try:
            return os.open(directory, os.O_RDWR | os.O_TMPFILE, 0o600)
        except OSError as exc:
            # EISDIR: a kernel without O_TMPFILE; EOPNOTSUPP: a file system without it.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _tmpfile["usable"] = False
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.unlink(path)
    except OSError:
        os.close(fd)
        raise
    return fd


def _data_regions(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The [start, stop) regions of a sparse file between ``start`` and ``end``
    that hold data (holes skipped)."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


class OpenFiles:
    """The open files of a mount, by inode, and the content generations the
    kernel's cached pages belong to."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self._files: dict[int, OpenFile] = {}
        self._generations: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[OpenFile]:
        return iter(list(self._files.values()))

    def get(self, ino: int) -> OpenFile | None:
        return self._files.get(ino)

    def busy(self, ino: int) -> bool:
        """Whether the file is open, being written or being published."""
        return ino in self._files

    def held(self, ino: int) -> bool:
        """Whether the file may not be evicted: it is busy, and not a closed
        file waiting to be published with others (whose publication then
        finds it gone) while no publication of it runs (its lock free)."""
        state = self._files.get(ino)
        return state is not None and (state.opens > 0 or not state.waiting or state.lock.locked())

    def size(self, ino: int) -> int | None:
        """The size of an open file as it is now (None: not open)."""
        state = self._files.get(ino)
        return None if state is None else state.size

    def new(self, ino: int, inode: Inode) -> OpenFile:
        """A state for a file (the file must not be open)."""
        return OpenFile(
            ino,
            inode.digest,
            inode.size,
            inode.size,
            generation=self._generations.get(ino, 0),
            spool_dir=self.spool_dir,
        )

    def adopt(self, state: OpenFile) -> None:
        """Take in a state made by :meth:`new` (a file replayed from the journal
        that could not be published yet)."""
        assert state.ino not in self._files
        self._files[state.ino] = state

    def state(self, inode: Inode) -> OpenFile:
        """The open file of ``inode``, made if it is not open."""
        state = self._files.get(inode.ino)
        if state is None:
            state = self._files[inode.ino] = self.new(inode.ino, inode)
        return state

    def remove(self, state: OpenFile) -> None:
        """The file is closed and published: keep only its generation."""
        if self._files.get(state.ino) is state:
            del self._files[state.ino]
            self._generations[state.ino] = state.generation
            state.close()

    def keep_cache(self, state: OpenFile) -> bool:
        """Whether the kernel may keep the pages it cached of the file (the
        content did not change since it last opened it); notes it opens now."""
        known = self._generations.get(state.ino)
        self._generations[state.ino] = state.generation
        return known is not None and known == state.generation

    def forget(self, ino: int) -> None:
        """The inode is gone."""
        self._generations.pop(ino, None)

    def close(self) -> None:
        for state in self._files.values():
            state.close()


@dataclass
class FileHandle:
    """An open regular file."""

    file: OpenFile
    writable: bool
    append: bool

    @property
    def ino(self) -> int:
        return self.file.ino


@dataclass
class DirHandle:
    """An open directory; its entries are a snapshot taken at the first read."""

    ino: int
    entries: list[tuple[bytes, Inode]] | None = None


@dataclass
class ContentHandle:
    """A control file whose content was fixed when it was opened."""

    ino: int
    content: bytes


@dataclass
class CommandHandle:
    """``/.cachefs/control``: the request written, then the answer to read."""

    ino: int
    request: bytearray = field(default_factory=bytearray)
    answer: bytes | None = None


@dataclass
class ObjectHandle:
    """A stored object opened under ``/.cachefs/cas``; ``holder``, the orphan
    that keeps it while it is open (``Namespace.hold``), if it could be made."""

    ino: int
    digest: Digest
    holder: int | None = None


Handle = FileHandle | DirHandle | ContentHandle | CommandHandle | ObjectHandle


class Handles:
    """The handles the kernel holds, by number."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = 1

    def add(self, handle: Handle) -> int:
        fh = self._next
        self._next += 1
        self._handles[fh] = handle
        return fh

    def __getitem__(self, fh: int) -> Handle:
        return self._handles[fh]

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)
