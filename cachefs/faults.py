"""Named fault points for the fault-injection suite (used by every layer).

Every I/O step of the write and maintenance paths calls ``fault(POINT)`` just
before it does its I/O, inside the same ``try`` that handles the step's real
errors, so that an injected fault takes the path a real one would.  In
production nothing is armed and ``fault`` is one test of a module global.

The test suite arms points in its own process with :func:`arm`, and in the
processes it starts (mount daemons, servers, the command line) through the
environment::

    CACHEFS_FAULTS="segment.append=enospc@3,index.commit=kill"

Each item is ``POINT=ACTION[@N][+]``: on the ``N``-th time (default: the
first) the point is reached, do ACTION; with ``+``, on that time and every
later one (a disk that stays full).  Actions:

* ``eio``    raise ``OSError(EIO)`` (a failing disk),
* ``enospc`` raise ``OSError(ENOSPC)`` (a full disk),
* ``kill``   SIGKILL this process (a crash: power loss for this process).

An unknown point or action in the variable stops the process at start with a
message (a typo would otherwise make a fault test pass for nothing).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass

#: The fault points, by name, and the step each one precedes.
POINTS = {
    "journal.append": "writing a record to the write-ahead log",
    "journal.checkpoint": "starting a new write-ahead log after everything was applied",
    "spool.write": "writing a file's unpublished bytes to its spool",
    "segment.append": "writing a chunk record to a segment file",
    "segment.sync": "fdatasync of a segment file before its publication commits",
    "index.commit": "committing an LMDB write transaction",
    "index.sync": "fdatasync of the LMDB index",
    "rename": "the rename that replaces a small file whole (journal, store header, health)",
    "gc.move": "gc copying the live records of a segment it compacts",
}
ACTIONS = ("eio", "enospc", "kill")
ENVIRONMENT = "CACHEFS_FAULTS"


@dataclass
class _Armed:
    action: str
    at: int
    repeat: bool
    hits: int = 0


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def fault(point: str) -> None:
    """The step ``point`` is about to run: fail it or die here if so armed."""
    if not _armed:
        return
    with _lock:
        armed = _armed.get(point)
        if armed is None:
            return
        armed.hits += 1
        if armed.hits < armed.at or (armed.hits > armed.at and not armed.repeat):
            return
        action = armed.action
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.EIO if action == "eio" else errno.ENOSPC
    raise OSError(code, f"{os.strerror(code)} (fault injected at {point})")


def arm(point: str, action: str, *, at: int = 1, repeat: bool = False) -> None:
    """Arm ``point`` in this process (tests); see the module's docstring."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r}; known: {', '.join(ACTIONS)}")
    if at < 1:
        raise ValueError(f"fault count must be 1 or more, not {at}")
    with _lock:
        _armed[point] = _Armed(action, at, repeat)


def disarm() -> None:
    """Disarm every point of this process."""
    with _lock:
        _armed.clear()


def hits(point: str) -> int:
    """How often an armed ``point`` was reached (0 when it is not armed)."""
    with _lock:
        armed = _armed.get(point)
        return 0 if armed is None else armed.hits


def parse(spec: str) -> list[tuple[str, str, int, bool]]:
    """The items of a ``CACHEFS_FAULTS`` value: (point, action, at, repeat)."""
    items = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, rest = item.partition("=")
        if not sep:
            raise ValueError(f"fault {item!r} is not POINT=ACTION[@N][+]")
        repeat = rest.endswith("+")
        action, _, count = rest.rstrip("+").partition("@")
        try:
            at = int(count) if count else 1
        except ValueError:
            raise ValueError(f"fault {item!r}: {count!r} is not a count") from None
        items.append((point.strip(), action.strip(), at, repeat))
    return items


def arm_from_environment() -> None:
    """Arm what ``CACHEFS_FAULTS`` names (done once, when this module loads)."""
    spec = os.environ.get(ENVIRONMENT, "")
    if not spec:
        return
    try:
        for point, action, at, repeat in parse(spec):
            arm(point, action, at=at, repeat=repeat)
    except ValueError as exc:
        raise SystemExit(f"cachefs: {ENVIRONMENT}: {exc}") from None


arm_from_environment()

__all__ = ["ACTIONS", "ENVIRONMENT", "POINTS", "arm", "disarm", "fault", "hits", "parse"]
