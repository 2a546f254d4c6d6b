"""Random operations on a few large files in a mount, checked against a model:
the long variant of ``tests/test_mount_model.py`` for files of many chunks.

Each seed mounts a new store and, for ``--seconds``, draws operations on three
files of up to 12 MiB: writes at any offset (random bytes, zeros, repeated
text, or bytes written before: dedup), appends, truncations up and down,
reads of a range (``pread``, or through ``mmap``) and of a whole file, a fresh
descriptor for each, ``fsync``, ``close`` (which publishes a file), drops of
the page cache (``drop_caches``: cold reads of the segments), ``copy_file_range``
from another file, writes through a shared ``mmap``, unmount and mount again,
and with ``--kill`` the daemon killed with SIGKILL between two operations (a
write that returned survives the daemon's death: every file is then compared
whole).  Every read is compared with the model; at the end each file is read
whole, again after a remount, and ``cachefs fsck`` must find the store clean.
``--renames`` runs readers against writers that rename whole files over three
names instead (every read must be one whole version).  A failure prints the
seed, the operation and the last ones before it, and the script exits 1.

The two runs found two races on December 7: a read between a publication's
commit and its new base read files short, and a reader racing a rename read
the file it replaced as empty (its writes dropped before the kernel forgot it).

Run from the repository root, as root (it mounts FUSE file systems)::

    .venv/bin/python scripts/stress_mount.py                         # 5 seeds x 90 s
    .venv/bin/python scripts/stress_mount.py --dir /var/tmp --kill --seeds 3
    .venv/bin/python scripts/stress_mount.py --renames --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.mounting import CACHEFS, Mount, kill, start, stop  # noqa: E402

NAMES = ("f0", "f1", "f2")
MAX_SIZE = 12 << 20
#: How often each operation is drawn (``kill`` only with --kill).
WEIGHTS = {
    "write": 30, "append": 8, "truncate": 5, "read": 25, "read_all": 4, "fsync": 5,
    "close": 6, "drop_caches": 3, "copy_range": 4, "mmap_write": 3, "remount": 0.5,
    "kill": 0.5,
}  # fmt: skip


class Mismatch(Exception):
    """What the mount gave differs from the model."""


class Stress:
    """One seed's run: a mount, its files, their model and the operations done."""

    def __init__(self, base: Path, seed: int, *, with_kill: bool) -> None:
        self.store, self.mountpoint = base / "store", base / "mnt"
        self.rng = random.Random(seed)
        self.model = {name: bytearray() for name in NAMES}
        self.fds: dict[str, int] = {}
        self.done: list[tuple[object, ...]] = []
        self.seen = self.rng.randbytes(4 << 20)  # bytes that come back: dedup
        self.weights = {op: w for op, w in WEIGHTS.items() if with_kill or op != "kill"}
        #: The operation under way: its name, file and what it drew.
        self.current: tuple[object, ...] = ()
        self.mount: Mount = start(self.store, self.mountpoint)
        for name in NAMES:
            self.fds[name] = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.path(name), os.O_RDWR)
        return self.fds[name]

    def close_all(self) -> None:
        for name in list(self.fds):
            os.close(self.fds.pop(name))

    def data(self, size: int) -> bytes:
        kind = self.rng.randrange(4)
        if kind == 0:
            return self.rng.randbytes(size)
        if kind == 1:
            return bytes(size)
        if kind == 2:
            start = self.rng.randrange(max(1, len(self.seen) - size))
            return (self.seen[start : start + size] + bytes(size))[:size]
        unit = b"line %d of a text file\n" % self.rng.randrange(1000)
        return (unit * (size // len(unit) + 1))[:size]

    def check(self, name: str, offset: int, size: int, how: str = "pread") -> None:
        want = bytes(self.model[name][offset : offset + size])
        fd = os.open(self.path(name), os.O_RDONLY)
        try:
            if how == "mmap" and self.model[name]:
                with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
                    got = mapped[offset : offset + size]
            else:
                got = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            raise Mismatch(
                f"{name} [{offset}, +{size}) by {how}: {len(got)} bytes, "
                f"{len(want)} expected, first difference at {offset + first}"
            )

    @staticmethod
    def put(model: bytearray, offset: int, data: bytes) -> None:
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset : offset + len(data)] = data

    def step(self) -> None:
        rng = self.rng
        name = rng.choice(NAMES)
        model = self.model[name]
        op = rng.choices(list(self.weights), list(self.weights.values()))[0]
        action: Callable[[str], None] = getattr(self, f"op_{op}")
        self.current = (op, name, len(model))
        action(name)
        self.done.append(self.current)

    # --- the operations, each on the file ``name`` (some on all of them) ---

    def op_write(self, name: str, *, append: bool = False) -> None:
        model = self.model[name]
        size = self.rng.randrange(1, self.rng.choice([1, 100, 4096, 65536, 200_000, 1 << 20]) + 1)
        limit = min(len(model) + (1 << 20), MAX_SIZE)
        offset = len(model) if append else self.rng.randrange(limit + 1)
        data = self.data(size)
        self.current += (offset, size)
        if os.pwrite(self.fd(name), data, offset) != size:
            raise Mismatch(f"a write of {size} bytes to {name} was short")
        self.put(model, offset, data)

    def op_append(self, name: str) -> None:
        self.op_write(name, append=True)

    def op_truncate(self, name: str) -> None:
        size = self.rng.randrange(MAX_SIZE)
        self.current += (size,)
        os.ftruncate(self.fd(name), size)
        model = self.model[name]
        del model[size:]
        model.extend(bytes(size - len(model)))

    def op_read(self, name: str) -> None:
        if self.model[name]:
            offset = self.rng.randrange(len(self.model[name]) + 10)
            size = self.rng.randrange(1, self.rng.choice([1, 4096, 131072, 1 << 20, 5 << 20]) + 1)
            how = self.rng.choice(["pread", "pread", "mmap"])
            self.current += (offset, size, how)
            self.check(name, offset, size, how)

    def op_read_all(self, name: str) -> None:
        self.check(name, 0, len(self.model[name]) + 100)

    def op_fsync(self, name: str) -> None:
        os.fsync(self.fd(name))

    def op_close(self, name: str) -> None:
        if name in self.fds:
            os.close(self.fds.pop(name))

    def op_drop_caches(self, _name: str) -> None:
        for fd in self.fds.values():
            os.fsync(fd)  # else the page cache keeps dirty mmap pages
        Path("/proc/sys/vm/drop_caches").write_text("3")

    def op_copy_range(self, name: str) -> None:
        source = self.rng.choice([n for n in NAMES if n != name])
        if not self.model[source]:
            return
        offset = self.rng.randrange(len(self.model[source]))
        to = self.rng.randrange(len(self.model[name]) + 100_000)
        size = self.rng.randrange(1, 3 << 20)
        self.current += (source, offset, to, size)
        copied = os.copy_file_range(self.fd(source), self.fd(name), size, offset, to)
        self.put(self.model[name], to, bytes(self.model[source][offset : offset + copied]))

    def op_mmap_write(self, name: str) -> None:
        model = self.model[name]
        if len(model) < 2:
            return
        offset = self.rng.randrange(len(model) - 1)
        data = self.data(self.rng.randrange(1, min(len(model) - offset, 300_000) + 1))
        self.current += (offset, len(data))
        with mmap.mmap(self.fd(name), len(model)) as mapped:
            mapped[offset : offset + len(data)] = data
            mapped.flush()
        self.put(model, offset, data)

    def op_remount(self, _name: str = "") -> None:
        self.close_all()
        if stop(self.mount) != 0:
            raise Mismatch(f"the daemon did not exit cleanly: {self.mount.stderr()[-2000:]}")
        self.mount = start(self.store, self.mountpoint)

    def op_kill(self, _name: str) -> None:
        self.close_all()
        kill(self.mount)
        self.mount = start(self.store, self.mountpoint)
        for name in NAMES:  # every write returned before the kill is there
            self.check(name, 0, len(self.model[name]) + 10)

    def finish(self) -> None:
        for name in NAMES:
            self.check(name, 0, len(self.model[name]) + 10)
        self.op_remount()
        for name in NAMES:
            self.check(name, 0, len(self.model[name]) + 10)
        self.close_all()
        if stop(self.mount) != 0:
            raise Mismatch(f"the daemon did not exit cleanly: {self.mount.stderr()[-2000:]}")
        fsck = subprocess.run(
            [*CACHEFS, "fsck", str(self.store)], capture_output=True, text=True, check=False
        )
        if fsck.returncode != 0:
            raise Mismatch(f"cachefs fsck: {fsck.stdout[-2000:]}{fsck.stderr[-2000:]}")


def run_seed(base: Path, seed: int, seconds: float, *, with_kill: bool) -> Counter[str]:
    """Operations for ``seconds``; how many of each (Mismatch on a failure)."""
    stress = Stress(base, seed, with_kill=with_kill)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stress.step()
        stress.finish()
    except (Mismatch, OSError, pytest.fail.Exception) as exc:  # (a daemon that did not start)
        last = "\n  ".join(map(str, stress.done[-12:]))
        with contextlib.suppress(OSError):
            stress.close_all()
        stop(stress.mount)  # the store and the daemon's log stay, for a look
        raise Mismatch(
            f"seed {seed}, operation {len(stress.done) + 1} {stress.current}: {exc}\n"
            f"the operations before it:\n  {last}\ndaemon log: {stress.mount.log}"
        ) from None
    return Counter(str(done[0]) for done in stress.done)


def run_renames(base: Path, seed: int, seconds: float) -> Counter[str]:
    """``--renames``: two writers each write whole files (a SHA-256 of the
    rest first) under names of their own and rename them over three shared
    names, as ccache and Bazel publish; two readers read the shared names
    whole.  Every read must be one whole version, never empty or mixed (a
    reader that found a name just before a rename opens the file it
    replaced).  Mismatch on a failure; how many renames and reads."""
    mount = start(base / "store", base / "mnt")
    deadline = time.monotonic() + seconds
    done: Counter[str] = Counter()
    errors: list[str] = []

    def writer(number: int) -> None:
        rng = random.Random(seed * 100 + number)
        for version in itertools.count():
            if time.monotonic() > deadline or errors:
                return
            size = rng.randrange(1, rng.choice([100, 5000, 60_000, 200_000, 700_000, 3 << 20]))
            body = rng.randbytes(size)
            temporary = mount.path / f"w{number}.{version}.tmp"
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, hashlib.sha256(body).digest() + body)
                    if rng.random() < 0.2:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temporary, mount.path / f"f{rng.randrange(3)}")
            except OSError as exc:
                errors.append(f"writing {temporary.name}: {exc}")
                return
            done["renames"] += 1

    def reader(number: int) -> None:
        rng = random.Random(seed * 100 + 50 + number)
        while time.monotonic() < deadline and not errors:
            path = mount.path / f"f{rng.randrange(3)}"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # not written yet
            except OSError as exc:
                errors.append(f"reading {path.name}: {exc}")
                return
            done["reads"] += 1
            if len(data) < 33 or hashlib.sha256(data[32:]).digest() != data[:32]:
                errors.append(f"{path.name}: {len(data)} bytes that are no whole version")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    threads += [threading.Thread(target=reader, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if stop(mount) != 0:
        errors.append(f"the daemon did not exit cleanly: {mount.stderr()[-2000:]}")
    fsck = subprocess.run(
        [*CACHEFS, "fsck", str(base / "store")], capture_output=True, text=True, check=False
    )
    if fsck.returncode != 0:
        errors.append(f"cachefs fsck: {fsck.stdout[-2000:]}{fsck.stderr[-2000:]}")
    if errors:
        raise Mismatch(f"seed {seed}, after {done['reads']} reads: {errors[0]}")
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="per seed (default 90)")
    parser.add_argument("--seed", type=int, default=1, help="the first seed (default 1)")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds (default 5)")
    parser.add_argument(
        "--dir", type=Path, default=Path("/dev/shm"), help="where stores go (default /dev/shm)"
    )
    parser.add_argument("--kill", action="store_true", help="also kill -9 the daemon at times")
    parser.add_argument(
        "--renames", action="store_true", help="readers against writers that rename over names"
    )
    args = parser.parse_args()
    failed = 0
    for seed in range(args.seed, args.seed + args.seeds):
        base = Path(tempfile.mkdtemp(prefix="cachefs-stress-", dir=args.dir))
        try:
            if args.renames:
                done = run_renames(base, seed, args.seconds)
            else:
                done = run_seed(base, seed, args.seconds, with_kill=args.kill)
        except Mismatch as exc:
            failed += 1
            print(f"FAILED {exc}", flush=True)
            continue
        if args.renames:
            print(f"seed {seed}: {done['renames']} renames, {done['reads']} reads, each whole")
        else:
            rare = ", ".join(f"{done[op]} {op}" for op in ("remount", "kill") if done[op])
            total = sum(done.values())
            print(f"seed {seed}: {total} operations ({rare}), every read as the model", flush=True)
        shutil.rmtree(base)
    print(f"{args.seeds - failed} of {args.seeds} seeds passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
