"""Ingest as the bytes arrive: a new file written from start to end (filesystem layer).

Build outputs are written once, in order, from the first byte to the last.
Without this, every byte of such a file goes to the journal and the spool as
it is written, and the chunking, hashing and compression all wait for
``fsync`` or the last ``close``.  A :class:`Stream` starts the store's
ingest of the file (``Store.put``) in a worker thread as soon as the file
passes ``STREAM_MIN`` bytes; the ingest reads the spool as it grows
(:class:`GrowingSpool`) and cuts, hashes, compresses and appends the chunks
while the writer goes on.  When the file is published, the rest of it is
read, the ingest ends, and the same ``Store.put`` publishes the object with
the same hook as any publication (``_publish.py``): what ``fsync`` waits
for is the tail, not the whole file.

Only what the spool holds from offset 0 up, grown by appends, is streamed:
the stream is *abandoned* by any other change (a write below the end or
past it, a truncation), by maintenance waiting for the store (a stream holds
the store's maintenance lock shared, which gc must not wait behind), and by
the file being dropped.  The publication then takes the usual path, and the
chunks the stream appended are found pending by its ingest (they are not
appended twice; gc collects those that no object names).  Nothing about
durability changes: every byte still reaches the journal before the write
returns, and the object is published at the same moments, durably.

At most ``MAX_STREAMS`` files stream at once (each holds a worker thread
for as long as it is written); others are ingested at publication, as ever.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from cachefs.engine import CachefsError, Digest, Store
from cachefs.errors import from_oserror
from cachefs.fs._files import OpenFile

if TYPE_CHECKING:
    import lmdb

log = logging.getLogger(__name__)

#: A file streams once it holds this many bytes (smaller ones are ingested
#: at publication: on the loop's thread up to ``INLINE_PUBLISH``).
STREAM_MIN = 4 << 20
#: Files streaming at once, at most.
MAX_STREAMS = 2
#: How often a waiting stream looks whether maintenance waits for the store.
POLL = 0.1

#: The publication's hook: points the inode at the object in its transaction.
Hook = Callable[["lmdb.Transaction", Digest], None]


class Abandoned(Exception):
    """The stream's ingest stops: the file changed otherwise, or the store is needed."""


class GrowingSpool:
    """A spool read from the start while it grows (``readinto`` for the chunker).

    ``readinto`` waits until bytes past what it read are there, the end is
    set (then it returns 0 there), or the stream is abandoned (Abandoned).
    It reads through a descriptor of its own: the file's may be closed."""

    def __init__(self, fd: int, stop: Callable[[], bool]) -> None:
        self.fd = os.dup(fd)
        self.stop = stop
        self.position = 0
        self._available = 0
        self._end: int | None = None
        self._why: str | None = None
        self._cond = threading.Condition()

    def grow(self, size: int) -> None:
        """The spool holds bytes [0, size) now, for good (the caller's appends)."""
        with self._cond:
            self._available = size
            self._cond.notify()

    def finish(self, size: int) -> None:
        """The file ends at ``size``: read up to it, then the end."""
        with self._cond:
            self._available = self._end = size
            self._cond.notify()

    def abandon(self, why: str) -> None:
        with self._cond:
            if self._why is None:
                self._why = why
            self._cond.notify()

    def readinto(self, buf: memoryview) -> int:
        with self._cond:
            while True:
                if self._why is not None:
                    raise Abandoned(self._why)
                if self.stop():
                    raise Abandoned("maintenance waits for the store")
                if self.position < self._available:
                    break
                if self._end is not None:
                    return 0
                self._cond.wait(POLL)
            wanted = min(len(buf), self._available - self.position)
        try:
            n = os.preadv(self.fd, [buf[:wanted]], self.position)
        except OSError as exc:
            raise from_oserror(exc, "reading a spool file") from None
        if n != wanted:  # the bytes were there: only a change could shorten them
            raise Abandoned(f"the spool gave {n} of {wanted} bytes")
        self.position += n
        return n

    def close(self) -> None:
        os.close(self.fd)


