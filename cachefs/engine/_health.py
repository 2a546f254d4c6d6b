"""What a store knows of its own damage, kept in the store (storage engine layer).

Damage is recorded once, where it is found: a read whose chunk fails its
checks, a recipe that does not add up, a segment missing at open; a layer
above records the damage the engine met without recording it (the index, seen
through the namespace), and an error already recorded is not counted again.
A mount that turns read-only to protect the store records why (``failsafe``).

What is recorded is kept in ``STORE/health.json`` (written whole, atomically,
when it changes), so that a restart does not forget it: ``cachefs stats``
and ``stats.json`` show it until ``cachefs fsck`` clears it (a check that finds
the store clean, or ``--repair``).  The file is JSON: ``needs_fsck`` (bool),
``corruptions`` (damaged reads, each counted once), ``recent`` (the last
``RECENT`` of them, oldest first: ``time`` (ISO 8601, UTC), ``message``,
``path`` and ``offset`` when known) and ``failsafe`` (the reason, or null).
A store without the file is healthy; a read-only opener records nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cachefs.errors import CorruptDataError
from cachefs.fsutil import atomic_write

log = logging.getLogger(__name__)

HEALTH_NAME = "health.json"
#: Damaged reads remembered with their place.
RECENT = 8


class Health:
    """``needs_fsck``, the count of damaged reads and the failsafe reason;
    thread-safe; kept in a file (none: in memory only)."""

    def __init__(self, path: Path | None = None, *, readonly: bool = False) -> None:
        """``path``: where it is kept (read at once; written on changes unless
        ``readonly``)."""
        self._lock = threading.Lock()
        self._path = None if readonly else path
        #: Set when damage was met; the store should be checked with fsck.
        self.needs_fsck = False
        #: Operations that failed on damaged data (each failed read counts once).
        self.corruptions = 0
        self.recent: list[dict[str, Any]] = []
        #: Why a mount turned read-only to protect the store (None: it did not).
        self.failsafe: str | None = None
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_bytes())
            needs_fsck = doc["needs_fsck"]
            corruptions = doc["corruptions"]
            recent = doc["recent"]
            failsafe = doc["failsafe"]
            if not (
                isinstance(needs_fsck, bool)
                and isinstance(corruptions, int)
                and isinstance(recent, list)
                and (failsafe is None or isinstance(failsafe, str))
            ):
                raise ValueError("a value of the wrong type")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s): the store is taken to need fsck", path, exc)
            self.needs_fsck = True
            return
        self.needs_fsck = needs_fsck
        self.corruptions = corruptions
        self.recent = recent[-RECENT:]
        self.failsafe = failsafe

    def as_dict(self) -> dict[str, Any]:
        return {
            "needs_fsck": self.needs_fsck,
            "corruptions": self.corruptions,
            "recent": list(self.recent),
            "failsafe": self.failsafe,
        }

    def _save(self) -> None:
        """Write the record (the caller holds the lock).  A store that cannot
        be written (a full disk) keeps it in memory: the error is logged."""
        if self._path is None:
            return
        try:
            if self.needs_fsck or self.corruptions or self.failsafe:
                atomic_write(self._path, json.dumps(self.as_dict(), indent=1).encode())
            else:
                self._path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("could not record the store's health in %s: %s", self._path, exc)

    def damaged(self, exc: CorruptDataError) -> CorruptDataError:
        """An operation failed on damaged data (a read never returns wrong bytes):
        count it, unless it was counted already; returns ``exc`` to raise."""
        with self._lock:
            if exc.recorded and self.needs_fsck:
                return exc
            self.needs_fsck = True
            if not exc.recorded:
                exc.recorded = True
                self.corruptions += 1
                place: dict[str, Any] = {
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "message": exc.message,
                }
                if exc.path is not None:
                    place["path"] = exc.path
                if exc.offset is not None:
                    place["offset"] = exc.offset
                self.recent = [*self.recent, place][-RECENT:]
            self._save()
        return exc

    def suspect(self) -> None:
        """Something does not add up, though nothing failed: the store should be checked."""
        with self._lock:
            if not self.needs_fsck:
                self.needs_fsck = True
                self._save()

    def protect(self, reason: str) -> None:
        """A mount turned read-only to protect the store."""
        with self._lock:
            self.needs_fsck = True
            if self.failsafe is None:
                self.failsafe = reason
            self._save()

    def repaired(self) -> None:
        """fsck found the store clean, or repaired it: forget what was recorded."""
        with self._lock:
            self.needs_fsck = False
            self.corruptions = 0
            self.recent = []
            self.failsafe = None
            self._save()
