"""The fault-point matrix: every named fault point of ``cachefs.faults``, each
failing with EIO, with ENOSPC, or killing the mount daemon.

Each case mounts a fresh store, writes and fsyncs some files (acknowledged),
then arms one point (``tests/faulting.py``) and runs a workload that reaches
every point: files written in pieces and fsynced (journal, spool, segments,
index), closed past the journal's restart size (checkpoint, rename), then
garbage deleted and ``cachefs gc`` run (gc's moves).  What must hold:

* no step hangs; the process that did the failing step sees the injected
  errno (EIO or ENOSPC), or, for steps no writer waits on (a checkpoint), the
  daemon logs the failure and nothing else changes;
* for a kill: the daemon dies at the point;
* nothing acknowledged is lost: after the fault is disarmed (or after the
  kill) and the store is mounted again, every file whose fsync returned is
  byte-identical, and every other one holds a prefix of what was written;
* after an EIO/ENOSPC, the mount goes on working once the disk does (a new
  file can be written and fsynced) and unmounts cleanly; the store opens after
  a kill; ``cachefs fsck`` is clean.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefs import faults
from cachefs.faults import ACTIONS, POINTS
from tests import faulting
from tests.mounting import CACHEFS, Mount, cachefs, kill, mounted, start, stop

#: Sizes of the files written in each phase: a few of each kind of publication
#: (inline, in a worker thread, several chunks); over the journal's restart
#: size in all, so that closing them checkpoints the journal.
SIZES = [300, 70_000, 1_500_000, 3_000_000]
#: Points no writer waits on: their failure is logged and changes nothing else.
QUIET = {"journal.checkpoint", "rename"}
#: Points only gc reaches.
GC = {"gc.move"}
TIMEOUT = 60.0


class Workload:
    """Files written through the mount, and what became of them."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.written: dict[str, bytes] = {}
        self.synced: dict[str, bytes] = {}
        self.errors: list[tuple[str, int]] = []

    def write(self, name: str, size: int) -> bool:
        """Write ``name`` in 64 KiB pieces and fsync it; False at the first error."""
        data = self.rng.randbytes(size)
        self.written[name] = data
        try:
            fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self.errors.append((f"open {name}", exc.errno or 0))
            return False
        step = "write"
        try:
            for at in range(0, size, 64 * 1024):
                os.write(fd, data[at : at + 64 * 1024])
            step = "fsync"
            os.fsync(fd)
            self.synced[name] = data
            step = "close"
        except OSError as exc:
            self.errors.append((f"{step} {name}", exc.errno or 0))
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                self.errors.append((f"close {name}", exc.errno or 0))
        return name in self.synced

    def fsync_again(self) -> None:
        """fsync once more the files whose fsync failed: their writes were kept."""
        for step, _ in self.errors:
            kind, name = step.split()
            if kind == "fsync" and name not in self.synced:
                fd = os.open(self.root / name, os.O_WRONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.synced[name] = self.written[name]

    def files(self, prefix: str) -> bool:
        return all(self.write(f"{prefix}-{i}", size) for i, size in enumerate(SIZES))

    def check(self) -> None:
        """Every fsynced file is whole; every other one a prefix of its writes."""
        for name, data in self.written.items():
            path = self.root / name
            if name in self.synced:
                assert path.read_bytes() == data, f"{name} was acknowledged and is not intact"
            elif path.exists():
                got = path.read_bytes()
                assert got == data[: len(got)], f"{name} holds what was never written"


def _in_time(what: str, work: Callable[[], object]) -> None:
    """Run ``work``; fail the test if it hangs."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # reported by the test's thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(TIMEOUT):
        pytest.fail(f"{what} hung for {TIMEOUT}s")
    if failure:
        raise failure[0]


def _gc(mountpoint: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CACHEFS, "gc", str(mountpoint), "--threshold", "0.9"],
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )


def _faulted_phase(mount: Mount, work: Workload) -> subprocess.CompletedProcess[str] | None:
    """Reach every point: write and fsync, close past the restart size, gc."""
    if not work.files("after"):
        return None
    for i in range(len(SIZES)):
        name = f"junk-{i}"
        try:
            (work.root / name).unlink()
        except OSError as exc:
            work.errors.append((f"unlink {name}", exc.errno or 0))
            return None
        del work.written[name], work.synced[name]
    return _gc(mount.path)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", sorted(POINTS))
def test_fault_point(tmp_path: Path, point: str, action: str) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    cue = tmp_path / "faults"
    env = {**os.environ, faulting.CUE: str(cue)}
    mount = start(store, mountpoint, command=faulting.COMMAND, env=env)
    work = Workload(mountpoint, seed=len(point) * 7 + ACTIONS.index(action))
    gc: list[subprocess.CompletedProcess[str] | None] = []
    try:
        assert work.files("before") and work.files("junk"), work.errors
        if action == "kill":
            faulting.arm(cue, f"{point}=kill")
            _in_time("the workload", lambda: gc.append(_faulted_phase(mount, work)))
            try:
                mount.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the daemon did not reach {point}: {work.errors}")
            assert mount.process.returncode == -9, mount.stderr()
        else:
            faulting.arm(cue, f"{point}={action}@1+")
            _in_time("the workload", lambda: gc.append(_faulted_phase(mount, work)))
            expected = errno.EIO if action == "eio" else errno.ENOSPC
            shown = os.strerror(expected) if action == "eio" else "no space left"
            log = mount.stderr()
            if point in GC:
                assert not work.errors, work.errors
                assert gc[0] is not None and gc[0].returncode != 0, gc[0]
                assert shown.lower() in gc[0].stderr.lower(), gc[0].stderr
            elif point in QUIET:
                assert not work.errors, work.errors
                assert "could not restart the journal" in log, log
                assert shown.lower() in log.lower(), log
            else:
                assert work.errors, f"no writer saw the fault at {point}"
                assert work.errors[0][1] == expected, (work.errors, log)
            faulting.arm(cue, "")
            _in_time("a write after the disk recovered", lambda: work.write("recovered", 100_000))
            assert "recovered" in work.synced, (work.errors, mount.stderr())
            _in_time("fsync after the disk recovered", work.fsync_again)
    finally:
        if mount.process.poll() is None:
            assert stop(mount) == 0, mount.stderr()
        else:
            kill(mount)
    with mounted(store, mountpoint):
        work.check()
        assert all((mountpoint / name).exists() for name in work.synced)
    result = cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_point_fires_on_its_count_and_only_where_armed() -> None:
    try:
        faults.arm("rename", "enospc", at=2)
        faults.fault("segment.append")  # not armed
        faults.fault("rename")
        with pytest.raises(OSError, match="fault injected at rename") as caught:
            faults.fault("rename")
        assert caught.value.errno == errno.ENOSPC
        faults.fault("rename")  # once, without "+"
        assert faults.hits("rename") == 3
        faults.arm("rename", "eio", repeat=True)
        for _ in range(3):
            with pytest.raises(OSError) as caught:
                faults.fault("rename")
            assert caught.value.errno == errno.EIO
    finally:
        faults.disarm()
    faults.fault("rename")
    assert faults.hits("rename") == 0


def test_a_fault_spec_is_checked() -> None:
    assert faults.parse(" segment.append=enospc@3+, index.commit=kill,") == [
        ("segment.append", "enospc", 3, True),
        ("index.commit", "kill", 1, False),
    ]
    for bad, message in [
        ("segment.apend=eio", "unknown fault point"),
        ("rename=explode", "unknown fault action"),
        ("rename=eio@x", "is not a count"),
        ("rename", "is not POINT=ACTION"),
        ("rename=eio@0", "1 or more"),
    ]:
        result = subprocess.run(
            [*CACHEFS, "--help"],
            env={**os.environ, faults.ENVIRONMENT: bad},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 1, bad
        assert f"{faults.ENVIRONMENT}: " in result.stderr and message in result.stderr, bad


def test_a_fault_injected_at_start_stops_a_mount_with_a_clear_error(tmp_path: Path) -> None:
    """``CACHEFS_FAULTS`` arms a point from the start: a store whose first
    segment cannot be written is refused with the errno and no trace back."""
    store = tmp_path / "store"
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(100_000))
    env = {**os.environ, faults.ENVIRONMENT: "segment.append=enospc@1+"}
    result = cachefs("put", str(store), str(source), check=False, env=env)
    assert result.returncode == 7, result.stderr  # no space left
    assert "no space left" in result.stderr and "Traceback" not in result.stderr
    result = cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
