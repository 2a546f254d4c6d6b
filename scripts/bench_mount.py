"""Benchmark of a mounted cachefs against a native directory, FUSE passthroughs and
read-side peers.

This is a benchmark, not a test: it asserts nothing about time.  It prints a Markdown
table of figures and of cachefs's ratios against baselines measured in the same run, on
the same bytes, on the same filesystem (``--targets`` keys in brackets):

* ``native`` [native]: a plain directory;
* ``passthrough`` [pt]: the minimal pyfuse3 + trio passthrough of ``shared/baselines``
  (``passthrough.py BACKING MOUNTPOINT``), its backing directory beside the others;
* ``pt kc+wb`` [ptkc]: the same with ``--keep-cache --writeback --timeout 60``;
* ``bindfs`` [bindfs]: bindfs, a passthrough in C (libfuse 2), over a backing directory
  beside the others: ``bindfs -f BACKING MOUNTPOINT`` and nothing else (``-f`` keeps it in
  the foreground as our child), so its defaults: single-threaded, ``-o allow_other``
  added (it works as root), the kernel's attribute and entry caches at libfuse's 1 s, no
  keep_cache, and no ``big_writes``: the kernel sends it writes of 4 KiB.
  ``--bindfs-arg=-obig_writes`` (repeatable, like ``--cachefs-arg``) changes that;
* ``squashfuse`` [squashfuse] and ``borg`` [borg], the read-side peers: read-only mounts of
  an image of the same files, built untimed from a staging directory in the workspace
  (``mksquashfs SRC IMAGE -comp zstd -Xcompression-level 3 -noappend -quiet``, mounted
  with ``squashfuse_ll -f IMAGE MOUNTPOINT`` (the package's low-level driver: about 3x
  the high-level ``squashfuse``'s speed on a tree of small files here, so the stronger
  peer); ``borg init -e none REPO``, then in SRC ``borg
  create --compression zstd,3 REPO::a ENTRY...`` (SRC's entries: ``.`` would show up as a
  second ``.`` in the mount), mounted with ``borg mount -f REPO::a MOUNTPOINT`` and
  unmounted with ``borg umount``; borg's home, ``BORG_BASE_DIR``, is in the workspace).
  They take part in every read: their write, create, copy and delete figures are "n/a",
  and they sit out the build;
* ``cachefs`` [cachefs]: ``cachefs mount STORE MOUNTPOINT`` (a fresh store for every run);
* ``cachefs+metrics`` (``--targets ...,cachefsm``, not by default): the same with
  ``--metrics``, its ``/metrics`` scraped every second: "cachefs / cachefs+metrics" is
  then what metrics cost; ``cachefs+traces`` (``cachefst``): with ``--otlp-endpoint``,
  spans sent to an OTLP/gRPC receiver in this process (``tests/otlp.py``).

By default ``--targets`` is native, pt, ptkc and cachefs, and bindfs, squashfuse and borg
for each whose tools are installed (a line says which were skipped; ``scripts/bootstrap.sh
--bench`` installs them; naming a missing one in ``--targets`` is an error).

By default everything lives on a tmpfs that the script mounts in a temporary directory
of its own (``mount -t tmpfs``; this needs root, as FUSE mounts and drop_caches do) and
unmounts at the end; ``--dir DIR`` uses a temporary directory inside DIR instead.  The
staging directories, the read-side peers' images and repositories and the cachefs store
are in it too, on the same filesystem as the targets' files.

Copies into a target are made durable with ``fsync`` of every copied file (what GNU
``sync FILE...`` does), not with ``sync -f``: ``syncfs`` does not reach a FUSE daemon
(Linux does not pass it to FUSE file systems), so it would leave the daemons' work out.

Workloads (``--only`` picks some: ``seq``, ``small``, ``tree``, ``build``):

* ``seq``: sequential write of a ``--size-mib`` file in 1 MiB writes, then fsync and
  close (timed together), once with incompressible (random) data and once with a
  build-artifact mix (real .so/.a/.pyc files from .venv/lib and /usr/lib, about 45% /
  30% / 25% of the bytes, concatenated; the same bytes for every target).  Then, per
  file: a cold sequential read (cachefs and the passthroughs are unmounted, the page
  cache dropped (``echo 3 > /proc/sys/vm/drop_caches``) and remounted; a native
  directory only has its caches dropped - which does nothing on tmpfs, whose files *are*
  page cache), an untimed read that checks every byte, a timed warm read, and on the
  random file ``--random-reads`` 4 KiB preads at random aligned offsets (a new open, after
  the reads above warmed the cache), reported as IOPS.  Every read opens the file anew.
  Last, ``cp -a`` of the random file from a staging copy in the workspace (written and
  fsynced first, untimed) into the target, then ``fsync`` of the copy (timed together,
  MB/s; the copy's bytes are checked after, untimed).  For cachefs the daemon's CPU time
  (utime + stime from /proc) is sampled around the two writes and around each cold read
  (after the remount): CPU seconds per GiB written and per GiB read are printed under the
  table.  The read-side peers get an image of the two files and do the reads.
* ``small``: ``--files`` files of 16 KiB (distinct random contents) in directories of 100:
  create (open O_CREAT|O_EXCL + write + close), cold stat and cold read (each after a
  remount + drop_caches), warm stat and warm read (each done twice, the second timed;
  the first read checks every byte), delete (unlink).  Rates are files per second.  The
  read-side peers get an image of the same files, in the same directories, and do the
  stats and reads.
* ``tree``: a tree of real build artifacts: .so/.a/.pyc files found as for the artifact
  mix (about 45% / 30% / 25% of the bytes; ``--tree-mib``, 512 by default), copied once
  (untimed) into a staging directory in the workspace with their layout under
  ``venv/lib`` (the project's .venv/lib) and ``usr/lib``.  Timed: ``cp -a`` of the staging
  tree into the target and ``fsync`` of every copied file (the staging tree is read once
  before, untimed), MB/s of file contents; then, after a remount + drop_caches, a cold read
  of the whole tree with ``tar -C DIR -cf - . | cat > /dev/null`` (through a pipe: GNU tar
  does not read the files when its archive is /dev/null), MB/s of file contents; then an
  untimed check of every file's bytes.  The read-side peers get an image of the tree.
* ``build``: a real C build with sources and objects inside the target: the sources of a
  Debian source package are copied into the target (untimed) and ``make -jN`` is timed
  (wall clock).  ``--build lua`` (default: Lua 5.4, ``make -C src lua``, 33 C files, the
  build issue 15 names), ``zstd`` (``make -C programs zstd``, about 50 C files) or ``lz4``
  (``make -C programs lz4``, the ``--quick`` default).  The source tarball is
  taken from /var/cache/cachefs-bench/src when it is there; otherwise it is fetched once
  with ``apt-get source --download-only`` into that directory, with a private apt
  configuration under /var/cache/cachefs-bench/apt (deb-src entries made from the
  machine's own apt sources; the system's apt configuration is not touched).  Later runs
  reuse it, offline.  A native build runs once, untimed, first, to warm the compiler.
  The read-side peers cannot take part.

Every figure is measured ``--runs`` times; the median is reported, and ratios are ratios
of medians.  Targets are visited in a rotated order each run.  MB/s are 10**6 bytes per
second.  A phase (one workload step on one target) that takes longer than
``--phase-timeout`` seconds is reported as a hang and its FUSE daemon is killed (by pid;
the blocked calls then fail and the benchmark goes on without that figure); for cachefs,
the state of its threads is printed and its log and (with gdb) the Python stacks of its
threads are kept in the temp directory.  ERROR/WARNING lines of the daemon's log and its
``errors``/``corruptions`` counters are printed under the table.

Run from the repository root, as root::

    .venv/bin/python scripts/bench_mount.py
    .venv/bin/python scripts/bench_mount.py --quick
    .venv/bin/python scripts/bench_mount.py --only seq,small --targets native,cachefs --runs 1
    .venv/bin/python scripts/bench_mount.py --dir /var/tmp --json bench-mount.json
    .venv/bin/python scripts/bench_mount.py --only seq --cachefs-init-arg=--digest-function=blake3
    .venv/bin/python scripts/bench_mount.py --only tree --targets pt,squashfuse,cachefs

With the defaults and every peer installed it takes about 30 minutes on a 2-core machine
and needs about 8 GiB of memory (the data in this process, the tmpfs, the page cache of
the mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_engine import kind_of  # the same artifact kinds as the engine benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import clients, otlp

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CACHEFS = VENV_BIN / "cachefs"
#: The venv's python has pyfuse3 and trio (the system python3 may not).
PYTHON = VENV_BIN / "python"
DEFAULT_PASSTHROUGH = ROOT.parent / "shared" / "baselines" / "passthrough.py"
CACHE_DIR = clients.SOURCE_CACHE

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MB = 1e6
BLOCK = 1 * MiB
SMALL_SIZE = 16 * KiB
SMALL_PER_DIR = 100
MAX_ARTIFACT = 64 * MiB
MIX_SHARES = {"so": 0.45, "a": 0.30, "pyc": 0.25}
MIX_ROOTS = (ROOT / ".venv" / "lib", Path("/usr/lib"))

#: Where the tree workload's files come from, and where they go in the tree.
TREE_ROOTS = {ROOT / ".venv" / "lib": "venv/lib", Path("/usr/lib"): "usr/lib"}

WORKLOADS = ("seq", "small", "tree", "build")
#: In the table's order; the ratio columns are cachefs against each of the others.
TARGET_KEYS = (
    "native",
    "pt",
    "ptkc",
    "bindfs",
    "squashfuse",
    "borg",
    "cachefs",
    "cachefsm",
    "cachefst",
)
#: Measured unless --targets says otherwise (cachefsm, cachefst: the cost of
#: --metrics and of --otlp-endpoint).
DEFAULT_TARGETS = ("native", "pt", "ptkc", "cachefs")
#: Also measured by default, each when its tools are installed.
DEFAULT_PEERS = ("bindfs", "squashfuse", "borg")
#: The commands each peer needs.
PEER_TOOLS = {
    "bindfs": ("bindfs",),
    "squashfuse": ("squashfuse_ll", "mksquashfs"),
    "borg": ("borg",),
}
INSTALL_HINT = "scripts/bootstrap.sh --bench installs it (as root)"


#: The C projects the build workload can build (sources: ``tests/clients.py``).
BUILDS = clients.C_PROJECTS


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the machine ----------------------------------------------------------------------


class Caches:
    """Dropping the page cache (root only); remembers whether it worked."""

    def __init__(self) -> None:
        self.works = True

    def drop(self) -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            if self.works:
                log(f"cannot drop caches ({exc}): cold figures are not cold")
            self.works = False


def run_cmd(
    cmd: list[str],
    timeout: float = 300.0,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run a command; fail with its output when it fails."""
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {output}")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (also when its FUSE daemon is dead)."""
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def detach(mountpoint: Path) -> None:
    """Unmount a FUSE mount whatever its daemon's state (lazily if it is busy)."""
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
    if result.returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if (str(path) + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) > len(
                best
            ):
                best, kind = parts[1], parts[2]
    return kind


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


