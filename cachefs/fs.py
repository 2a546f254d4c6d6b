"""Filesystem semantics over the store (filesystem layer).

This layer turns the namespace (``namespace.py``) and the chunk store into a
POSIX filesystem: open files and their unpublished writes, the kernel's lookup
counts, truncation, and when a file's new content is published.  It knows
nothing of pyfuse3: ``fuse.py`` adapts it to the kernel, and tests can drive it
directly.  Methods run on the trio thread; ingest runs in worker threads.

Write path.  A file being written has an :class:`OpenFile`: its published
content (``base``, an object in the store) plus a *spool*, a sparse file in
``STORE/tmp`` holding what was written since.  Offsets below ``base_limit``
read from the base unless an extent in ``dirty`` says the spool has them;
offsets at or past it read from the spool (holes read as zeros).  Truncation
lowers ``base_limit`` and cuts the spool.  The new content goes through the
dedup pipeline (only the regions around the changes are chunked again:
``Store.put_revision``) and one transaction points the inode at it
(``Namespace.set_content``):

* on ``fsync``,
* when the last handle of the file is released,
* when a file's unpublished bytes pass ``publish_threshold`` (in the background).

Every publication is durable (segment bytes synced before the index commits),
so that the index never names bytes a machine crash could lose; files up to
``_INLINE_PUBLISH`` bytes are published on the loop's thread, larger ones in a
worker thread.

Every ``write`` and truncation is first appended to the filesystem's
write-ahead log, ``STORE/fswal/wal.log`` (the framing, checksums and torn-tail
handling of ``wal.py``), then applied to the spool.  Record kinds and payloads
(little-endian):

* ``LOG_BASE`` (1): inode Q, size Q, content digest 32s (zeros: empty) --
  the published content the records after it apply to; logged when a file
  with nothing unpublished is first changed.
* ``LOG_WRITE`` (2): inode Q, offset Q, mtime ns q, then the bytes.
* ``LOG_TRUNCATE`` (3): inode Q, size Q, mtime ns q.

When the daemon is killed, the next mount replays the log: for every inode,
the records after its last ``LOG_BASE`` are applied to that base and published
-- unless the inode's content is no longer that base (it was published
afterwards, or truncated to nothing) or the inode is gone.  So writes that
reached the log survive the death of the daemon, and with ``sync`` (which
flushes the store's own files) a crash of the machine.  The store stays
consistent whatever the moment: spools are scratch space that the next start
discards.  The log restarts whenever it passed ``_LOG_RESTART`` bytes and
nothing is unpublished; once it passes ``log_limit``, the files with the most
unpublished bytes are published and it restarts carrying over the rest
(re-logged from the spools).

Concurrency invariants (all state below is touched only on the trio thread):

* An inode's ``OpenFile`` lives while the file has open handles or a
  publication in flight; its ``lock`` is held while publishing, so writes wait
  and never race the composition of the content being stored.  Reads never
  wait: they see the spool and base, which only change under the lock.
* An inode whose last link goes while the kernel still knows it (lookup count
  > 0) or a handle is open becomes an orphan in the namespace; it is deleted
  when the last of both goes (``forget``, ``release``).
"""

from __future__ import annotations

import bisect
import errno
import functools
import json
import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb
import trio

from cachefs.caches import CACHE_XATTR, CacheDirs
from cachefs.control import (
    COMMAND_INO,
    CONTROL_INO,
    CONTROL_NAME,
    STATS_INO,
    ControlTree,
    is_virtual,
)
from cachefs.digest import Digest
from cachefs.errors import (
    CachefsError,
    CorruptDataError,
    ReadOnlyError,
    StoreFullError,
    from_oserror,
)
from cachefs.memory import DEFAULT_MEMORY_LIMIT, MemoryGovernor
from cachefs.namespace import (
    NO_CONTENT,
    RENAME_EXCHANGE,
    ROOT_INODE,
    FsError,
    Inode,
    Namespace,
)
from cachefs.store import Store
from cachefs.trace import TraceRecorder
from cachefs.wal import WriteAheadLog

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Unpublished bytes of one file that start a background publication.
DEFAULT_PUBLISH_THRESHOLD = 1 << 30
#: Size of the write-ahead log that makes every file publish and the log restart.
DEFAULT_LOG_LIMIT = 1 << 30
#: Past this size the log restarts whenever nothing is left unpublished.
_LOG_RESTART = 4 << 20
#: Files up to this size are published on the event loop's thread.
_INLINE_PUBLISH = 256 * 1024
#: Pieces in which composed content is handed to the ingest pipeline.
_PIECE = 4 << 20

