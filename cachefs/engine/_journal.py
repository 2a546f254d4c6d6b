"""The store's journal (storage engine layer): one append-only log per store.

The file format and every record kind are in ``cachefs.format.journal``.  The
engine opens the journal for the writing process (``Store.journal``) and cuts a
torn tail off; what the records mean is up to the layer that logged them,
which replays them (the mount: ``cachefs.fs``).  The engine never checkpoints
the journal on its own (but to write an empty one of an older version anew):
only a writer that has replayed (or published) what it logged knows that its
records are no longer needed.

Group commit: ``append`` only writes; ``commit(seq)`` makes every record up to
``seq`` durable with one ``fdatasync`` shared by all threads waiting at the same
time.  With ``fsync=False`` commit only orders (survives the process, not the
machine).  A record is *acknowledged* once ``commit`` returned for it (or, for
a writer that only needs to survive the death of its process, once ``append``
returned), so a torn tail cut at open holds nothing acknowledged -- unless the
machine or disk lost synced data, which the warning then points at.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from cachefs.errors import CachefsError, from_oserror
from cachefs.faults import fault
from cachefs.format import journal as fmt
from cachefs.fsutil import atomic_write

log = logging.getLogger(__name__)


class Journal:
    """An append-only log with group commit and checkpoints; thread-safe."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.path = directory / fmt.FILE_NAME
        self.fsync = fsync
        self._lock = threading.Lock()  # appends
        self._sync_lock = threading.Lock()  # one fdatasync at a time
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                atomic_write(self.path, fmt.encode_header(1))
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise from_oserror(exc, f"opening the journal {self.path}") from None
        try:
            data = _read_all(self._fd)
            self.base_seq, self._records, end = fmt.parse(data, str(self.path))
            version = fmt.HEADER.unpack_from(data)[1]
            size = os.fstat(self._fd).st_size
            if end < size:
                log.warning(
                    "journal %s: cut off a torn or damaged tail of %d bytes at offset %d",
                    self.path,
                    size - end,
                    end,
                )
                os.ftruncate(self._fd, end)
                os.fsync(self._fd)
        except BaseException as exc:
            os.close(self._fd)  # a refused journal must not leak its descriptor
            if isinstance(exc, OSError):
                raise from_oserror(exc, f"reading the journal {self.path}") from None
            raise
        #: Bytes cut off the tail when the journal was opened.
        self.truncated_bytes = size - end
        self._end = end
        self.next_seq = self.base_seq + len(self._records)
        self.synced_seq = self.next_seq - 1
        #: Checkpoints since the journal was opened (``Store.activity``).
        self.checkpoints = 0
        if version < fmt.FORMAT_VERSION and not self._records:
            try:  # empty, of an older version: records of this one may follow
                self._start(fmt.FORMAT_VERSION)
            except CachefsError as exc:  # an older cachefs may then misread it
                log.warning(
                    "journal %s: could not write it in version %d: %s",
                    self.path,
                    fmt.FORMAT_VERSION,
                    exc,
                )

    def replay(self) -> list[fmt.JournalRecord]:
        """The records past the last checkpoint, found when the journal was opened."""
        return list(self._records)

    def append(self, kind: int, *parts: bytes | memoryview) -> int:
        """Write one record (not yet durable) whose payload is ``parts`` joined
        (given apart, so that a caller's header and data need not be copied
        together); return its sequence number."""
        length = sum(len(p) for p in parts)
        if length > fmt.MAX_PAYLOAD:
            raise ValueError(f"journal payload of {length} bytes is too large")
        with self._lock:
            seq = self.next_seq
            head = fmt.encode_record(seq, kind, *parts)
            try:
                fault("journal.append")
                written = os.pwritev(self._fd, [head, *parts], self._end)
                if written != len(head) + length:
                    raise OSError(errno.ENOSPC, "short write to the journal")
            except OSError as exc:
                os.ftruncate(self._fd, self._end)
                raise from_oserror(exc, "appending to the journal") from None
            self._end += written
            self.next_seq = seq + 1
            return seq

    def commit(self, seq: int | None = None) -> None:
        """Make every record up to ``seq`` (default: all) durable (group commit)."""
        target = self.next_seq - 1 if seq is None else seq
        if not self.fsync or self.synced_seq >= target:
            return
        with self._sync_lock:
            if self.synced_seq >= target:  # another thread's fdatasync covered us
                return
            upto = self.next_seq - 1
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise from_oserror(exc, "syncing the journal") from None
            self.synced_seq = max(self.synced_seq, upto)

    @property
    def size(self) -> int:
        """The file's size: its header and the records since the last checkpoint."""
        return self._end

    def checkpoint(self, *, last: bool = False) -> None:
        """Start an empty journal: every record so far has been applied elsewhere.
        ``last``: nothing more is appended before the journal is opened again
        (a clean close), so it may be written in the version every cachefs reads.

        Raises StoreFullError (or another CachefsError) when the new file cannot
        be written; the old one then stays in place, whole.
        """
        self._start(fmt.EMPTY_VERSION if last else fmt.FORMAT_VERSION)
        self.checkpoints += 1

    def mark(self) -> tuple[int, int]:
        """Where the next record goes: its sequence number and offset
        (:meth:`checkpoint_from`, :meth:`drop_from`)."""
        with self._lock:
            return self.next_seq, self._end

    def checkpoint_from(self, mark: tuple[int, int]) -> None:
        """Start a journal that holds only the records appended since ``mark``
        (those before it are applied elsewhere): written beside the old one and
        renamed over it, so that if it cannot be (StoreFullError or another
        CachefsError), the old one stays whole."""
        seq, offset = mark
        with self._lock, self._sync_lock:
            header = fmt.encode_header(seq, fmt.FORMAT_VERSION)
            kept = self._end - offset
            try:
                fault("journal.checkpoint")
                atomic_write(self.path, header, tail=(self._fd, offset, kept))
                fd = os.open(self.path, os.O_RDWR)
            except OSError as exc:
                raise from_oserror(exc, f"checkpointing the journal {self.path}") from None
            os.close(self._fd)
            self._fd = fd
            self.base_seq = seq
            self._end = len(header) + kept
            self._records = []
            self.synced_seq = self.next_seq - 1
        self.checkpoints += 1

    def drop_from(self, mark: tuple[int, int]) -> None:
        """Take back the records appended since ``mark`` (none of them was
        needed by anything yet: a carry-over that failed half way)."""
        seq, offset = mark
        with self._lock:
            try:
                os.ftruncate(self._fd, offset)
            except OSError as exc:
                raise from_oserror(exc, f"cutting the journal {self.path}") from None
            self._end = offset
            self.next_seq = seq
            self.synced_seq = min(self.synced_seq, seq - 1)

    def number_from(self, seq: int) -> None:
        """Number the records from ``seq`` on (an empty journal started anew,
        whose numbering must stay above what the store recorded of an older
        one)."""
        if self._records or self.next_seq >= seq:
            return
        self.next_seq = seq
        self._start(fmt.FORMAT_VERSION)

    def _start(self, version: int) -> None:
        """Replace the journal by an empty one of ``version`` (atomically)."""
        with self._lock, self._sync_lock:
            try:
                fault("journal.checkpoint")
                atomic_write(self.path, fmt.encode_header(self.next_seq, version))
                fd = os.open(self.path, os.O_RDWR)
            except OSError as exc:
                raise from_oserror(exc, f"checkpointing the journal {self.path}") from None
            os.close(self._fd)
            self._fd = fd
            self.base_seq = self.next_seq
            self._end = fmt.HEADER.size
            self._records = []
            self.synced_seq = self.next_seq - 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 16 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