@contextlib.contextmanager
def workspace(args: argparse.Namespace) -> Iterator[Path]:
    """A temporary directory: on a tmpfs of our own, or inside --dir."""
    if args.dir is not None:
        path = Path(tempfile.mkdtemp(prefix="cachefs-bench-mount-", dir=args.dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    path = Path(tempfile.mkdtemp(prefix="cachefs-bench-mount-"))
    try:
        run_cmd(
            ["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_size},mode=0755", "tmpfs", str(path)]
        )
        try:
            yield path
        finally:
            result = subprocess.run(["umount", str(path)], capture_output=True, check=False)
            if result.returncode != 0:
                log(f"tmpfs {path} busy, detaching it (umount -l)")
                subprocess.run(["umount", "-l", str(path)], check=False)
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


# --- targets --------------------------------------------------------------------------


class Target:
    """A directory the workloads run in, and how to make it cold."""

    key = ""
    label = ""
    #: False for the read-side peers: they only read what an image of the files holds.
    writable = True

    def __init__(self, base: Path, caches: Caches) -> None:
        self.base = base
        self.caches = caches
        self.root = base / self.key
        self.problems: list[str] = []

    def start(self) -> None:
        self.root.mkdir(exist_ok=True)

    def stop(self) -> None:
        pass

    def cold(self) -> None:
        """Empty every cache between the data and the reader."""
        self.stop()
        self.caches.drop()
        self.start()

    def fresh(self, run: int) -> None:
        """Start a run with an empty target."""
        if self.root.exists():
            for entry in self.root.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def kill(self) -> None:
        """Emergency stop (from the watchdog thread): make blocked calls fail."""

    def close(self) -> None:
        """Best-effort cleanup at the end, whatever state things are in."""


class Native(Target):
    key = "native"
    label = "native"

    def cold(self) -> None:
        self.caches.drop()


class FuseChild(Target):
    """A target whose FUSE daemon runs in the foreground as our child process."""

    def __init__(self, base: Path, caches: Caches) -> None:
        super().__init__(base, caches)
        self.root = base / f"{self.key}-mnt"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Start the daemon and wait until its mount answers."""
        self.root.mkdir(exist_ok=True)
        with open(self.base / f"{self.key}.log", "ab") as out:
            # A session of its own: Ctrl-C reaches us, and we unmount it cleanly.
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({proc.returncode}); see {out.name}")
            return os.path.ismount(self.root)

        wait_until(ready, f"{self.label} to mount")

    def unmount(self) -> None:
        run_cmd(["fusermount3", "-u", str(self.root)])

    def stop(self) -> None:
        if self.proc is None:
            return
        self.unmount()
        self.proc.wait(timeout=60)
        self.proc = None

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        if is_mounted(self.root):
            detach(self.root)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class FuseDaemon(FuseChild):
    """A read-write FUSE daemon over a backing directory beside the other targets."""

    def __init__(self, base: Path, caches: Caches) -> None:
        super().__init__(base, caches)
        self.backing = base / f"{self.key}-backing"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.backing.mkdir(exist_ok=True)
        self.spawn(self.command())

    def fresh(self, run: int) -> None:
        if self.proc is None:
            self.start()
        super().fresh(run)


class Passthrough(FuseDaemon):
    key = "pt"
    label = "passthrough"
    options: tuple[str, ...] = ()

    def __init__(self, base: Path, caches: Caches, script: Path) -> None:
        super().__init__(base, caches)
        self.script = script

    def command(self) -> list[str]:
        return [str(PYTHON), str(self.script), str(self.backing), str(self.root), *self.options]


class PassthroughCached(Passthrough):
    key = "ptkc"
    label = "pt kc+wb"
    options = ("--keep-cache", "--writeback", "--timeout", "60")


class Bindfs(FuseDaemon):
    """bindfs, a C passthrough on libfuse 2, with its defaults (see the module docstring)."""

    key = "bindfs"
    label = "bindfs"

    def __init__(self, base: Path, caches: Caches, extra: list[str]) -> None:
        super().__init__(base, caches)
        self.extra = extra

    def command(self) -> list[str]:
        return ["bindfs", "-f", *self.extra, str(self.backing), str(self.root)]


class ImagePeer(FuseChild):
    """A read-side peer: a read-only mount of an image built from a staging directory.

    ``load(SRC)`` builds the image of SRC (untimed; SRC's entries are the mount's root
    entries) and mounts it; ``cold()`` unmounts, drops the caches and mounts it again;
    ``unload()`` unmounts it and deletes the image.  Between loads nothing is mounted.
    """

    writable = False

    def __init__(self, base: Path, caches: Caches, timeout: float) -> None:
        super().__init__(base, caches)
        self.image = base / f"{self.key}-image"
        self.timeout = timeout
        self.loaded = False

    def build(self, src: Path) -> None:
        raise NotImplementedError

    def mount_command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def load(self, src: Path) -> None:
        self.unload()
        self.build(src)
        self.loaded = True
        self.start()

    def unload(self) -> None:
        self.stop()
        self.loaded = False
        if self.image.is_dir():
            shutil.rmtree(self.image)
        elif self.image.exists():
            self.image.unlink()

    def start(self) -> None:
        self.root.mkdir(exist_ok=True)
        if self.loaded:
            self.spawn(self.mount_command(), self.env())

    def fresh(self, run: int) -> None:
        self.unload()


class Squashfuse(ImagePeer):
    key = "squashfuse"
    label = "squashfuse"

    def build(self, src: Path) -> None:
        cmd = ["mksquashfs", str(src), str(self.image), "-comp", "zstd"]
        run_cmd([*cmd, "-Xcompression-level", "3", "-noappend", "-quiet"], self.timeout)

    def mount_command(self) -> list[str]:
        return ["squashfuse_ll", "-f", str(self.image), str(self.root)]


class Borg(ImagePeer):
    """A borg repository (no encryption) holding one archive, ``a``."""

    key = "borg"
    label = "borg"

    def __init__(self, base: Path, caches: Caches, timeout: float) -> None:
        super().__init__(base, caches, timeout)
        self.home = base / "borg-home"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BORG_BASE_DIR": str(self.home),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def build(self, src: Path) -> None:
        shutil.rmtree(self.home, ignore_errors=True)  # the caches of earlier repositories
        env = self.env()
        run_cmd(["borg", "init", "-e", "none", str(self.image)], env=env)
        entries = sorted(os.listdir(src))
        cmd = ["borg", "create", "--compression", "zstd,3", f"{self.image}::a", *entries]
        run_cmd(cmd, self.timeout, cwd=src, env=env)

    def mount_command(self) -> list[str]:
        return ["borg", "mount", "-f", f"{self.image}::a", str(self.root)]

    def unmount(self) -> None:
        run_cmd(["borg", "umount", str(self.root)], env=self.env())


class Cachefs(Target):
    key = "cachefs"
    label = "cachefs"

    def __init__(self, base: Path, caches: Caches, extra: list[str]) -> None:
        super().__init__(base, caches)
        self.extra = extra
        #: Arguments of the `cachefs init` that makes each fresh store (none: the
        #: mount makes it, with the defaults).
        self.init_args: list[str] = []
        self.store = base / f"{self.key}-store"
        self.root = base / f"{self.key}-mnt"
        self.pid: int | None = None
        self.run = 0
        self.last_stats: dict[str, Any] = {}
        self.after_writes: dict[str, Any] = {}
        self.log_offset = 0
        #: CPU seconds of the daemons that have exited (they are not our children).
        self.daemon_cpu = 0.0

    def start(self) -> None:
        self.root.mkdir(exist_ok=True)
        if self.init_args and not self.store.exists():
            run_cmd([str(CACHEFS), "init", *self.init_args, str(self.store)])
        run_cmd([str(CACHEFS), "mount", str(self.store), str(self.root), *self.extra])
        stats = self.read_stats()
        self.pid = int(str(stats["pid"]))

    def read_stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.root / ".cachefs" / "stats.json").read_bytes())
        return doc

    def snapshot(self) -> dict[str, Any] | None:
        """The live figures, kept in last_stats (None if they cannot be read)."""
        try:
            self.last_stats = self.read_stats()
        except (OSError, ValueError) as exc:
            self.problems.append(f"run {self.run}: cannot read stats.json: {exc}")
            return None
        return self.last_stats

    def stop(self) -> None:
        if self.pid is None:
            return
        # The daemon's counters live as long as it does: report them as it goes.
        stats = self.snapshot() or {}
        for key in ("errors", "corruptions"):
            if stats.get(key):
                self.problems.append(f"run {self.run}: stats.json {key}={stats[key]}")
        self.umount_tracking_cpu(self.pid)
        self.pid = None
        self.scan_log()

    def umount_tracking_cpu(self, pid: int) -> None:
        """``cachefs umount``, sampling the daemon's CPU time until it exits."""
        cmd = [str(CACHEFS), "umount", str(self.root)]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        last = 0.0
        while proc.poll() is None:
            last = process_cpu_seconds(pid) or last
            time.sleep(0.01)
        self.daemon_cpu += last
        output = proc.stdout.read().decode(errors="replace").strip() if proc.stdout else ""
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {output}")

    def scan_log(self) -> None:
        """Collect ERROR/WARNING lines (and tracebacks) of the daemon's log."""
        path = self.store / "cachefs.log"
        if not path.exists():
            return
        with open(path, "rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode("utf-8", "replace")
            self.log_offset = f.tell()
        for line in text.splitlines():
            if any(word in line for word in (" ERROR ", " WARNING ", " CRITICAL ", "Traceback")):
                self.problems.append(f"run {self.run}: log: {line.strip()}")

    def fresh(self, run: int) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)
        self.run = run
        self.log_offset = 0
        self.start()

    def kill(self) -> None:
        pid, self.pid = self.pid, None
        if pid is not None:
            self.problems.append(f"run {self.run}: daemon threads when killed:")
            self.problems += [f"    {line}" for line in thread_states(pid)]
            stacks = self.saved_name("stacks.txt")
            if python_stacks(pid, stacks):
                self.problems.append(f"run {self.run}: its Python stacks: {stacks}")
            self.daemon_cpu += process_cpu_seconds(pid) or 0.0
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def saved_name(self, suffix: str) -> Path:
        """A file outside the workspace, kept after the run (for failures)."""
        stamp = time.strftime("%H%M%S")
        name = f"cachefs-bench-mount-{os.getpid()}-run{self.run}-{stamp}-{suffix}"
        return Path(tempfile.gettempdir()) / name

    def save_log(self) -> None:
        """Keep the daemon's log out of the workspace (after a failure)."""
        path = self.store / "cachefs.log"
        if not path.exists():
            return
        saved = self.saved_name("cachefs.log")
        with contextlib.suppress(OSError):
            shutil.copyfile(path, saved)
            self.problems.append(f"run {self.run}: daemon log saved as {saved}")

    def close(self) -> None:
        if is_mounted(self.root):
            try:
                if self.pid is None:
                    raise RuntimeError("its daemon was killed")
                self.stop()
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                log(f"cachefs umount failed ({exc}); killing the daemon, unmounting")
                self.kill()
                detach(self.root)
        self.pid = None
        self.scan_log()


def thread_states(pid: int) -> list[str]:
    """State, wchan and the top of the kernel stack of every thread of a process."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        try:
            comm = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip()
            stack = [ln.split()[-1] for ln in (task / "stack").read_text().splitlines()[:4]]
        except OSError:
            continue
        lines.append(f"tid {task.name} {comm} {state} wchan={wchan} {' < '.join(stack)}")
    return lines


def python_stacks(pid: int, path: Path) -> bool:
    """Write the Python stacks of every thread of ``pid`` to ``path`` (needs gdb).

    gdb makes the process call CPython's own faulthandler dumper, which needs no GIL.
    """
    if shutil.which("gdb") is None:
        return False
    commands = [
        f'call (int)open("{path}", 01101, 0644)',
        "call (void*)_Py_DumpTracebackThreads($1, (void*)0, (void*)0)",
        "call (int)close($1)",
    ]
    cmd = ["gdb", "-p", str(pid), "-batch", *(arg for c in commands for arg in ("-ex", c))]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    return path.exists() and path.stat().st_size > 0


class CachefsMetrics(Cachefs):
    """cachefs with ``--metrics``, scraped every second as Prometheus would (more often)."""

    key = "cachefsm"
    label = "cachefs+metrics"

    def __init__(self, base: Path, caches: Caches, extra: list[str]) -> None:
        super().__init__(base, caches, [*extra, "--metrics", "127.0.0.1:0"])
        self._stop_scraping = threading.Event()
        self._scraper: threading.Thread | None = None
        self.scrapes = 0

    def start(self) -> None:
        super().start()
        address = str(self.read_stats()["metrics"])
        self._stop_scraping.clear()
        self._scraper = threading.Thread(target=self._scrape, args=(address,), daemon=True)
        self._scraper.start()

    def _scrape(self, address: str) -> None:
        while not self._stop_scraping.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
                    r.read()
                self.scrapes += 1
            except OSError as exc:
                self.problems.append(f"run {self.run}: scrape failed: {exc}")

    def stop(self) -> None:
        self._stop_scraping.set()
        if self._scraper is not None:
            self._scraper.join()
            self._scraper = None
        super().stop()


class CachefsTraced(Cachefs):
    """cachefs with ``--otlp-endpoint``, its spans sent to an OTLP receiver
    in this process (the default share of FUSE requests traced)."""

    key = "cachefst"
    label = "cachefs+traces"

    def __init__(self, base: Path, caches: Caches, extra: list[str]) -> None:
        super().__init__(base, caches, extra)
        self._receiver = contextlib.ExitStack()
        spans, endpoint = self._receiver.enter_context(otlp.receiver())
        self.spans = spans
        self.extra = [*extra, "--otlp-endpoint", endpoint]

    def close(self) -> None:
        super().close()
        log(f"{self.label}: the receiver got {len(self.spans.spans)} spans")
        self._receiver.close()


def make_targets(args: argparse.Namespace, base: Path, caches: Caches) -> list[Target]:
    made: dict[str, Target] = {
        "native": Native(base, caches),
        "pt": Passthrough(base, caches, args.passthrough),
        "ptkc": PassthroughCached(base, caches, args.passthrough),
        "bindfs": Bindfs(base, caches, args.bindfs_arg),
        "squashfuse": Squashfuse(base, caches, args.phase_timeout),
        "borg": Borg(base, caches, args.phase_timeout),
        "cachefs": Cachefs(base, caches, args.cachefs_arg),
        "cachefsm": CachefsMetrics(base, caches, args.cachefs_arg),
    }
    if "cachefst" in args.targets:
        made["cachefst"] = CachefsTraced(base, caches, args.cachefs_arg)
    for target in made.values():
        if isinstance(target, Cachefs):
            target.init_args = args.cachefs_init_arg
    return [made[key] for key in TARGET_KEYS if key in args.targets]


class Watchdog:
    """Kills a target's daemon when one phase on it runs for too long."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.hangs: list[str] = []

    @contextlib.contextmanager
    def phase(self, target: Target, what: str) -> Iterator[None]:
        timer = threading.Timer(self.seconds, self._fire, (target, what))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _fire(self, target: Target, what: str) -> None:
        message = f"{what} on {target.label} still running after {self.seconds:.0f} s"
        log(f"HANG: {message}; killing its daemon")
        self.hangs.append(message)
        target.kill()


# --- data -----------------------------------------------------------------------------


@dataclass
class Data:
    random: bytes = b""
    mix: bytes = b""
    mix_kinds: dict[str, tuple[int, int]] = field(default_factory=dict)
    mix_repeated: bool = False
    small: bytes = b""


def find_artifacts() -> dict[str, list[tuple[str, int]]]:
    """Regular .so/.a/.pyc files under MIX_ROOTS (no symlinks, hard links once)."""
    found: dict[str, list[tuple[str, int]]] = {k: [] for k in MIX_SHARES}
    seen: set[tuple[int, int]] = set()
    for root in MIX_ROOTS:
        for directory, _dirs, files in os.walk(root):
            for name in files:
                kind = kind_of(name)
                if kind is None:
                    continue
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not (0 < st.st_size <= MAX_ARTIFACT and os.path.isfile(path)):
                    continue
                if os.path.islink(path) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                found[kind].append((path, st.st_size))
    return found


def _spread(path: str) -> bytes:
    return hashlib.blake2b(path.encode(), digest_size=8).digest()


def choose_artifacts(total: int) -> list[tuple[str, str]]:
    """(kind, path) of artifacts making up about ``total`` bytes in MIX_SHARES, in a
    deterministic spread order (fewer bytes if this machine has fewer)."""
    found = find_artifacts()
    chosen: list[tuple[str, str]] = []
    for kind, share in MIX_SHARES.items():
        budget = int(total * share)
        for path, size in sorted(found[kind], key=lambda item: _spread(item[0])):
            if budget <= 0:
                break
            chosen.append((kind, path))
            budget -= size
    chosen.sort(key=lambda item: _spread(item[1]))
    return chosen


def make_mix(total: int) -> tuple[bytes, dict[str, tuple[int, int]], bool]:
    """``total`` bytes of real artifacts, concatenated in a deterministic spread order."""
    chosen = choose_artifacts(total)
    buf = bytearray(total)
    kinds: dict[str, tuple[int, int]] = dict.fromkeys(MIX_SHARES, (0, 0))
    filled, repeated = 0, False
    while filled < total:
        before = filled
        for kind, path in chosen:
            try:
                blob = Path(path).read_bytes()
            except OSError:
                continue
            piece = blob[: total - filled]
            buf[filled : filled + len(piece)] = piece
            filled += len(piece)
            files, nbytes = kinds[kind]
            kinds[kind] = (files + 1, nbytes + len(piece))
            if filled >= total:
                break
        if filled == before:
            raise RuntimeError("no readable .so/.a/.pyc files found for the artifact mix")
        if filled < total:
            repeated = True  # not enough artifacts on this machine: the mix repeats
    return bytes(buf), kinds, repeated


@dataclass
class Tree:
    """The tree workload's files: ``stage / "tree" / rel`` for each ``rel`` in ``files``."""

    stage: Path
    files: list[str] = field(default_factory=list)
    nbytes: int = 0
    kinds: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def top(self) -> Path:
        return self.stage / "tree"


def tree_name(path: str) -> str | None:
    """Where an artifact goes in the tree: its path under its TREE_ROOTS root, prefixed."""
    for root, prefix in TREE_ROOTS.items():
        with contextlib.suppress(ValueError):
            return f"{prefix}/{Path(path).relative_to(root)}"
    return None


def make_tree(total: int, stage: Path) -> Tree:
    """Copy about ``total`` bytes of artifacts (with their metadata) into ``stage / "tree"``."""
    tree = Tree(stage, kinds=dict.fromkeys(MIX_SHARES, (0, 0)))
    for kind, path in choose_artifacts(total):
        rel = tree_name(path)
        if rel is None:
            continue
        dest = tree.top / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(path, dest)
        except OSError:
            continue
        size = dest.stat().st_size
        tree.files.append(rel)
        tree.nbytes += size
        files, nbytes = tree.kinds[kind]
        tree.kinds[kind] = (files + 1, nbytes + size)
    if not tree.files:
        raise RuntimeError("no readable .so/.a/.pyc files found for the tree")
    os.sync()
    return tree


def make_data(args: argparse.Namespace) -> Data:
    data = Data()
    size = args.size_mib * MiB
    if "seq" in args.only:
        data.random = os.urandom(size)
        data.mix, data.mix_kinds, data.mix_repeated = make_mix(size)
    if "small" in args.only:
        data.small = os.urandom(args.files * SMALL_SIZE)
    return data


# --- build sources --------------------------------------------------------------------


def build_sources(name: str, workdir: Path) -> Path:
    """The extracted sources of ``name`` in ``workdir``, fetched once per machine
    (into ``/var/cache/cachefs-bench``) the way the tests fetch them."""
    return clients.c_project(workdir, name)


# --- workloads ------------------------------------------------------------------------


Record = Callable[[str, float], None]


def write_file(path: Path, data: bytes) -> float:
    """Seconds to write ``data`` in BLOCK writes, fsync and close a new file."""
    view = memoryview(data)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            while offset < len(view):
                offset += os.write(fd, view[offset : offset + BLOCK])
            os.fsync(fd)
        finally:
            os.close(fd)

    return timed(run)


def read_file(path: Path, expected: int) -> float:
    """Seconds to read a whole file in BLOCK reads."""
    buf = bytearray(BLOCK)
    total = 0

    def run() -> None:
        nonlocal total
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)

    seconds = timed(run)
    if total != expected:
        raise RuntimeError(f"read {total} bytes from {path}, expected {expected}")
    return seconds


def check_file(path: Path, data: bytes) -> None:
    """Read the whole file and compare it with ``data`` (untimed)."""
    view = memoryview(data)
    offset = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            if block != view[offset : offset + len(block)]:
                raise RuntimeError(f"{path}: wrong bytes in [{offset}, {offset + len(block)})")
            offset += len(block)
    if offset != len(data):
        raise RuntimeError(f"{path}: {offset} bytes, expected {len(data)}")


def random_reads(path: Path, offsets: list[int]) -> float:
    buf = bytearray(4 * KiB)
    short = 0

    def run() -> None:
        nonlocal short
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in offsets:
                if os.preadv(fd, [buf], offset) != 4 * KiB:
                    short += 1
        finally:
            os.close(fd)

    seconds = timed(run)
    if short:
        raise RuntimeError(f"{path}: {short} short 4 KiB reads")
    return seconds


def empty_dir(path: Path) -> Path:
    """``path`` as a new empty directory (whatever a failed phase left there before)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def fsync_files(paths: list[Path]) -> None:
    """fsync each file, as GNU ``sync FILE...`` does (``sync -f``, syncfs, would not reach
    a FUSE daemon)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_in(src: Path, dest: Path, copies: list[Path], timeout: float) -> float:
    """Seconds to ``cp -a SRC DEST`` and fsync ``copies`` (the files it made)."""

    def run() -> None:
        run_cmd(["cp", "-a", str(src), str(dest)], timeout)
        fsync_files(copies)

    return timed(run)


def tar_read(directory: Path, timeout: float) -> float:
    """Seconds to read a whole tree with ``tar -C DIR -cf - . | cat > /dev/null``.

    A pipe, not ``tar -cf /dev/null``: GNU tar sees that its archive is /dev/null and then
    does not read the files' contents.
    """

    def run() -> None:
        with tempfile.TemporaryFile() as errors:
            tar = subprocess.Popen(
                ["tar", "-C", str(directory), "-cf", "-", "."],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
            assert tar.stdout is not None
            try:
                cat = subprocess.run(
                    ["cat"],
                    stdin=tar.stdout,
                    stdout=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                )
            finally:
                tar.stdout.close()
                tar.wait()
            errors.seek(0)
            if tar.returncode != 0 or cat.returncode != 0:
                message = errors.read().decode(errors="replace").strip()
                raise RuntimeError(
                    f"tar -C {directory} -cf - . | cat failed ({tar.returncode}, "
                    f"{cat.returncode}): {message}"
                )

    return timed(run)


def check_tree(tree: Tree, directory: Path) -> None:
    """Compare every file of ``directory`` with the staging tree (untimed)."""
    for rel in tree.files:
        if (directory / rel).read_bytes() != (tree.top / rel).read_bytes():
            raise RuntimeError(f"{directory / rel}: wrong contents")


class DaemonCpu:
    """CPU seconds of a cachefs daemon, added up over the phases it is sampled around."""

    def __init__(self, t: Target) -> None:
        self.target = t if isinstance(t, Cachefs) else None
        self.seconds = 0.0
        self.complete = self.target is not None
        self._start: float | None = None

    def _now(self) -> float | None:
        if self.target is None or self.target.pid is None:
            return None
        return process_cpu_seconds(self.target.pid)

    def begin(self) -> None:
        self._start = self._now()

    def end(self) -> None:
        now = self._now()
        if self._start is None or now is None:
            self.complete = False
        else:
            self.seconds += now - self._start
        self._start = None

    def record(self, record: Record, metric: str, nbytes: int) -> None:
        """Record seconds per GiB (nothing if a sample was missed, or for other targets)."""
        if self.complete and nbytes:
            record(metric, self.seconds / (nbytes / GiB))


@dataclass
class Context:
    args: argparse.Namespace
    data: Data
    watchdog: Watchdog
    offsets: list[int] = field(default_factory=list)
    build_src: Path | None = None
    tree: Tree | None = None


def seq_workload(ctx: Context, t: Target, record: Record) -> None:
    files = {"random": ctx.data.random, "mix": ctx.data.mix}
    names = {kind: f"big-{kind}.bin" for kind in files}
    paths = {kind: t.root / names[kind] for kind in files}
    phase = ctx.watchdog.phase
    if isinstance(t, ImagePeer):
        with phase(t, "image of the seq files (untimed)"):
            stage = empty_dir(t.base / "stage-seq")
            for kind, blob in files.items():
                (stage / names[kind]).write_bytes(blob)
            t.load(stage)
            shutil.rmtree(stage)
    else:
        cpu = DaemonCpu(t)
        for kind, blob in files.items():
            with phase(t, f"write {kind}"):
                cpu.begin()
                seconds = write_file(paths[kind], blob)
                cpu.end()
                record(f"write_{kind}", len(blob) / seconds / MB)
        cpu.record(record, "daemon_cpu_write", sum(map(len, files.values())))
        if isinstance(t, Cachefs):
            t.after_writes = t.snapshot() or {}
    cpu = DaemonCpu(t)
    for kind, blob in files.items():
        with phase(t, f"cold read {kind}"):
            t.cold()
            cpu.begin()
            seconds = read_file(paths[kind], len(blob))
            cpu.end()
            record(f"read_cold_{kind}", len(blob) / seconds / MB)
        with phase(t, f"warm read {kind}"):
            check_file(paths[kind], blob)
            record(f"read_warm_{kind}", len(blob) / read_file(paths[kind], len(blob)) / MB)
        if kind == "random":
            with phase(t, "random 4 KiB reads"):
                seconds = random_reads(paths[kind], ctx.offsets)
                record("rand4k", len(ctx.offsets) / seconds)
    cpu.record(record, "daemon_cpu_read", sum(map(len, files.values())))
    if isinstance(t, ImagePeer):
        t.unload()
        return
    for path in paths.values():
        path.unlink()
    with phase(t, "cp -a random"):
        stage = empty_dir(t.base / "stage-cp")
        source = stage / names["random"]
        write_file(source, ctx.data.random)  # fsynced: no writeback of it while timed
        dest = t.root / "cp-random.bin"
        seconds = copy_in(source, dest, [dest], ctx.args.phase_timeout)
        record("cp_random", len(ctx.data.random) / seconds / MB)
        shutil.rmtree(stage)
        check_file(dest, ctx.data.random)
        dest.unlink()


def small_workload(ctx: Context, t: Target, record: Record) -> None:
    n = ctx.args.files
    rels = [f"small/d{i // SMALL_PER_DIR:03d}/f{i:05d}.o" for i in range(n)]
    top = t.root / "small"
    paths = [str(t.root / rel) for rel in rels]
    view = memoryview(ctx.data.small)
    buf = bytearray(SMALL_SIZE)

    def make_dirs(where: Path) -> None:
        for i in range(0, n, SMALL_PER_DIR):
            (where / rels[i]).parent.mkdir(parents=True)

    def create(names: list[str]) -> None:
        for i, path in enumerate(names):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, view[i * SMALL_SIZE : (i + 1) * SMALL_SIZE])
            os.close(fd)

    def stat_all() -> None:
        for path in paths:
            os.stat(path)

    def read_all() -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            os.readv(fd, [buf])
            os.close(fd)

    def check_all() -> None:
        for i, path in enumerate(paths):
            with open(path, "rb", buffering=0) as f:
                if f.read() != view[i * SMALL_SIZE : (i + 1) * SMALL_SIZE]:
                    raise RuntimeError(f"{path}: wrong contents")

    def delete() -> None:
        for path in paths:
            os.unlink(path)

    phase = ctx.watchdog.phase
    if isinstance(t, ImagePeer):
        with phase(t, "image of the small files (untimed)"):
            stage = empty_dir(t.base / "stage-small")
            make_dirs(stage)
            create([str(stage / rel) for rel in rels])
            t.load(stage)
            shutil.rmtree(stage)
    else:
        make_dirs(t.root)  # untimed
        with phase(t, "small-file create"):
            record("small_create", n / timed(lambda: create(paths)))
    with phase(t, "small-file cold stat"):
        t.cold()
        record("small_stat_cold", n / timed(stat_all))
    with phase(t, "small-file cold read"):
        t.cold()
        record("small_read_cold", n / timed(read_all))
    with phase(t, "small-file warm stat"):
        stat_all()
        record("small_stat_warm", n / timed(stat_all))
    with phase(t, "small-file warm read"):
        check_all()
        record("small_read_warm", n / timed(read_all))
    if isinstance(t, ImagePeer):
        t.unload()
        return
    with phase(t, "small-file delete"):
        record("small_delete", n / timed(delete))
    shutil.rmtree(top)


def tree_workload(ctx: Context, t: Target, record: Record) -> None:
    tree = ctx.tree
    assert tree is not None
    dest = t.root / "tree"
    phase = ctx.watchdog.phase
    timeout = ctx.args.phase_timeout
    if isinstance(t, ImagePeer):
        with phase(t, "image of the tree (untimed)"):
            t.load(tree.stage)
    else:
        with phase(t, "tree cp -a"):
            tar_read(tree.top, timeout)  # untimed: the source in the page cache, as for all
            copies = [dest / rel for rel in tree.files]
            record("tree_write", tree.nbytes / copy_in(tree.top, dest, copies, timeout) / MB)
    with phase(t, "tree cold read (tar)"):
        t.cold()
        record("tree_read_cold", tree.nbytes / tar_read(dest, timeout) / MB)
    with phase(t, "tree check (untimed)"):
        check_tree(tree, dest)
    if isinstance(t, ImagePeer):
        t.unload()
        return
    with phase(t, "remove tree"):
        shutil.rmtree(dest)


def run_make(directory: Path, args: argparse.Namespace, log_path: Path) -> float:
    spec = BUILDS[args.build]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env["LC_ALL"] = "C"
    cmd = ["make", f"-j{args.jobs}", "-C", spec.subdir, spec.target]
    with open(log_path, "wb") as out:
        start = time.perf_counter()
        result = subprocess.run(
            cmd,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=args.phase_timeout,
        )
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd)} in {directory} failed: " + " | ".join(tail))
    return seconds


