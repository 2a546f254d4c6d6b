"""Scrubbing a mounted store: on request and in the background (filesystem layer).

``Store`` damage that a read never met stays hidden until something reads it;
a scrub reads everything (``engine.scrub_store``: every segment record and
every index entry, at a rate limit) and records what it finds in the store's
health, as a damaged read would.  Damage to the index turns the mount
read-only (the failsafe), as it does when a request meets it.  The mount's
``--scrub-rate`` scrubs in the background: a pass soon after the mount
starts, then one every ``INTERVAL``; ``cachefs scrub MOUNTPOINT`` (the
weekly ``cachefs-scrub@.timer``) asks for a pass through ``/.cachefs/control``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from cachefs.engine import INDEX_PROBLEMS, CachefsError, FsckReport, Store, scrub_store

log = logging.getLogger(__name__)

#: Between two background passes.
INTERVAL = 24 * 3600.0
#: Before the first background pass: the mount's start-up (journal replay,
#: the first builds) goes first.
FIRST_DELAY = 10.0


class Scrubber:
    """Scrub passes over a mounted store, one at a time."""

    def __init__(
        self, store: Store, limiter: trio.CapacityLimiter, failsafe: Callable[[str], None]
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.failsafe = failsafe
        self._lock = trio.Lock()
        #: Passes done, and the problems the last one found (stats.json).
        self.passes = 0
        self.last_problems: int | None = None

    async def scrub(self, rate: int | None = None) -> FsckReport:
        """One pass (in a worker thread); waits for a pass already running."""
        async with self._lock:
            report = await trio.to_thread.run_sync(
                lambda: scrub_store(self.store, rate=rate), limiter=self.limiter
            )
        self.passes += 1
        self.last_problems = len(report.problems)
        index = [p for p in report.problems if p.kind in INDEX_PROBLEMS]
        if index:
            self.failsafe(f"scrub found damage to the index: {index[0]}")
        if report.problems:
            log.error("scrub found %d problems; run `cachefs fsck --repair`", len(report.problems))
        else:
            log.info("scrub: the store is clean")
        return report

    async def run(self, rate: int, *, first_delay: float = FIRST_DELAY) -> None:
        """Scrub in the background at ``rate`` bytes a second, for good."""
        await trio.sleep(first_delay)
        while True:
            try:
                await self.scrub(rate)
            except CachefsError as exc:
                log.error("background scrub failed: %s", exc)
            await trio.sleep(INTERVAL)
