"""Filesystem semantics over the store (filesystem layer).

This layer turns the namespace (``engine.Namespace``) and the chunk store into
a POSIX filesystem: lookups and the kernel's lookup counts, open files and
their unpublished writes, truncation, extended attributes, the control
directory.  It knows nothing of pyfuse3: ``cachefs.fuse`` adapts it to the
kernel, and tests drive it directly.  Methods run on the trio thread; ingest
runs in worker threads.  :class:`Filesystem` handles names, attributes and
xattrs itself and puts the other parts together:

* ``_files.py``    open files (base + spool), handles of each kind;
* ``_file_io.py``  open, read, write, truncate, fsync, release; when to publish;
* ``_journal.py``  every write logged to the store's journal, and replay;
* ``_publish.py``  how a file's new content is published (holes as holes);
* ``_sparse.py``   files with holes: ``st_blocks``, digests found in the background;
* ``_scrub.py``    scrub passes, on request and in the background;
* ``_lookups.py``  the kernel's lookup counts, orphans;
* ``_control.py``  the control directory ``/.cachefs``;
* ``_caches.py``, ``_eviction.py``, ``_policy.py``  cache directories;
* ``_trace.py``    access traces; ``_memory.py``  the memory limit;
* ``_events.py``   what this class tells cache directories and traces.

Write path: ``FileIO.write`` -> ``FileJournal.write`` (the store's journal) ->
``OpenFile.apply_write`` (the spool) -> on fsync, last close or the publish
threshold: ``FilePublisher.publish`` -> ``Store.put_revision`` (ingest, then
one transaction that also points the inode at the new object).

Concurrency invariants (all state below is touched only on the trio thread):

* An inode's ``OpenFile`` lives while the file has open handles or a
  publication in flight; its ``lock`` is held while publishing.
* An inode whose last link goes while the kernel still knows it (lookup count
  > 0) or a handle is open becomes an orphan in the namespace; it is deleted
  when the last of both goes (``Lookups``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from cachefs.engine import (
    RENAME_EXCHANGE,
    ROOT_INODE,
    CachefsError,
    CorruptDataError,
    Digest,
    ExtendedAttributes,
    FsError,
    GcReport,
    IndexCorruptError,
    Inode,
    Namespace,
    ReadOnlyError,
    Store,
    collect_garbage,
)
from cachefs.errors import from_oserror
from cachefs.fs._caches import CacheDirs
from cachefs.fs._control import CONTROL_INO, CONTROL_NAME, ControlTree, is_virtual
from cachefs.fs._events import Listeners
from cachefs.fs._file_io import FileIO, truncate_state
from cachefs.fs._files import (
    DirHandle,
    Handles,
    OpenFile,
    OpenFiles,
)
from cachefs.fs._journal import DEFAULT_LOG_LIMIT, FileJournal
from cachefs.fs._lookups import Lookups
from cachefs.fs._memory import DEFAULT_MEMORY_LIMIT, MemoryGovernor
from cachefs.fs._publish import FilePublisher
from cachefs.fs._scrub import Scrubber
from cachefs.fs._settings import CACHE_XATTR
from cachefs.fs._sparse import SparseFiles
from cachefs.fs._stored_files import StoredFiles
from cachefs.fs._tiers import RemoteTiers
from cachefs.fs._trace import TraceRecorder
from cachefs.remote import Tier

log = logging.getLogger(__name__)

#: Unpublished bytes of one file that start a background publication.
DEFAULT_PUBLISH_THRESHOLD = 1 << 30
#: The read-only xattr of every regular file: its digest, ``<hex>/<size>``.
DIGEST_XATTR = b"user.cachefs.digest"


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
        tiers: Sequence[Tier] = (),
    ) -> None:
        if store.journal is None:
            raise ReadOnlyError(f"store {store.path} is open read-only: it cannot be mounted")
        self.store = store
        self.namespace = Namespace(store)
        self.publish_threshold = publish_threshold
        self.limiter = limiter or trio.CapacityLimiter(max(2, store.options.workers))
        self.files = OpenFiles(store.tmp_root)
        self.sparse = SparseFiles(store, self.files)
        self.scrubber = Scrubber(store, self.limiter, self.enter_failsafe)
        self.handles = Handles()
        self.errors = 0
        #: gc runs started by this filesystem (a publication would wait for them).
        self._collecting = 0
        #: Why it went read-only to protect the store (None: it did not; until fsck).
        self.failsafe: str | None = store.health.failsafe
        self.control = ControlTree(store, self.figures, self)
        self.journal = FileJournal(store.journal, log_limit=log_limit)
        self.lookups = Lookups(self.namespace, self.files, self.control, self.journal)
        self.xattrs = ExtendedAttributes(self.namespace)
        self.listeners = Listeners()
        #: Tells the kernel that an entry is gone (set by the FUSE adapter).
        self.invalidate: Callable[[int, bytes, int], None] | None = None
        self.tracer: TraceRecorder | None = None
        if self.failsafe is not None:
            log.critical("read-only: damage was found (%s); fsck --repair clears it", self.failsafe)
        self.lookups.purge()
        store.reserve.ensure()
        self.publisher = FilePublisher(
            store,
            self.namespace,
            self.limiter,
            on_published=self._published,
            maintenance=lambda: bool(self._collecting) or store.maintenance_pending,
        )
        #: The remote tiers (none unless given): the replay may read their chunks.
        self.remote = RemoteTiers(store, tiers)
        self.journal.replay(
            self.namespace,
            self.files,
            functools.partial(truncate_state, store, self.namespace),
            self.publisher.publish_now,
        )
        # After the replay: the sizes it published are the ones that count.
        self.caches = CacheDirs(
            self.namespace,
            store,
            self.files,
            on_evicted=self._evicted,
            collect_garbage=self.collect_garbage,
            on_error=self._background_error,
            max_store_size=max_store_size,
        )
        self.listeners.add(self.caches)
        self.caches.eviction.release_orphans = self.lookups.flush
        self.memory = MemoryGovernor(store, memory_limit)
        #: Whole files the servers store and read (``_stored_files.py``).
        self.stored = StoredFiles(
            store,
            self.namespace,
            self.caches,
            self.listeners,
            rename=lambda old, name, new, new_name: self.rename(old, name, new, new_name, 0),
            unlink=self.unlink,
            changed=self._changed_here,
            unlinks=self.lookups,
        )
        self.shared = self.remote.share(self)  # shared cache directories
        self.io = FileIO(
            store,
            self.namespace,
            self.files,
            self.handles,
            self.journal,
            self.publisher,
            self.lookups,
            self.control,
            caches=self.caches,
            listeners=self.listeners,
            check_writable=self._check_writable,
            on_error=self._background_error,
            publish_threshold=publish_threshold,
        )

    def close(self) -> None:
        """After the last request: every file must have been published (flush_all)."""
        self.caches.save()
        self.remote.close()
        self.sparse.close()
        self.stop_trace()
        self.lookups.flush()
        self.journal.closing(self.files)
        self.files.close()

    # --- lifecycle ----------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve background publications, eviction and the memory limit until cancelled."""
        async with trio.open_nursery() as nursery:
            self.io.nursery = self.lookups.nursery = nursery
            nursery.start_soon(self.caches.eviction.run)
            nursery.start_soon(self.memory.run)
            nursery.start_soon(self.remote.run)
            task_status.started()
            await trio.sleep_forever()

    async def flush_all(self) -> None:
        """Publish every unpublished write, commit the unlinks, durably (unmount, sync)."""
        try:
            self.lookups.commit_unlinks()  # made durable by the sync that ends the flush
        finally:
            try:
                await self.publisher.flush_all(self.files)
            finally:
                self.io.settle()

    async def collect_garbage(self, threshold: float | None = None) -> GcReport:
        """Run gc in a worker thread (``/.cachefs/control``, the store quota)."""
        self.lookups.flush()  # orphans released but not yet deleted
        self._collecting += 1
        try:
            report = await trio.to_thread.run_sync(
                lambda: collect_garbage(self.store, threshold=threshold), limiter=self.limiter
            )
        finally:
            self._collecting -= 1
        self.caches.eviction.refresh_stored()
        return report

    def damaged(self, exc: CorruptDataError) -> None:
        """A request met damage: the store counts it; damaged index: read-only."""
        self.store.damaged(exc)
        if isinstance(exc, IndexCorruptError):
            self.enter_failsafe(str(exc))

    def enter_failsafe(self, reason: str) -> None:
        """Refuse every change from now on (EROFS): the store may be damaged."""
        if self.failsafe is None:
            self.failsafe = reason
            self.store.health.protect(reason)
            log.critical(
                "the file system is read-only from now on to protect the store: %s; "
                "unmount it and run `cachefs fsck %s`",
                reason,
                self.store.path,
            )

    def _check_writable(self, ino: int, name: bytes | None = None) -> None:
        """Refuse changes in failsafe mode, and to /.cachefs; commit the unlinks they need."""
        if is_virtual(ino) or (ino == ROOT_INODE and name == CONTROL_NAME):
            raise FsError(errno.EPERM, "the control directory /.cachefs cannot be changed")
        if self.failsafe is not None:
            raise ReadOnlyError(
                f"the file system went read-only after damage ({self.failsafe})",
                hint=f"unmount and run `cachefs fsck {self.store.path}`",
            )
        self.lookups.changing(ino, name)

    def _background_error(self, exc: CachefsError) -> None:
        self.errors += 1
        if isinstance(exc, CorruptDataError):  # as a request's: counted; the index's: read-only
            self.damaged(exc)

    def figures(self) -> dict[str, Any]:
        """The live figures of the store and the mount (``stats.json``)."""
        used, _ = self.namespace.counts()
        doc: dict[str, Any] = self.store.stats().as_dict()
        doc |= {
            "store": str(self.store.path),
            "inodes": used,
            "open_files": len(self.files),
            "ingest_streams": self.publisher.streams.figures(),
            "corruptions": self.store.corruptions,
            "needs_fsck": self.store.needs_fsck,
            "recent_damage": self.store.health.recent,
            "errors": self.errors,
            "failsafe": self.failsafe,
            "pid": os.getpid(),
            "tracing": None if self.tracer is None else str(self.tracer.path),
        }
        return doc | self.memory.figures() | self.caches.figures() | self.remote.figures()

    # --- events and lookup counts ------------------------------------------------------

    def _published(self, state: OpenFile) -> None:
        for listener in self.listeners:
            listener.published(state.ino, state.size)

    def _evicted(self, parent: int, name: bytes, inode: Inode) -> None:
        """A cache evicted an entry: the kernel forgets it (and its inode, if deleted)."""
        if inode.nlink == 0:
            self.files.forget(inode.ino)
        for listener in self.listeners:
            listener.evicted(parent, name, inode)
        if self.invalidate is not None:
            self.invalidate(parent, name, inode.ino if inode.nlink == 0 else 0)

    def _changed_here(self, parent: int, name: bytes) -> None:
        """An entry changed, not through the kernel (a server): the kernel looks again."""
        if self.invalidate is not None:
            self.invalidate(parent, name, 0)

    def forget(self, pairs: list[tuple[int, int]]) -> None:
        """The kernel dropped lookups (see ``Lookups.forget``)."""
        self.lookups.forget(pairs)

    # --- attributes and names ------------------------------------------------------------

    def getattr(self, ino: int) -> Inode:
        if is_virtual(ino):
            return self.control.getattr(ino)
        inode = self.lookups.attributes(self.namespace.get(ino))
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
            self.lookups.settle(parent, name)
            ino = self.namespace.lookup(parent, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                for listener in self.listeners:
                    listener.missed(parent, name)
            raise
        inode = self.getattr(ino)
        self.lookups.remember(inode.ino)
        for listener in self.listeners:
            listener.looked_up(parent, name, inode)
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
        self._check_writable(ino)
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
        self._check_writable(parent, name)
        inode = self.namespace.create(parent, name, mode, uid, gid, rdev=rdev, target=target)
        self.lookups.remember(inode.ino)
        for listener in self.listeners:
            listener.created(parent, name, inode)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self._check_writable(ino)
        self._check_writable(parent, name)
        self.namespace.link(ino, parent, name)
        self.lookups.remember(ino)
        inode = self.getattr(ino)
        for listener in self.listeners:
            listener.linked(parent, name, inode)
        return inode

    def unlink(self, parent: int, name: bytes, *, directory: bool = False) -> None:
        self._check_writable(parent, name)
        inode = self.lookups.unlink(parent, name, directory=directory)
        self.io.unlinked(inode)
        for listener in self.listeners:
            listener.removed(parent, name, inode)

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._check_writable(old_parent, old_name)
        self._check_writable(new_parent, new_name)
        in_use = set()
        moved = self.namespace.get(self.namespace.lookup(old_parent, old_name))
        target: Inode | None = None
        with contextlib.suppress(FsError):
            target = self.namespace.get(self.namespace.lookup(new_parent, new_name))
        if target is not None:
            self.lookups.replacing(target.ino)  # the unlinks of its other names, first
            if self.lookups.in_use(target.ino):
                in_use.add(target.ino)
        replaced = self.store.freeing(
            lambda: self.namespace.rename(
                old_parent, old_name, new_parent, new_name, flags, in_use=in_use
            )
        )
        if replaced is not None:
            self.io.unlinked(replaced)
            for listener in self.listeners:
                listener.replaced(new_parent, new_name, replaced)
        exchanged = target if flags & RENAME_EXCHANGE else None
        for listener in self.listeners:
            listener.renamed(moved, (old_parent, old_name), (new_parent, new_name), exchanged)

    def readlink(self, ino: int) -> bytes:
        inode = self.getattr(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target

    def opendir(self, ino: int) -> int:
        inode = self.getattr(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return self.handles.add(DirHandle(ino))

    def readdir(self, fh: int, start: int) -> list[tuple[bytes, Inode]]:
        """Entries from position ``start`` on (a snapshot taken at the first call),
        "." and ".." first (these two do not count as lookups)."""
        handle = self.handles[fh]
        if not isinstance(handle, DirHandle):
            raise FsError(errno.ENOTDIR)
        if is_virtual(handle.ino):
            handle.entries = self.control.entries(handle.ino)
        elif handle.entries is None or start == 0:
            self.lookups.settle(handle.ino)
            with self.namespace.read() as txn:
                dot = self.namespace.get(handle.ino, txn)
                dotdot = self.namespace.get(self.namespace.parent_of(handle.ino, txn), txn)
            handle.entries = [(b".", dot), (b"..", dotdot), *self.namespace.entries(handle.ino)]
            for _, inode in handle.entries:
                self.lookups.attributes(inode)  # (another name's unlink, not yet committed)
                state = self.files.get(inode.ino)
                if state is not None and state.changed:
                    inode.size = state.size
                    inode.mtime_ns = state.mtime_ns
        return handle.entries[start:]

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)

    # --- open files ------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, *, created: bool = False) -> tuple[int, bool]:
        """(handle, whether the kernel may keep its cached pages); ``created``: not a hit."""
        return await self.io.open(ino, flags, created=created)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        return await self.io.read(fh, offset, size)

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        return await self.io.write(fh, offset, data)

    async def truncate(self, ino: int, size: int) -> None:
        await self.io.truncate(ino, size)

    async def fsync(self, fh: int) -> None:
        await self.io.fsync(fh, then=self.remote.durable)

    async def release(self, fh: int) -> None:
        await self.io.release(fh)

    # --- traces ----------------------------------------------------------------------------

    def start_trace(self, path: Path) -> None:
        """Record file accesses to ``path`` (JSON lines, see ``_trace.py``)."""
        self.stop_trace()
        self.tracer = TraceRecorder(
            path, self.namespace.path_of, self.caches.cache_dir_of, self.stop_trace
        )
        self.listeners.add(self.tracer)
        log.info("recording a file-access trace to %s", path)

    def stop_trace(self) -> int:
        """Stop recording; returns the number of records written."""
        tracer, self.tracer = self.tracer, None
        if tracer is None:
            return 0
        self.listeners.remove(tracer)
        tracer.close()
        log.info("stopped the trace %s: %d records", tracer.path, tracer.records)
        return tracer.records

    # --- extended attributes ---------------------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes, uid: int | None = None) -> None:
        """``uid``: the caller (None: trusted).  Marking a directory as a cache
        makes its files evictable: only its owner (or root) may."""
        if name == DIGEST_XATTR:
            raise FsError(errno.EPERM, f"{DIGEST_XATTR.decode()} is read-only")
        self._check_writable(ino)
        if name == CACHE_XATTR:
            self._check_owner(ino, uid)
            self.caches.mark(ino, value)
            return
        self.xattrs.set(ino, name, value)

    def removexattr(self, ino: int, name: bytes, uid: int | None = None) -> None:
        if name == DIGEST_XATTR:
            raise FsError(errno.EPERM, f"{DIGEST_XATTR.decode()} is read-only")
        self._check_writable(ino)
        if name == CACHE_XATTR:
            self._check_owner(ino, uid)
            self.caches.unmark(ino)
            return
        self.xattrs.remove(ino, name)

    def _check_owner(self, ino: int, uid: int | None) -> None:
        if uid not in (None, 0) and self.namespace.get(ino).uid != uid:
            raise FsError(errno.EPERM, "only the owner of a directory may make it a cache")

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """An attribute's value (ENODATA when it has none)."""
        value = None
        if name == DIGEST_XATTR:
            value = str(await self.published_digest(ino)).encode()
        elif is_virtual(ino):
            value = None
        elif name == CACHE_XATTR:
            value = self.caches.setting_of(ino)
        else:
            value = self.xattrs.get(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        if is_virtual(ino):
            names = []
        else:
            names = self.xattrs.names(ino)
            if ino in self.caches.dirs:
                names.append(CACHE_XATTR)
        inode = self.getattr(ino)
        if inode.is_reg and self.sparse.digest_known(inode):
            names.append(DIGEST_XATTR)
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
        """The whole-file digest, publishing unpublished writes first (EAGAIN
        while a sparse file's is being computed: ``_sparse.py``)."""
        state = self.files.get(ino)
        if state is not None and state.changed:
            await self.publisher.publish(state, durable=False)
        return self.sparse.content(self.digest_of(ino), self.io.nursery)

    # --- figures ------------------------------------------------------------------------------

    def statfs(self) -> tuple[os.statvfs_result, int, int]:
        """(statvfs of the store's filesystem, inodes in use, open files)."""
        try:
            vfs = os.statvfs(self.store.path)
        except OSError as exc:
            raise from_oserror(exc, "reading the store's filesystem figures") from None
        used, _ = self.namespace.counts()
        return vfs, used, len(self.files)
