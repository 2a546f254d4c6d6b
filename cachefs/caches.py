"""Cache directories: byte budgets, eviction and the store quota (filesystem layer).

A directory of a mounted store can be marked as a *cache* with a budget in
logical bytes (what ``du --apparent-size`` shows) and an eviction policy
(``policy.py``: LRU, LFU with aging, ARC).  The mark is kept in the
namespace's ``caches`` database, survives remounts, and shows as the xattr
``user.cachefs.cache`` on the directory; setting that xattr (``cachefs cache
set`` does) marks the directory, removing it unmarks it.

Which files count.  A regular file belongs to the nearest cache directory
above it (caches may nest: the inner one's files are the inner one's).  Its
size counts from its creation on, unpublished writes included.  A file with
several hard links is followed through the link it was created or linked
under; when that link goes and others remain, the file leaves the cache (it
is no longer evictable and no longer counted).

What may go.  Only whole files of cache directories, never a file that is
open or has unpublished writes (those have an ``OpenFile``), never part of a
file.  Eviction removes the file's entry in one transaction with the others
of its batch; a file the kernel still knows becomes an orphan like any
unlinked file, and the kernel is told to drop its cached entry.

When.  Past ``HIGH_WATERMARK`` of its budget, a cache is evicted in the
background down to ``LOW_WATERMARK``, in batches of at most ``_BATCH`` files
with the request loop served between batches.  A write that would take a
cache past its budget waits for eviction (the writer is throttled) for at
most ``THROTTLE_LIMIT`` seconds and fails with ENOSPC when nothing is
evictable or no room came: the budget is a hard limit, like bazel-remote's.

The store quota (``--max-store-size``, kept in the store) counts stored
bytes.  When the store passes it, files are evicted from cache directories
(the fullest cache relative to its budget first, each by its policy), then gc
reclaims their chunks; writers wait meanwhile, and get ENOSPC only when the
store is still over the quota with nothing evictable left.  Deleting files
then makes room again (gc runs before a writer is refused).

Hits and misses.  The open of a file of a cache counts as a hit and refreshes
its recency and frequency (in memory: no metadata write per read); the
lookup of a missing name inside a cache counts as a miss.  Policies are
saved to ``cache_state`` at unmount and every ``SAVE_INTERVAL`` seconds, with
the counters, so that a remount keeps the order of eviction.

Everything here runs on the trio thread of the filesystem.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from cachefs import gc
from cachefs.errors import CachefsError, StoreFullError
from cachefs.namespace import CACHE_ENTRY, ROOT_INODE, STORE_SETTINGS, FsError, Inode
from cachefs.policy import POLICIES, Policy, make_policy

if TYPE_CHECKING:
    from cachefs.fs import Filesystem

log = logging.getLogger(__name__)

#: The xattr that marks a directory as a cache (value: ``max_size=N policy=P``).
CACHE_XATTR = b"user.cachefs.cache"
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
#: Counters kept in a cache's record.
_COUNTERS = ("hits", "misses", "evictions", "bytes_evicted", "throttled", "throttled_seconds")


def parse_setting(value: bytes) -> tuple[int, str]:
    """``max_size=N policy=P`` (the xattr's value) -> (max_size, policy)."""
    fields: dict[str, str] = {}
    for word in value.decode("ascii", "replace").replace(",", " ").split():
        key, sep, val = word.partition("=")
        if not sep:
            raise FsError(errno.EINVAL, f"cache setting {word!r} is not KEY=VALUE")
        fields[key.replace("-", "_")] = val
    unknown = set(fields) - {"max_size", "policy"}
    if unknown or "max_size" not in fields:
        raise FsError(errno.EINVAL, "a cache setting is max_size=BYTES [policy=lru|lfu|arc]")
    if not re.fullmatch(r"[0-9]+", fields["max_size"]) or int(fields["max_size"]) <= 0:
        raise FsError(errno.EINVAL, "max_size must be a positive number of bytes")
    policy = fields.get("policy", "lru")
    if policy not in POLICIES:
        raise FsError(errno.EINVAL, f"unknown policy {policy!r}")
    return int(fields["max_size"]), policy


class CacheDir:
    """One cache directory: its settings, policy, members and counters."""

    def __init__(self, ino: int, max_size: int, policy: str, record: dict[str, Any]) -> None:
        self.ino = ino
        self.max_size = max_size
        self.policy_name = policy
        self.policy: Policy = make_policy(policy, max_size)
        #: The entries (parent, name) of each member file inside this cache.
        self.names: dict[int, list[tuple[int, bytes]]] = {}
        self.counters: dict[str, float] = {k: float(record.get(k, 0)) for k in _COUNTERS}
        #: Bytes that writers waiting for room want to add.
        self.wanted = 0

    @property
    def usage(self) -> int:
        return int(self.policy.bytes)

    def setting(self) -> bytes:
        return f"max_size={self.max_size} policy={self.policy_name}".encode()

    def record(self) -> dict[str, Any]:
        return {"max_size": self.max_size, "policy": self.policy_name, **self.counters}

    def state(self) -> bytes:
        return b"".join(CACHE_ENTRY.pack(ino, count) for ino, _, count in self.policy.entries())

    def figures(self, path: str) -> dict[str, Any]:
        hits, misses = self.counters["hits"], self.counters["misses"]
        return {
            "path": path,
            "inode": self.ino,
            "max_size": self.max_size,
            "policy": self.policy_name,
            "files": len(self.policy),
            "bytes": self.usage,
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
            "evictions": int(self.counters["evictions"]),
            "bytes_evicted": int(self.counters["bytes_evicted"]),
            "throttled": int(self.counters["throttled"]),
            "throttled_seconds": round(self.counters["throttled_seconds"], 6),
        }


class CacheDirs:
    """The cache directories of a mounted store and the store quota."""

    def __init__(self, fs: Filesystem, *, max_store_size: int | None = None) -> None:
        self.fs = fs
        self.namespace = fs.namespace
        self.dirs: dict[int, CacheDir] = {}
        #: Member file -> its cache.
        self.members: dict[int, CacheDir] = {}
        #: Directory -> the cache it is in (0: none); filled on demand.
        self._dir_cache: dict[int, int] = {}
        self.waits: collections.deque[float] = collections.deque(maxlen=_WAITS)
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._waiting = 0
        #: Writes checked against a budget or the quota, and those held back.
        self.checks = 0
        self.blocked = 0
        self._stored = 0
        #: ``Store.dropped`` when gc last ran for the quota (None: not yet).
        self._gc_dropped: int | None = None
        self._saved = 0.0  # set when run() starts
        records = self.namespace.cache_records() if self.namespace.caches is not None else {}
        settings = records.pop(STORE_SETTINGS, {})
        if not isinstance(settings, dict):
            log.error("ignoring the damaged store-wide cache settings: %r", settings)
            settings = {}
        if max_store_size is not None:
            settings["max_store_size"] = max_store_size
            if not fs.store.readonly:
                self.namespace.put_cache_records({STORE_SETTINGS: settings})
        self.max_store_size: int | None = settings.get("max_store_size") or None
        for ino, record in records.items():
            try:
                max_size, policy = int(record["max_size"]), str(record["policy"])
                if max_size <= 0 or policy not in POLICIES:
                    raise ValueError(record)
                self.dirs[ino] = CacheDir(ino, max_size, policy, record)
            except (KeyError, ValueError, TypeError):
                log.error(
                    "ignoring the damaged settings of cache directory %d: %r "
                    "(set them again with `cachefs cache set`)",
                    ino,
                    record,
                )
        for cache in self.dirs.values():
            self._load(cache)
        self.refresh_stored()

    # --- membership ------------------------------------------------------------------

    def _load(self, cache: CacheDir) -> None:
        """Find the cache's files; rebuild its policy from the saved state."""
        found: dict[int, tuple[Inode, list[tuple[int, bytes]]]] = {}
        for parent, name, inode in self._walk(cache.ino):
            found.setdefault(inode.ino, (inode, []))[1].append((parent, name))
        for ino, count in self.namespace.cache_state_of(cache.ino):
            entry = found.pop(ino, None)
            if entry is not None and ino not in self.members:
                for parent, name in entry[1]:
                    self._add(cache, parent, name, ino, entry[0].size, count=count)
        # Files the saved state does not know (written before a crash): oldest first.
        for inode, names in sorted(found.values(), key=lambda e: e[0].mtime_ns):
            for parent, name in names:
                self._add(cache, parent, name, inode.ino, inode.size)

    def _walk(self, top: int) -> Iterator[tuple[int, bytes, Inode]]:
        """The regular files of a cache, not descending into nested caches."""
        pending = [top]
        while pending:
            directory = pending.pop()
            for name, inode in self.namespace.entries(directory):
                if inode.is_dir:
                    if inode.ino not in self.dirs:
                        pending.append(inode.ino)
                elif inode.is_reg:
                    yield directory, name, inode

    def _add(
        self,
        cache: CacheDir,
        parent: int,
        name: bytes,
        ino: int,
        size: int,
        count: int | None = None,
    ) -> None:
        """File ``ino`` has entry ``(parent, name)`` in ``cache``: admit it, or
        note one more entry of it (a file belongs to one cache at a time)."""
        current = self.members.get(ino)
        if current is not None:
            if current is cache and (parent, name) not in cache.names[ino]:
                cache.names[ino].append((parent, name))
            return
        if count is None:
            cache.policy.admit(ino, size, ghost=(parent, name))
        else:
            cache.policy.restore(ino, size, count)
        cache.names[ino] = [(parent, name)]
        self.members[ino] = cache

    def _drop(self, ino: int) -> None:
        cache = self.members.pop(ino, None)
        if cache is not None:
            cache.policy.discard(ino)
            cache.names.pop(ino, None)

    def _drop_entry(self, ino: int, entry: tuple[int, bytes]) -> None:
        """One entry of a member went; with its last entry in the cache, it leaves."""
        cache = self.members.get(ino)
        if cache is None:
            return
        names = cache.names[ino]
        if entry in names:
            names.remove(entry)
        if not names:
            self._drop(ino)

    def cache_of(self, directory: int) -> CacheDir | None:
        """The cache a directory is in (itself or its nearest marked ancestor)."""
        if not self.dirs:
            return None
        found = self._dir_cache.get(directory)
        if found is None:
            chain = []
            current = directory
            found = 0
            with self.namespace.read() as txn:
                while True:
                    known = self._dir_cache.get(current)
                    if known is not None:
                        found = known
                        break
                    chain.append(current)
                    if current in self.dirs:
                        found = current
                        break
                    if current == ROOT_INODE:
                        break
                    try:
                        current = self.namespace.parent_of(current, txn)
                    except CachefsError:
                        break
            for ino in chain:
                self._dir_cache[ino] = found
        return self.dirs.get(found) if found else None

    def _moved(self) -> None:
        self._dir_cache.clear()

    # --- events from the filesystem ------------------------------------------------------

    def missed(self, parent: int, name: bytes) -> None:
        cache = self.cache_of(parent)
        if cache is not None:
            cache.counters["misses"] += 1
            cache.policy.miss((parent, name))

    def opened(self, ino: int) -> None:
        cache = self.members.get(ino)
        if cache is not None:
            cache.counters["hits"] += 1
            cache.policy.hit(ino)

    def created(self, parent: int, name: bytes, inode: Inode) -> None:
        if inode.is_reg:
            cache = self.cache_of(parent)
            if cache is not None:
                self._add(cache, parent, name, inode.ino, inode.size)

    def linked(self, ino: int, parent: int, name: bytes, size: int) -> None:
        cache = self.cache_of(parent)
        if cache is not None:
            self._add(cache, parent, name, ino, size)
            self._check(cache)

    def removed(self, parent: int, name: bytes, inode: Inode) -> None:
        """An entry went (unlink, rmdir, or replaced by a rename)."""
        if inode.is_dir:
            self._dir_cache.pop(inode.ino, None)
            if inode.ino in self.dirs:
                self._unmark(inode.ino)
            return
        if inode.nlink == 0:
            self._drop(inode.ino)
        else:
            self._drop_entry(inode.ino, (parent, name))

    def renamed(
        self,
        moved: Inode,
        old: tuple[int, bytes],
        new: tuple[int, bytes],
        exchanged: Inode | None,
    ) -> None:
        """``moved`` went from entry ``old`` to ``new``; with RENAME_EXCHANGE,
        ``exchanged`` went the other way."""
        if not self.dirs:
            return
        self._rename_one(moved, old, new)
        if exchanged is not None:
            self._rename_one(exchanged, new, old)

    def _rename_one(self, inode: Inode, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        if inode.is_dir:
            if old[0] == new[0]:
                return
            source = self.cache_of(old[0])
            self._moved()
            if inode.ino in self.dirs:
                return  # a cache moved: its files stay its own
            target = self.cache_of(inode.ino)
            if source is target:
                return
            moved = list(self._walk(inode.ino))
            for _, _, child in moved:
                if self.members.get(child.ino) is not target:
                    self._drop(child.ino)
            if target is not None:
                for parent, name, child in moved:
                    self._add(target, parent, name, child.ino, self._size(child))
                self._check(target)
            return
        if not inode.is_reg:
            return
        cache = self.members.get(inode.ino)
        target = self.cache_of(new[0])
        if cache is not None and cache is target:
            names = cache.names[inode.ino]
            if old in names:
                names.remove(old)
            if new not in names:
                names.append(new)
            cache.policy.renamed(inode.ino, new)
            return
        if cache is not None:
            self._drop_entry(inode.ino, old)
        if target is not None:
            self._add(target, new[0], new[1], inode.ino, self._size(inode))
            self._check(target)

    def _size(self, inode: Inode) -> int:
        state = self.fs.files.get(inode.ino)
        return state.size if state is not None else inode.size

    def resized(self, ino: int, size: int) -> None:
        cache = self.members.get(ino)
        if cache is not None:
            cache.policy.resize(ino, size)
            self._check(cache)

    def published(self) -> None:
        if self._waiting:
            self.wake()  # a file that was being published may go now
        if self.max_store_size is not None:
            self.refresh_stored()
            if self._stored >= self.max_store_size * HIGH_WATERMARK:
                self.wake()

    def _check(self, cache: CacheDir) -> None:
        if cache.usage > cache.max_size * HIGH_WATERMARK:
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    def refresh_stored(self) -> None:
        index = self.fs.store.index
        with index.read() as txn:
            self._stored = index.counter(txn, "stored_bytes")

    # --- settings ----------------------------------------------------------------------

    def setting_of(self, ino: int) -> bytes | None:
        cache = self.dirs.get(ino)
        return None if cache is None else cache.setting()

    def mark(self, ino: int, value: bytes) -> None:
        """Make directory ``ino`` a cache (or change its budget or policy)."""
        if not self.namespace.get(ino).is_dir:
            raise FsError(errno.ENOTDIR, "only a directory can be a cache")
        max_size, policy = parse_setting(value)
        cache = self.dirs.get(ino)
        fresh = cache is None
        if cache is None:
            cache = CacheDir(ino, max_size, policy, {})
        elif cache.policy_name != policy:
            # The same object (the evictor may hold it): a new policy that
            # starts from the order of eviction the old one had reached.
            replacement = make_policy(policy, max_size)
            for member, size, _ in list(cache.policy.entries()):
                replacement.admit(member, size)
            cache.policy, cache.policy_name = replacement, policy
        cache.max_size = max_size
        cache.policy.capacity = max_size
        self.namespace.put_cache_records({ino: cache.record()})
        self.dirs[ino] = cache
        if fresh:
            self._moved()
            # Files of an enclosing cache below this directory are this one's now.
            below = list(self._walk(ino))
            for _, _, inode in below:
                self._drop(inode.ino)
            for parent, name, inode in below:
                self._add(cache, parent, name, inode.ino, self._size(inode))
        log.info("directory %d is a cache: %d bytes, %s", ino, max_size, policy)
        self._check(cache)

    def unmark(self, ino: int) -> None:
        if ino not in self.dirs:
            raise FsError(errno.ENODATA, "the directory is not a cache")
        self._unmark(ino)
        self.namespace.put_cache_records({ino: None})

    def _unmark(self, ino: int) -> None:
        cache = self.dirs.pop(ino)
        for member in list(cache.names):
            self._drop(member)
        self._moved()
        outer = self.cache_of(ino) if self.dirs else None
        if outer is not None:
            for parent, name, inode in self._walk(ino):
                self._add(outer, parent, name, inode.ino, self._size(inode))
            self._check(outer)

    def save(self) -> None:
        """Write the policies and counters to the store (unmount, now and then)."""
        if _in_trio():
            self._saved = trio.current_time()
        if not self.dirs or self.fs.store.readonly:
            return
        try:
            self.namespace.put_cache_records(
                {ino: cache.record() for ino, cache in self.dirs.items()},
                {ino: cache.state() for ino, cache in self.dirs.items()},
            )
        except CachefsError as exc:
            log.warning("could not save the state of the cache directories: %s", exc)

    # --- figures -----------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        caches = []
        for ino, cache in sorted(self.dirs.items()):
            try:
                path = self.namespace.path_of(ino).decode("utf-8", "surrogateescape")
            except CachefsError:
                path = f"<inode {ino}>"
            caches.append(cache.figures(path))
        waits = sorted(self.waits)
        # Over all checked writes (most never wait): the p99 is among the
        # waits only when more than 1% of the writes waited.
        unblocked_share = 1.0 - self.blocked / self.checks if self.checks else 1.0
        q_all = (0.99 - unblocked_share) / (1.0 - unblocked_share) if unblocked_share < 0.99 else 0
        return {
            "max_store_size": self.max_store_size,
            "caches": caches,
            "throttle_waits": {
                "count": len(waits),
                "p50_ms": _percentile(waits, 0.50) * 1000,
                "p99_ms": _percentile(waits, 0.99) * 1000,
                "max_ms": (waits[-1] if waits else 0.0) * 1000,
                "checked": self.checks,
                "blocked": self.blocked,
                "p99_all_ms": _percentile(waits, q_all) * 1000 if q_all > 0 else 0.0,
            },
        }

    # --- room for writes --------------------------------------------------------------------

    async def make_room(self, ino: int, growth: int) -> None:
        """Wait until file ``ino`` may grow by ``growth`` bytes: its cache's
        budget and the store quota allow it.  ENOSPC when they cannot."""
        cache = self.members.get(ino)
        if cache is not None or self.max_store_size is not None:
            self.checks += 1
        if not self._short(cache, growth):
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
        try:
            while self._short(cache, growth):
                over = cache is not None and cache.usage + growth > cache.max_size
                stuck = cache is not None and not self._evictable(cache)
                if over and stuck and cache is not None and not self._closing(cache):
                    raise _full(f"the cache's budget of {cache.max_size} bytes is used")
                if not over and self._quota_stuck():
                    raise _full(f"the store quota of {self.max_store_size} bytes is used")
                if trio.current_time() >= deadline:
                    raise _full(f"eviction made no room within {THROTTLE_LIMIT:g} s")
                progress = self._progress
                self.wake()
                with trio.move_on_at(deadline):
                    await progress.wait()
        finally:
            self._waiting -= 1
            if cache is not None:
                cache.wanted -= growth
            waited = trio.current_time() - start
            self.waits.append(waited)
            if cache is not None:
                cache.counters["throttled"] += 1
                cache.counters["throttled_seconds"] += waited

    def _short(self, cache: CacheDir | None, growth: int) -> bool:
        if cache is not None and cache.usage + growth > cache.max_size:
            return True
        return self.max_store_size is not None and self._stored >= self.max_store_size

    def _pinned(self, cache: CacheDir) -> int:
        """Bytes of the cache's files that are open (they may not go)."""
        return sum(
            state.size
            for ino, state in self.fs.files.items()
            if state.opens and self.members.get(ino) is cache
        )

    def _closing(self, cache: CacheDir) -> bool:
        """Whether files of the cache are closed but still being published
        (evictable once that is done)."""
        return any(
            not state.opens and self.members.get(ino) is cache
            for ino, state in self.fs.files.items()
        )

    def _evictable(self, cache: CacheDir) -> bool:
        return next(self._victims(cache), None) is not None

    def _victims(self, cache: CacheDir) -> Iterator[int]:
        files = self.fs.files
        for ino in cache.policy.victims():
            if ino not in files and ino in cache.names:
                yield ino

    def _quota_stuck(self) -> bool:
        """Over the quota, nothing evictable, and gc ran since the last reference
        to stored data was dropped (so it cannot free anything either)."""
        if self.max_store_size is None or self._stored < self.max_store_size:
            return False
        if any(self._evictable(cache) for cache in self.dirs.values()):
            return False
        return self._gc_dropped == self.fs.store.dropped

    # --- eviction --------------------------------------------------------------------------

    async def run(self) -> None:
        """Evict in the background; save the policies now and then."""
        self._saved = trio.current_time()
        while True:
            with trio.move_on_at(self._saved + SAVE_INTERVAL):
                await self._wake.wait()
            if trio.current_time() >= self._saved + SAVE_INTERVAL:
                self.save()
            if not self._wake.is_set():
                continue
            self._wake = trio.Event()
            try:
                await self._enforce()
            except CachefsError as exc:
                self.fs.errors += 1
                log.error("eviction failed: %s", exc)
                await trio.sleep(1)
            finally:
                self._signal()

    def _signal(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _enforce(self) -> None:
        for cache in list(self.dirs.values()):
            # Down to the low watermark, and room for the writers that wait.
            target = max(0, min(int(cache.max_size * LOW_WATERMARK), cache.max_size - cache.wanted))
            if cache.usage > cache.max_size * HIGH_WATERMARK or (
                cache.wanted and cache.usage > target
            ):
                while cache.usage > target:
                    if not self.evict(cache, target)[0]:
                        break
                    self._signal()
                    await trio.sleep(0)
        quota = self.max_store_size
        if quota is not None and self._stored >= quota * HIGH_WATERMARK:
            await self._enforce_quota(quota)

    async def _enforce_quota(self, quota: int) -> None:
        """Evict from the caches (fullest first) and collect garbage until the
        store is below the quota's low watermark, or nothing is left to do."""
        while self._stored >= quota * LOW_WATERMARK:
            stats = self.fs.store.stats()
            excess = self._stored - int(quota * LOW_WATERMARK)
            # Logical bytes to evict for that many stored bytes, roughly.
            ratio = stats.logical_bytes / stats.stored_bytes if stats.stored_bytes else 1.0
            goal = max(1, int(excess * max(1.0, ratio)))
            evicted = 0
            while evicted < goal:
                candidates = [c for c in self.dirs.values() if self._evictable(c)]
                if not candidates:
                    break
                cache = max(candidates, key=lambda c: c.usage / c.max_size)
                files, freed = self.evict(cache, max(0, cache.usage - (goal - evicted)))
                if not files:
                    break
                evicted += max(1, freed)
                self._signal()
                await trio.sleep(0)
            if self._gc_dropped == self.fs.store.dropped:
                return  # nothing was freed since gc last ran
            await self._collect_garbage()
            self._signal()
            if not evicted:
                return

    async def _collect_garbage(self) -> None:
        fs = self.fs
        store = fs.store
        dropped = store.dropped
        fs.maintenance += 1
        try:
            report = await trio.to_thread.run_sync(
                lambda: gc.collect_garbage(store), limiter=fs.limiter
            )
        finally:
            fs.maintenance -= 1
        self._gc_dropped = dropped
        self.refresh_stored()
        log.info(
            "store quota: gc reclaimed %d bytes; %d bytes stored of %s",
            report.stored_bytes_removed,
            self._stored,
            self.max_store_size,
        )

    def evict(self, cache: CacheDir, target: int) -> tuple[int, int]:
        """Evict one batch of files of ``cache``, by its policy, towards
        ``target`` bytes of usage; returns (files, logical bytes) evicted.

        An evicted file loses every entry it has in the cache, in one
        transaction, and is deleted at once unless it has entries elsewhere
        (a file the kernel still knows reads as gone: its entry is invalidated)."""
        fs = self.fs
        chosen: list[int] = []
        planned = 0
        for ino in self._victims(cache):
            chosen.append(ino)
            planned += self._size_of(ino)
            if cache.usage - planned <= target or len(chosen) >= _BATCH:
                break
        if not chosen:
            return 0, 0
        entries = [(parent, name, ino) for ino in chosen for parent, name in cache.names[ino]]
        removed = fs._freeing(lambda: fs.namespace.evict(entries, set()))
        went = {(parent, name, inode.ino) for parent, name, inode in removed}
        final = {inode.ino: inode for _, _, inode in removed}  # the last state of each
        files = freed = 0
        for ino in chosen:
            inode = final.get(ino)
            if inode is None:  # its entries changed under us: stop following it
                self._drop(ino)
                continue
            names = cache.names.get(ino, [])
            files += 1
            freed += inode.size
            cache.policy.evict(ino, ghost=names[0] if names else None)
            cache.names.pop(ino, None)
            self.members.pop(ino, None)
            cache.counters["evictions"] += 1
            cache.counters["bytes_evicted"] += inode.size
            for parent, name in names:
                if (parent, name, ino) in went:
                    fs.evicted(parent, name, inode)
        return files, freed

    def _size_of(self, ino: int) -> int:
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


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


__all__ = ["CACHE_XATTR", "CacheDir", "CacheDirs", "parse_setting"]
