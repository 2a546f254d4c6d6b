"""What a store knows of its own damage (storage engine layer).

Damage is recorded once, where it is found: a read whose chunk fails its
checks, a recipe that does not add up, a segment missing at open; a layer
above records the damage the engine met without recording it (the index, seen
through the namespace), and an error already recorded is not counted again.
The figures show in ``stats.json`` (``corruptions``, ``needs_fsck``); ``fsck
--repair`` clears ``needs_fsck``.
"""

from __future__ import annotations

import threading

from cachefs.errors import CorruptDataError


class Health:
    """``needs_fsck`` and the count of damaged reads; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Set when damage was met; the store should be checked with fsck.
        self.needs_fsck = False
        #: Operations that failed on damaged data (each failed read counts once).
        self.corruptions = 0

    def damaged(self, exc: CorruptDataError) -> CorruptDataError:
        """An operation failed on damaged data (a read never returns wrong bytes):
        count it, unless it was counted already; returns ``exc`` to raise."""
        with self._lock:
            self.needs_fsck = True
            if not exc.recorded:
                exc.recorded = True
                self.corruptions += 1
        return exc

    def suspect(self) -> None:
        """Something does not add up, though nothing failed: the store should be checked."""
        self.needs_fsck = True

    def repaired(self) -> None:
        self.needs_fsck = False
