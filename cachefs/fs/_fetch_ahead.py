"""Fetching ahead of readers what only the remote tiers hold (filesystem layer).

A chunk dropped here under ``--local-max-size`` is held only by the remote
tiers.  A read that meets one waits while it is fetched; with it come the
chunks after it in the file, fetched in the background in the file's order,
a span (``SPAN`` bytes of the file) at a time.  The tiers fetch a span with
several requests in flight and store what comes as it comes, 1 MiB first
(``Tiers.restore``), and the waiting read goes on as soon as its chunk is
here, while the rest comes.  A reader that goes on reading what the fetch
brought keeps it going, up to ``AHEAD`` bytes past its read; so a sequential
reader reads what came while the next spans come.  The readers of one
content share its fetch, and ``FETCHES`` fetches run at most.  A read that
meets such a chunk where no fetch is going (a reader that jumps, a second
reader elsewhere in the file, a reader of other content while as many
fetches run) fetches its own ``OWN`` bytes and waits for all of them
(``FileIO._fetch``), as a read does without a running filesystem (no
nursery) and when the fetch did not bring its chunk (that read then says
why); once the fetch has stopped, the next such read moves it there.
Under ``--local-max-size`` a fetch goes at most an eighth of that size
ahead (a span at least), so that what it brings is not dropped again before
it is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from cachefs.engine import CachefsError, Digest, Store

log = logging.getLogger(__name__)

#: Bytes of a file fetched at once (its chunks held remotely), and how far
#: ahead of a reader that reads what came the fetch goes on.
SPAN, AHEAD = 32 << 20, 64 << 20
#: Bytes of a file that a read which fetches its own (``FileIO._fetch``) fetches.
OWN = 8 << 20
#: Fetches that run at once (each holds up to 32 MiB: ``Tiers.restore``); a
#: read of other content meanwhile fetches its own.
FETCHES = 2


@dataclass(eq=False)
class _Fetch:
    """The fetch of one content's chunks, ahead of its readers."""

    digest: Digest
    #: Where it went on from last (a read that met a chunk held remotely).
    start: int
    #: The next span's offset, and where the fetch stops (reads move it on).
    next: int
    stop: int
    #: The offset of the span being fetched now, if one is.
    fetching: int | None = None
    running: bool = False
    #: Handles that read this content and met one of its chunks held remotely.
    readers: set[int] = field(default_factory=set)
    #: Set (and replaced) when chunks land and when the fetch ends.
    changed: trio.Event = field(default_factory=trio.Event)

    def brings(self, offset: int) -> bool:
        """Whether the span being fetched, or the next one, holds ``offset``."""
        if not self.running:
            return False
        if self.fetching is not None and self.fetching <= offset < self.fetching + SPAN:
            return True
        return self.next < self.stop and self.next <= offset < self.next + SPAN

    def still_brings(self, offset: int, end: int) -> bool:
        """Whether the fetch has yet to bring (some of) ``[offset, end)``."""
        if not self.running:
            return False
        if self.fetching is not None and self.fetching < end and offset < self.fetching + SPAN:
            return True
        return self.next < min(self.stop, end) and offset < self.stop


