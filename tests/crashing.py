"""kill -9 rounds of a mixed mount workload, and what must hold after each
(the short run is ``tests/test_mount_crash.py``, the long one
``scripts/kill_rounds.py``).

Each round mounts the store, checks everything earlier rounds were told,
then runs writers for a random moment and kills the daemon.  Each writer
thread works on files of its own, one step at a time, chosen at random:

* write a new file in 64 KiB pieces, fsync it (most of the time) and close;
* append to one of its fsynced files and fsync again;
* rename one of its fsynced files to a new name;
* unlink one of its fsynced files (always its oldest past ``KEEP``, so that
  what is checked each round stays bounded over a thousand rounds).

A step the kill interrupted may have happened or not: its names are left
unchecked from then on.  What must hold after every kill:

* every file whose fsync returned (and not renamed or unlinked since) is
  byte-identical -- otherwise it is counted as *lost*;
* every name whose rename or unlink returned is gone (else *resurrected*);
* a file that was never fsynced holds a prefix of what was written to it;
* the namespace is consistent: every entry can be stat'ed and read, and
  directory link counts match their subdirectories.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.mounting import kill, start

SIZES = [0, 100, 5000, 70_000, 300_000, 1_200_000]
#: Fsynced files a writer keeps; it unlinks its oldest past this.
KEEP = 12
THREADS = 3


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass
class Model:
    """What the mount was told, and what a check found."""

    #: name -> digest of the content its last fsync acknowledged
    synced: dict[str, bytes] = field(default_factory=dict)
    #: name -> content written but never fsynced (only a prefix must survive)
    written: dict[str, bytes] = field(default_factory=dict)
    #: names whose unlink or rename-away returned
    gone: set[str] = field(default_factory=set)
    #: names an interrupted step may or may not have changed
    unsure: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    verified: int = 0
    lost: list[str] = field(default_factory=list)
    resurrected: list[str] = field(default_factory=list)
    rounds: int = 0


class Writer:
    def __init__(self, prefix: str, root: Path, rng: random.Random, model: Model) -> None:
        self.prefix, self.root, self.rng, self.model = prefix, root, rng, model
        self.serial = 0
        self.mine: list[str] = []  # fsynced names of this writer, oldest first

    def _name(self) -> str:
        self.serial += 1
        return f"{self.prefix}-{self.serial}"

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            roll = self.rng.random()
            try:
                if len(self.mine) > KEEP:
                    self.unlink(self.mine[0])
                elif roll < 0.15 and self.mine:
                    self.append(self.rng.choice(self.mine))
                elif roll < 0.3 and self.mine:
                    self.rename(self.rng.choice(self.mine))
                elif roll < 0.4 and self.mine:
                    self.unlink(self.rng.choice(self.mine))
                else:
                    self.create()
            except OSError:
                return  # the daemon is gone

    def _unsure(self, *names: str) -> None:
        with self.model.lock:
            self.model.unsure.update(names)

    def _sure(self, *names: str) -> None:
        with self.model.lock:
            self.model.unsure.difference_update(names)

    def create(self) -> None:
        name = self._name()
        data = self.rng.randbytes(self.rng.choice(SIZES))
        fsync = self.rng.random() < 0.6
        with self.model.lock:
            self.model.written[name] = data
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for at in range(0, len(data), 64 * 1024):
                os.write(fd, data[at : at + 64 * 1024])
            if fsync:
                os.fsync(fd)
                with self.model.lock:
                    del self.model.written[name]
                    self.model.synced[name] = _digest(data)
                self.mine.append(name)
        finally:
            os.close(fd)

    def append(self, name: str) -> None:
        path = self.root / name
        extra = self.rng.randbytes(self.rng.choice(SIZES[:4]))
        self._unsure(name)
        old = path.read_bytes()
        with open(path, "ab") as f:
            f.write(extra)
            f.flush()
            os.fsync(f.fileno())
        with self.model.lock:
            self.model.synced[name] = _digest(old + extra)
        self._sure(name)

    def rename(self, name: str) -> None:
        new = self._name()
        self._unsure(name, new)
        os.rename(self.root / name, self.root / new)
        with self.model.lock:
            self.model.synced[new] = self.model.synced.pop(name)
            self.model.gone.add(name)
        self.mine[self.mine.index(name)] = new
        self._sure(name, new)

    def unlink(self, name: str) -> None:
        self._unsure(name)
        os.unlink(self.root / name)
        with self.model.lock:
            del self.model.synced[name]
            self.model.gone.add(name)
        self.mine.remove(name)
        self._sure(name)


def check_namespace(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        st = os.lstat(dirpath)
        assert st.st_nlink == 2 + len(dirnames), dirpath
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            assert len(path.read_bytes()) == st.st_size, path


def check(root: Path, model: Model) -> None:
    """Count what survived the last kill into ``model``; assert the rest."""
    for name, digest in model.synced.items():
        if name in model.unsure:
            continue
        path = root / name
        if path.exists() and _digest(path.read_bytes()) == digest:
            model.verified += 1
        else:
            model.lost.append(f"round {model.rounds}: {name}")
    for name in model.gone - model.unsure:
        if (root / name).exists():
            model.resurrected.append(f"round {model.rounds}: {name}")
    model.gone.clear()  # names are never used again: checked once is enough
    for name, data in model.written.items():
        path = root / name
        if name not in model.unsure and path.exists():
            got = path.read_bytes()
            assert got == data[: len(got)], f"round {model.rounds}: {name} is not a prefix"
    check_namespace(root)


class Rounds:
    """kill -9 rounds over one store; the writers and the model carry over."""

    def __init__(self, store: Path, mountpoint: Path, seed: int) -> None:
        self.store, self.mountpoint = store, mountpoint
        self.root = mountpoint / "data"
        self.rng = random.Random(seed)
        self.model = Model()
        self.writers = [
            Writer(f"t{i}", self.root, random.Random(self.rng.random()), self.model)
            for i in range(THREADS)
        ]

    def _tidy(self) -> None:
        """Remove what is checked no more: files never fsynced (checked once)
        and what an interrupted step may have left."""
        for name in self.model.unsure | set(self.model.written):
            (self.root / name).unlink(missing_ok=True)
            self.model.synced.pop(name, None)
            for writer in self.writers:
                if name in writer.mine:
                    writer.mine.remove(name)
        self.model.unsure.clear()
        self.model.written.clear()

    def round(self) -> None:
        """Mount, check, write for a random moment, kill -9."""
        mount = start(self.store, self.mountpoint)
        threads: list[threading.Thread] = []
        stop = threading.Event()
        try:
            self.root.mkdir(exist_ok=True)
            check(self.root, self.model)
            self._tidy()
            threads = [threading.Thread(target=w.run, args=(stop,)) for w in self.writers]
            for thread in threads:
                thread.start()
            time.sleep(self.rng.uniform(0.05, 0.6))
        finally:
            kill(mount)
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
                assert not thread.is_alive(), "a writer hung on the dead mount"
        self.model.rounds += 1
