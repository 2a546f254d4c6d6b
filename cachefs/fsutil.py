"""Durable file helpers (used by every layer).

Every file that must survive a crash whole or not at all is written the one way
(borg ``SaveFile``): write a temporary file beside it, ``fsync`` it, ``rename``
it over the target, ``fsync`` the directory.

Files written in long appends (segments) start their writeback as they grow
(``start_writeback``), so that the ``fdatasync`` that makes them durable has
little left to wait for.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from cachefs.faults import fault


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: sync_file_range(2)'s flag: start writing the range's dirty pages, wait for nothing.
SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux, or no such call in its libc
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of a file from
    ``offset`` to disk, without waiting (Linux ``sync_file_range``; the call
    drops the GIL).  Only a head start for a later ``fdatasync``, which alone
    makes the bytes durable: an error here is left for that call to report."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


#: cachestat(2)'s system call number (Linux 6.5; the same on every architecture).
_SYS_CACHESTAT = 451


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


def _cachestat_call() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """syscall(2) prototyped for ``cachestat`` (its number and four arguments):
    another system call needs a prototype of its own."""
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    # syscall(2) takes the number and each argument as a long (the pointers too).
    call.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long)
    call.restype = ctypes.c_long
    return call


_CACHESTAT = _cachestat_call()


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many of the pages that ``length`` bytes of a file from ``offset``
    touch are in the page cache (Linux ``cachestat``, which reads nothing);
    None if the kernel cannot tell (before Linux 6.5)."""
    if _CACHESTAT is None:
        return None
    span = _CachestatRange(offset, length)
    stat = _Cachestat()
    if _CACHESTAT(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return None
    return int(stat.nr_cache)


def _copy(source: int, offset: int, length: int, fd: int) -> None:
    """Write ``length`` bytes of ``source`` from ``offset`` to ``fd``, 1 MiB at a time."""
    end = offset + length
    while offset < end:
        data = os.pread(source, min(end - offset, 1 << 20), offset)
        if not data:
            raise OSError(errno.EIO, "the file to copy ended early")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        offset += len(data)


def atomic_write(
    path: Path, data: bytes, mode: int = 0o644, *, tail: tuple[int, int, int] | None = None
) -> None:
    """Replace ``path`` with ``data`` (a new file of ``mode``): after a crash it
    holds the old or the new bytes.  ``tail``: ``(fd, offset, length)``, bytes
    of an open file written after ``data``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover; and nothing planted there is written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as exc:  # name the file being written, not the scratch name beside it
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if tail is not None:
            _copy(*tail, fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        fault("rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
