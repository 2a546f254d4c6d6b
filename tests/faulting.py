"""The cachefs command line with fault points armed on cue (a test-only hook).

``python tests/faulting.py ARGS...`` runs ``cachefs ARGS...``; a thread
watches the file named by ``$CACHEFS_FAULTS_CUE`` and, when it appears, arms
the faults it holds (the syntax of ``CACHEFS_FAULTS``, see ``cachefs.faults``;
an empty file disarms every point), then renames it to ``CUE.armed``.  So a
test can let a daemon start and take acknowledged writes before its disk
starts failing, which ``CACHEFS_FAULTS`` alone (armed at start) cannot.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from cachefs import faults
from cachefs.cli import main as cachefs_main

#: Run this file with the interpreter of the tests.
COMMAND = [sys.executable, str(Path(__file__).resolve())]
CUE = "CACHEFS_FAULTS_CUE"


def _watch(cue: Path) -> None:
    while True:
        if cue.exists():
            spec = cue.read_text()
            faults.disarm()
            for point, action, at, repeat in faults.parse(spec):
                faults.arm(point, action, at=at, repeat=repeat)
            cue.rename(cue.with_name(cue.name + ".armed"))
        time.sleep(0.01)


def arm(cue: Path, spec: str, timeout: float = 10.0) -> None:
    """Have the process watching ``cue`` arm ``spec`` (empty: disarm); waits until it has."""
    armed = cue.with_name(cue.name + ".armed")
    armed.unlink(missing_ok=True)
    tmp = cue.with_name(cue.name + ".tmp")
    tmp.write_text(spec)
    tmp.rename(cue)
    deadline = time.monotonic() + timeout
    while not armed.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"no process armed {spec!r} within {timeout}s")
        time.sleep(0.01)


def main() -> None:
    threading.Thread(target=_watch, args=(Path(os.environ[CUE]),), daemon=True).start()
    sys.argv[0] = "cachefs"
    cachefs_main()


if __name__ == "__main__":
    main()
