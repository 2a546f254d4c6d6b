"""kill -9 of the mount daemon at random moments, many rounds, of the mixed
workload in ``tests/crashing.py`` (what must hold after each kill is there);
``scripts/kill_rounds.py`` is the long variant.  After the last round the
store must pass ``cachefs fsck``."""

from __future__ import annotations

import os
from pathlib import Path

from tests.crashing import Rounds, check, check_namespace
from tests.mounting import cachefs, mounted

ROUNDS = 12


def test_kill9_rounds(tmp_path: Path) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    rounds = Rounds(store, mountpoint, int(os.environ.get("CACHEFS_CRASH_SEED", "7")))
    for _ in range(ROUNDS):
        rounds.round()
    model = rounds.model
    assert model.synced, "nothing was fsynced before the kills: the test proved nothing"
    with mounted(store, mountpoint):
        check(rounds.root, model)
        check_namespace(mountpoint)
    assert model.verified > 0
    assert not model.lost, model.lost
    assert not model.resurrected, model.resurrected
    result = cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