def build_workload(ctx: Context, t: Target, record: Record) -> None:
    assert ctx.build_src is not None
    dest = t.root / "build"
    with ctx.watchdog.phase(t, "copy build sources"):
        shutil.copytree(ctx.build_src, dest, symlinks=True)
    with ctx.watchdog.phase(t, "build"):
        record("build", run_make(dest, ctx.args, t.base / f"make-{t.key}.log"))
    with ctx.watchdog.phase(t, "remove build tree"):
        shutil.rmtree(dest)


WORKLOAD_FUNCS: dict[str, Callable[[Context, Target, Record], None]] = {
    "seq": seq_workload,
    "small": small_workload,
    "tree": tree_workload,
    "build": build_workload,
}


# --- runs -----------------------------------------------------------------------------

#: results[metric][target key] -> one value per run that succeeded
Results = dict[str, dict[str, list[float]]]


def run_workload(
    ctx: Context, name: str, t: Target, run: int, results: Results, errors: list[str]
) -> None:
    def record(metric: str, value: float) -> None:
        results.setdefault(metric, {}).setdefault(t.key, []).append(value)

    log(f"run {run}: {name} on {t.label}")
    try:
        WORKLOAD_FUNCS[name](ctx, t, record)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        message = f"run {run}: {name} on {t.label}: {exc!r}"
        log("FAILED " + message)
        traceback.print_exc()
        errors.append(message)
        recover(t, errors, run)


