"""Eviction from cache directories, and room for writes (filesystem layer).

The other half of cache directories (``_caches.py`` keeps their books).

When.  Past ``HIGH_WATERMARK`` of its budget, a cache is evicted in the
background down to ``LOW_WATERMARK``, in batches of at most ``_BATCH`` files
with the request loop served between batches.  A write that would take a
cache past its budget waits for eviction (the writer is throttled) for at
most ``THROTTLE_LIMIT`` seconds and fails with ENOSPC when nothing is
evictable or no room came: the budget is a hard limit, like bazel-remote's.
Closed files still being published will be evictable, and so will files being
stored whole (a server's upload, a shared directory's fetch: they hold their
room, ``_caches.Reservation``): while some are, the wait goes on (a slow
disk's sync must not fail the next write).  A writer
wakes the evictor once; the evictor passes again when something that may make
room happens (``changed``: a publication, a file let go).

What may go.  Only whole files of cache directories, never a file that is
open or has unpublished writes (those are busy in ``OpenFiles``), never part
of a file.  Eviction removes the file's entries in one transaction with the
others of its batch; the filesystem is told (``on_evicted``) so that the
kernel drops its cached entries.

The store quota (``--max-store-size``, kept in the store) counts stored
bytes.  When the store passes it, files are evicted from cache directories
(the fullest cache relative to its budget first, each by its policy), then gc
reclaims their chunks; writers wait meanwhile, and get ENOSPC only when the
store is still over the quota with nothing evictable left.  Deleting files
then makes room again (gc runs before a writer is refused).

Everything here runs on the trio thread of the filesystem.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from cachefs.engine import CachefsError, GcReport, Inode, Namespace, Store, StoreFullError
from cachefs.fs._files import OpenFile, OpenFiles

if TYPE_CHECKING:
    from cachefs.fs._caches import CacheDir, CacheDirs

log = logging.getLogger(__name__)

#: Eviction starts past this fraction of a budget (or of the store quota) ...
HIGH_WATERMARK = 0.95
#: ... and goes down to this fraction.
LOW_WATERMARK = 0.90
#: Seconds a writer waits for room before it gets ENOSPC.
THROTTLE_LIMIT = 5.0
#: Seconds between saves of the policies and counters.
SAVE_INTERVAL = 60.0
#: Files evicted per transaction.
_BATCH = 128
#: Writers' waits kept for the figures.
_WAITS = 4096

#: Told of each entry eviction removed: (parent, name, the inode as it is now).
OnEvicted = Callable[[int, bytes, Inode], None]


class Eviction:
    """Keeps the cache directories of a mount under their budgets and the
    store under its quota, and makes writers wait for room."""

    def __init__(
        self,
        caches: CacheDirs,
        namespace: Namespace,
        store: Store,
        files: OpenFiles,
        *,
        on_evicted: OnEvicted,
        collect_garbage: Callable[[], Awaitable[GcReport]],
        on_error: Callable[[CachefsError], None],
    ) -> None:
        self.caches = caches
        self.namespace = namespace
        self.store = store
        self.files = files
        self.on_evicted = on_evicted
        self.collect_garbage = collect_garbage
        self.on_error = on_error
        self.waits: collections.deque[float] = collections.deque(maxlen=_WAITS)
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._waiting = 0
        #: Writes checked against a budget or the quota, and those held back.
        self.checks = 0
        self.blocked = 0
        #: Stored bytes of the store, as last read.
        self.stored = 0
        #: ``Store.dropped`` when gc last ran for the quota (None: not yet).
        self._gc_dropped: int | None = None
        #: Deletes the orphans released but not deleted yet (set by the
        #: filesystem): their references go before the quota is judged stuck.
        self.release_orphans: Callable[[], None] = lambda: None
        self.refresh_stored()

    @property
    def quota(self) -> int | None:
        return self.caches.max_store_size

    def refresh_stored(self) -> None:
        self.stored = self.store.stored_bytes()

    def wake(self) -> None:
        self._wake.set()

    def check(self, cache: CacheDir) -> None:
        """Wake the evictor if ``cache`` passed its high watermark."""
        if cache.usage > cache.max_size * HIGH_WATERMARK:
            self.wake()

    def published(self) -> None:
        """A file was published: the store may have passed its quota."""
        self.changed()
        if self.quota is not None:
            self.refresh_stored()
            if self.stored >= self.quota * HIGH_WATERMARK:
                self.wake()

    def changed(self) -> None:
        """Something that may make room for a waiting writer happened (a file
        was published or let go): the evictor looks again.  Writers wake it
        once and then wait for these."""
        if self._waiting:
            self.wake()

    # --- room for writes --------------------------------------------------------------

    async def make_room(self, cache: CacheDir | None, growth: int, *, queue: bool = False) -> None:
        """Wait until a file of ``cache`` (None: of no cache) may grow by
        ``growth`` bytes: the cache's budget and the store quota allow it.
        ENOSPC when they cannot.  With ``queue`` (room to be held), it does
        not go ahead of writers already waiting in the cache: stores that hold
        room in turn would keep a larger writer waiting for good."""
        if cache is not None or self.quota is not None:
            self.checks += 1
        if not self._short(cache, growth) and not (queue and cache is not None and cache.growths):
            return
        if cache is not None and growth + self._pinned(cache) > cache.max_size:
            # Evicting everything that may go would not make room: refuse now.
            raise _full(f"the cache's budget of {cache.max_size} bytes is taken by open files")
        self.blocked += 1
        start = trio.current_time()
        deadline = start + THROTTLE_LIMIT
        self._waiting += 1
        if cache is not None:
            cache.wanted += growth
            cache.growths.append(growth)
        woke = last_pass = False
        first = queue
        try:
            while first or self._short(cache, growth):
                if first:  # behind the writers waiting: once the evictor has passed
                    first = False
                    self.wake()
                    woke = True
                    with trio.move_on_at(deadline):
                        await self._progress.wait()
                    continue
                over = cache is not None and cache.usage + cache.reserved + growth > cache.max_size
                stuck = cache is not None and not self._evictable(cache)
                if over and stuck and cache is not None and not self._coming(cache):
                    raise _full(f"the cache's budget of {cache.max_size} bytes is used")
                if not over and self.quota_stuck():
                    raise _full(f"the store quota of {self.quota} bytes is used")
                if trio.current_time() >= deadline:
                    # Files that will be evictable are being published (a slow
                    # disk's sync): they end in a publication or an error.
                    # (Room held by stores being made goes soon, but may be
                    # taken again by others: it is waited for a while only.)
                    now = trio.current_time()
                    held = cache is not None and bool(cache.reserved)
                    held = held and now < start + 4 * THROTTLE_LIMIT
                    if cache is None or not (self._publishing(cache) or held):
                        # Or one was, past the limit, and the evictor has not
                        # passed since: one more pass for it, once.
                        if cache is None or last_pass or not self._evictable(cache):
                            raise _full(f"eviction made no room within {THROTTLE_LIMIT:g} s")
                        last_pass = True
                        self.wake()
                    deadline = trio.current_time() + THROTTLE_LIMIT
                progress = self._progress
                if not woke:
                    # Once: the evictor signals progress after each pass, and
                    # passes again when something changed (``changed``).
                    # Waking it at every signal would spin both on the CPU
                    # the publications that make room need.
                    self.wake()
                    woke = True
                with trio.move_on_at(deadline):
                    await progress.wait()
        finally:
            self._waiting -= 1
            if cache is not None:
                cache.wanted -= growth
                cache.growths.remove(growth)
            waited = trio.current_time() - start
            self.waits.append(waited)
            if cache is not None:
                cache.counters["throttled"] += 1
                cache.counters["throttled_seconds"] += waited

    def fits(self, cache: CacheDir | None, growth: int) -> bool:
        """Whether a file of ``cache`` may grow by ``growth`` bytes now, with
        no wait (what :meth:`make_room` would return at once for)."""
        return not self._short(cache, growth)

    def _short(self, cache: CacheDir | None, growth: int) -> bool:
        if cache is not None and cache.usage + cache.reserved + growth > cache.max_size:
            return True
        return self.quota is not None and self.stored >= self.quota

    def _busy_members(self, cache: CacheDir) -> Iterator[OpenFile]:
        """The cache's files that are busy (open, written or being published)."""
        members = self.caches.members
        for state in self.files:
            if members.get(state.ino) is cache:
                yield state

    def _pinned(self, cache: CacheDir) -> int:
        """Bytes of the cache's files that are open (they may not go)."""
        return sum(state.size for state in self._busy_members(cache) if state.opens)

    def _coming(self, cache: CacheDir) -> bool:
        """Whether files of the cache will be evictable: closed but still busy
        (once their publication is done), or being stored whole (the room
        they hold, once they are counted)."""
        return bool(cache.reserved) or any(not state.opens for state in self._busy_members(cache))

    def _publishing(self, cache: CacheDir) -> bool:
        """Whether closed files of the cache are being published now."""
        return any(not s.opens and s.publishing for s in self._busy_members(cache))

    def _evictable(self, cache: CacheDir) -> bool:
        return next(self._victims(cache), None) is not None

    def _victims(self, cache: CacheDir) -> Iterator[int]:
        for ino in cache.policy.victims():
            if not self.files.held(ino) and ino in cache.names:
                yield ino

    def quota_stuck(self) -> bool:
        """Over the quota, nothing evictable, and gc ran since the last reference
        to stored data was dropped (so it cannot free anything either)."""
        if self.quota is None or self.stored < self.quota:
            return False
        self.release_orphans()
        if any(self._evictable(cache) for cache in self.caches.dirs.values()):
            return False
        return self._gc_dropped == self.store.dropped

    def figures(self) -> dict[str, Any]:
        """The writers' waits (``throttle_waits`` in the figures)."""
        waits = sorted(self.waits)
        # Over all checked writes (most never wait): the p99 is among the
        # waits only when more than 1% of the writes waited.
        unblocked_share = 1.0 - self.blocked / self.checks if self.checks else 1.0
        q_all = (0.99 - unblocked_share) / (1.0 - unblocked_share) if unblocked_share < 0.99 else 0
        return {
            "count": len(waits),
            "p50_ms": _percentile(waits, 0.50) * 1000,
            "p99_ms": _percentile(waits, 0.99) * 1000,
            "max_ms": (waits[-1] if waits else 0.0) * 1000,
            "checked": self.checks,
            "blocked": self.blocked,
            "p99_all_ms": _percentile(waits, q_all) * 1000 if q_all > 0 else 0.0,
        }

    # --- eviction --------------------------------------------------------------------------

    async def run(self) -> None:
        """Evict in the background; save the policies now and then."""
        caches = self.caches
        caches.saved_at = trio.current_time()
        # A cache may be over its budget from the start (a mount that stopped
        # while its evictor worked, a budget lowered offline).
        for cache in caches.dirs.values():
            self.check(cache)
        if self.quota is not None and self.stored >= self.quota * HIGH_WATERMARK:
            self.wake()
        while True:
            with trio.move_on_at(caches.saved_at + SAVE_INTERVAL):
                await self._wake.wait()
            if trio.current_time() >= caches.saved_at + SAVE_INTERVAL:
                caches.save()
            if not self._wake.is_set():
                continue
            self._wake = trio.Event()
            try:
                await self._enforce()
            except CachefsError as exc:
                self.on_error(exc)
                log.error("eviction failed: %s", exc)
                await trio.sleep(1)
            finally:
                self._signal()

    def _signal(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _enforce(self) -> None:
        for cache in list(self.caches.dirs.values()):
            # Down to the low watermark, and room for the writers that wait.
            low = int(cache.max_size * LOW_WATERMARK)
            free = cache.max_size - cache.reserved
            room = free - cache.wanted
            if room < 0:
                # Not all at once: room for the largest that fits beside the
                # room held (the others fit then too, one at a time); none
                # for one that cannot fit until that room goes.
                fitting = [g for g in cache.growths if g <= free]
                room = free - max(fitting) if fitting else low
            target = min(low, room)
            if cache.usage > cache.max_size * HIGH_WATERMARK or (
                cache.wanted and cache.usage > target
            ):
                while cache.usage > target:
                    if not self.evict(cache, target)[0]:
                        break
                    self._signal()
                    await trio.sleep(0)
        quota = self.quota
        if quota is not None and self.stored >= quota * HIGH_WATERMARK:
            await self._enforce_quota(quota)

    async def _enforce_quota(self, quota: int) -> None:
        """Evict from the caches (fullest first) and collect garbage until the
        store is below the quota's low watermark, or nothing is left to do."""
        self.release_orphans()
        while self.stored >= quota * LOW_WATERMARK:
            stats = self.store.stats()
            excess = self.stored - int(quota * LOW_WATERMARK)
            # Logical bytes to evict for that many stored bytes, roughly.
            ratio = stats.logical_bytes / stats.stored_bytes if stats.stored_bytes else 1.0
            goal = max(1, int(excess * max(1.0, ratio)))
            evicted = 0
            while evicted < goal:
                candidates = [c for c in self.caches.dirs.values() if self._evictable(c)]
                if not candidates:
                    break
                cache = max(candidates, key=lambda c: c.usage / c.max_size)
                files, freed = self.evict(cache, max(0, cache.usage - (goal - evicted)))
                if not files:
                    break
                evicted += max(1, freed)
                self._signal()
                await trio.sleep(0)
            if self._gc_dropped == self.store.dropped:
                return  # nothing was freed since gc last ran
            dropped = self.store.dropped
            report = await self.collect_garbage()
            self._gc_dropped = dropped
            self.refresh_stored()
            log.info(
                "store quota: gc reclaimed %d bytes; %d bytes stored of %s",
                report.stored_bytes_removed,
                self.stored,
                quota,
            )
            self._signal()
            if not evicted:
                return

    def evict(self, cache: CacheDir, target: int) -> tuple[int, int]:
        """Evict one batch of files of ``cache``, by its policy, towards
        ``target`` bytes of usage; returns (files, logical bytes) evicted.

        An evicted file loses every entry it has in the cache, in one
        transaction, and is deleted at once unless it has entries elsewhere
        (a file the kernel still knows reads as gone: its entry is invalidated)."""
        chosen: dict[int, int] = {}  # inode: size
        for ino in self._victims(cache):
            chosen[ino] = self._size_of(ino)
            if cache.usage - sum(chosen.values()) <= target or len(chosen) >= _BATCH:
                break
        if not chosen:
            return 0, 0
        entries = [(parent, name, ino, 0) for ino in chosen for parent, name in cache.names[ino]]
        removed = self.store.freeing(lambda: self.namespace.remove_entries(entries, set()))
        went = {(parent, name, inode.ino) for parent, name, inode in removed}
        final = {inode.ino: inode for _, _, inode in removed}  # the last state of each
        files = freed = 0
        for ino, size in chosen.items():
            inode = final.get(ino)
            if inode is None:  # its entries changed under us: stop following it
                self.caches.drop(ino)
                continue
            inode.size = size  # with the writes of a file that waited to be published
            names = cache.names.get(ino, [])
            files += 1
            freed += size
            cache.policy.evict(ino, ghost=names[0] if names else None)
            cache.names.pop(ino, None)
            self.caches.members.pop(ino, None)
            cache.counters["evictions"] += 1
            cache.counters["bytes_evicted"] += size
            for parent, name in names:
                if (parent, name, ino) in went:
                    self.on_evicted(parent, name, inode)
        return files, freed

    def _size_of(self, ino: int) -> int:
        """A file's size (a closed file waiting to be published: as written)."""
        size = self.files.size(ino)
        if size is not None:
            return size
        try:
            return self.namespace.get(ino).size
        except CachefsError:
            return 0


def _full(why: str) -> StoreFullError:
    return StoreFullError(
        f"no space left: {why} and nothing more can be evicted",
        hint="close or delete files, or raise the budget (`cachefs cache set DIR --max-size`) "
        "or the quota (`--max-store-size`)",
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
