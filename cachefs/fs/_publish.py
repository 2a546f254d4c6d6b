"""Publishing files: a file's new content through the dedup pipeline (filesystem layer).

A file's new content (its base and spool composed, ``_files.py``) goes
through the engine's ingest (only the regions around the changes are
chunked again: ``Store.put_revision``), and the same transaction points the
inode at it (``Namespace.set_content``, run as the publication's hook).  The
filesystem publishes a file

* on ``fsync``,
* when the last handle of the file is released,
* when a file's unpublished bytes pass the publish threshold (in the background).

A new file written from start to end has been ingested while it was written
(``_streams.py``): its publication takes that object when it can.

Holes (``HOLE_MIN`` bytes or more that were never written: truncated up,
skipped by a seek) are stored as holes, so that publication reads and stores
only a file's data, whatever its size: ``Store.put_sparse``.

Every publication is durable (segment bytes synced before the index commits),
so that the index never names bytes a machine crash could lose.  Files up to
``INLINE_PUBLISH`` bytes are published on the loop's thread (cheaper than a
hop to a worker thread and back), unless maintenance holds the store: a
publication then waits for it, which the loop's thread must never do.

Small new files released within ``BATCH_DELAY`` of each other (a build's
outputs, an unpacked tree) are published together (:meth:`FilePublisher.
publish_together`): one transaction, and one sync of each segment and of the
index for all of them, where each file alone costs its own.  A release
promises nothing durable (``fsync`` does), and the journal keeps their writes
meanwhile.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import lmdb
import trio

from cachefs import tracing
from cachefs.engine import CachefsError, CorruptDataError, Digest, FsError, Namespace, Store
from cachefs.errors import HealElsewhere, from_oserror
from cachefs.fs._files import OpenFile
from cachefs.fs._streams import Hook, Streams

log = logging.getLogger(__name__)

#: Files up to this size are published on the event loop's thread.
INLINE_PUBLISH = 256 * 1024
#: Seconds a small file released waits to be published with the others of the moment.
BATCH_DELAY = 0.02
#: Released files (or their bytes) published together however recent.
BATCH_FILES = 256
BATCH_BYTES = 4 * INLINE_PUBLISH
#: Runs of zeros at least this long that a file never had written (truncated
#: up, or skipped by a seek) are stored as holes; shorter ones as data.
HOLE_MIN = 1 << 20


def _spool_size(state: OpenFile) -> int | None:
    """The length of a file's spool (None: it has none); shorter than the file
    when the file was truncated up (past its end the spool reads as zeros)."""
    return None if state.spool is None else os.fstat(state.spool).st_size


def _reading(state: OpenFile) -> BinaryIO:
    """A file's spool opened for reading on its own (others move the offset of
    the spool's descriptor: SEEK_DATA)."""
    try:
        return open(f"/proc/self/fd/{state.spool}", "rb", buffering=0)
    except OSError as exc:
        raise from_oserror(exc, "opening a spool file") from None