def recover(t: Target, errors: list[str], run: int) -> None:
    """After a failure: remount the target, empty, so that the next workloads can go on."""
    try:
        t.close()
        if isinstance(t, Cachefs):
            t.save_log()
        t.start()
        t.fresh(run)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        errors.append(f"run {run}: could not recover {t.label}: {exc!r}")


def run_all(ctx: Context, targets: list[Target]) -> tuple[Results, list[str]]:
    results: Results = {}
    errors: list[str] = []
    for run in range(ctx.args.runs):
        order = targets[run % len(targets) :] + targets[: run % len(targets)]
        for t in targets:
            t.fresh(run)
        for name in WORKLOADS:
            if name in ctx.args.only:
                for t in order:
                    if name == "build" and not t.writable:
                        continue  # a read-side peer: nothing to build in
                    run_workload(ctx, name, t, run, results, errors)
        for t in targets:
            if isinstance(t, Cachefs) and t.pid is not None:
                t.snapshot()
                t.scan_log()
    return results, errors


# --- report ---------------------------------------------------------------------------


#: A goal: cachefs against this baseline target key at least (for times: at most) this ratio.
Goal = tuple[str, float]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "MB/s", "IOPS", "files/s" or "s" (lower is better)
    goals: tuple[Goal, ...] = ()  # each its own PASS/MISS


