"""Eviction policies of cache directories (filesystem layer, pure bookkeeping).

Used by the filesystem layer's cache directories (``_caches.py``) and by the
trace-replay benchmark (``scripts/bench_cache.py``).  This module does no I/O
and imports nothing else from cachefs.

A policy tracks the *resident files* of one cache with their sizes in bytes
and orders them for eviction.  It does not enforce the budget: the caller
reports events (:meth:`Policy.admit`, :meth:`~Policy.hit`,
:meth:`~Policy.miss`, :meth:`~Policy.resize`, :meth:`~Policy.discard`), asks
for candidates with :meth:`~Policy.victims`, evicts the ones it can and
reports each with :meth:`~Policy.evict`.

Keys are opaque hashable values.  The mount uses inode numbers for resident
files and ``(parent_inode, name)`` as *ghost keys*, the names under which ARC
remembers evicted files (an evicted file's inode is gone; the name it is
looked up by again is not).  The replay uses path strings for both.

The policies (``n`` resident files, ``g`` ghosts, ``P`` distinct priorities):

``lru``  least recently used first.  One ``OrderedDict``: every event O(1);
    ``victims()`` walks it from the old end.

``lfu``  least frequently used first with dynamic aging (LFU-DA, Arlitt et
    al. 2000).  A file's priority is ``L + frequency``, computed at its last
    access, where ``L`` is the priority of the last evicted file; ties go
    to the least recently used.  Without aging, a file that was hot once
    keeps its high count forever and outlives every file of a new workload;
    with it, files of the new workload enter at the raised ``L`` and soon
    overtake it.  Files are kept in buckets per priority (``OrderedDict``s,
    oldest access first) with a lazy heap of the priorities: ``hit`` and
    ``admit`` are O(1) plus O(log P) when a new priority appears (amortised:
    the heap is rebuilt when stale priorities outnumber live ones).

``arc``  Adaptive Replacement Cache (Megiddo & Modha, FAST 2003) counted in
    bytes.  T1 holds files seen once, T2 files seen at least twice; B1 and
    B2 are ghost lists of files evicted from T1 and T2 (keys and sizes
    only).  The target ``p`` of T1's bytes adapts: a request for a ghost of
    B1 means T1 was too small (``p`` grows), one of B2 that T2 was (``p``
    shrinks), each by the ghost's size times the ratio of the ghost lists'
    bytes (at least 1).  Ghost lists are bounded as in ARC, in bytes:
    ``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c``; a ghost
    weighs at least one byte so that ghosts of empty files stay bounded
    too.  Every event O(1) (amortised over the ghosts it drops).

``victims()`` is a lazy iterator in every policy: taking the first few
candidates costs O(1) (LRU, ARC) or O(log P) (LFU) whatever the number of
files.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, TypeAlias

#: A key of a resident file or of a ghost: any hashable value, opaque to the
#: policies.  ``Any`` rather than ``Hashable`` so that each caller gets its
#: own key type back from :meth:`Policy.victims` and :meth:`Policy.entries`.
Key: TypeAlias = Any


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"a file's size cannot be negative: {size}")


class Policy(ABC):
    """The eviction order of one cache's resident files.

    Events about a key that is not resident (``hit``, ``resize``,
    ``discard``, ``evict``) are ignored: the policy is advisory, and a
    caller that lost track of a file must not be taken down by it.
    """

    #: The name of the policy in settings and on the command line.
    name: ClassVar[str]

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"a cache's budget cannot be negative: {capacity}")
        self._capacity = capacity
        self._bytes = 0

    @property
    def capacity(self) -> int:
        """The budget in bytes (ARC's ``c``; LRU and LFU do not use it).
        Settable when the budget changes."""
        return self._capacity

    @capacity.setter
    def capacity(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"a cache's budget cannot be negative: {capacity}")
        self._capacity = capacity
        self._capacity_changed()

    def _capacity_changed(self) -> None:  # noqa: B027 - a hook, empty by default
        """Hook for policies that depend on the budget."""

    @property
    def bytes(self) -> int:
        """The sum of the resident files' sizes."""
        return self._bytes

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self)} files, {self._bytes} bytes of {self._capacity}>"

    @abstractmethod
    def __contains__(self, key: Key) -> bool:
        """Whether ``key`` is a resident file."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of resident files."""

    @abstractmethod
    def admit(self, key: Key, size: int, *, ghost: Key = None) -> None:
        """A new resident file of ``size`` bytes.

        ``ghost`` is the key under which the file may be remembered from an
        earlier eviction (default: ``key``).  Admitting a resident key
        counts as :meth:`resize` and :meth:`hit`.
        """

    @abstractmethod
    def hit(self, key: Key) -> None:
        """A request (open) of the resident file ``key``."""

    def hits(self, keys: Iterable[Key]) -> None:
        """:meth:`hit` of each key, in order (a server's batch of lookups)."""
        for key in keys:
            self.hit(key)

    def miss(self, key: Key) -> None:  # noqa: B027 - a no-op unless a policy has ghosts
        """A request for ``key``, a ghost key, that is not resident (the
        lookup of a missing name).  A no-op unless the policy keeps ghosts."""

    @abstractmethod
    def resize(self, key: Key, size: int) -> None:
        """The resident file ``key`` now has ``size`` bytes."""

    def renamed(self, key: Key, ghost: Key) -> None:  # noqa: B027 - ARC only
        """Resident ``key`` now goes by ``ghost`` (a rename).  ARC: a file
        renamed onto a name that :meth:`miss` recalled from a ghost list (a
        tool writing a temporary file and renaming it into place) is placed
        as :meth:`admit` would have placed it under that name."""

    @abstractmethod
    def discard(self, key: Key) -> None:
        """The file left the cache other than by eviction (deleted, moved
        out): forget it, leaving no ghost."""

    @abstractmethod
    def evict(self, key: Key, *, ghost: Key = None) -> None:
        """The caller evicted the resident file ``key``; a policy with
        ghosts remembers it under ``ghost`` (default: ``key``)."""

    @abstractmethod
    def victims(self) -> Iterator[Key]:
        """The resident keys, best victim first, each once.

        Lazy: taking the first few costs little whatever the number of
        files.  The caller may skip keys (files it cannot evict now).  The
        iterator is only valid until the next call of another method: after
        ``evict``, ``admit`` or any other event, call ``victims()`` again.
        """

    @abstractmethod
    def entries(self) -> Iterator[tuple[Key, int, int]]:
        """``(key, size, count)`` of every resident file, in an order such
        that :meth:`restore` of each, in that order, on a fresh policy of
        the same kind rebuilds the same order of victims.  What ``count``
        means depends on the policy; it is an int >= 0."""

    @abstractmethod
    def restore(self, key: Key, size: int, count: int) -> None:
        """Add a resident file as saved by :meth:`entries` (a remount)."""