class FetchAhead:
    """The fetches ahead of the readers of a mounted store.  Use from one trio thread."""

    def __init__(self, store: Store, nursery: Callable[[], trio.Nursery | None]) -> None:
        self.store = store
        self._nursery = nursery
        #: How far a fetch goes past a reader's read (bounded under --local-max-size).
        self.ahead = AHEAD
        self._fetches: dict[Digest, _Fetch] = {}
        #: Handle -> the fetch of the content it reads.
        self._readers: dict[int, _Fetch] = {}

    @property
    def running(self) -> int:
        """How many fetches are running."""
        return sum(fetch.running for fetch in self._fetches.values())

    async def wait(self, fh: int, digest: Digest, offset: int, end: int, chunk: bytes) -> bool:
        """Fetch, ahead of handle ``fh``'s read of ``[offset, end)`` of content
        ``digest``, from that read on, and wait until the chunk it met that
        the tiers hold (``chunk``) is here.  False if it is not (no running
        filesystem, or the fetch did not bring it): the caller fetches it."""
        nursery = self._nursery()
        if nursery is None or self.store.chunks.restorer is None:
            return False
        fetch = self._fetches.get(digest)
        if fetch is None:
            if self.running >= FETCHES:
                return False
            fetch = self._fetches[digest] = _Fetch(digest, offset, offset, offset + SPAN)
        elif not fetch.brings(offset):
            if fetch.running or self.running >= FETCHES:  # this read fetches its own
                return False
            fetch.start = fetch.next = offset  # stopped: it goes on from here now
            fetch.stop = offset + SPAN
        fetch.stop = max(fetch.stop, end)
        if self._readers.get(fh) is not fetch:  # it read other content before
            self.released(fh)
            fetch.readers.add(fh)
            self._readers[fh] = fetch
        if not fetch.running:
            self._start(fetch, nursery)
        while self.store.chunks.held_remotely(chunk):
            if not fetch.still_brings(offset, end):
                return False
            await fetch.changed.wait()
        return True

    def bound(self, local_max_size: int | None) -> None:
        """Fetch at most an eighth of ``--local-max-size`` ahead of a reader
        (a span at least)."""
        self.ahead = AHEAD if local_max_size is None else max(SPAN, min(AHEAD, local_max_size // 8))

    def own(self, digest: Digest, offset: int) -> list[tuple[bytes, int]]:
        """What a read at ``offset`` of content ``digest`` that fetches its
        own fetches: the chunks held remotely of the next ``OWN`` bytes."""
        return self.store.reader.held_remotely(digest, offset, OWN)

    def read(self, fh: int, offset: int, end: int) -> None:
        """Handle ``fh`` read ``[offset, end)``: if that is what its fetch
        brought, the fetch goes on to ``AHEAD`` bytes past it."""
        fetch = self._readers.get(fh)
        if fetch is None or not fetch.start < offset <= fetch.next:
            return  # not reading on from where it met a chunk held remotely
        stop = min(fetch.digest.size, end + self.ahead)
        if stop <= fetch.stop:
            return
        fetch.stop = stop
        nursery = self._nursery()
        if (
            not fetch.running
            and fetch.next < stop
            and nursery is not None
            and self.running < FETCHES
        ):
            self._start(fetch, nursery)

    def released(self, fh: int) -> None:
        """Handle ``fh`` is closed (or reads other content now): a fetch that
        no handle reads any more stops after its span."""
        fetch = self._readers.pop(fh, None)
        if fetch is None:
            return
        fetch.readers.discard(fh)
        if not fetch.readers:
            fetch.stop = fetch.next
            if not fetch.running:
                self._forget(fetch)

    def _start(self, fetch: _Fetch, nursery: trio.Nursery) -> None:
        fetch.running = True
        try:
            nursery.start_soon(self._run, fetch)
        except RuntimeError:  # the nursery is closed: the readers fetch their own
            fetch.running = False

    async def _run(self, fetch: _Fetch) -> None:
        restorer = self.store.chunks.restorer
        digest = fetch.digest

        def landed(count: int) -> None:  # in the restorer's thread
            trio.from_thread.run_sync(self._tell, fetch)

        try:
            while restorer is not None and fetch.next < min(fetch.stop, digest.size):
                at = fetch.fetching = fetch.next
                fetch.next = at + SPAN
                wanted = await trio.to_thread.run_sync(
                    self.store.reader.held_remotely, digest, at, SPAN
                )
                if wanted:
                    await trio.to_thread.run_sync(restorer, wanted, landed)
                self._tell(fetch)
        except (CachefsError, OSError) as exc:  # the reader's own fetch then says why
            log.warning("fetching %s ahead of its readers: %s", digest, exc)
        except Exception:  # a read-ahead must not stop the mount: its readers fetch their own
            log.exception("fetching %s ahead of its readers failed", digest)
        finally:
            fetch.running, fetch.fetching = False, None
            self._tell(fetch)
            if not fetch.readers:
                self._forget(fetch)

    @staticmethod
    def _tell(fetch: _Fetch) -> None:
        fetch.changed.set()
        fetch.changed = trio.Event()

    def _forget(self, fetch: _Fetch) -> None:
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]


__all__ = ["AHEAD", "FETCHES", "OWN", "SPAN", "FetchAhead"]