class Stream:
    """One file's ingest in progress (see the module's docstring)."""

    def __init__(self, spool: GrowingSpool) -> None:
        self.spool = spool
        self.done = trio.Event()
        self.digest: Digest | None = None
        self.failure: BaseException | None = None

    async def run(self, put: Callable[[], Digest], limiter: trio.CapacityLimiter) -> None:
        """Ingest in a worker thread until the spool ends or the stream is
        abandoned (cancelled: abandoned, and waited for)."""

        async def abandon_when_cancelled() -> None:
            try:
                await self.done.wait()
            finally:
                self.spool.abandon("the filesystem stops")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(abandon_when_cancelled)
                try:
                    self.digest = await trio.to_thread.run_sync(put, limiter=limiter)
                except (Abandoned, CachefsError) as exc:
                    self.failure = exc
                except Exception as exc:  # a bug: the publication raises it
                    log.exception("ingest as written failed")
                    self.failure = exc
                finally:
                    self.done.set()
        finally:
            self.spool.close()


class Streams:
    """The files being ingested as they are written."""

    def __init__(self, store: Store, hook: Callable[[OpenFile], Hook]) -> None:
        """``hook``: the publication's hook for a file."""
        self.store = store
        self.hook = hook
        self.limiter = trio.CapacityLimiter(MAX_STREAMS)
        self.running = 0
        #: Files published from their stream, and streams abandoned.
        self.used = 0
        self.abandoned = 0

    def figures(self) -> dict[str, int]:
        """For ``stats.json``: files streaming now, published from their
        stream, and streams abandoned (published the usual way)."""
        return {"running": self.running, "used": self.used, "abandoned": self.abandoned}

    def wrote(self, state: OpenFile, offset: int, old_size: int, nursery: trio.Nursery) -> None:
        """After a write at ``offset`` to a file that was ``old_size`` bytes (its
        lock held): the stream grows, is abandoned, or starts."""
        stream = state.stream
        if offset != old_size or state.base is not None:
            self.abandon(state, "a write that is not an append")
        elif stream is not None:
            stream.spool.grow(state.size)
        elif (
            state.streamable
            and state.size >= STREAM_MIN
            and state.base_limit == 0
            and not state.dirty
            and self.running < MAX_STREAMS
            and not self.store.maintenance_pending
        ):
            self._start(state, nursery)

    def _start(self, state: OpenFile, nursery: trio.Nursery) -> None:
        """Start a file's stream; if it cannot start (no descriptor left, the
        filesystem stopping), the file is published the usual way: the write
        that asked has happened and must not fail for it."""
        try:
            spool = GrowingSpool(state.spool_fd(), lambda: self.store.maintenance_pending)
        except OSError as exc:
            log.debug("inode %d: ingest as written not started: %s", state.ino, exc)
            return
        spool.grow(state.size)
        stream = Stream(spool)
        hook = self.hook(state)

        def put() -> Digest:
            return self.store.put(spool, on_publish=hook)

        async def run() -> None:
            try:
                await stream.run(put, self.limiter)
            finally:
                self.running -= 1

        try:
            nursery.start_soon(run)
        except RuntimeError:  # the nursery is closed: the filesystem has stopped
            spool.close()
            return
        self.running += 1
        state.stream = stream

    def abandon(self, state: OpenFile, why: str) -> None:
        """Stop a file's stream, if it has one; it does not stream again
        until it is emptied (``OpenFile.emptied``)."""
        state.streamable = False
        stream, state.stream = state.stream, None
        if stream is not None:
            stream.spool.abandon(why)
            self.abandoned += 1
            log.debug("inode %d: ingest as written abandoned: %s", state.ino, why)

    def truncated(self, state: OpenFile, size: int) -> None:
        """A file was truncated (its lock held): to nothing, it may stream again."""
        self.abandon(state, "truncated")
        state.streamable = size == 0

    async def take(self, state: OpenFile) -> Digest | None:
        """End a file's stream at its size and wait for the object it published
        (its lock held); None if there is none or it was abandoned (the caller
        then publishes the usual way).  An error of the store (a failed sync:
        the disk may have dropped bytes the stream appended, which another
        ingest would find and count on) is raised, as a publication's is."""
        stream, state.stream = state.stream, None
        if stream is None:
            return None
        stream.spool.finish(state.size)
        await stream.done.wait()
        failure = stream.failure
        if failure is not None and not isinstance(failure, Abandoned):
            state.streamable = False
            raise failure
        if failure is not None or stream.digest is None:
            state.streamable = False
            self.abandoned += 1
            log.debug("inode %d: ingest as written abandoned: %s", state.ino, failure)
            return None
        self.used += 1
        return stream.digest