def _between(holes: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The [start, stop) regions of ``[0, size)`` that are not in ``holes``."""
    regions = []
    position = 0
    for start, stop in holes:
        if start > position:
            regions.append((position, start))
        position = stop
    if position < size:
        regions.append((position, size))
    return regions


class FilePublisher:
    """Stores files' new content and points their inodes at it."""

    def __init__(
        self,
        store: Store,
        namespace: Namespace,
        limiter: trio.CapacityLimiter,
        *,
        on_published: Callable[[OpenFile], None],
        maintenance: Callable[[], bool],
    ) -> None:
        """``on_published``: told of each publication; ``maintenance``: whether
        maintenance holds (or is about to hold) the store."""
        self.store = store
        self.namespace = namespace
        self.limiter = limiter
        self.on_published = on_published
        self.maintenance = maintenance
        #: Files ingested as they are written (``_streams.py``).
        self.streams = Streams(store, self.hook)
        #: Told of a file whose new content a publication is about to store
        #: (set by the file I/O: it tells the listeners).
        self.on_written: Callable[[OpenFile], None] = lambda state: None
        #: How many entries of an inode are unlinked but not yet committed
        #: (``Lookups.unlinks_of``: set by the file I/O).
        self.unlinks_of: Callable[[int], int] = lambda ino: 0

    def hook(self, state: OpenFile) -> Hook:
        """What a publication of ``state`` runs in its transaction: the inode
        points at the object."""
        namespace = self.namespace

        def hook(txn: lmdb.Transaction, digest: Digest) -> None:
            # The times as they are when the publication commits: a utimensat()
            # that came in meanwhile (rsync does one right after close) wins.
            namespace.set_content(txn, state.ino, digest, state.mtime_ns, state.ctime_ns)
            state.committing = (digest,)

        return hook

    def store_content(self, state: OpenFile, *, durable: bool) -> Digest | None:
        """Store a file's content and point its inode at it (in a worker thread:
        the caller holds the file's lock, so nothing changes meanwhile).

        Every publication is durable (its segment bytes are synced before the
        index commits, in group commits), fsync or not: a machine crash must
        never leave the index naming bytes that did not reach the disk.
        ``durable`` only makes an empty file's publication wait for a sync."""
        store = self.store
        if state.size == 0:
            self.namespace.clear_content(state.ino, state.mtime_ns, state.ctime_ns)
            state.committing = (None,)
            if durable:
                try:
                    store.sync()
                except CachefsError as exc:  # (shared by a group commit's publications)
                    failure = copy.copy(exc)
                    failure.committed = True
                    raise failure from exc
            return None
        hook = self.hook(state)
        base = state.base
        base_holes = [] if base is None or state.base_limit == 0 else store.holes(base)
        holes = [] if state.size < HOLE_MIN else state.holes(base_holes, HOLE_MIN)
        if holes:
            # Holes are stored as holes: only the data between them is read.
            return store.put_sparse(
                state.size,
                _between(holes, state.size),
                functools.partial(state.compose, store.iter_object),
                on_publish=hook,
            )
        if state.base_limit == 0 and _spool_size(state) == state.size:
            # All of it is in the spool: read it straight, through an open file
            # of its own (others move the offset of the spool's: SEEK_DATA).
            with _reading(state) as spool:
                return store.put(spool, on_publish=hook)
        if base is None or state.base_limit == 0 or base_holes:
            return store.put(state.compose(store.iter_object), on_publish=hook)
        # A new revision: only the regions around the changes are chunked again.
        changed = list(state.dirty)
        if state.size > state.base_limit:
            changed.append((state.base_limit, state.size))
        return store.put_revision(
            base,
            state.size,
            changed,
            functools.partial(state.compose, store.iter_object),
            on_publish=hook,
        )

    def publish_now(self, state: OpenFile) -> None:
        """Store a state's content durably, here and now (journal replay)."""
        state.committing = None
        try:
            digest = self.store_content(state, durable=True)
        except CachefsError as exc:
            self._committed_anyway(state, exc)
            raise
        state.stored(digest)

    async def publish(self, state: OpenFile, *, durable: bool, told: bool = False) -> None:
        """Store the file's new content and point its inode at it (``on_written``
        first, unless the caller has ``told`` of it)."""
        state.publishing += 1
        try:
            async with state.lock:
                if state.changed and self.orphaned(state.ino):
                    # Unlinked: its writes stay readable in the spool, never published.
                    self.streams.abandon(state, "unlinked")
                    return
                if not state.changed:
                    if durable:
                        await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)
                    return
                if not told:
                    self.on_written(state)
                state.committing = None
                try:
                    digest = await self.streams.take(state)  # ingested as it was written
                    if digest is None:
                        digest = await self._store(state, durable=durable)
                except CachefsError as exc:
                    self._committed_anyway(state, exc)
                    raise
                state.stored(digest)
                self.on_published(state)
        finally:
            state.publishing -= 1

    @staticmethod
    def _committed_anyway(state: OpenFile, exc: CachefsError) -> None:
        """A publication that failed once committed (the index's sync failed:
        EIO, a full disk): the inode names what it published, and the state
        takes that as its base, as if it had succeeded (its caller still
        fails).  Else the writes logged after it would name a base the inode
        no longer has, and a replay after the daemon dies would skip them."""
        if exc.committed and state.committing is not None:
            log.warning("inode %d: its new content was committed, not made durable", state.ino)
            state.stored(state.committing[0])
        state.committing = None

    def batchable(self, state: OpenFile) -> bool:
        """Whether a released file may wait to be published with others: new
        (no base), small, all of it in the spool, changed."""
        return (
            state.changed
            and 0 < state.size <= INLINE_PUBLISH
            and state.base_limit == 0
            and state.stream is None
            and _spool_size(state) == state.size
        )

    async def publish_together(self, states: list[OpenFile], trace: Any = None) -> list[OpenFile]:
        """Publish released files in one publication (those ``batchable`` still,
        once their locks are taken); return those left to :meth:`publish`.
        ``trace``: the trace context to publish in (``tracing.recorded_context``)."""
        taken: list[OpenFile] = []
        left: list[OpenFile] = []
        batch: list[OpenFile] = []
        for state in states:
            try:
                state.lock.acquire_nowait()  # else busy: published alone
            except trio.WouldBlock:
                left.append(state)
            else:
                taken.append(state)
        try:
            for state in taken:
                if state.changed and self.orphaned(state.ino):
                    self.streams.abandon(state, "unlinked")
                elif self.batchable(state):
                    batch.append(state)
                elif state.changed:
                    left.append(state)
            if len(batch) > 1:
                for state in batch:
                    state.committing = None
                digests = await self._store_together(batch, trace)
                for state, digest in zip(batch, digests, strict=True):
                    state.stored(digest)
                    self.on_published(state)
            else:
                left += batch
        except (CachefsError, OSError) as exc:  # e.g. the disk is full: each alone tells
            if isinstance(exc, CachefsError):
                for state in batch:
                    self._committed_anyway(state, exc)  # (then published already: not left)
            if isinstance(exc, CorruptDataError):
                raise  # damage: the caller tells the store; the files keep their writes
            log.info("publishing %d files together failed (%s): one at a time", len(batch), exc)
            left += [state for state in batch if state.changed]
        finally:
            for state in taken:
                state.lock.release()
        return left

    async def _store_together(self, states: list[OpenFile], trace: Any) -> list[Digest]:
        """The content of files wholly in their spools, in one publication."""

        def put() -> list[Digest]:
            with contextlib.ExitStack() as stack:
                items = [(stack.enter_context(_reading(s)), None, self.hook(s)) for s in states]
                digests = self.store.put_many(items)
            return [d for d in digests if isinstance(d, Digest)]

        def store() -> list[Digest]:
            return tracing.run_in(trace, put)

        if not self.maintenance() and not self.streams.running:
            return store()
        return await trio.to_thread.run_sync(store, limiter=self.limiter)

    async def _store(self, state: OpenFile, *, durable: bool) -> Digest | None:
        """``store_content`` where it is cheapest (the caller holds the lock)."""
        store = functools.partial(self.store_content, state, durable=durable)
        if state.size <= INLINE_PUBLISH and not self.maintenance() and not self.streams.running:
            # Cheaper than a hop to a worker thread and back (and than the wait
            # for the GIL that the hop would cost the loop); not while files
            # stream, whose appended bytes the publication's sync would wait for.
            try:
                return store()
            except HealElsewhere:
                # Its old content needs the tiers (a chunk dropped here under
                # --local-max-size, or damaged), which are asked off this
                # thread: stored there instead (nothing was published).
                pass
        return await trio.to_thread.run_sync(store, limiter=self.limiter)

    async def flush_all(self, files: Iterable[OpenFile]) -> None:
        """Publish every file with unpublished writes, durably (unmount, sync).

        A file that cannot be published (disk full) keeps its writes and does
        not stop the others; the first error is raised at the end."""
        failed: CachefsError | None = None
        for state in files:
            try:
                await self.publish(state, durable=False)
            except CachefsError as exc:
                log.error("could not publish inode %d: %s", state.ino, exc)
                failed = failed or exc
        await trio.to_thread.run_sync(self.store.sync, limiter=self.limiter)
        if failed is not None:
            raise failed

    def orphaned(self, ino: int) -> bool:
        """Whether a file has lost every entry (or is gone), counting its
        unlinks not yet committed (``unlinks_of``)."""
        try:
            return self.namespace.get(ino).nlink <= self.unlinks_of(ino)
        except FsError:
            return True