def metrics(args: argparse.Namespace, tree: Tree | None = None) -> list[Metric]:
    size = f"{args.size_mib / 1024:g} GiB" if args.size_mib >= 1024 else f"{args.size_mib} MiB"
    n = f"{args.files:,} x 16 KiB"
    spec = BUILDS.get(args.build)
    make = f"make -j{args.jobs} -C {spec.subdir} {spec.target}" if spec else ""
    build = f"build {args.build} ({make})" if spec else ""
    if tree is None:
        tree_label = f"tree of artifacts, {args.tree_mib} MiB"
    else:
        tree_label = f"tree of {len(tree.files):,} artifacts, {tree.nbytes / MiB:.0f} MiB"
    pt = ("pt", 0.6)
    return [
        Metric("write_random", f"seq write {size}, random, bs 1 MiB + fsync", "MB/s", (pt,)),
        Metric("write_mix", f"seq write {size}, artifact mix, bs 1 MiB + fsync", "MB/s"),
        Metric(
            "read_cold_random",
            f"seq read cold, random {size}",
            "MB/s",
            (("pt", 0.8), ("squashfuse", 1.0)),
        ),
        Metric("read_cold_mix", f"seq read cold, artifact mix {size}", "MB/s"),
        Metric("read_warm_random", f"seq read warm, random {size}", "MB/s", (("native", 0.85),)),
        Metric("read_warm_mix", f"seq read warm, artifact mix {size}", "MB/s", (("native", 0.85),)),
        Metric(
            "rand4k",
            f"random 4 KiB reads warm ({args.random_reads:,})",
            "IOPS",
            (("native", 0.5),),
        ),
        Metric("cp_random", f"cp -a {size} random + fsync", "MB/s", (pt,)),
        Metric("small_create", f"{n}: create", "files/s", (("pt", 0.8),)),
        Metric("small_stat_warm", f"{n}: stat warm", "files/s", (("native", 0.3),)),
        Metric("small_read_warm", f"{n}: read warm", "files/s"),
        Metric("small_stat_cold", f"{n}: stat cold", "files/s"),
        Metric("small_read_cold", f"{n}: read cold", "files/s"),
        Metric("small_delete", f"{n}: delete", "files/s", (("pt", 0.8),)),
        Metric("tree_write", f"{tree_label}: cp -a + fsync", "MB/s"),
        Metric("tree_read_cold", f"{tree_label}: read cold (tar)", "MB/s", (("squashfuse", 1.0),)),
        Metric("build", f"{build}, wall time", "s", (("native", 1.05),)),
    ]


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s"
    suffix = "/s" if unit == "files/s" else " IOPS"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M{suffix}"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k{suffix}"
    return f"{value:.0f}{suffix}"


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def ratio(metric: Metric, meds: dict[str, float | None], base: str) -> float | None:
    """cachefs against ``base``: rate ratio, or for times cachefs time / base time."""
    mine, theirs = meds.get("cachefs"), meds.get(base)
    if mine is None or theirs is None or theirs == 0:
        return None
    return mine / theirs


