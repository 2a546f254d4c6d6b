"""I/O on open files: open, read, write, truncate, fsync, release (filesystem layer).

Every ``write`` and truncation is logged to the journal (``_journal.py``),
then applied to the file's spool (``_files.py``).  This module also decides
when a file is published (``_publish.py`` says how): on ``fsync``, when the
last handle is released, when its unpublished bytes pass the publish
threshold (in the background), and when the journal passes its limit (the
files with the most unpublished bytes first, the rest carried over).  Small
new files released one after another are published together, a moment
later (``FilePublisher.publish_together``).  Reads never wait for
publications: they compose the spool and the base.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from cachefs import tracing
from cachefs.engine import (
    CachefsError,
    CorruptDataError,
    FsError,
    Inode,
    Namespace,
    ObjectNotFoundError,
    Store,
    hold,
)
from cachefs.errors import HealElsewhere, RemoteError, from_oserror
from cachefs.format.schema import MAX_FILE_SIZE
from cachefs.fs._caches import CacheDirs
from cachefs.fs._control import ControlTree, is_virtual
from cachefs.fs._events import Listeners
from cachefs.fs._fetch_ahead import FetchAhead
from cachefs.fs._files import (
    CommandHandle,
    ContentHandle,
    FileHandle,
    Handle,
    Handles,
    ObjectHandle,
    OpenFile,
    OpenFiles,
)
from cachefs.fs._journal import FileJournal
from cachefs.fs._lookups import Lookups
from cachefs.fs._publish import BATCH_BYTES, BATCH_DELAY, BATCH_FILES, FilePublisher

log = logging.getLogger(__name__)


#: Chunks one read may heal or fetch, one after the other.
HEAL_ROUNDS = 16


class FileIO:
    """The data side of a mounted store's files.  Use from one trio thread."""

    def __init__(
        self,
        store: Store,
        namespace: Namespace,
        files: OpenFiles,
        handles: Handles,
        journal: FileJournal,
        publisher: FilePublisher,
        lookups: Lookups,
        control: ControlTree,
        *,
        caches: CacheDirs,
        listeners: Listeners,
        check_writable: Callable[[int], None],
        on_error: Callable[[CachefsError], None],
        publish_threshold: int,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.files = files
        self.handles = handles
        self.journal = journal
        self.publisher = publisher
        self.lookups = lookups
        self.control = control
        self.caches = caches
        self.listeners = listeners
        self.check_writable = check_writable
        self.on_error = on_error
        self.publish_threshold = publish_threshold
        #: Where background publications run (set while the filesystem runs).
        self.nursery: trio.Nursery | None = None
        self.ahead = FetchAhead(store, lambda: self.nursery)
        self._carrying_over = False
        #: Released files waiting to be published together, and their bytes.
        self._released: dict[int, OpenFile] = {}
        self._released_bytes = 0
        self._batch_full = trio.Event()
        #: The trace context of the first traced release among them (its
        #: request's span is the parent of their publication's).
        self._released_trace: Any = None
        publisher.on_written = self._written
        publisher.unlinks_of = lookups.unlinks_of
        lookups.forgotten = self.forgotten

    def unlinked(self, inode: Inode) -> None:
        """A file lost an entry (``inode`` as it is now, its size made the size
        it has with its unpublished writes).  Without a name left it is an
        orphan until the kernel forgets it and it is closed; its unpublished
        writes are never published, and stay readable while it is open or the
        kernel knows it (a process that found its name before may open it)."""
        state = self.files.get(inode.ino)
        if state is not None:
            inode.size = state.size
        if inode.nlink > 0:
            return
        self.lookups.orphans.add(inode.ino)
        if state is not None and state.opens == 0 and state.publishing == 0:
            self._drop_state(state)

    async def open(self, ino: int, flags: int, *, created: bool = False) -> tuple[int, bool]:
        """Open a file; returns (handle, whether the kernel may keep its cached pages).
        ``created``: the file was just created (not a cache hit).

        The content of a control file that changes (``stats.json``) is fixed at
        open and must be read with direct I/O (``is_volatile``)."""
        writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        if is_virtual(ino):
            handle = self.control.open(ino, writable)
            if isinstance(handle, ObjectHandle):
                self._hold(handle)
            return self.handles.add(handle), True
        inode = self.namespace.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not inode.is_reg:
            raise FsError(errno.EINVAL)
        if writable:
            self.check_writable(ino)
        state = self.files.state(inode)
        state.opens += 1
        state.writers += writable
        if not created:
            for listener in self.listeners:
                listener.opened(ino, state.size)
        fh = self.handles.add(FileHandle(state, writable, bool(flags & os.O_APPEND)))
        try:
            if flags & os.O_TRUNC and writable:
                await self.truncate(ino, 0)
        except BaseException:
            await self.release(fh)
            raise
        return fh, self.files.keep_cache(state)

    def _hold(self, handle: ObjectHandle) -> None:
        """Keep an object opened by its digest while it is open, as an unlinked
        file is kept: by an orphan that holds a reference to it (deleted at the
        release, or by the next mount after a crash).  A store that cannot
        take it (read-only, full) opens the object unkept."""
        if self.store.readonly or self.store.health.failsafe is not None:
            return  # nothing deletes it (failsafe: the index is not written)
        try:
            handle.holder = hold(self.namespace, handle.digest)
        except ObjectNotFoundError:
            raise FsError(errno.ENOENT, f"object {handle.digest} is no longer stored") from None
        except CachefsError as exc:
            log.warning(
                "object %s opened without being kept while open (%s): "
                "if its last file goes meanwhile, reads of it fail with ESTALE",
                handle.digest, exc.message,
            )  # fmt: skip
            return
        self.lookups.orphans.add(handle.holder)

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        handle = self.handles[fh]
        if isinstance(handle, CommandHandle):
            handle.request += data
            handle.answer = None
            return len(data)
        if not isinstance(handle, FileHandle) or not handle.writable:
            raise FsError(errno.EBADF)
        state = handle.file
        self.check_writable(state.ino)
        async with state.lock:
            if handle.append:
                offset = state.size
            data = _fitting(offset, data)
            growth = offset + len(data) - state.size
            if growth > 0 or self.caches.max_store_size is not None:
                await self.caches.make_room(state.ino, max(0, growth))
                if handle.append:
                    offset = state.size
                    data = _fitting(offset, data)
            self.journal.changing(state)
            old_size = state.size
            if state.stream is not None and offset == old_size and self.journal.spooled(state):
                # Streaming: the bytes go to the spool only, and the record
                # that follows names them there.
                written = state.apply_write(offset, data)
                try:
                    self.journal.wrote(state, offset, written)
                except BaseException:  # not logged: the write did not happen
                    state.cut_spool(old_size)
                    state.size = old_size
                    raise
            else:
                self.journal.write(state, offset, data)
                written = state.apply_write(offset, data)
            state.unpublished += written
            if self.nursery is not None:
                self.publisher.streams.wrote(state, offset, old_size, self.nursery)
        if growth > 0:
            self._resized(state)
        if self.nursery is not None:
            if state.unpublished >= self.publish_threshold:
                state.unpublished = 0
                state.publishing += 1
                self.nursery.start_soon(self._publish_in_background, state)
            if self.journal.full and not self._carrying_over:
                self._carrying_over = True
                self.nursery.start_soon(self._carry_over)
        return written

    def _resized(self, state: OpenFile) -> None:
        for listener in self.listeners:
            listener.resized(state.ino, state.size)

    async def _carry_over(self) -> None:
        """The journal passed its limit: restart it, carrying over what is unpublished.

        Files whose unpublished bytes would fill more than half of the new
        journal are published first (largest first), so that it starts small
        and files that keep being written do not make it restart again at once.
        """
        try:
            changed = [state for state in self.files if state.changed]
            changed.sort(key=lambda state: state.journal_bytes, reverse=True)
            carried = sum(state.journal_bytes for state in changed)
            for state in changed:
                if carried <= self.journal.log_limit // 2:
                    break
                carried -= state.journal_bytes
                await self.publisher.publish(state, durable=False)
            self.journal.carry_over(self.files)  # no await in there
        except CachefsError as exc:
            self.on_error(exc)
            log.error("journal checkpoint failed: %s", exc)
        finally:
            self._carrying_over = False

    async def truncate(self, ino: int, size: int) -> None:
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG, f"files are at most {MAX_FILE_SIZE} bytes")
        inode = self.namespace.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not inode.is_reg:
            raise FsError(errno.EINVAL)
        state = self.files.state(inode)
        state.publishing += 1  # keeps the state alive while we wait for the lock
        try:
            async with state.lock:
                if size > state.size:
                    await self.caches.make_room(ino, size - state.size)
                if size not in (0, state.size):
                    self.journal.changing(state)
                    self.journal.truncate(state, size)
                self.truncate_locked(state, size, emptied=self.journal.emptied)
        except BaseException:
            state.publishing -= 1
            if state.opens == 0 and state.publishing == 0:
                self._drop_state(state)  # kept if it has changes to publish
            raise
        state.publishing -= 1
        self._resized(state)
        if state.opens == 0 and state.publishing == 0:
            await self.publisher.publish(state, durable=False)
            self._drop_state(state)

    def truncate_locked(
        self, state: OpenFile, size: int, emptied: Callable[[OpenFile], None] | None = None
    ) -> None:
        """Apply a truncation to a file whose lock the caller holds (``emptied``:
        see :func:`truncate_state`)."""
        self.publisher.streams.truncated(state, size)
        truncate_state(self.store, self.namespace, state, size, emptied)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self.handles[fh]
        try:
            # Each round heals or fetches one chunk at least (else it raises):
            # a read spans a few chunks.
            for _ in range(HEAL_ROUNDS):
                try:
                    data = await self._read(handle, offset, size)
                except HealElsewhere as damaged:
                    if damaged.remote:
                        await self._fetch(damaged, handle, fh, offset, offset + size)
                    else:
                        await self._heal(damaged)
                else:
                    self.ahead.read(fh, offset, offset + len(data))
                    return data
            return await self._read(handle, offset, size)
        except HealElsewhere as exc:
            if exc.remote:  # not damage: say what it is
                raise RemoteError(f"reading inode {handle.ino}: {exc.message}") from None
            raise
        except CorruptDataError as exc:
            # Say which file it hit: the store's message names chunk and segment.
            exc.message = f"reading inode {handle.ino} at offset {offset}: {exc.message}"
            raise

    async def _heal(self, damaged: HealElsewhere) -> None:
        """Heal a damaged chunk from the remote tiers in a worker thread (they
        may be slow: never on this one); the damage is recorded if it cannot be."""
        healer = self.store.chunks.healer
        healed = None
        if healer is not None:
            with contextlib.suppress(CachefsError):  # logged by the tiers
                healed = await trio.to_thread.run_sync(healer, damaged.digest, damaged.length)
        if healed is None:
            raise self.store.health.damaged(CorruptDataError(damaged.message))

    async def _fetch(
        self, missing: HealElsewhere, handle: Handle, fh: int, offset: int, end: int
    ) -> None:
        """Have a chunk held only by the remote tiers fetched: ahead of the
        reader, with the chunks after it (``_fetch_ahead.py``), or else with
        those of the next ``OWN`` bytes of the file, in a worker thread;
        RemoteError if the tiers do not give it."""
        restorer = self.store.chunks.restorer
        wanted = [(missing.digest, missing.length)]
        digest = handle.digest if isinstance(handle, ObjectHandle) else None
        if isinstance(handle, FileHandle):
            digest = self.namespace.get(handle.ino).digest
        if digest is not None:
            if await self.ahead.wait(fh, digest, offset, end, missing.digest):
                return
            ahead = self.ahead.own(digest, offset)
            wanted += [item for item in ahead if item[0] != missing.digest]
        failure: CachefsError | None = None
        if restorer is not None:
            try:
                await trio.to_thread.run_sync(restorer, wanted)
            except CachefsError as exc:  # e.g. the disk is full: nothing could be stored
                failure = exc
        if self.store.chunks.held_remotely(missing.digest):
            if failure is not None:
                # The disk here cannot keep them (full): they serve the read all the same.
                needed = [(missing.digest, missing.length)]
                if digest is not None:
                    needed = self.store.reader.held_remotely(digest, offset, end - offset) or needed
                if await trio.to_thread.run_sync(_unstored, self.store, needed):
                    return
                failure.message = f"{missing.message}; storing it here failed: {failure.message}"
                raise failure
            raise RemoteError(
                f"{missing.message}, and none of them gave it",
                hint="check the remote tiers (`cachefs stats` shows their state)",
            )

    async def _read(self, handle: Handle, offset: int, size: int) -> bytes | memoryview:
        if isinstance(handle, CommandHandle):
            if handle.answer is None:
                handle.answer = await self.control.run(bytes(handle.request))
            return handle.answer[offset : offset + size]
        if isinstance(handle, ContentHandle):
            return handle.content[offset : offset + size]
        if isinstance(handle, ObjectHandle):
            end = min(handle.digest.size, offset + size)
            if offset >= end:
                return b""
            try:
                return self.store.read_range(handle.digest, offset, end - offset)
            except ObjectNotFoundError:
                # Opened unkept (``_hold``), its last file went meanwhile
                # (ENOENT is no answer a read may give).
                raise FsError(
                    errno.ESTALE, f"object {handle.digest} was deleted while open"
                ) from None
        if not isinstance(handle, FileHandle):
            raise FsError(errno.EISDIR)
        state = handle.file
        try:
            return self._read_file(state, offset, size)
        except ObjectNotFoundError:
            if not state.lock.locked():
                raise
        # A publication of the file has committed its new content, which dropped
        # the old one (the base read here), and makes it the base once it has
        # the loop again: read once it has.
        async with state.lock:
            return self._read_file(state, offset, size)

    def _read_file(self, state: OpenFile, offset: int, size: int) -> bytes | memoryview:
        end = min(state.size, offset + size)
        if offset >= end:
            return b""
        return state.read(offset, end, self.store.read_range)

    async def _publish_in_background(self, state: OpenFile, *, counted: bool = True) -> None:
        """Publish a file; ``counted``: this publication holds one of the
        file's ``publishing`` counts and lets it go when done (else it is one
        that a batch left, whose content was told of as written)."""
        try:
            await self.publisher.publish(state, durable=False, told=not counted)
        except (CachefsError, OSError) as exc:  # OSError: the spool's disk
            error = exc if isinstance(exc, CachefsError) else from_oserror(exc, "publishing")
            self.on_error(error)
            retry = (
                "it is retried at close" if counted else "kept for the next sync, open or unmount"
            )
            log.error("publishing inode %d failed (%s): %s", state.ino, retry, error)
        finally:
            if counted:
                self._published(state)

    async def fsync(self, fh: int, then: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Publish the file durably; then ``then(ino)`` (the remote tiers' wait)."""
        handle = self.handles[fh]
        if isinstance(handle, FileHandle):
            await self.publisher.publish(handle.file, durable=True)
            if then is not None:
                await then(handle.file.ino)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        self.ahead.released(fh)
        if isinstance(handle, ObjectHandle) and handle.holder is not None:
            self.lookups.release([handle.holder])
        if not isinstance(handle, FileHandle):
            return
        state = handle.file
        state.opens -= 1
        state.writers -= handle.writable
        if state.opens > 0:
            return
        if (
            self.nursery is not None
            and self.publisher.batchable(state)
            and self._publish_soon(state, self.nursery, writable=handle.writable)
        ):
            return
        try:
            await self.publisher.publish(state, durable=False)
        finally:
            if state.opens == 0 and state.publishing == 0:
                self._drop_state(state)

    def _written(self, state: OpenFile) -> None:
        """Tell the listeners that a file's new content is complete."""
        for listener in self.listeners:
            listener.written(state.ino, state.size)

    def _publish_soon(self, state: OpenFile, nursery: trio.Nursery, *, writable: bool) -> bool:
        """Publish a released file with the others released within ``BATCH_DELAY``
        (False: the filesystem has stopped, publish it now).  Its content is
        told of as written now (again only after a writer's release), unless
        it has no name left."""
        waiting = self._released.get(state.ino) is state
        if not self._released:
            try:
                nursery.start_soon(self._publish_released)
            except RuntimeError:  # the nursery is closed
                return False
        if (writable or not waiting) and state.ino not in self.lookups.orphans:
            self._written(state)
        if waiting:
            return True  # opened and released again meanwhile
        state.publishing += 1
        state.waiting = True
        if self._released_trace is None:
            self._released_trace = tracing.recorded_context()
        self._released[state.ino] = state
        self._released_bytes += state.size
        if self._released_bytes >= BATCH_BYTES or len(self._released) >= BATCH_FILES:
            self._batch_full.set()
        return True

    async def _publish_released(self) -> None:
        states: list[OpenFile] | None = None
        try:
            with trio.move_on_after(BATCH_DELAY):
                await self._batch_full.wait()
            trace = self._released_trace
            states = self._take_released()
            try:
                left = await self.publisher.publish_together(states, trace)
            except CachefsError as exc:  # damage: counted (the index's: read-only)
                self.on_error(exc)
                log.error("publishing %d files released together failed: %s", len(states), exc)
                return
            for state in left:
                await self._publish_in_background(state, counted=False)
        finally:  # cancelled while waiting: the filesystem stops (flush_all published them)
            for state in self._take_released() if states is None else states:
                self._published(state)

    def _take_released(self) -> list[OpenFile]:
        states = list(self._released.values())
        self._released = {}
        self._released_bytes = 0
        self._batch_full = trio.Event()
        self._released_trace = None
        for state in states:
            state.waiting = False
        return states

    def _published(self, state: OpenFile) -> None:
        state.publishing -= 1
        if state.opens == 0 and state.publishing == 0:
            self._drop_state(state)

    def settle(self) -> None:
        """Let go of the files nothing holds open any more (after a sync)."""
        for state in self.files:
            if state.opens == 0 and state.publishing == 0:
                self._drop_state(state)
        self.lookups.flush()

    def forgotten(self, ino: int) -> None:
        """The kernel forgot inode ``ino``: an orphan's unpublished writes kept
        for it (``_drop_state``) can go, unless it is open or being published."""
        state = self.files.get(ino)
        if state is not None:
            self._drop_state(state)

    def _drop_state(self, state: OpenFile) -> None:
        if self.files.get(state.ino) is not state or state.opens or state.publishing:
            return
        if state.changed and not self.publisher.orphaned(state.ino):
            return  # publication failed: keep the data for the next attempt
        if state.changed and state.ino in self.lookups.counts:
            # An orphan the kernel still knows: a process that found its name
            # before the unlink (or the rename over it) may open it yet, and
            # must read what was written (``forgotten`` drops it).
            return
        self.publisher.streams.abandon(state, "dropped")
        self.files.remove(state)
        self.lookups.release([state.ino])
        for listener in self.listeners:
            listener.closed(state.ino)
        if not self.store.reserve.held:
            self.store.reserve.ensure()
        if not self._carrying_over:
            self.journal.restart(self.files)


def _unstored(store: Store, chunks: list[tuple[bytes, int]]) -> bool:
    """Chunks held remotely that a read needs, from the tiers into the cache
    of decoded chunks, where a read of such a chunk looks first: they could
    not be stored here (a full disk), and the read is served all the same.
    Whether the cache holds them all now (a worker thread)."""
    healer, cache = store.chunks.healer, store.chunks.cache
    if healer is None:
        return False
    for digest, length in chunks:
        try:
            data = healer(digest, length)  # verified; storing it fails, and is logged
        except CachefsError:
            return False
        if data is None:
            return False
        cache.put(digest, data)
    return all(digest in cache for digest, _ in chunks)


def _fitting(offset: int, data: bytes | memoryview) -> bytes | memoryview:
    """What of a write at ``offset`` fits below MAX_FILE_SIZE (a short write);
    EFBIG if nothing does."""
    if offset + len(data) <= MAX_FILE_SIZE:
        return data
    if offset >= MAX_FILE_SIZE:
        raise FsError(errno.EFBIG, f"files are at most {MAX_FILE_SIZE} bytes")
    return memoryview(data)[: MAX_FILE_SIZE - offset]


def truncate_state(
    store: Store,
    namespace: Namespace,
    state: OpenFile,
    size: int,
    emptied: Callable[[OpenFile], None] | None = None,
) -> None:
    """Apply a truncation to a file's state (its lock held, or in replay).  To
    nothing, the common O_TRUNC case, drops the published content at once, and
    ``emptied`` (the journal's) is told of that before the file's spool is cut:
    what was logged of the file before, which may name that spool's bytes, is
    then never replayed over the empty file."""
    if size == 0:
        if state.size == 0 and state.base is None and not state.changed:
            return
        now = time.time_ns()
        store.freeing(lambda: namespace.clear_content(state.ino, now, now))
        try:
            if emptied is not None:
                emptied(state)
        finally:
            state.emptied()
        return
    if size == state.size:
        return
    state.cut(size)
    state.cut_spool(size)
    state.size = size
    state.changed = True
