"""The pyfuse3 adapter (FUSE adapter layer).

A protocol adapter only: each handler calls ``cachefs.fs`` and translates.
Domain errors become ``FUSEError(errno)``; any other exception is a bug, which
is logged with its traceback, counted, and answered with EIO, so that it never
takes the mount down.  A request that fails on damaged data is answered with
EIO and reported to the filesystem (``Filesystem.damaged``); the engine
already counted the damage where it found it.  Only this module and the daemon
import pyfuse3.

With metrics (``--metrics``), each handler is wrapped on the instance
(:func:`_measured`): its latency by operation, its errors by errno, and the
bytes read and written.  With traces on, a sampled share of the requests
(``--otlp-fuse-ratio``) are spans (:func:`_traced`).  Without either, the
handlers are called as they are.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from cachefs import tracing
from cachefs.engine import Inode
from cachefs.errors import CachefsError, CorruptDataError
from cachefs.fs import Filesystem, is_virtual, is_volatile

if TYPE_CHECKING:
    from cachefs.metrics import FuseMeter

log = logging.getLogger(__name__)

#: How long the kernel may trust attributes and entries.  Every change goes
#: through this mount, and the kernel updates its copy from our replies, so
#: long timeouts are safe and let repeated stats and lookups stay in the kernel.
ATTR_TIMEOUT = 300.0
ENTRY_TIMEOUT = 300.0
#: Entries that do not exist: negative lookups are cached briefly.
NEGATIVE_TIMEOUT = 1.0

P = ParamSpec("P")
R = TypeVar("R")


class _LateReplies(logging.Filter):
    """pyfuse3 logs an ERROR when a reply finds that the kernel no longer waits
    for it (ENOENT): the request ended with the connection (``umount`` just
    after files were closed: their releases were still being handled).  The
    handler ran, and nothing is lost (a released file is published as always),
    so it is said at DEBUG, not as an error."""

    LATE = "fuse_reply_* failed with " + os.strerror(errno.ENOENT)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR or not record.getMessage().endswith(self.LATE):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("pyfuse3").addFilter(_LateReplies())


def _translate(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn domain errors into FUSEError; log anything else as a bug (EIO)."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except CorruptDataError as exc:
            ops: Operations = args[0]  # type: ignore[assignment]
            ops.fs.damaged(exc)
            log.error("%s: %s", handler.__name__, exc)
            raise FUSEError(errno.EIO) from None
        except CachefsError as exc:
            if exc.errno in (errno.EIO, errno.ENOSPC, errno.EROFS):
                log.error("%s: %s", handler.__name__, exc)
            raise FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            ops = args[0]  # type: ignore[assignment]
            ops.fs.errors += 1
            log.exception("bug in handler %s", handler.__name__)
            ops.fs.enter_failsafe(f"unexpected error in {handler.__name__}")
            raise FUSEError(errno.EIO) from None

    return wrapper


#: The handlers measured with metrics (every request pyfuse3 hands us).
OPERATIONS = (
    "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
    "rmdir", "symlink", "rename", "link", "open", "create", "read", "write", "flush",
    "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs",
    "setxattr", "getxattr", "listxattr", "removexattr",
)  # fmt: skip


def _measured(
    handler: Callable[..., Coroutine[Any, Any, Any]], name: str, meter: FuseMeter
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``handler`` timed under ``name``, its FUSEErrors counted by errno, and
    the bytes of reads and writes counted (on the event loop's thread, as
    every handler runs: ``FuseMeter`` takes no lock)."""
    latency = meter.operation(name)
    clock = time.perf_counter
    counted: Callable[[Any], None] | None = None
    if name == "read":

        def counted(data: Any) -> None:
            meter.read_bytes += len(data)

    elif name == "write":

        def counted(written: Any) -> None:
            meter.written_bytes += int(written)

    async def measured(*args: Any) -> Any:
        start = clock()
        try:
            result = await handler(*args)
        except FUSEError as exc:
            meter.failed(name, errno.errorcode.get(exc.errno, str(exc.errno)))
            raise
        finally:
            latency.observe(clock() - start)
        if counted is not None:
            counted(result)
        return result

    return measured