def table(
    args: argparse.Namespace, targets: list[Target], results: Results, tree: Tree | None
) -> str:
    labels = {t.key: t.label for t in targets}
    header = ["workload", *labels.values()]
    bases = (
        [k for k in TARGET_KEYS if k in labels and k != "cachefs"] if "cachefs" in labels else []
    )
    header += [f"cachefs / {labels[b]}" for b in bases] + ["target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 3) + "|---|---|"]
    for metric in metrics(args, tree):
        if metric.key not in results:
            continue
        meds = {k: median(results[metric.key].get(k)) for k in labels}
        cells = [metric.label] + [fmt_value(meds[k], metric.unit) for k in labels]
        for base in bases:
            r = ratio(metric, meds, base)
            cells.append("n/a" if r is None else f"{r:.2f}x")
        goal_texts, verdicts = [], []
        lower = metric.unit == "s"
        for base, goal in metric.goals:
            if base not in labels or "cachefs" not in labels:
                continue
            goal_texts.append(f"{'<=' if lower else '>='} {goal:.2f}x {labels[base]}")
            r = ratio(metric, meds, base)
            if r is None:
                verdict = "n/a"
            else:
                verdict = "PASS" if (r <= goal if lower else r >= goal) else "MISS"
            verdicts.append(f"{verdict} ({base})")
        lines.append("| " + " | ".join([*cells, ", ".join(goal_texts), ", ".join(verdicts)]) + " |")
    return "\n".join(lines)


NOTES = """\
Notes: medians of the runs; "cachefs / X" is the ratio of the medians (for rates
cachefs / X, higher is better; for the build's wall time cachefs time / X time, lower is
better).  "passthrough" is shared/baselines/passthrough.py with its defaults (attribute and
entry timeout 1 s, no keep_cache); "pt kc+wb" adds --keep-cache --writeback --timeout 60.
"bindfs" is bindfs with its defaults (single-threaded, libfuse 2, 4 KiB writes unless
--bindfs-arg=-obig_writes).  "squashfuse" and "borg" are read-side peers: read-only mounts of
an image of the same files (squashfs, zstd level 3; a borg repository, zstd level 3), built
untimed, so their write, create, copy and delete figures are n/a.  Copies (cp -a) are timed
with an fsync of every copied file (syncfs does not reach FUSE daemons).
Cold reads and stats come after an unmount, drop_caches and a remount (a native directory
only drops caches: on tmpfs its files stay in memory, so its cold figures are warm ones).
Warm figures are the second of two passes; every read pass opens each file anew."""


def tool_version(cmd: list[str], name: str | None = None) -> str:
    """The first line that a tool's version command prints naming the tool
    (``name``, by default the command), or "TOOL ?"."""
    name = name or cmd[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        for line in (result.stderr + result.stdout).splitlines():
            if line.strip().startswith(name):
                return line.strip() if cmd[0] == name else f"{cmd[0]}: {line.strip()}"
    return f"{cmd[0]} ?"


def peer_versions(targets: list[Target]) -> list[str]:
    versions = {
        "bindfs": ["bindfs", "--version"],
        "squashfuse": ["squashfuse_ll", "--version"],
        "borg": ["borg", "--version"],
    }
    found = [tool_version(versions[t.key], t.key) for t in targets if t.key in versions]
    if any(t.key == "squashfuse" for t in targets):
        found.append(tool_version(["mksquashfs", "-version"]))
    return found


def summary_lines(
    args: argparse.Namespace,
    data: Data,
    tree: Tree | None,
    targets: list[Target],
    base: Path,
    caches: Caches,
) -> list[str]:
    lines = [
        f"cachefs mount benchmark: {args.runs} run(s), medians; python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs ({cpu_model()}), "
        f"kernel {platform.release()}",
        f"all targets and the cachefs store on {fs_type(base)} ({base})"
        + ("" if caches.works else "; CACHES COULD NOT BE DROPPED"),
    ]
    if data.mix_kinds:
        kinds = ", ".join(f"{n} .{k} ({b / MiB:.0f} MiB)" for k, (n, b) in data.mix_kinds.items())
        note = " (repeated: not enough artifacts on this machine)" if data.mix_repeated else ""
        lines.append(f"artifact mix: {kinds}{note}")
    if tree is not None:
        kinds = ", ".join(f"{n} .{k} ({b / MiB:.0f} MiB)" for k, (n, b) in tree.kinds.items())
        lines.append(f"tree: {len(tree.files):,} files, {tree.nbytes / MiB:.0f} MiB: {kinds}")
    if args.cachefs_init_arg:
        lines.append(f"cachefs stores made by: cachefs init {' '.join(args.cachefs_init_arg)}")
    if args.cachefs_arg:
        lines.append(f"cachefs mount options: {' '.join(args.cachefs_arg)}")
    if args.bindfs_arg:
        lines.append(f"bindfs options: {' '.join(args.bindfs_arg)}")
    if versions := peer_versions(targets):
        lines.append(f"peers: {'; '.join(versions)}")
    if args.skipped_peers:
        skipped = "; ".join(f"{k} ({why})" for k, why in args.skipped_peers.items())
        lines.append(f"peers skipped, their tools missing ({INSTALL_HINT}): {skipped}")
    return lines


def daemon_cpu_lines(targets: list[Target], results: Results) -> list[str]:
    """The cachefs daemons' CPU seconds per GiB of the seq workload, medians over runs."""
    lines = []
    for t in targets:
        if not isinstance(t, Cachefs):
            continue
        parts = []
        for metric, what in (("daemon_cpu_write", "written"), ("daemon_cpu_read", "read")):
            values = results.get(metric, {}).get(t.key)
            if values:
                parts.append(f"{statistics.median(values):.2f} s/GiB {what}")
        if parts:
            lines.append(
                f"{t.label} daemon CPU s/GiB written / read: {', '.join(parts)} (seq workload: "
                "the two writes with their fsync; the two cold reads, after the remount; "
                "medians over the runs)"
            )
    return lines


def cachefs_lines(targets: list[Target]) -> list[str]:
    lines: list[str] = []
    for t in targets:
        if not isinstance(t, Cachefs):
            continue
        for when, s in (("after the seq writes", t.after_writes), ("at the end", t.last_stats)):
            if s:
                lines.append(
                    f"cachefs store {when} (last run): "
                    f"logical {s.get('logical_bytes', 0) / MiB:,.0f} MiB, "
                    f"stored {s.get('stored_bytes', 0) / MiB:,.0f} MiB, "
                    f"segments {s.get('segment_bytes', 0) / MiB:,.0f} MiB, "
                    f"dedup {s.get('dedup_ratio', 0):.2f}, "
                    f"compression {s.get('compression_ratio', 0):.2f}"
                )
        problems = t.problems
        lines.append(f"cachefs problems (stats.json counters, log lines): {len(problems)}")
        lines += [f"  {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... {len(problems) - 20} more")
    return lines


# --- main -----------------------------------------------------------------------------


def borg_fuse_problem() -> str | None:
    """Why ``borg mount`` cannot work here (no llfuse/pyfuse3 for borg's Python), or None."""
    borg = shutil.which("borg")
    if borg is None:
        return "no borg"
    try:
        with open(borg, "rb") as f:
            first = f.readline().decode(errors="replace")
    except OSError as exc:
        return f"cannot read {borg}: {exc}"
    interpreter = first[2:].split()[0] if first.startswith("#!") and first[2:].split() else ""
    if not interpreter:
        return None  # not a script: a bundled borg brings its own FUSE support
    check = (
        "import sys\nfrom borg.fuse_impl import has_llfuse, has_pyfuse3\n"
        "sys.exit(0 if has_llfuse or has_pyfuse3 else 1)"
    )
    result = subprocess.run(
        [interpreter, "-c", check], capture_output=True, timeout=60, check=False
    )
    if result.returncode != 0:
        return "borg without FUSE support (python3-llfuse or python3-pyfuse3)"
    return None


def peer_problem(key: str) -> str | None:
    """What a peer's tools lack on this machine, or None."""
    missing = [tool for tool in PEER_TOOLS.get(key, ()) if shutil.which(tool) is None]
    if missing:
        return "no " + ", ".join(missing)
    if key == "borg":
        return borg_fuse_problem()
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark a cachefs mount against a native directory, FUSE "
        "passthroughs and read-side peers (run as root).",
        epilog=f"Build sources are cached in {CACHE_DIR} (fetched once with apt-get source).",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs; medians (default 3)")
    parser.add_argument("--size-mib", type=int, default=None, help="large file size (1024)")
    parser.add_argument("--files", type=int, default=None, help="small files (10000)")
    parser.add_argument("--random-reads", type=int, default=20000, help="4 KiB preads (20000)")
    parser.add_argument(
        "--tree-mib", type=int, default=None, help="size of the tree of artifacts (512)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 256 MiB, 2,000 files, a 128 MiB tree, 1 run, lz4 build",
    )
    parser.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of: {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--targets",
        default=None,
        help=f"comma-separated subset of: {','.join(TARGET_KEYS)} (default: "
        f"{','.join(DEFAULT_TARGETS)}, and {','.join(DEFAULT_PEERS)} where their tools are "
        "installed; cachefsm: cachefs with --metrics, scraped every second; cachefst: with "
        "--otlp-endpoint to a receiver here)",
    )
    parser.add_argument(
        "--build", choices=[*BUILDS, "none"], default=None, help="C project (lua; --quick lz4)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="make -jN")
    parser.add_argument(
        "--dir", type=Path, default=None, help="use a temporary directory inside DIR, no tmpfs"
    )
    parser.add_argument("--tmpfs-size", default="8G", help="size of the tmpfs (8G)")
    parser.add_argument(
        "--passthrough", type=Path, default=DEFAULT_PASSTHROUGH, help="passthrough.py"
    )
    parser.add_argument(
        "--cachefs-init-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="argument for the `cachefs init` that makes each fresh store (repeatable): "
        "--cachefs-init-arg=--digest-function=blake3",
    )
    parser.add_argument(
        "--cachefs-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `cachefs mount` (repeatable): --cachefs-arg=--cache-size=256M",
    )
    parser.add_argument(
        "--bindfs-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for bindfs (repeatable): --bindfs-arg=-obig_writes",
    )
    parser.add_argument(
        "--phase-timeout", type=float, default=600.0, help="seconds before a phase is a hang"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random 4 KiB offsets")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.size_mib = args.size_mib or (256 if quick else 1024)
    args.files = args.files or (2000 if quick else 10000)
    args.tree_mib = args.tree_mib or (128 if quick else 512)
    args.build = args.build or ("lz4" if quick else "lua")
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    if args.build == "none" and "build" in args.only:
        args.only.remove("build")
    if bad := set(args.only) - set(WORKLOADS):
        parser.error(f"unknown workload(s) {sorted(bad)}; choose from {', '.join(WORKLOADS)}")
    # peer key -> what it lacks, for the peers left out of the default targets
    args.skipped_peers = {}
    if args.targets is None:
        args.targets = list(DEFAULT_TARGETS)
        for key in DEFAULT_PEERS:
            if problem := peer_problem(key):
                args.skipped_peers[key] = problem
            else:
                args.targets.append(key)
    else:
        args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        if bad := set(args.targets) - set(TARGET_KEYS):
            parser.error(f"unknown target(s) {sorted(bad)}; choose from {', '.join(TARGET_KEYS)}")
        for key in args.targets:
            if problem := peer_problem(key):
                needs = " and ".join(PEER_TOOLS[key])
                parser.error(f"target {key} needs {needs}: {problem}; {INSTALL_HINT}")
    values = (args.runs, args.size_mib, args.files, args.tree_mib, args.random_reads, args.jobs)
    if min(values) < 1:
        parser.error(
            "--runs, --size-mib, --files, --tree-mib, --random-reads and --jobs must be positive"
        )
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_mount.py: run as root (FUSE mounts, tmpfs, drop_caches)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)  # cleanup in the finally blocks
    started = time.perf_counter()
    busy_start, own_start = machine_busy_seconds(), own_cpu_seconds()
    caches = Caches()
    rng = random.Random(args.seed)
    blocks = args.size_mib * MiB // (4 * KiB)
    offsets = [rng.randrange(blocks) * 4 * KiB for _ in range(args.random_reads)]
    if args.skipped_peers:
        skipped = ", ".join(f"{k} ({why})" for k, why in args.skipped_peers.items())
        log(f"peers skipped, their tools missing ({INSTALL_HINT}): {skipped}")
    log("preparing data")
    data = make_data(args)
    with workspace(args) as base:
        log(f"working in {base} ({fs_type(base)})")
        watchdog = Watchdog(args.phase_timeout)
        ctx = Context(args, data, watchdog, offsets)
        targets = make_targets(args, base, caches)
        try:
            if "tree" in args.only:
                log(f"staging the tree of artifacts ({args.tree_mib} MiB)")
                ctx.tree = make_tree(args.tree_mib * MiB, base / "stage-tree")
            if "build" in args.only:
                ctx.build_src = build_sources(args.build, base)
                log(f"warm-up build (native, untimed) of {ctx.build_src.name}")
                warm = base / "warmup-build"
                shutil.copytree(ctx.build_src, warm, symlinks=True)
                run_make(warm, args, base / "make-warmup.log")
                shutil.rmtree(warm)
            for t in targets:
                t.start()
            results, errors = run_all(ctx, targets)
        finally:
            for t in targets:
                try:
                    t.close()
                except Exception as exc:  # cleanup goes on for the others
                    log(f"cleanup of {t.label} failed: {exc!r}")
        wall = time.perf_counter() - started
        cpu = {
            "machine_busy": machine_busy_seconds() - busy_start,
            "own_and_children": own_cpu_seconds() - own_start,
            "cachefs_daemons": sum(t.daemon_cpu for t in targets if isinstance(t, Cachefs)),
        }
        others = max(0.0, cpu["machine_busy"] - cpu["own_and_children"] - cpu["cachefs_daemons"])
        others /= wall
        for line in summary_lines(args, data, ctx.tree, targets, base, caches):
            print(line)
    print()
    print(table(args, targets, results, ctx.tree))
    print()
    for line in daemon_cpu_lines(targets, results):
        print(line)
    print()
    print(NOTES)
    print()
    for line in cachefs_lines(targets):
        print(line)
    for line in [*watchdog.hangs, *errors]:
        print(f"FAILED: {line}")
    print(f"total wall time: {wall:.1f} s")
    print(
        f"CPU used by other processes during the run: {others:.2f} of {os.cpu_count()} cores "
        "on average"
        + (" - figures are disturbed, rerun on a quiet machine" if others > 0.2 else "")
        + f" (CPU seconds: machine busy {cpu['machine_busy']:.0f}, this script and its children "
        f"{cpu['own_and_children']:.0f}, cachefs daemons {cpu['cachefs_daemons']:.0f})"
    )
    if args.json:
        doc = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results,
            "errors": errors,
            "hangs": watchdog.hangs,
            "cachefs_problems": [p for t in targets for p in t.problems],
            "skipped_peers": args.skipped_peers,
            "tree": None
            if ctx.tree is None
            else {"files": len(ctx.tree.files), "bytes": ctx.tree.nbytes, "kinds": ctx.tree.kinds},
            "wall_seconds": wall,
            "other_processes_cores": others,
            "cpu_seconds": cpu,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if errors or watchdog.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
