"""kill -9 of the mount daemon at random moments, many rounds.

Each round mounts the store, checks everything earlier rounds fsynced, then
writes: threads create files, write them in pieces and fsync some of them,
while other files stay mid-write; the daemon is killed at a random moment,
the dead mount is detached lazily, and the next round remounts.  After the
last round the store must pass ``cachefs fsck``.

What must hold after every kill:
* every file whose fsync returned is byte-identical;
* a file that was never fsynced holds a prefix of what was written to it
  (writes reach the write-ahead log in order and a replay applies a prefix);
* the namespace is consistent: every entry can be stat'ed and read, and
  directory link counts match their subdirectories.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

from tests.mounting import cachefs, kill, mounted, start

ROUNDS = 12


def _writer(
    prefix: str,
    root: Path,
    rng: random.Random,
    synced: dict[str, bytes],
    written: dict[str, bytes],
    stop: threading.Event,
) -> None:
    serial = 0
    while not stop.is_set():
        serial += 1
        name = f"{prefix}-{serial}"
        size = rng.choice([0, 100, 5000, 70_000, 300_000, 1_200_000])
        data = rng.randbytes(size)
        fsync = rng.random() < 0.6
        path = root / name
        written[name] = data
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for start_at in range(0, len(data), 64 * 1024):
                    os.write(fd, data[start_at : start_at + 64 * 1024])
                if fsync:
                    os.fsync(fd)
                    synced[name] = data
            finally:
                os.close(fd)
        except OSError:
            return  # the daemon is gone


def _check_namespace(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        st = os.lstat(dirpath)
        assert st.st_nlink == 2 + len(dirnames), dirpath
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            assert len(path.read_bytes()) == st.st_size


def test_kill9_rounds(tmp_path: Path) -> None:
    store = tmp_path / "store"
    mountpoint = tmp_path / "mnt"
    rng = random.Random(int(os.environ.get("CACHEFS_CRASH_SEED", "7")))
    synced: dict[str, bytes] = {}
    written: dict[str, bytes] = {}
    for round_number in range(ROUNDS):
        mount = start(store, mountpoint)
        try:
            root = mountpoint / "data"
            root.mkdir(exist_ok=True)
            for name, data in synced.items():
                assert (root / name).read_bytes() == data, f"round {round_number}: {name} lost"
            for name, data in written.items():
                if name in synced:
                    continue
                path = root / name
                if path.exists():
                    got = path.read_bytes()
                    assert got == data[: len(got)], f"round {round_number}: {name} is not a prefix"
            _check_namespace(mountpoint)
            written = {k: v for k, v in written.items() if k in synced}
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=_writer,
                    args=(
                        f"r{round_number}t{i}",
                        root,
                        random.Random(rng.random()),
                        synced,
                        written,
                        stop,
                    ),
                )
                for i in range(3)
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            kill(mount)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()
    assert synced, "nothing was fsynced before the kills: the test proved nothing"
    with mounted(store, mountpoint):
        for name, data in synced.items():
            assert (mountpoint / "data" / name).read_bytes() == data
        _check_namespace(mountpoint)
    result = cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