def _traced(
    handler: Callable[..., Coroutine[Any, Any, Any]], name: str
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``handler``, a span (``fuse <name>``) for a sampled share of its requests."""
    span_name = f"fuse {name}"

    async def traced(*args: Any) -> Any:
        if not tracing.fuse_sampled():
            return await handler(*args)
        with tracing.span(span_name, kind="server", attributes={"fuse.operation": name}):
            return await handler(*args)

    return traced


def _invalidate_entry(parent: int, name: bytes, deleted: int) -> None:
    """Make the kernel drop an entry the filesystem removed on its own
    (eviction); ``deleted``: the inode, if it went with it (else 0: the
    kernel must not take other links of it for gone)."""
    pyfuse3.invalidate_entry_async(parent, name, deleted=deleted, ignore_enoent=True)


def entry_attributes(inode: Inode, allocated: int | None = None) -> pyfuse3.EntryAttributes:
    """The attributes of ``inode``; ``allocated``: the bytes it stores (its
    size less its holes; by default its size)."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = inode.ino
    attr.generation = 0
    if is_virtual(inode.ino):  # control files come and go: never cached
        attr.entry_timeout = attr.attr_timeout = 0
    else:
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
    attr.st_mode = inode.mode
    attr.st_nlink = inode.nlink
    attr.st_uid = inode.uid
    attr.st_gid = inode.gid
    attr.st_rdev = inode.rdev
    attr.st_size = inode.size
    attr.st_blksize = 128 * 1024
    attr.st_blocks = ((inode.size if allocated is None else allocated) + 511) // 512
    attr.st_atime_ns = inode.atime_ns
    attr.st_mtime_ns = inode.mtime_ns
    attr.st_ctime_ns = inode.ctime_ns
    return attr


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a :class:`~cachefs.fs.Filesystem`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem, metrics: FuseMeter | None = None) -> None:
        super().__init__()
        self.fs = fs
        fs.invalidate = _invalidate_entry
        for name in OPERATIONS:
            if metrics is not None:
                setattr(self, name, _measured(getattr(self, name), name, metrics))
            if tracing.fuse_ratio() > 0:
                setattr(self, name, _traced(getattr(self, name), name))

    @_translate
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._attributes(self.fs.lookup(parent_inode, name))
        except CachefsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # Not here: in a shared cache directory, a remote tier may have it.
        if await self.fs.shared.resolve(parent_inode, name):
            with contextlib.suppress(CachefsError):
                return self._attributes(self.fs.lookup(parent_inode, name))
        # A negative entry the kernel may cache for a moment.
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = NEGATIVE_TIMEOUT
        return attr

    @_translate
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.fs.forget(list(inode_list))

    @_translate
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self.fs.getattr(inode))

    @_translate
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        new = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            size=attr.st_size if fields.update_size else None,
        )
        return self._attributes(new)

    @_translate
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_translate
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FUSEError(errno.EINVAL)
        return self._attributes(
            self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid, rdev=rdev)
        )

    @_translate
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        return self._attributes(self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.unlink(parent_inode, name)

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.unlink(parent_inode, name, directory=True)

    @_translate
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFLNK | 0o777
        return self._attributes(
            self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid, target=target)
        )

    @_translate
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_translate
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(self.fs.link(inode, new_parent_inode, new_name))

    def _attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return entry_attributes(inode, self.fs.sparse.allocated(inode))

    def _file_info(self, ino: int, fh: int, keep_cache: bool) -> pyfuse3.FileInfo:
        volatile = is_volatile(ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not volatile, direct_io=volatile)

    @_translate
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, keep = await self.fs.open(inode, flags)
        return self._file_info(inode, fh, keep)

    @_translate
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self.fs.create(
            parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx.uid, ctx.gid
        )
        fh, keep = await self.fs.open(inode.ino, flags & ~os.O_TRUNC, created=True)
        return self._file_info(inode.ino, fh, keep), self._attributes(inode)

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        return await self.fs.read(fh, off, size)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_translate
    async def flush(self, fh: int) -> None:
        # Nothing to do at close(2): a file is published at its release (or
        # fsync), which close does not wait for.  ENOSYS makes the kernel send
        # no FLUSH again on this mount, so that a close waits for no round trip.
        raise FUSEError(errno.ENOSYS)

    @_translate
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_translate
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.fs.opendir(inode)

    @_translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i, (name, inode) in enumerate(self.fs.readdir(fh, start_id)):
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), start_id + i + 1):
                break
            if name not in (b".", b".."):
                self.fs.lookups.remember(inode.ino)

    @_translate
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.flush_all()

    @_translate
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        vfs, used, _ = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = vfs.f_bsize
        data.f_frsize = vfs.f_frsize
        data.f_blocks = vfs.f_blocks
        data.f_bfree = vfs.f_bfree
        data.f_bavail = vfs.f_bavail
        # Inodes are only limited by the index; report what is used and a large pool.
        data.f_files = used + (1 << 32)
        data.f_ffree = 1 << 32
        data.f_favail = 1 << 32
        data.f_namemax = 255
        return data

    @_translate
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.fs.setxattr(inode, name, value, ctx.uid)

    @_translate
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.getxattr(inode, name)

    @_translate
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_translate
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.removexattr(inode, name, ctx.uid)