LOG_DIRECTORY = "fswal"
LOG_BASE = 1
LOG_WRITE = 2
LOG_TRUNCATE = 3
_LOG_BASE = struct.Struct("<QQ32s")
_LOG_WRITE = struct.Struct("<QQq")
_LOG_TRUNCATE = struct.Struct("<QQq")


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
    publishing: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    #: The content generation handles saw when they opened (for keep_cache).
    generation: int = 0

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


@dataclass
class Handle:
    ino: int
    file: OpenFile | None
    writable: bool
    append: bool = False
    #: A virtual file's content (the control directory), fixed at open.
    content: bytes | None = None
    #: A virtual file's request buffer (``/.cachefs/control``).
    request: bytearray | None = None
    #: A read-only stored object (``/.cachefs/cas/...``).
    digest: Digest | None = None
    entries: list[tuple[bytes, Inode]] | None = None


class Filesystem:
    """A mounted store's filesystem semantics.  Use from one trio thread."""

    def __init__(
        self,
        store: Store,
        *,
        publish_threshold: int = DEFAULT_PUBLISH_THRESHOLD,
        log_limit: int = DEFAULT_LOG_LIMIT,
        limiter: trio.CapacityLimiter | None = None,
        max_store_size: int | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        self.store = store
        self.namespace = Namespace(store)
        self.publish_threshold = publish_threshold
        self.limiter = limiter or trio.CapacityLimiter(max(2, store.options.workers))
        self.files: dict[int, OpenFile] = {}
        self.handles: dict[int, Handle] = {}
        self.lookups: dict[int, int] = {}
        self._next_fh = 1
        self._generations: dict[int, int] = {}
        #: Inodes that lost their last link while in use (see Namespace.remove).
        self._orphans: set[int] = set()
        self._spool_dir = store.tmp_root
        self._nursery: trio.Nursery | None = None
        self.errors = 0
        #: Non-zero while gc runs: it holds the store's maintenance lock, which a
        #: publication waits for, so none may wait on the loop's thread.
        self.maintenance = 0
        #: Why the filesystem went read-only to protect the store (None: it did not).
        self.failsafe: str | None = None
        self.control = ControlTree(self)
        self.log_limit = log_limit
        self._checkpointing = False
        purged = self.namespace.purge_orphans()
        if purged:
            log.info("deleted %d files that were unlinked while open when last mounted", purged)
        self._reserve = store.ensure_reserve()
        #: Tells the kernel that an entry is gone (set by the FUSE adapter).
        self.invalidate: Callable[[int, bytes, int], None] | None = None
        #: Records file accesses when a trace is being recorded (``trace.py``).
        self.tracer: TraceRecorder | None = None
        self.wal = WriteAheadLog(store.path / LOG_DIRECTORY, fsync=store.options.fsync)
        try:
            self._replay()
            # After the replay: the sizes it published are the ones that count.
            self.caches = CacheDirs(self, max_store_size=max_store_size)
        except BaseException:
            self.wal.close()
            raise
        self.memory = MemoryGovernor(store, memory_limit)

    def close(self) -> None:
        """After the last request: every file must have been published (flush_all)."""
        self.caches.save()
        self.stop_trace()
        if not any(state.changed for state in self.files.values()):
            try:
                self.wal.checkpoint()
            except CachefsError as exc:
                log.warning("could not checkpoint the write-ahead log: %s", exc)
        for state in self.files.values():
            if state.spool is not None:
                os.close(state.spool)
                state.spool = None
        self.wal.close()

    def _replay(self) -> None:
        """Publish the writes a killed daemon logged but never published."""
        records = self.wal.replay()
        if not records:
            return
        logs: dict[int, list[tuple[int, bytes]]] = {}
        for record in records:
            if record.kind not in (LOG_BASE, LOG_WRITE, LOG_TRUNCATE):
                log.warning("write-ahead log: skipping record of unknown kind %d", record.kind)
                continue
            ino = struct.unpack_from("<Q", record.payload)[0]
            if record.kind == LOG_BASE:
                logs[ino] = []
            if ino in logs:
                logs[ino].append((record.kind, record.payload))
        replayed = failed = 0
        for ino, entries in logs.items():
            _, size, content = _LOG_BASE.unpack_from(entries[0][1])
            try:
                inode = self.namespace.get(ino)
            except FsError:
                continue  # deleted since
            if not inode.is_reg or inode.content != content or inode.size != size:
                continue  # published (or emptied) after these writes
            state = OpenFile(ino, inode.digest, inode.size, inode.size)
            state.changed = True
            for kind, payload in entries[1:]:
                if kind == LOG_WRITE:
                    _, offset, mtime = _LOG_WRITE.unpack_from(payload)
                    self._apply_write(state, offset, memoryview(payload)[_LOG_WRITE.size :])
                else:
                    _, new_size, mtime = _LOG_TRUNCATE.unpack_from(payload)
                    self._truncate_locked(state, new_size)
                state.mtime_ns = state.ctime_ns = mtime
                state.changed = True
            try:
                self._stored(state, self._store(state, durable=True))
                replayed += 1
            except CachefsError as exc:
                # Keep the log (a later mount tries again); the rest goes on.
                failed += 1
                log.error("write-ahead log: could not publish inode %d: %s", ino, exc)
            finally:
                if state.spool is not None:
                    os.close(state.spool)
        self.store.sync()
        if not failed:
            self.wal.checkpoint()
        if replayed:
            log.info("write-ahead log: published the logged writes of %d files", replayed)

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background publications until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.caches.run)
            nursery.start_soon(self.memory.run)
            task_status.started()
            await trio.sleep_forever()

    async def flush_all(self) -> None:
        """Publish every file with unpublished writes, durably (unmount, sync).

        A file that cannot be published (disk full) keeps its writes and does
        not stop the others; the first error is raised at the end."""
        failed: CachefsError | None = None
        for ino in list(self.files):
            state = self.files.get(ino)
            if state is None:
                continue
            try:
                await self._publish(state, durable=False)
            except CachefsError as exc:
                log.error("could not publish inode %d: %s", ino, exc)
                failed = failed or exc
        await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)
        if failed is not None:
            raise failed

    def enter_failsafe(self, reason: str) -> None:
        """Refuse every change from now on (EROFS): the store may be damaged."""
        if self.failsafe is None:
            self.failsafe = reason
            log.critical(
                "the file system is read-only from now on to protect the store: %s; "
                "unmount it and run `cachefs fsck %s`",
                reason,
                self.store.path,
            )

    def _check_writable(self) -> None:
        if self.failsafe is not None:
            raise ReadOnlyError(
                f"the file system went read-only after damage ({self.failsafe})",
                hint=f"unmount and run `cachefs fsck {self.store.path}`",
            )

    # --- lookup counts -------------------------------------------------------------

    def remember(self, ino: int, count: int = 1) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + count

    def forget(self, pairs: list[tuple[int, int]]) -> None:
        """The kernel dropped ``count`` lookups of each inode; orphans it no
        longer knows (and nothing has open) are deleted, in one transaction."""
        released = []
        for ino, count in pairs:
            if is_virtual(ino):
                self.control.forget(ino, count)
                continue
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            if ino in self._orphans and ino not in self.files:
                released.append(ino)
        self._delete_orphans(released)

    def _in_use(self, ino: int) -> bool:
        return ino in self.lookups or ino in self.files

    def _delete_orphans(self, inos: list[int]) -> None:
        """Delete orphans that nothing uses any more."""
        inos = [i for i in inos if i in self._orphans and not self._in_use(i)]
        if not inos:
            return
        try:
            self.namespace.release(*inos)
        except CachefsError as exc:
            log.error("could not delete released inodes %s: %s", inos, exc)
            return
        for ino in inos:
            self._orphans.discard(ino)
            self._generations.pop(ino, None)

    # --- attributes -------------------------------------------------------------------

    def getattr(self, ino: int) -> Inode:
        if is_virtual(ino):
            return self.control.getattr(ino)
        inode = self.namespace.get(ino)
        state = self.files.get(ino)
        if state is not None and state.changed:
            inode.size = state.size
            inode.mtime_ns = state.mtime_ns  # the writes' time, or one set since
            inode.ctime_ns = max(inode.ctime_ns, state.ctime_ns)
        return inode

    def lookup(self, parent: int, name: bytes) -> Inode:
        if is_virtual(parent):
            return self.control.lookup(parent, name)
        if parent == ROOT_INODE and name == CONTROL_NAME:
            return self.control.getattr(CONTROL_INO)
        try:
            ino = self.namespace.lookup(parent, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                self.caches.missed(parent, name)
                if self.tracer is not None:
                    self.tracer.entry_event("miss", parent, name)
            raise
        inode = self.getattr(ino)
        self.remember(inode.ino)
        if self.tracer is not None and inode.is_reg:
            self.tracer.named(ino, parent, name)
        return inode

    async def setattr(
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
        _real(ino)
        self._check_writable()
        if size is not None:
            await self.truncate(ino, size)
        if (mode, uid, gid, atime_ns, mtime_ns) != (None,) * 5:
            state = self.files.get(ino)
            if mtime_ns is not None and state is not None:
                state.mtime_ns = mtime_ns  # an explicit time wins over the writes' time
            self.namespace.setattr(
                ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns
            )
        return self.getattr(ino)

    # --- namespace operations -----------------------------------------------------------

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
    ) -> Inode:
        _real(parent, name)
        self._check_writable()
        inode = self.namespace.create(parent, name, mode, uid, gid, rdev=rdev, target=target)
        self.remember(inode.ino)
        self.caches.created(parent, name, inode)
        if self.tracer is not None and inode.is_reg:
            self.tracer.named(inode.ino, parent, name)
            self.tracer.entry_event("create", parent, name)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        _real(ino)
        _real(parent, name)
        self._check_writable()
        self.namespace.link(ino, parent, name)
        self.remember(ino)
        inode = self.getattr(ino)
        self.caches.linked(ino, parent, name, inode.size)
        return inode

    def unlink(self, parent: int, name: bytes, *, directory: bool = False) -> None:
        _real(parent, name)
        self._check_writable()
        ino = self.namespace.lookup(parent, name)
        inode = self._freeing(
            lambda: self.namespace.remove(
                parent, name, directory=directory, in_use=self._in_use(ino)
            )
        )
        if inode.nlink == 0:
            self._forget_writes(ino)
        self.caches.removed(parent, name, inode)
        if self.tracer is not None and inode.is_reg:
            self.tracer.entry_event("unlink", parent, name, inode.size)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        _real(old_parent, old_name)
        _real(new_parent, new_name)
        self._check_writable()
        in_use = set()
        moved = self.namespace.get(self.namespace.lookup(old_parent, old_name))
        target: Inode | None = None
        try:
            target = self.namespace.get(self.namespace.lookup(new_parent, new_name))
        except FsError:
            pass
        else:
            if self._in_use(target.ino):
                in_use.add(target.ino)
        replaced = self._freeing(
            lambda: self.namespace.rename(
                old_parent, old_name, new_parent, new_name, flags, in_use=in_use
            )
        )
        if replaced is not None:
            if replaced.nlink == 0:
                self._forget_writes(replaced.ino)
            self.caches.removed(new_parent, new_name, replaced)
        exchanged = target if flags & RENAME_EXCHANGE else None
        self.caches.renamed(moved, (old_parent, old_name), (new_parent, new_name), exchanged)
        if self.tracer is not None:
            if moved.is_dir or (exchanged is not None and exchanged.is_dir):
                self.tracer.moved()
            self.tracer.renamed((old_parent, old_name), (new_parent, new_name), moved.ino)

    def evicted(self, parent: int, name: bytes, inode: Inode) -> None:
        """A cache evicted an entry (``caches.py``): the kernel must forget it
        (and the inode, when that was its last entry: it is deleted)."""
        if inode.nlink == 0:
            self._generations.pop(inode.ino, None)
        if self.tracer is not None:
            self.tracer.entry_event("unlink", parent, name, inode.size, evicted=True)
        if self.invalidate is not None:
            self.invalidate(parent, name, inode.ino if inode.nlink == 0 else 0)

    def _freeing(self, operation: Callable[[], T]) -> T:
        """Run an operation that frees space; on a full disk, release the
        store's reserve and try once more (deleting needs room too)."""
        try:
            return operation()
        except StoreFullError:
            if not self.store.release_reserve():
                raise
            self._reserve = False
            return operation()

    def _restore_reserve(self) -> None:
        if not self._reserve:
            self._reserve = self.store.ensure_reserve()

    def _forget_writes(self, ino: int) -> None:
        """A file lost its last name: it is an orphan until the kernel forgets it
        and it is closed; unpublished writes nobody can reach are dropped (an
        open file keeps them, readable, until it is closed)."""
        self._orphans.add(ino)
        state = self.files.get(ino)
        if state is not None and state.opens == 0 and state.publishing == 0:
            self._drop_state(state)

    def readlink(self, ino: int) -> bytes:
        inode = self.getattr(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target

    def opendir(self, ino: int) -> int:
        inode = self.getattr(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return self._new_handle(Handle(ino, None, False))

    def readdir(self, fh: int, start: int) -> list[tuple[bytes, Inode]]:
        """Entries from position ``start`` on (a snapshot taken at the first call),
        "." and ".." first (these two do not count as lookups)."""
        handle = self.handles[fh]
        if is_virtual(handle.ino):
            handle.entries = self.control.entries(handle.ino)
        elif handle.entries is None or start == 0:
            with self.namespace.read() as txn:
                dot = self.namespace.get(handle.ino, txn)
                dotdot = self.namespace.get(self.namespace.parent_of(handle.ino, txn), txn)
            handle.entries = [(b".", dot), (b"..", dotdot), *self.namespace.entries(handle.ino)]
            for _, inode in handle.entries:
                state = self.files.get(inode.ino)
                if state is not None and state.changed:
                    inode.size = state.size
                    inode.mtime_ns = state.mtime_ns
        return handle.entries[start:]

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    # --- open files ------------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    def _state(self, ino: int, inode: Inode | None = None) -> OpenFile:
        state = self.files.get(ino)
        if state is None:
            inode = inode or self.namespace.get(ino)
            state = OpenFile(ino, inode.digest, inode.size, inode.size)
            state.generation = self._generations.get(ino, 0)
            self.files[ino] = state
        return state

    async def open(self, ino: int, flags: int, *, created: bool = False) -> tuple[int, bool]:
        """Open a file; returns (handle, whether the kernel may keep its cached pages).
        ``created``: the file was just created (not a cache hit).

        The content of a virtual file that changes (``stats.json``) is fixed at
        open and must be read with direct I/O: see :meth:`is_volatile`.
        """
        accmode = flags & os.O_ACCMODE
        writable = accmode in (os.O_WRONLY, os.O_RDWR)
        if is_virtual(ino):
            return self._open_virtual(ino, writable), True
        inode = self.namespace.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not inode.is_reg:
            raise FsError(errno.EINVAL)
        if writable:
            self._check_writable()
        state = self._state(ino, inode)
        state.opens += 1
        if not created:
            self.caches.opened(ino)
            if self.tracer is not None:
                self.tracer.file_event("open", ino, state.size)
        fh = self._new_handle(Handle(ino, state, writable, bool(flags & os.O_APPEND)))
        try:
            if flags & os.O_TRUNC and writable:
                await self.truncate(ino, 0)
        except BaseException:
            await self.release(fh)
            raise
        known = self._generations.get(ino)
        keep = known is not None and known == state.generation
        self._generations[ino] = state.generation
        return fh, keep

    def _open_virtual(self, ino: int, writable: bool) -> int:
        inode = self.control.getattr(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if ino == COMMAND_INO:
            return self._new_handle(Handle(ino, None, True, request=bytearray()))
        if writable:
            raise FsError(errno.EACCES)
        if ino == STATS_INO:
            content = (json.dumps(self.control.stats(), indent=2) + "\n").encode()
            return self._new_handle(Handle(ino, None, False, content=content))
        return self._new_handle(Handle(ino, None, False, digest=self.control.digest(ino)))

    @staticmethod
    def is_virtual(ino: int) -> bool:
        """Whether an inode is one of the control directory's (never stored)."""
        return is_virtual(ino)

    @staticmethod
    def is_volatile(ino: int) -> bool:
        """Whether a file's size is unknown until read (the kernel must not cache it)."""
        return ino in (STATS_INO, COMMAND_INO)

    def _spool(self, state: OpenFile) -> int:
        if state.spool is None:
            path = self._spool_dir / f"file-{state.ino}"
            try:
                state.spool = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                os.unlink(path)  # scratch space: gone with the descriptor
            except OSError as exc:
                raise from_oserror(exc, "creating a spool file") from None
        return state.spool

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        handle = self.handles[fh]
        if handle.request is not None:
            handle.request += data
            handle.content = None
            return len(data)
        state = handle.file
        if state is None or not handle.writable:
            raise FsError(errno.EBADF)
        self._check_writable()
        async with state.lock:
            if handle.append:
                offset = state.size
            growth = offset + len(data) - state.size
            if growth > 0 or self.caches.max_store_size is not None:
                await self.caches.make_room(state.ino, max(0, growth))
                if handle.append:
                    offset = state.size
            self._changed(state)
            self._log(LOG_WRITE, _LOG_WRITE.pack(state.ino, offset, state.mtime_ns), data)
            written = self._apply_write(state, offset, data)
            state.unpublished += written
        if growth > 0:
            self.caches.resized(state.ino, state.size)
        if self._nursery is not None:
            if state.unpublished >= self.publish_threshold:
                state.unpublished = 0
                state.publishing += 1
                self._nursery.start_soon(self._publish_in_background, state)
            if self.wal.size >= self.log_limit and not self._checkpointing:
                self._checkpointing = True
                self._nursery.start_soon(self._checkpoint)
        return written

    def _apply_write(self, state: OpenFile, offset: int, data: bytes | memoryview) -> int:
        spool = self._spool(state)
        try:
            written = os.pwrite(spool, data, offset)
        except OSError as exc:
            raise from_oserror(exc, "writing to a spool file") from None
        state.mark_dirty(offset, offset + written)
        state.size = max(state.size, offset + written)
        return written

    def _log(self, kind: int, head: bytes, data: bytes | memoryview = b"") -> None:
        self.wal.append(kind, head, data)

    def _changed(self, state: OpenFile) -> None:
        """A change is about to be applied: log the base it applies to, if new."""
        if not state.changed:
            base = state.base
            content, size = (NO_CONTENT, 0) if base is None else (base.hash, base.size)
            self._log(LOG_BASE, _LOG_BASE.pack(state.ino, size, content))
            state.changed = True
        now = time.time_ns()
        state.mtime_ns = state.ctime_ns = now
        state.generation += 1

    async def _checkpoint(self) -> None:
        """The log passed its limit: restart it, carrying over what is unpublished.

        Files whose unpublished bytes would fill more than half of the new log
        are published first (largest first), so that the new log starts small
        and files that keep being written do not make it restart again at once.
        """
        try:
            changed = [state for state in self.files.values() if state.changed]
            changed.sort(key=_unpublished_bytes, reverse=True)
            carried = sum(map(_unpublished_bytes, changed))
            for state in changed:
                if carried <= self.log_limit // 2:
                    break
                carried -= _unpublished_bytes(state)
                await self._publish(state, durable=False)
            # No await from here on: nothing can change while the log restarts.
            self.wal.checkpoint()
            for state in self.files.values():
                if state.changed:
                    self._log_unpublished(state)
        except CachefsError as exc:
            self.errors += 1
            log.error("write-ahead log checkpoint failed: %s", exc)
        finally:
            self._checkpointing = False

    def _log_unpublished(self, state: OpenFile) -> None:
        """Log a changed file's unpublished content again, as if written anew
        (records whose replay gives the file as it is now)."""
        ino, mtime = state.ino, state.mtime_ns
        base = state.base
        content, size = (NO_CONTENT, 0) if base is None else (base.hash, base.size)
        self._log(LOG_BASE, _LOG_BASE.pack(ino, size, content))
        self._log(LOG_TRUNCATE, _LOG_TRUNCATE.pack(ino, state.base_limit, mtime))
        self._log(LOG_TRUNCATE, _LOG_TRUNCATE.pack(ino, state.size, mtime))
        if state.spool is None:
            return
        regions = [*state.dirty, *_data_regions(state.spool, state.base_limit, state.size)]
        for start, stop in regions:
            for piece in range(start, stop, _PIECE):
                data = os.pread(state.spool, min(_PIECE, stop - piece), piece)
                self._log(LOG_WRITE, _LOG_WRITE.pack(ino, piece, mtime), data)

    async def truncate(self, ino: int, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL)
        inode = self.namespace.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not inode.is_reg:
            raise FsError(errno.EINVAL)
        state = self._state(ino, inode)
        state.publishing += 1  # keeps the state alive while we wait for the lock
        try:
            async with state.lock:
                if size > state.size:
                    await self.caches.make_room(ino, size - state.size)
                if size not in (0, state.size):
                    self._changed(state)
                    self._log(LOG_TRUNCATE, _LOG_TRUNCATE.pack(ino, size, state.mtime_ns))
                self._truncate_locked(state, size)
        except BaseException:
            state.publishing -= 1
            if state.opens == 0 and state.publishing == 0:
                self._drop_state(state)  # kept if it has changes to publish
            raise
        state.publishing -= 1
        self.caches.resized(ino, state.size)
        if state.opens == 0 and state.publishing == 0:
            await self._publish(state, durable=False)
            self._drop_state(state)

    def _truncate_locked(self, state: OpenFile, size: int) -> None:
        if size == 0:
            if state.size == 0 and state.base is None and not state.changed:
                return
            # The common O_TRUNC case: drop the content at once.
            now = time.time_ns()
            self._freeing(lambda: self.namespace.clear_content(state.ino, now, now))
            state.base = None
            state.base_limit = 0
            state.dirty.clear()
            if state.spool is not None:
                os.ftruncate(state.spool, 0)
            state.size = 0
            state.unpublished = 0
            state.changed = False
            state.generation += 1
            return
        if size == state.size:
            return
        state.cut(size)
        if state.spool is not None or size > state.base_limit:
            try:
                os.ftruncate(self._spool(state), size)
            except OSError as exc:
                raise from_oserror(exc, "truncating a spool file") from None
        state.size = size
        state.changed = True

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        try:
            return await self._read(fh, offset, size)
        except CorruptDataError as exc:
            # Say which file it hit: the store's message names chunk and segment.
            raise CorruptDataError(
                f"reading inode {self.handles[fh].ino} at offset {offset}: {exc.message}",
                hint=exc.hint,
            ) from None

    async def _read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self.handles[fh]
        if handle.request is not None and handle.content is None:
            handle.content = await self.control.run(bytes(handle.request))
        if handle.content is not None:
            return handle.content[offset : offset + size]
        if handle.digest is not None:
            end = min(handle.digest.size, offset + size)
            return self._read_base(handle.digest, offset, end) if offset < end else b""
        state = handle.file
        assert state is not None
        end = min(state.size, offset + size)
        if offset >= end:
            return b""
        if not state.changed:
            return self._read_base(state.base, offset, end)
        pieces: list[bytes | memoryview] = []
        for from_spool, start, stop in state.ranges(offset, end):
            if from_spool:
                pieces.append(self._read_spool(state, start, stop))
            else:
                pieces.append(self._read_base(state.base, start, stop))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_base(self, base: Digest | None, start: int, stop: int) -> bytes | memoryview:
        if base is None:
            return bytes(stop - start)
        pieces = list(self.store.iter_object(base, start, stop - start))
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _read_spool(self, state: OpenFile, start: int, stop: int) -> bytes:
        if state.spool is None:
            return bytes(stop - start)
        try:
            data = os.pread(state.spool, stop - start, start)
        except OSError as exc:
            raise from_oserror(exc, "reading a spool file") from None
        if len(data) < stop - start:  # a hole at the end of the spool
            data += bytes(stop - start - len(data))
        return data

    def _compose(
        self, state: OpenFile, offset: int = 0, end: int | None = None
    ) -> Iterator[bytes | memoryview]:
        """The file's current content (or a range of it), in pieces (run in a
        worker thread)."""
        end = state.size if end is None else end
        for from_spool, start, stop in list(state.ranges(offset, end)):
            for piece_start in range(start, stop, _PIECE):
                piece_stop = min(stop, piece_start + _PIECE)
                if from_spool:
                    yield self._read_spool(state, piece_start, piece_stop)
                elif state.base is None:
                    yield bytes(piece_stop - piece_start)
                else:
                    yield from self.store.iter_object(
                        state.base, piece_start, piece_stop - piece_start
                    )

    async def _publish_in_background(self, state: OpenFile) -> None:
        try:
            await self._publish(state, durable=False)
        except CachefsError as exc:
            self.errors += 1
            log.error("publishing inode %d failed (it is retried at close): %s", state.ino, exc)
        finally:
            state.publishing -= 1
            if state.opens == 0 and state.publishing == 0:
                self._drop_state(state)

    def _store(self, state: OpenFile, *, durable: bool) -> Digest | None:
        """Store a file's content and point its inode at it (in a worker thread:
        the caller holds the file's lock, so nothing changes meanwhile).

        Every publication is durable (its segment bytes are synced before the
        index commits, in group commits), fsync or not: a machine crash must
        never leave the index naming bytes that did not reach the disk.
        ``durable`` only makes an empty file's publication wait for a sync."""
        if state.size == 0:
            self.namespace.clear_content(state.ino, state.mtime_ns, state.ctime_ns)
            if durable:
                self.store.sync()
            return None
        namespace = self.namespace

        def hook(txn: lmdb.Transaction, digest: Digest) -> None:
            # The times as they are when the publication commits: a utimensat()
            # that came in meanwhile (rsync does one right after close) wins.
            namespace.set_content(txn, state.ino, digest, state.mtime_ns, state.ctime_ns)

        base = state.base
        if state.base_limit == 0 and state.spool is not None:
            # All of it is in the spool (as long as the file): read it straight.
            with open(os.dup(state.spool), "rb", buffering=0) as spool:
                spool.seek(0)  # a duplicate shares the (unused) offset of the original
                return self.store.put(spool, on_publish=hook)
        if base is None or state.base_limit == 0:
            return self.store.put(self._compose(state), on_publish=hook)
        # A new revision: only the regions around the changes are chunked again.
        changed = list(state.dirty)
        if state.size > state.base_limit:
            changed.append((state.base_limit, state.size))
        return self.store.put_revision(
            base,
            state.size,
            changed,
            functools.partial(self._compose, state),
            on_publish=hook,
        )

    def _stored(self, state: OpenFile, digest: Digest | None) -> None:
        """The file's content is ``digest`` now: nothing is unpublished."""
        state.base = digest
        state.base_limit = state.size
        state.dirty.clear()
        if state.spool is not None:
            os.ftruncate(state.spool, 0)
        state.changed = False
        state.unpublished = 0

    async def _publish(self, state: OpenFile, *, durable: bool) -> None:
        """Store the file's new content and point its inode at it."""
        state.publishing += 1
        try:
            async with state.lock:
                if state.changed and self._orphaned(state.ino):
                    return  # unlinked: its writes stay readable in the spool, never stored
                if not state.changed:
                    if durable:
                        await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)
                    return
                store = functools.partial(self._store, state, durable=durable)
                if state.size <= _INLINE_PUBLISH and not self.maintenance:
                    # Cheaper than a hop to a worker thread and back (and than
                    # the wait for the GIL that the hop would cost the loop).
                    digest = store()
                else:
                    digest = await trio.to_thread.run_sync(store, limiter=self.limiter)
                self._stored(state, digest)
                self.caches.published()
                if self.tracer is not None:
                    self.tracer.file_event("write", state.ino, state.size)
        finally:
            state.publishing -= 1

    async def fsync(self, fh: int) -> None:
        handle = self.handles[fh]
        if handle.file is not None:
            await self._publish(handle.file, durable=True)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None or handle.file is None:
            return
        state = handle.file
        state.opens -= 1
        if state.opens > 0:
            return
        try:
            await self._publish(state, durable=False)
        finally:
            if state.opens == 0 and state.publishing == 0:
                self._drop_state(state)

    def _orphaned(self, ino: int) -> bool:
        try:
            return self.namespace.get(ino).nlink == 0
        except FsError:
            return True

    def _drop_state(self, state: OpenFile) -> None:
        if self.files.get(state.ino) is not state or state.opens or state.publishing:
            return
        if state.changed and not self._orphaned(state.ino):
            return  # publication failed: keep the data for the next attempt
        del self.files[state.ino]
        self._generations[state.ino] = state.generation
        if state.spool is not None:
            os.close(state.spool)
            state.spool = None
        self._delete_orphans([state.ino])
        self._restore_reserve()
        if self.wal.size >= _LOG_RESTART and not self._checkpointing:
            self._restart_log()

    def _restart_log(self) -> None:
        """Empty the write-ahead log if everything it holds has been published."""
        if any(other.changed for other in self.files.values()):
            return
        try:
            self.wal.checkpoint()
        except CachefsError as exc:
            log.warning("could not restart the write-ahead log: %s", exc)

    # --- traces ----------------------------------------------------------------------------

    def start_trace(self, path: Path) -> None:
        """Record file accesses to ``path`` (JSON lines, see ``trace.py``)."""
        self.stop_trace()
        self.tracer = TraceRecorder(self, path)
        log.info("recording a file-access trace to %s", path)

    def stop_trace(self) -> int:
        """Stop recording; returns the number of records written."""
        tracer, self.tracer = self.tracer, None
        if tracer is None:
            return 0
        tracer.close()
        log.info("stopped the trace %s: %d records", tracer.path, tracer.records)
        return tracer.records

    # --- extended attributes ---------------------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes, uid: int | None = None) -> None:
        """``uid``: the caller (None: trusted).  Marking a directory as a cache
        makes its files evictable: only its owner (or root) may."""
        _real(ino)
        self._check_writable()
        if name == CACHE_XATTR:
            self._check_owner(ino, uid)
            self.caches.mark(ino, value)
            return
        self.namespace.setxattr(ino, name, value)

    def removexattr(self, ino: int, name: bytes, uid: int | None = None) -> None:
        _real(ino)
        self._check_writable()
        if name == CACHE_XATTR:
            self._check_owner(ino, uid)
            self.caches.unmark(ino)
            return
        self.namespace.removexattr(ino, name)

    def _check_owner(self, ino: int, uid: int | None) -> None:
        if uid not in (None, 0) and self.namespace.get(ino).uid != uid:
            raise FsError(errno.EPERM, "only the owner of a directory may make it a cache")

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        if is_virtual(ino):
            return None
        if name == CACHE_XATTR:
            return self.caches.setting_of(ino)
        return self.namespace.getxattr(ino, name)

    def listxattr(self, ino: int) -> list[bytes]:
        if is_virtual(ino):
            return []
        names = self.namespace.listxattr(ino)
        if ino in self.caches.dirs:
            names.append(CACHE_XATTR)
        return names

    def digest_of(self, ino: int) -> Digest:
        if is_virtual(ino):
            return self.control.digest(ino)
        inode = self.namespace.get(ino)
        if not inode.is_reg:
            raise FsError(errno.ENODATA)
        digest = inode.digest
        if digest is None:
            return Digest(self.store.digest_function.hash(b""), 0)
        return digest

    async def published_digest(self, ino: int) -> Digest:
        """The whole-file digest, publishing unpublished writes first."""
        state = self.files.get(ino)
        if state is not None and state.changed:
            await self._publish(state, durable=False)
        return self.digest_of(ino)

    # --- figures ------------------------------------------------------------------------------

    def statfs(self) -> tuple[os.statvfs_result, int, int]:
        """(statvfs of the store's filesystem, inodes in use, open files)."""
        try:
            vfs = os.statvfs(self.store.path)
        except OSError as exc:
            raise from_oserror(exc, "reading the store's filesystem figures") from None
        used, _ = self.namespace.counts()
        return vfs, used, len(self.files)


def _unpublished_bytes(state: OpenFile) -> int:
    return sum(stop - start for start, stop in state.dirty) + state.size - state.base_limit


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


def _real(ino: int, name: bytes | None = None) -> None:
    """Refuse changes to the control directory (and to its name in the root)."""
    if is_virtual(ino) or (ino == ROOT_INODE and name == CONTROL_NAME):
        raise FsError(errno.EPERM, "the control directory /.cachefs cannot be changed")


__all__ = ["Filesystem", "Handle", "OpenFile"]
