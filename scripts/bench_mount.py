"""Benchmark of a mounted cachefs against a native directory and two FUSE passthroughs.

This is a benchmark, not a test: it asserts nothing about time.  It prints a Markdown
table of figures and of cachefs's ratios against baselines measured in the same run, on
the same bytes, on the same filesystem:

* ``native``: a plain directory;
* ``passthrough``: the minimal pyfuse3 + trio passthrough of ``shared/baselines``
  (``passthrough.py BACKING MOUNTPOINT``), its backing directory beside the others;
* ``pt kc+wb``: the same with ``--keep-cache --writeback --timeout 60``;
* ``cachefs``: ``cachefs mount STORE MOUNTPOINT`` (a fresh store for every run);
* ``cachefs+metrics`` (``--targets ...,cachefsm``, not by default): the same with
  ``--metrics``, its ``/metrics`` scraped every second: "cachefs / cachefs+metrics" is
  then what metrics cost; ``cachefs+traces`` (``cachefst``): with ``--otlp-endpoint``,
  spans sent to an OTLP/gRPC receiver in this process (``tests/otlp.py``).

By default everything lives on a tmpfs that the script mounts in a temporary directory
of its own (``mount -t tmpfs``; this needs root, as FUSE mounts and drop_caches do) and
unmounts at the end; ``--dir DIR`` uses a temporary directory inside DIR instead.

Workloads (``--only`` picks some: ``seq``, ``small``, ``build``):

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
* ``small``: ``--files`` files of 16 KiB (distinct random contents) in directories of 100:
  create (open O_CREAT|O_EXCL + write + close), cold stat and cold read (each after a
  remount + drop_caches), warm stat and warm read (each done twice, the second timed;
  the first read checks every byte), delete (unlink).  Rates are files per second.
* ``build``: a real C build with sources and objects inside the target: the sources of a
  Debian source package are copied into the target (untimed) and ``make -jN`` is timed
  (wall clock).  ``--build zstd`` (default: ``make -C programs zstd``, about 50 C files)
  or ``lz4`` (``make -C programs lz4``, the ``--quick`` default).  The source tarball is
  taken from /var/cache/cachefs-bench/src when it is there; otherwise it is fetched once
  with ``apt-get source --download-only`` into that directory, with a private apt
  configuration under /var/cache/cachefs-bench/apt (deb-src entries made from the
  machine's own apt sources; the system's apt configuration is not touched).  Later runs
  reuse it, offline.  A native build runs once, untimed, first, to warm the compiler.

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

With the defaults it takes about 20 minutes on a 2-core machine and needs about 5 GiB of
memory (the data in this process, the tmpfs, the page cache of the mounts).
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
MB = 1e6
BLOCK = 1 * MiB
SMALL_SIZE = 16 * KiB
SMALL_PER_DIR = 100
MAX_ARTIFACT = 64 * MiB
MIX_SHARES = {"so": 0.45, "a": 0.30, "pyc": 0.25}
MIX_ROOTS = (ROOT / ".venv" / "lib", Path("/usr/lib"))

WORKLOADS = ("seq", "small", "build")
TARGET_KEYS = ("native", "pt", "ptkc", "cachefs", "cachefsm", "cachefst")
#: Measured unless --targets says otherwise (cachefsm, cachefst: the cost of
#: --metrics and of --otlp-endpoint).
DEFAULT_TARGETS = ("native", "pt", "ptkc", "cachefs")


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


def run_cmd(cmd: list[str], timeout: float = 300.0) -> None:
    """Run a command; fail with its output when it fails."""
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
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


class Passthrough(Target):
    key = "pt"
    label = "passthrough"
    options: tuple[str, ...] = ()

    def __init__(self, base: Path, caches: Caches, script: Path) -> None:
        super().__init__(base, caches)
        self.script = script
        self.backing = base / f"{self.key}-backing"
        self.root = base / f"{self.key}-mnt"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.backing.mkdir(exist_ok=True)
        self.root.mkdir(exist_ok=True)
        with open(self.base / f"{self.key}.log", "ab") as out:
            # A session of its own: Ctrl-C reaches us, and we unmount it cleanly.
            self.proc = subprocess.Popen(
                [str(PYTHON), str(self.script), str(self.backing), str(self.root), *self.options],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({proc.returncode}); see {out.name}")
            return os.path.ismount(self.root)

        wait_until(ready, f"{self.label} to mount")

    def stop(self) -> None:
        if self.proc is None:
            return
        run_cmd(["fusermount3", "-u", str(self.root)])
        self.proc.wait(timeout=60)
        self.proc = None

    def fresh(self, run: int) -> None:
        if self.proc is None:
            self.start()
        super().fresh(run)

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


class PassthroughCached(Passthrough):
    key = "ptkc"
    label = "pt kc+wb"
    options = ("--keep-cache", "--writeback", "--timeout", "60")


class Cachefs(Target):
    key = "cachefs"
    label = "cachefs"

    def __init__(self, base: Path, caches: Caches, extra: list[str]) -> None:
        super().__init__(base, caches)
        self.extra = extra
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
        "cachefs": Cachefs(base, caches, args.cachefs_arg),
        "cachefsm": CachefsMetrics(base, caches, args.cachefs_arg),
    }
    if "cachefst" in args.targets:
        made["cachefst"] = CachefsTraced(base, caches, args.cachefs_arg)
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


def make_mix(total: int) -> tuple[bytes, dict[str, tuple[int, int]], bool]:
    """``total`` bytes of real artifacts, concatenated in a deterministic spread order."""
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


@dataclass
class Context:
    args: argparse.Namespace
    data: Data
    watchdog: Watchdog
    offsets: list[int] = field(default_factory=list)
    build_src: Path | None = None


def seq_workload(ctx: Context, t: Target, record: Record) -> None:
    files = {"random": ctx.data.random, "mix": ctx.data.mix}
    paths = {kind: t.root / f"big-{kind}.bin" for kind in files}
    phase = ctx.watchdog.phase
    for kind, blob in files.items():
        with phase(t, f"write {kind}"):
            record(f"write_{kind}", len(blob) / write_file(paths[kind], blob) / MB)
    if isinstance(t, Cachefs):
        t.after_writes = t.snapshot() or {}
    for kind, blob in files.items():
        with phase(t, f"cold read {kind}"):
            t.cold()
            record(f"read_cold_{kind}", len(blob) / read_file(paths[kind], len(blob)) / MB)
        with phase(t, f"warm read {kind}"):
            check_file(paths[kind], blob)
            record(f"read_warm_{kind}", len(blob) / read_file(paths[kind], len(blob)) / MB)
        if kind == "random":
            with phase(t, "random 4 KiB reads"):
                seconds = random_reads(paths[kind], ctx.offsets)
                record("rand4k", len(ctx.offsets) / seconds)
    for path in paths.values():
        path.unlink()


def small_workload(ctx: Context, t: Target, record: Record) -> None:
    n = ctx.args.files
    top = t.root / "small"
    top.mkdir()
    dirs = [top / f"d{i:03d}" for i in range((n + SMALL_PER_DIR - 1) // SMALL_PER_DIR)]
    for d in dirs:
        d.mkdir()
    paths = [str(dirs[i // SMALL_PER_DIR] / f"f{i:05d}.o") for i in range(n)]
    view = memoryview(ctx.data.small)
    buf = bytearray(SMALL_SIZE)

    def create() -> None:
        for i, path in enumerate(paths):
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
    with phase(t, "small-file create"):
        record("small_create", n / timed(create))
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
    with phase(t, "small-file delete"):
        record("small_delete", n / timed(delete))
    shutil.rmtree(top)


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
                    run_workload(ctx, name, t, run, results, errors)
        for t in targets:
            if isinstance(t, Cachefs) and t.pid is not None:
                t.snapshot()
                t.scan_log()
    return results, errors


# --- report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "MB/s", "IOPS", "files/s" or "s" (lower is better)
    goal: tuple[str, float] | None = None  # (baseline target key, ratio)


def metrics(args: argparse.Namespace) -> list[Metric]:
    size = f"{args.size_mib / 1024:g} GiB" if args.size_mib >= 1024 else f"{args.size_mib} MiB"
    n = f"{args.files:,} x 16 KiB"
    spec = BUILDS.get(args.build)
    make = f"make -j{args.jobs} -C {spec.subdir} {spec.target}" if spec else ""
    build = f"build {args.build} ({make})" if spec else ""
    return [
        Metric("write_random", f"seq write {size}, random, bs 1 MiB + fsync", "MB/s", ("pt", 0.5)),
        Metric("write_mix", f"seq write {size}, artifact mix, bs 1 MiB + fsync", "MB/s"),
        Metric("read_cold_random", f"seq read cold, random {size}", "MB/s", ("pt", 0.7)),
        Metric("read_cold_mix", f"seq read cold, artifact mix {size}", "MB/s"),
        Metric("read_warm_random", f"seq read warm, random {size}", "MB/s", ("native", 0.8)),
        Metric("read_warm_mix", f"seq read warm, artifact mix {size}", "MB/s", ("native", 0.8)),
        Metric(
            "rand4k", f"random 4 KiB reads warm ({args.random_reads:,})", "IOPS", ("native", 0.5)
        ),
        Metric("small_create", f"{n}: create", "files/s", ("pt", 0.7)),
        Metric("small_stat_warm", f"{n}: stat warm", "files/s", ("native", 0.3)),
        Metric("small_read_warm", f"{n}: read warm", "files/s"),
        Metric("small_stat_cold", f"{n}: stat cold", "files/s"),
        Metric("small_read_cold", f"{n}: read cold", "files/s"),
        Metric("small_delete", f"{n}: delete", "files/s", ("pt", 0.7)),
        Metric("build", f"{build}, wall time", "s", ("native", 1.10)),
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


def table(args: argparse.Namespace, targets: list[Target], results: Results) -> str:
    labels = {t.key: t.label for t in targets}
    header = ["workload", *labels.values()]
    bases = (
        [k for k in TARGET_KEYS if k in labels and k != "cachefs"] if "cachefs" in labels else []
    )
    header += [f"cachefs / {labels[b]}" for b in bases] + ["target", "result"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 3) + "|---|---|"]
    for metric in metrics(args):
        if metric.key not in results:
            continue
        meds = {k: median(results[metric.key].get(k)) for k in labels}
        cells = [metric.label] + [fmt_value(meds[k], metric.unit) for k in labels]
        for base in bases:
            r = ratio(metric, meds, base)
            cells.append("n/a" if r is None else f"{r:.2f}x")
        target, verdict = "", ""
        if metric.goal is not None and metric.goal[0] in labels and "cachefs" in labels:
            base, goal = metric.goal
            lower = metric.unit == "s"
            target = f"{'<=' if lower else '>='} {goal:.2f}x {labels[base]}"
            r = ratio(metric, meds, base)
            if r is None:
                verdict = "n/a"
            else:
                verdict = "PASS" if (r <= goal if lower else r >= goal) else "MISS"
        lines.append("| " + " | ".join([*cells, target, verdict]) + " |")
    return "\n".join(lines)


NOTES = """\
Notes: medians of the runs; "cachefs / X" is the ratio of the medians (for rates
cachefs / X, higher is better; for the build's wall time cachefs time / X time, lower is
better).  "passthrough" is shared/baselines/passthrough.py with its defaults (attribute and
entry timeout 1 s, no keep_cache); "pt kc+wb" adds --keep-cache --writeback --timeout 60.
Cold reads and stats come after an unmount, drop_caches and a remount (a native directory
only drops caches: on tmpfs its files stay in memory, so its cold figures are warm ones).
Warm figures are the second of two passes; every read pass opens each file anew."""


def summary_lines(args: argparse.Namespace, data: Data, base: Path, caches: Caches) -> list[str]:
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
    if args.cachefs_arg:
        lines.append(f"cachefs mount options: {' '.join(args.cachefs_arg)}")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark a cachefs mount against a native directory and FUSE "
        "passthroughs (run as root).",
        epilog=f"Build sources are cached in {CACHE_DIR} (fetched once with apt-get source).",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs; medians (default 3)")
    parser.add_argument("--size-mib", type=int, default=None, help="large file size (1024)")
    parser.add_argument("--files", type=int, default=None, help="small files (10000)")
    parser.add_argument("--random-reads", type=int, default=20000, help="4 KiB preads (20000)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 256 MiB, 2,000 files, 1 run, lz4 build"
    )
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="comma-separated subset of: seq,small,build"
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated subset of: native,pt,ptkc,cachefs,cachefsm,cachefst (cachefs "
        "with --metrics, scraped every second; with --otlp-endpoint to a receiver here; "
        "not by default)",
    )
    parser.add_argument(
        "--build", choices=[*BUILDS, "none"], default=None, help="C project (zstd; --quick lz4)"
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
        "--cachefs-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `cachefs mount` (repeatable): --cachefs-arg=--cache-size=256M",
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
    args.build = args.build or ("lz4" if quick else "zstd")
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.build == "none" and "build" in args.only:
        args.only.remove("build")
    if bad := set(args.only) - set(WORKLOADS):
        parser.error(f"unknown workload(s) {sorted(bad)}; choose from {', '.join(WORKLOADS)}")
    if bad := set(args.targets) - set(TARGET_KEYS):
        parser.error(f"unknown target(s) {sorted(bad)}; choose from {', '.join(TARGET_KEYS)}")
    if min(args.runs, args.size_mib, args.files, args.random_reads, args.jobs) < 1:
        parser.error("--runs, --size-mib, --files, --random-reads and --jobs must be positive")
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
    log("preparing data")
    data = make_data(args)
    with workspace(args) as base:
        log(f"working in {base} ({fs_type(base)})")
        watchdog = Watchdog(args.phase_timeout)
        ctx = Context(args, data, watchdog, offsets)
        targets = make_targets(args, base, caches)
        try:
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
        for line in summary_lines(args, data, base, caches):
            print(line)
    print()
    print(table(args, targets, results))
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
            "wall_seconds": wall,
            "other_processes_cores": others,
            "cpu_seconds": cpu,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if errors or watchdog.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
