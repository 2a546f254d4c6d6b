"""Cache directories: byte budgets, policies and hit/miss figures (filesystem layer).

A directory of a mounted store can be marked as a *cache* with a budget in
logical bytes (what ``du --apparent-size`` shows) and an eviction policy
(``_policy.py``: LRU, LFU with aging, ARC).  The mark is kept in the
namespace's ``caches`` database (``engine.CacheRecords``), survives remounts,
and shows as the xattr ``user.cachefs.cache`` on the directory; setting that
xattr (``cachefs cache set`` does) marks the directory, removing it unmarks it.

Which files count.  A regular file belongs to the nearest cache directory
above it (caches may nest: the inner one's files are the inner one's).  Its
size counts from its creation on, unpublished writes included.  A file with
several hard links is followed through each of its entries in the cache;
when the last of those goes and others remain, the file leaves the cache (it
is no longer evictable and no longer counted).

:class:`CacheDirs` keeps these books from the filesystem's events (it is a
listener, ``_events.py``); evicting and making room for writes is
``_eviction.py``.

Hits and misses.  The open of a file of a cache counts as a hit and refreshes
its recency and frequency (in memory: no metadata write per read); the
lookup of a missing name inside a cache counts as a miss.  Policies are
saved to ``cache_state`` at unmount and every ``SAVE_INTERVAL`` seconds, with
the counters, so that a remount keeps the order of eviction.

Everything here runs on the trio thread of the filesystem.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio

from cachefs.engine import (
    ROOT_INODE,
    CachefsError,
    CacheRecords,
    FsError,
    GcReport,
    Inode,
    Namespace,
    Store,
)
from cachefs.format.schema import STORE_SETTINGS
from cachefs.fs._events import Entry, FsEvents
from cachefs.fs._eviction import Eviction, OnEvicted
from cachefs.fs._files import OpenFiles
from cachefs.fs._policy import POLICIES, Policy, make_policy
from cachefs.fs._settings import parse_setting

log = logging.getLogger(__name__)

#: Counters kept in a cache's record.
_COUNTERS = ("hits", "misses", "evictions", "bytes_evicted", "throttled", "throttled_seconds")


class CacheDir:
    """One cache directory: its settings, policy, members and counters."""

    def __init__(
        self, ino: int, max_size: int, policy: str, record: dict[str, Any], shared: str | None
    ) -> None:
        self.ino = ino
        self.max_size = max_size
        self.policy_name = policy
        #: The share's name when the directory is shared through the remote tiers.
        self.shared = shared
        self.policy: Policy = make_policy(policy, max_size)
        #: The entries (parent, name) of each member file inside this cache.
        self.names: dict[int, list[tuple[int, bytes]]] = {}
        self.counters: dict[str, float] = {k: float(record.get(k, 0)) for k in _COUNTERS}
        #: The counters when this process took the cache up: the figures since
        #: then only grow (metrics), where the kept ones restart from the last
        #: save after a crash.
        self.opened = dict(self.counters)
        #: Bytes that writers waiting for room want to add.
        self.wanted = 0
        #: Each waiting writer's growth (``wanted`` is their sum).
        self.growths: list[int] = []
        #: Bytes held for files being stored whole (``Reservation``): counted
        #: as used until the file is.
        self.reserved = 0

    @property
    def usage(self) -> int:
        return int(self.policy.bytes)

    def setting(self) -> bytes:
        shared = "" if self.shared is None else f" shared={self.shared}"
        return f"max_size={self.max_size} policy={self.policy_name}{shared}".encode()

    def record(self) -> dict[str, Any]:
        shared = {} if self.shared is None else {"shared": self.shared}
        return {"max_size": self.max_size, "policy": self.policy_name, **shared, **self.counters}

    def state(self) -> list[tuple[int, int]]:
        """(file inode, count) of every member, in the order that rebuilds the policy."""
        return [(ino, count) for ino, _, count in self.policy.entries()]

    def figures(self, path: str) -> dict[str, Any]:
        hits, misses = self.counters["hits"], self.counters["misses"]
        return {
            "path": path,
            "inode": self.ino,
            "max_size": self.max_size,
            "policy": self.policy_name,
            "shared": self.shared,
            "files": len(self.policy),
            "bytes": self.usage,
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
            "evictions": int(self.counters["evictions"]),
            "bytes_evicted": int(self.counters["bytes_evicted"]),
            "throttled": int(self.counters["throttled"]),
            "throttled_seconds": round(self.counters["throttled_seconds"], 6),
            "since_start": {k: self.counters[k] - self.opened[k] for k in _COUNTERS},
        }


class Reservation:
    """Room held in a cache for a file being stored whole (a server's upload,
    a shared directory's fetch), so that files stored at once do not all take
    the same room: released once the file is counted, or was not stored."""

    __slots__ = ("cache", "released", "size")

    def __init__(self, cache: CacheDir | None, size: int, released: Callable[[], None]) -> None:
        """``released``: told when the room is let go (writers waiting for
        room wait for that too)."""
        self.cache = cache
        self.size = size
        self.released = released
        if cache is not None:
            cache.reserved += size

    def release(self) -> None:
        """On the filesystem's trio thread; a second call does nothing."""
        if self.cache is not None:
            self.cache.reserved -= self.size
            self.cache = None
            self.released()


class CacheDirs(FsEvents):
    """The cache directories of a mounted store and the store quota."""

    def __init__(
        self,
        namespace: Namespace,
        store: Store,
        files: OpenFiles,
        *,
        on_evicted: OnEvicted,
        collect_garbage: Callable[[], Awaitable[GcReport]],
        on_error: Callable[[CachefsError], None],
        max_store_size: int | None = None,
    ) -> None:
        self.namespace = namespace
        self.records = CacheRecords(namespace)
        self.files = files
        self.dirs: dict[int, CacheDir] = {}
        #: Member file -> its cache.
        self.members: dict[int, CacheDir] = {}
        #: Directory -> the cache it is in (0: none); filled on demand.
        self._dir_cache: dict[int, int] = {}
        #: When the policies were last saved (trio clock; set when eviction runs).
        self.saved_at = 0.0
        records = self.records.records()
        settings = records.pop(STORE_SETTINGS, {})
        if not isinstance(settings, dict):
            log.error("ignoring the damaged store-wide cache settings: %r", settings)
            settings = {}
        if max_store_size is not None:
            settings["max_store_size"] = max_store_size
            self.records.put({STORE_SETTINGS: settings})
        self.max_store_size: int | None = settings.get("max_store_size") or None
        for ino, record in records.items():
            try:
                max_size, policy = int(record["max_size"]), str(record["policy"])
                shared = record.get("shared")
                if max_size <= 0 or policy not in POLICIES or not isinstance(shared, str | None):
                    raise ValueError(record)
                self.dirs[ino] = CacheDir(ino, max_size, policy, record, shared)
            except (KeyError, ValueError, TypeError):
                log.error(
                    "ignoring the damaged settings of cache directory %d: %r "
                    "(set them again with `cachefs cache set`)",
                    ino,
                    record,
                )
        for cache in self.dirs.values():
            self._load(cache)
        self.eviction = Eviction(
            self,
            namespace,
            store,
            files,
            on_evicted=on_evicted,
            collect_garbage=collect_garbage,
            on_error=on_error,
        )

    # --- membership ------------------------------------------------------------------

    def _load(self, cache: CacheDir) -> None:
        """Find the cache's files; rebuild its policy from the saved state."""
        found: dict[int, tuple[Inode, list[tuple[int, bytes]]]] = {}
        for parent, name, inode in self._walk(cache.ino):
            found.setdefault(inode.ino, (inode, []))[1].append((parent, name))
        for ino, count in self.records.state_of(cache.ino):
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

    def drop(self, ino: int) -> None:
        """Stop following file ``ino`` (it left its cache)."""
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
            self.drop(ino)

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

    def cache_dir_of(self, directory: int) -> int | None:
        """The inode of the cache directory ``directory`` is in (None: none)."""
        cache = self.cache_of(directory)
        return None if cache is None else cache.ino

    def opened(self, ino: int, size: int) -> None:
        cache = self.members.get(ino)
        if cache is not None:
            cache.counters["hits"] += 1
            cache.policy.hit(ino)

    def opened_many(self, files: Sequence[tuple[int, int]]) -> None:
        # Runs of files of one cache directory (a server's batch is all one)
        # are told to its policy at once.
        member = self.members.get
        run: list[int] = []
        current: CacheDir | None = None
        for ino, _ in files:
            cache = member(ino)
            if cache is not current:
                if current is not None:
                    current.counters["hits"] += len(run)
                    current.policy.hits(run)
                current, run = cache, []
            if cache is not None:
                run.append(ino)
        if current is not None:
            current.counters["hits"] += len(run)
            current.policy.hits(run)

    def created(self, parent: int, name: bytes, inode: Inode) -> None:
        if inode.is_reg:
            cache = self.cache_of(parent)
            if cache is not None:
                self._add(cache, parent, name, inode.ino, inode.size)
                if inode.size:  # stored whole (a server's, a fetch)
                    self.eviction.check(cache)

    def linked(self, parent: int, name: bytes, inode: Inode) -> None:
        if not inode.is_reg:
            return  # a hard link of a symlink (or a special file): not a cache's file
        cache = self.cache_of(parent)
        if cache is not None:
            self._add(cache, parent, name, inode.ino, inode.size)
            self.eviction.check(cache)

    def removed(self, parent: int, name: bytes, inode: Inode) -> None:
        """An entry went (unlink, rmdir, or replaced by a rename)."""
        if inode.is_dir:
            self._dir_cache.pop(inode.ino, None)
            if inode.ino in self.dirs:
                self._unmark(inode.ino)
            return
        if inode.nlink == 0:
            self.drop(inode.ino)
        else:
            self._drop_entry(inode.ino, (parent, name))

    def replaced(self, parent: int, name: bytes, inode: Inode) -> None:
        self.removed(parent, name, inode)

    def renamed(
        self,
        moved: Inode,
        old: Entry,
        new: Entry,
        exchanged: Inode | None,
    ) -> None:
        """``moved`` went from entry ``old`` to ``new``; with RENAME_EXCHANGE,
        ``exchanged`` went the other way."""
        if not self.dirs:
            return
        self._rename_one(moved, old, new)
        if exchanged is not None:
            self._rename_one(exchanged, new, old)

    def _rename_one(self, inode: Inode, old: Entry, new: Entry) -> None:
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
            for parent, name, child in moved:
                if self.members.get(child.ino) is not target:
                    # Names of it left behind keep it in its cache.
                    self._drop_entry(child.ino, (parent, name))
            if target is not None:
                for parent, name, child in moved:
                    self._add(target, parent, name, child.ino, self._size(child))
                self.eviction.check(target)
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
            self.eviction.check(target)

    def _size(self, inode: Inode) -> int:
        size = self.files.size(inode.ino)
        return inode.size if size is None else size

    def resized(self, ino: int, size: int) -> None:
        cache = self.members.get(ino)
        if cache is not None:
            cache.policy.resize(ino, size)
            self.eviction.check(cache)

    def published(self, ino: int, size: int) -> None:
        self.eviction.published()
        self._may_go(ino)

    def closed(self, ino: int) -> None:
        self.eviction.changed()
        self._may_go(ino)

    def _may_go(self, ino: int) -> None:
        """File ``ino`` may be evicted now: if its cache is over its budget
        (a file moved in while open), the evictor passes again."""
        cache = self.members.get(ino)
        if cache is not None:
            self.eviction.check(cache)

    # --- settings ----------------------------------------------------------------------

    def setting_of(self, ino: int) -> bytes | None:
        cache = self.dirs.get(ino)
        return None if cache is None else cache.setting()

    def mark(self, ino: int, value: bytes) -> None:
        """Make directory ``ino`` a cache (or change its budget or policy)."""
        if not self.namespace.get(ino).is_dir:
            raise FsError(errno.ENOTDIR, "only a directory can be a cache")
        max_size, policy, shared = parse_setting(value)
        cache = self.dirs.get(ino)
        fresh = cache is None
        if cache is None:
            cache = CacheDir(ino, max_size, policy, {}, shared)
        elif cache.policy_name != policy:
            # The same object (the evictor may hold it): a new policy that
            # starts from the order of eviction the old one had reached.
            replacement = make_policy(policy, max_size)
            for member, size, _ in list(cache.policy.entries()):
                replacement.admit(member, size)
            cache.policy, cache.policy_name = replacement, policy
        cache.max_size, cache.shared = max_size, shared
        cache.policy.capacity = max_size
        self.records.put({ino: cache.record()})
        self.dirs[ino] = cache
        self._audit("cache.set", ino, max_size=max_size, policy=policy, shared=shared)
        if fresh:
            self._moved()
            # Files of an enclosing cache below this directory are this one's now.
            below = list(self._walk(ino))
            for parent, name, inode in below:
                self._drop_entry(inode.ino, (parent, name))  # names outside keep it
            for parent, name, inode in below:
                self._add(cache, parent, name, inode.ino, self._size(inode))
        log.info("directory %d is a cache: %d bytes, %s", ino, max_size, policy)
        self.eviction.check(cache)

    def unmark(self, ino: int) -> None:
        if ino not in self.dirs:
            raise FsError(errno.ENODATA, "the directory is not a cache")
        self._unmark(ino)
        self.records.put({ino: None})
        self._audit("cache.unset", ino)

    def _audit(self, event: str, ino: int, **fields: object) -> None:
        path = self.namespace.path_of(ino).decode("utf-8", "surrogateescape")
        self.namespace.store.audit.record(event, path=path, **fields)

    def _unmark(self, ino: int) -> None:
        cache = self.dirs.pop(ino)
        for member in list(cache.names):
            self.drop(member)
        self._moved()
        outer = self.cache_of(ino) if self.dirs else None
        if outer is not None:
            for parent, name, inode in self._walk(ino):
                self._add(outer, parent, name, inode.ino, self._size(inode))
            self.eviction.check(outer)

    def save(self) -> None:
        """Write the policies and counters to the store (unmount, now and then)."""
        if _in_trio():
            self.saved_at = trio.current_time()
        if not self.dirs:
            return
        try:
            self.records.put(
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
        return {
            "max_store_size": self.max_store_size,
            "quota_stuck": self.eviction.quota_stuck(),
            "caches": caches,
            "throttle_waits": self.eviction.figures(),
        }

    async def make_room(self, ino: int, growth: int) -> None:
        """Wait until file ``ino`` may grow by ``growth`` bytes (``Eviction.make_room``)."""
        await self.eviction.make_room(self.members.get(ino), growth)

    async def make_room_in(self, directory: int, size: int, *, hold: bool) -> Reservation:
        """Wait until a new file of ``size`` bytes may be made in ``directory``;
        with ``hold``, the room is held until the reservation is released."""
        cache = self.cache_of(directory)
        await self.eviction.make_room(cache, size, queue=hold)
        return Reservation(cache if hold else None, size, self.eviction.changed)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


__all__ = ["CacheDir", "CacheDirs", "Reservation"]