class LRU(Policy):
    """Least recently used first.  ``count`` in entries: requests seen."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        #: key -> size, least recently used first.
        self._sizes: OrderedDict[Key, int] = OrderedDict()
        #: key -> requests (admission included).
        self._counts: dict[Key, int] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def admit(self, key: Key, size: int, *, ghost: Key = None) -> None:
        if key in self._sizes:
            self.resize(key, size)
            self.hit(key)
            return
        self.restore(key, size, 1)

    def hit(self, key: Key) -> None:
        if key in self._sizes:
            self._sizes.move_to_end(key)
            self._counts[key] += 1

    def hits(self, keys: Iterable[Key]) -> None:
        sizes, counts, to_end = self._sizes, self._counts, self._sizes.move_to_end
        for key in keys:
            if key in sizes:
                to_end(key)
                counts[key] += 1

    def resize(self, key: Key, size: int) -> None:
        _check_size(size)
        old = self._sizes.get(key)
        if old is not None:
            self._sizes[key] = size
            self._bytes += size - old

    def discard(self, key: Key) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._bytes -= size
            del self._counts[key]

    def evict(self, key: Key, *, ghost: Key = None) -> None:
        self.discard(key)

    def victims(self) -> Iterator[Key]:
        return iter(self._sizes)

    def entries(self) -> Iterator[tuple[Key, int, int]]:
        for key, size in self._sizes.items():
            yield key, size, self._counts[key]

    def restore(self, key: Key, size: int, count: int) -> None:
        _check_size(size)
        self.discard(key)
        self._sizes[key] = size
        self._counts[key] = max(0, count)
        self._bytes += size


class _Counted:
    """A resident file of :class:`LFU`."""

    __slots__ = ("frequency", "priority", "size")

    def __init__(self, size: int, frequency: int, priority: int) -> None:
        self.size = size
        self.frequency = frequency
        self.priority = priority


class LFU(Policy):
    """Least frequently used first, with dynamic aging (LFU-DA).

    ``count`` in entries: the file's priority above the current age ``L``
    (its frequency, as long as nothing was evicted).  A restored policy
    starts at age 0 with ``frequency = priority = count``: the order of
    victims is kept, the age and exact frequencies are not.
    """

    name = "lfu"

    #: Stale priorities tolerated in the heap, beyond the live ones, before it is rebuilt.
    _HEAP_SLACK = 64

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        #: ``L``: the priority of the last evicted file (never decreases).
        self.age = 0
        self._files: dict[Key, _Counted] = {}
        #: priority -> keys of that priority, least recently used first.
        #: An emptied bucket is deleted.
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        #: Min-heap of priorities, with stale ones (no bucket) removed lazily;
        #: ``_queued`` is the set of priorities in it (no duplicates).
        self._heap: list[int] = []
        self._queued: set[int] = set()

    def __contains__(self, key: Key) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def _place(self, key: Key, priority: int) -> None:
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = OrderedDict()
            if priority not in self._queued:
                if len(self._heap) > 2 * len(self._buckets) + self._HEAP_SLACK:
                    self._heap = list(self._buckets)
                    heapq.heapify(self._heap)
                    self._queued = set(self._heap)
                else:
                    heapq.heappush(self._heap, priority)
                    self._queued.add(priority)
        bucket[key] = None

    def _unplace(self, key: Key, priority: int) -> None:
        bucket = self._buckets[priority]
        del bucket[key]
        if not bucket:
            del self._buckets[priority]

    def admit(self, key: Key, size: int, *, ghost: Key = None) -> None:
        if key in self._files:
            self.resize(key, size)
            self.hit(key)
            return
        _check_size(size)
        self._files[key] = _Counted(size, 1, self.age + 1)
        self._place(key, self.age + 1)
        self._bytes += size

    def hit(self, key: Key) -> None:
        entry = self._files.get(key)
        if entry is None:
            return
        self._unplace(key, entry.priority)
        entry.frequency += 1
        # Always above the old priority: the age never decreases.
        entry.priority = self.age + entry.frequency
        self._place(key, entry.priority)

    def resize(self, key: Key, size: int) -> None:
        _check_size(size)
        entry = self._files.get(key)
        if entry is not None:
            self._bytes += size - entry.size
            entry.size = size

    def discard(self, key: Key) -> None:
        entry = self._files.pop(key, None)
        if entry is not None:
            self._unplace(key, entry.priority)
            self._bytes -= entry.size

    def evict(self, key: Key, *, ghost: Key = None) -> None:
        entry = self._files.get(key)
        if entry is not None:
            self.discard(key)
            # A caller that skipped better victims evicts a higher priority:
            # the age follows it, as LFU-DA's L follows the evicted file.
            self.age = max(self.age, entry.priority)

    def victims(self) -> Iterator[Key]:
        heap = self._heap
        while heap and heap[0] not in self._buckets:
            self._queued.discard(heapq.heappop(heap))
        if not heap:
            return
        # Walk the heap in order without popping: a frontier of positions.
        frontier = [(heap[0], 0)]
        while frontier:
            priority, at = heapq.heappop(frontier)
            for child in (2 * at + 1, 2 * at + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
            bucket = self._buckets.get(priority)
            if bucket:
                yield from bucket

    def entries(self) -> Iterator[tuple[Key, int, int]]:
        for key in self.victims():
            entry = self._files[key]
            # Files below the age (left by skipped victims) share count 0,
            # in their order.
            yield key, entry.size, max(0, entry.priority - self.age)

    def restore(self, key: Key, size: int, count: int) -> None:
        _check_size(size)
        self.discard(key)
        count = max(0, count)
        self._files[key] = _Counted(size, count, self.age + count)
        self._place(key, self.age + count)
        self._bytes += size


class ARC(Policy):
    """Adaptive Replacement Cache in bytes.

    ``count`` in entries: 1 for a file of T1, 2 for one of T2.  Ghosts and
    ``p`` are not saved: a restored policy starts with ``p = 0``, like a new
    ARC, so its order of victims is the saved one when ``p`` was 0 (with
    another ``p``, T1 and T2 each keep their order).
    """

    name = "arc"

    #: Ghost hits remembered by :meth:`miss` for the :meth:`admit` that follows.
    RECALLED = 1024

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        #: The target size of T1 in bytes, 0 <= p <= capacity.
        self.p = 0
        # Resident lists (key -> size) and ghost lists (ghost key -> weight),
        # least recently used first.
        self._t1: OrderedDict[Key, int] = OrderedDict()
        self._t2: OrderedDict[Key, int] = OrderedDict()
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._t1_bytes = 0
        self._b1_bytes = 0
        self._b2_bytes = 0
        #: Ghost key -> whether it came from B2, for ghosts that miss() took
        #: out of B1/B2 (p already adapted) and admit() has not seen yet.
        self._recalled: OrderedDict[Key, bool] = OrderedDict()
        #: Whether the last admitted file was a ghost of B2 (REPLACE's tie rule).
        self._b2_hit = False

    def __contains__(self, key: Key) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def list_of(self, key: Key) -> str | None:
        """``"T1"`` or ``"T2"`` for a resident key, ``"B1"`` or ``"B2"`` for
        a ghost key, else None (for tests and statistics)."""
        for name, found in (("T1", self._t1), ("T2", self._t2), ("B1", self._b1)):
            if key in found:
                return name
        return "B2" if key in self._b2 else None

    def list_bytes(self) -> dict[str, int]:
        """The bytes of T1, T2, B1 and B2 (ghosts weigh at least 1 byte)."""
        return {
            "T1": self._t1_bytes,
            "T2": self._bytes - self._t1_bytes,
            "B1": self._b1_bytes,
            "B2": self._b2_bytes,
        }

    # --- ghosts and adaptation ------------------------------------------------------

    def _adapt(self, ghost: Key) -> bool:
        """Take ``ghost`` out of B1 or B2 and move ``p`` (ARC cases II and
        III); returns whether it was in B2.  ``ghost`` must be in one."""
        if ghost in self._b1:
            weight = self._b1.pop(ghost)
            delta = weight * max(1.0, self._b2_bytes / self._b1_bytes)
            self._b1_bytes -= weight
            self.p = min(self._capacity, self.p + round(delta))
            return False
        weight = self._b2.pop(ghost)
        delta = weight * max(1.0, self._b1_bytes / self._b2_bytes)
        self._b2_bytes -= weight
        self.p = max(0, self.p - round(delta))
        return True

    def _forget_ghost(self, ghost: Key) -> None:
        weight = self._b1.pop(ghost, None)
        if weight is not None:
            self._b1_bytes -= weight
        weight = self._b2.pop(ghost, None)
        if weight is not None:
            self._b2_bytes -= weight

    def _trim(self) -> None:
        """Drop the oldest ghosts past ARC's bounds."""
        c = self._capacity
        while self._b1 and self._t1_bytes + self._b1_bytes > c:
            self._b1_bytes -= self._b1.popitem(last=False)[1]
        while self._b2 and self._bytes + self._b1_bytes + self._b2_bytes > 2 * c:
            self._b2_bytes -= self._b2.popitem(last=False)[1]
        while self._b1 and self._bytes + self._b1_bytes + self._b2_bytes > 2 * c:
            self._b1_bytes -= self._b1.popitem(last=False)[1]

    def _capacity_changed(self) -> None:
        self.p = min(self.p, self._capacity)
        self._trim()

    def miss(self, key: Key) -> None:
        if key in self._b1 or key in self._b2:
            self._recalled[key] = self._adapt(key)
            if len(self._recalled) > self.RECALLED:
                self._recalled.popitem(last=False)

    # --- resident files ---------------------------------------------------------------

    def admit(self, key: Key, size: int, *, ghost: Key = None) -> None:
        if key in self:
            self.resize(key, size)
            self.hit(key)
            return
        _check_size(size)
        if ghost is None:
            ghost = key
        if ghost in self._recalled:
            self._b2_hit = self._recalled.pop(ghost)
            self._forget_ghost(ghost)
            frequent = True
        elif ghost in self._b1 or ghost in self._b2:
            self._b2_hit = self._adapt(ghost)
            frequent = True
        else:
            self._b2_hit = False
            frequent = False
        self._place(key, size, frequent)

    def renamed(self, key: Key, ghost: Key) -> None:
        if ghost in self._recalled and key in self._t1:
            self._b2_hit = self._recalled.pop(ghost)
            size = self._t1.pop(key)
            self._t1_bytes -= size
            self._t2[key] = size

    def hit(self, key: Key) -> None:
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_bytes -= size
            self._t2[key] = size
        elif key in self._t2:
            self._t2.move_to_end(key)

    def resize(self, key: Key, size: int) -> None:
        _check_size(size)
        if key in self._t1:
            self._t1_bytes += size - self._t1[key]
            self._bytes += size - self._t1[key]
            self._t1[key] = size
        elif key in self._t2:
            self._bytes += size - self._t2[key]
            self._t2[key] = size
        else:
            return
        self._trim()

    def _remove(self, key: Key) -> tuple[int, bool] | None:
        """Take ``key`` out of T1 or T2: (size, whether it was in T2)."""
        size = self._t1.pop(key, None)
        if size is not None:
            self._t1_bytes -= size
            self._bytes -= size
            return size, False
        size = self._t2.pop(key, None)
        if size is not None:
            self._bytes -= size
            return size, True
        return None

    def discard(self, key: Key) -> None:
        self._remove(key)

    def evict(self, key: Key, *, ghost: Key = None) -> None:
        removed = self._remove(key)
        if removed is None:
            return
        size, frequent = removed
        if ghost is None:
            ghost = key
        self._forget_ghost(ghost)
        self._recalled.pop(ghost, None)
        weight = max(1, size)
        if frequent:
            self._b2[ghost] = weight
            self._b2_bytes += weight
        else:
            self._b1[ghost] = weight
            self._b1_bytes += weight
        self._trim()

    def victims(self) -> Iterator[Key]:
        """ARC's REPLACE, repeated: from T1's old end while T1 holds more
        than ``p`` bytes (or exactly ``p`` after a B2 ghost hit), else from
        T2's.  Each key yielded counts as evicted for the next choice; when
        one list runs out (skipped keys), the other continues."""
        t1_left = self._t1_bytes
        in_t1 = iter(self._t1.items())
        in_t2 = iter(self._t2)
        first = next(in_t1, None)
        second = next(in_t2, None)
        while first is not None or second is not None:
            if first is not None and (
                second is None or t1_left > self.p or (t1_left == self.p and self._b2_hit)
            ):
                key, size = first
                t1_left -= size
                yield key
                first = next(in_t1, None)
            else:
                yield second
                second = next(in_t2, None)

    def entries(self) -> Iterator[tuple[Key, int, int]]:
        for key, size in self._t1.items():
            yield key, size, 1
        for key, size in self._t2.items():
            yield key, size, 2

    def restore(self, key: Key, size: int, count: int) -> None:
        _check_size(size)
        self.discard(key)
        self._place(key, size, count >= 2)

    def _place(self, key: Key, size: int, frequent: bool) -> None:
        """A new resident file goes to T2 (``frequent``) or T1."""
        if frequent:
            self._t2[key] = size
        else:
            self._t1[key] = size
            self._t1_bytes += size
        self._bytes += size
        self._trim()


#: The policies by name.
POLICIES: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU, "arc": ARC}


def make_policy(name: str, capacity: int) -> Policy:
    """A new policy ``name`` (a key of :data:`POLICIES`) for a budget of
    ``capacity`` bytes.

    Raises:
        ValueError: ``name`` is not a known policy.
    """
    cls = POLICIES.get(name)
    if cls is None:
        choices = ", ".join(POLICIES)
        raise ValueError(f"unknown eviction policy {name!r} (choose one of {choices})")
    return cls(capacity)
