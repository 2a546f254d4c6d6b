"""The store's audit log, written (engine layer); its format is ``format/audit.py``.

:class:`AuditLog` appends one line per :meth:`~AuditLog.record`, from any
thread, in the order they are recorded.  Each line reaches the file (the page
cache: it survives the death of the process) before ``record`` returns; fsync
is done in batches by a background thread, at most :data:`SYNC_INTERVAL`
seconds after a line, and at :meth:`~AuditLog.close`.  The file is opened at the
first record, so that stores nobody audits get no directory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cachefs.errors import from_oserror
from cachefs.format.audit import CURRENT, GENESIS, encode, line_hash, log_files, rotated_name
from cachefs.fsutil import fsync_dir

log = logging.getLogger(__name__)

#: Seconds between a line and its fsync, at most.
SYNC_INTERVAL = 1.0
#: Size past which the current file is rotated.
DEFAULT_MAX_SIZE = 64 << 20


class AuditLog:
    """Appends events to ``directory/audit.log``, hash-chained (see the module doc)."""

    def __init__(
        self, directory: Path, *, max_size: int = DEFAULT_MAX_SIZE, fsync: bool = True
    ) -> None:
        self.directory = directory
        self.max_size = max_size
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._seq = 0
        self._prev = GENESIS
        self._dirty = False
        self._closed = False
        #: The seq of the current file's first line (its name once rotated).
        self._first = 0
        self._wake = threading.Condition(self._lock)
        self._syncer: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.directory / CURRENT

    def record(self, event: str, **fields: Any) -> None:
        """Append one line: ``event`` and ``fields`` (JSON values; see the module doc)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the audit log is closed")
            try:
                if self._fd is None:
                    self._open()
                elif self._size >= self.max_size:
                    self._rotate()
                self._append(event, fields)
            except OSError as exc:
                raise from_oserror(exc, f"writing the audit log {self.path}") from None
            if self.fsync and not self._dirty:
                self._dirty = True
                self._wake.notify()

    def head(self) -> tuple[int, str]:
        """The seq the next line gets and the hash it will name as ``prev``."""
        with self._lock:
            if self._fd is None and not self._closed:
                self._open()
            return self._seq, self._prev

    def close(self) -> None:
        """Sync and close (the head is logged, to compare the file against)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
            fd, self._fd = self._fd, None
        if self._syncer is not None:
            self._syncer.join()
        if fd is not None:
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            log.info("audit log %s: head seq %d sha256 %s", self.path, self._seq - 1, self._prev)

    # --- under the lock ----------------------------------------------------------------

    def _append(self, event: str, fields: dict[str, Any]) -> None:
        """Write one whole line, or none: a failed or short write (a full
        disk) is cut off again, so that the file never holds half a line."""
        assert self._fd is not None
        line = encode(self._seq, self._prev, event, fields, datetime.now(UTC))
        view = memoryview(line + b"\n")
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(line) + 1
        self._seq += 1
        self._prev = line_hash(line)

    def _open(self) -> None:
        """Open the current file, find the head (cutting a torn last line) and,
        if the file is new, carry the chain over from the last rotated file."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            torn = self._find_head(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self.fsync:
            self._syncer = threading.Thread(target=self._sync_loop, name="cachefs-audit")
            self._syncer.daemon = True
            self._syncer.start()
        if torn:
            self._append("audit.torn_tail", {"bytes": torn})

    def _find_head(self, fd: int) -> int:
        """Set seq and prev from the file's last line (or the last rotated
        file's); the bytes of a torn last line, cut off."""
        size = os.fstat(fd).st_size
        last, end = _last_line(fd, size)
        torn = size - end
        if torn:
            log.warning("audit log %s: cutting off a torn last line of %d bytes", self.path, torn)
            os.ftruncate(fd, end)
        self._size = end
        if last is not None and _seq_of(last) is None:
            # A last line that is no line of ours (damage): kept, and the chain
            # goes on from it, so that verify names it.
            log.error("audit log %s: the last line is not an audit line", self.path)
        if last is None:
            last = self._last_rotated_line()
        if last is not None:
            self._seq = (_seq_of(last) or 0) + 1
            self._prev = line_hash(last)
        self._first = self._seq - _lines_in(self.path)
        return torn

    def _last_rotated_line(self) -> bytes | None:
        rotated = [p for p in log_files(self.directory) if p.name != CURRENT]
        if not rotated:
            return None
        with open(rotated[-1], "rb") as f:
            return _last_line(f.fileno(), os.fstat(f.fileno()).st_size)[0]

    def _rotate(self) -> None:
        assert self._fd is not None
        if self.fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self.path, self.directory / rotated_name(self._first))
        self._first = self._seq
        log.info(
            "audit log rotated at seq %d: head sha256 %s (%s)", self._seq - 1, self._prev, self.path
        )
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = 0
        if self.fsync:
            fsync_dir(self.directory)

    def _sync_loop(self) -> None:
        """fsync what was written, at most SYNC_INTERVAL after the first line of
        a batch (records do not wake it while a batch is pending; close does)."""
        with self._lock:
            while not self._closed:
                if not self._dirty:
                    self._wake.wait()
                    continue
                self._wake.wait(SYNC_INTERVAL)
                if self._closed or self._fd is None:
                    break
                self._dirty = False
                fd = os.dup(self._fd)  # a rotation may close the file meanwhile
                self._lock.release()
                try:
                    os.fsync(fd)
                except OSError as exc:
                    log.error("audit log %s: fsync failed: %s", self.path, exc)
                finally:
                    os.close(fd)
                    self._lock.acquire()


def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """The last complete line of the file (without its newline), or None, and
    where the complete lines end."""
    block = 1 << 16
    end = size
    tail = b""
    # Find the last newline: everything after it is torn.
    while end > 0:
        start = max(0, end - block)
        tail = os.pread(fd, end - start, start) + tail
        nl = tail.rfind(b"\n")
        if nl >= 0:
            complete = start + nl + 1
            break
        end = start
    else:
        return None, 0
    # Then the line before that newline.
    body = tail[: complete - start - 1]
    begin = body.rfind(b"\n")
    while begin < 0 and start > 0:
        more = max(0, start - block)
        body = os.pread(fd, start - more, more) + body
        start = more
        begin = body.rfind(b"\n")
    return body[begin + 1 :], complete


def _lines_in(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _seq_of(line: bytes) -> int | None:
    try:
        seq = json.loads(line)["seq"]
    except (ValueError, KeyError, TypeError):
        return None
    return seq if isinstance(seq, int) else None
