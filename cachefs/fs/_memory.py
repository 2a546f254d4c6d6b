"""Keeping the mount daemon within its memory limit (filesystem layer).

``cachefs mount --memory-limit SIZE`` caps what the daemon keeps in memory:
the store's decompressed-chunk cache gets at most an eighth of the limit, and
segment pages read through memory maps are dropped from the process after a
quarter of it (they stay in the kernel's page cache, so reads stay
zero-copy; see ``Store.limit_memory``), and glibc's allocator keeps a little
freed memory for the next request (``tune_malloc``).  Every ``_PERIOD`` seconds
:class:`MemoryGovernor` also reads the daemon's resident set and the system's
memory pressure, and drops the caches when

* the resident set passes ``_SHRINK_AT`` of the limit, or
* the system is short of memory: ``/proc/pressure/memory`` reports tasks
  stalled on memory more than ``_PRESSURE`` percent of the last 10 seconds,
  or ``MemAvailable`` is below ``_AVAILABLE`` of ``MemTotal``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

import trio

from cachefs.engine import Store

log = logging.getLogger(__name__)

#: Default ``--memory-limit``: sensible for a laptop.
DEFAULT_MEMORY_LIMIT = 512 << 20
#: Seconds between checks.
_PERIOD = 1.0
#: Fraction of the limit at which the caches are dropped.
_SHRINK_AT = 0.75
#: Seconds after dropping the caches before they are dropped again for the
#: same reason (what they cannot free must not cost a full gc every second).
_BACKOFF = 30.0
#: "some avg10" of /proc/pressure/memory (percent) counted as pressure.
_PRESSURE = 10.0
#: Fraction of MemTotal below which MemAvailable counts as pressure.
_AVAILABLE = 0.05
#: mallopt(3) parameters (glibc's malloc.h) and the values ``tune_malloc`` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 8 << 20
_TRIM_THRESHOLD = 32 << 20


def resident_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """The resident set size of a process (``VmRSS``; ``VmHWM``: its peak),
    in bytes; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_pressure() -> str | None:
    """Why the system is short of memory now, or None."""
    try:
        for line in Path("/proc/pressure/memory").read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            if line.startswith("some") and float(fields.get("avg10", 0)) > _PRESSURE:
                return f"memory pressure {fields['avg10']}% (/proc/pressure/memory)"
    except (OSError, ValueError):
        pass
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
        if info["MemAvailable"] < info["MemTotal"] * _AVAILABLE:
            return f"only {info['MemAvailable'] >> 20} MiB available"
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc)."""
    with contextlib.suppress(AttributeError):
        if (libc := _libc()) is not None:
            libc.malloc_trim(0)


def tune_malloc(limit: int) -> None:
    """Keep glibc's allocator from faulting in fresh pages for every large
    request: allocations under ``_MMAP_THRESHOLD`` come from the heap (not a
    mapping of their own, unmapped when freed), and up to a sixteenth of the
    limit (at most ``_TRIM_THRESHOLD``) of freed heap is kept for the next
    request rather than handed back at once.  A server's batch (4 MiB of
    blobs, the message that holds them, its encoding) otherwise costs a
    thousand page faults each time: BatchReadBlobs ran at 130 MB/s before
    this and about 220 MB/s after, for 25 MiB more resident.  What is kept is
    given back when the governor shrinks (``_malloc_trim``)."""
    with contextlib.suppress(AttributeError):
        if (libc := _libc()) is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, min(_TRIM_THRESHOLD, limit // 16))


class MemoryGovernor:
    """Holds a store's caches to a memory limit; shrinks them under pressure."""

    def __init__(self, store: Store, limit: int) -> None:
        self.store = store
        self.limit = limit
        self.shrinks = 0
        self._quiet_until = 0.0
        self._after_shrink = 0
        store.limit_memory(limit)
        tune_malloc(limit)

    def check(self, now: float) -> None:
        rss = resident_bytes()
        why = None
        if rss > self.limit * _SHRINK_AT:
            why = f"resident set {rss >> 20} MiB of a {self.limit >> 20} MiB limit"
        else:
            why = memory_pressure()
        if why is None:
            return
        # Again within the back-off only if the resident set grew meanwhile.
        if now < self._quiet_until and rss < self._after_shrink + self.limit // 8:
            return
        self.shrink(why)
        self._quiet_until = now + _BACKOFF
        self._after_shrink = resident_bytes()

    def shrink(self, why: str) -> None:
        self.shrinks += 1
        log.info("dropping in-memory caches: %s", why)
        self.store.shrink()
        gc.collect()
        _malloc_trim()

    def figures(self) -> dict[str, int]:
        return {
            "memory_limit": self.limit,
            "rss_bytes": resident_bytes(),
            "peak_rss_bytes": resident_bytes(field="VmHWM"),
            "memory_shrinks": self.shrinks,
        }

    async def run(self) -> None:
        while True:
            await trio.sleep(_PERIOD)
            self.check(trio.current_time())


__all__ = ["DEFAULT_MEMORY_LIMIT", "MemoryGovernor", "memory_pressure", "resident_bytes"]
