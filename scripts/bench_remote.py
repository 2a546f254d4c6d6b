"""Benchmark of cachefs's remote tiers: shared cache directories of two mounts over SeaweedFS.

Two machines sharing a cache are two mounts on this one (fresh stores ``A`` and ``B``,
both ``--remote s3://...`` of one SeaweedFS S3 gateway on 127.0.0.1, both under
``--memory-limit``), each with the same directories marked ``cachefs cache set DIR
--shared``.  Every figure is the median of ``--runs`` runs, each run on a fresh SeaweedFS
and fresh stores, and each baseline is measured in the same run, against the same
endpoint, with the client library cachefs uses (obstore) and its parallelism
(``--threads``, 16: ``FETCH_AHEAD`` of cachefs/remote/_transfer.py; a cold read of
packs has at most ``FETCH_BYTES`` in flight, 8 whole packs):

* cold read of a ``--large`` file (1 GiB of random bytes) that only the remote holds
  for B: written on A, pushed, then opened and read on B in 1 MiB pieces (the lookup
  fetches it, verified, into B's store).  Baseline: the same chunks (A's recipe of the
  file) fetched with ``obstore.get`` on ``--threads`` threads as the bucket holds them
  -- the packs that hold them whole (cachefs/remote/_packs.py), the others as the
  objects ``PREFIX/cas/<hex>`` -- each checked against its SHA-256.  Ratio: baseline
  s / cachefs s (goal >= 0.7);
* cold read of a tree of ``--small-count`` files of 4-16 KiB (random bytes, in 256
  directories ``x/y/`` as ccache lays out its cache) that only the remote holds for B,
  read by name on ``--threads`` threads (a listing of a shared directory shows only what
  is local: tools look files up by name).  Baseline: their chunks fetched as above.
  Ratio: baseline s / cachefs s (no goal);
* cold read of the ``--large`` file dropped on B (``--local-max-size``): after the
  other phases, B is mounted again with ``--local-max-size 32M``, so that the chunks of
  the file it fetched are dropped there (the bucket holds them), then once more with
  ``--local-max-size 4G`` (a large cache in front of the bucket: its fetches go 64 MiB
  ahead), and the file is read in 1 MiB pieces: chunks fetched ahead of the reader, as
  they lie in the bucket's packs.  Baseline: the same direct GETs as for the cold read
  above.  Ratio: baseline s / cachefs s (goal >= 0.7, as for the cold read of a file only
  the remote holds);
* push of a ``--large`` write: from the first write into A's shared directory (1 MiB
  writes, fsync, close) until the remote holds the file's content (A's one object
  pushed: the chunks sent while it was written, the rest, its chunk list) -- and, a
  figure of its own with no goal, until its entry is there too (the push queue is
  empty and the entry was pushed; an entry is queued once its file has rested for 1 s,
  so that a tool's temporary name is not shared in place of its final one).
  Baseline: ``obstore.put`` of the same bytes (a multipart upload with obstore's
  defaults: 5 MiB parts, 12 in flight) to a second fresh SeaweedFS started the same way
  (one holds less than 2 GiB: ``tests/seaweed.py`` gives it 30 volumes of 64 MiB).
  Ratio: baseline s / cachefs s (goal >= 0.7).  And against what the issue's layout
  (each chunk an object, asked about first) allows at best: a HEAD, then a PUT, of each
  of the file's chunks, read from A's store, on ``--threads`` threads, to a third fresh
  SeaweedFS (no goal: it shows how much of the gap is the layout's and how much ours);
* ccache (``tests/clients.py``: ``make`` of zstd with ``CC="ccache gcc"``): a build on
  A fills A's shared ``ccache`` directory and is pushed; then the same project (another
  copy of the sources) is built on B with B's shared ``ccache`` directory, which starts
  empty (warm-shared).  Baseline: a second build on A (local warm).  Ratio: B s / A s
  (goal <= 1.3); B must hit for every compilation A missed.  ccache's own log of both
  builds (``CCACHE_LOGFILE``) gives where the time goes: milliseconds per compilation
  that ccache spent reading the manifest and the result, locking and updating its stats
  file, and in all (``CCACHE_STEPS``).  The log costs both builds alike (about a hundred
  lines per ccache process, written outside the mounts);
* memory: the resident set (``VmRSS`` of /proc/PID/status, and of it ``RssAnon``) of
  both daemons, sampled every 0.2 s during every phase; the peak against the limit.

The cold reads and their baselines take turns going first, run by run; after a cold read
the script waits (untimed) until B has pushed what it fetched back to the remote.  The
SeaweedFS volume files were just written and are in the page cache for cachefs and the
baselines alike: the cold figures measure the client path (HTTP, hashing, storing), not a
disk.  The large cold read puts the file in B's page cache twice (B's segments, and the
FUSE file the reader reads through) where the baseline keeps nothing, and a write through
the mount fills the page cache three or four times over (the kernel's copy of the file,
the journal, the spool, the segments).  On a virtual machine that returns free memory to
its host (free page reporting), memory that stayed free for a few seconds is slow to touch
again: here 2 GiB written into the page cache took 3.4-4.2 s after 8 s of rest and 0.42 s
right after 2 GiB were freed, and perf of a cold read's read phase in such a sitting put
36% of the machine's samples in the kernel's copy into the FUSE file's new pages
(``fuse_copy_folio``), the daemon otherwise idle.  How much free memory rested depends on
what ran before (the first run of a sitting gets the most), and it moves the figures more
than the changes measured with them: compare sittings by the per-run figures.  (Touching
and freeing memory before each timed step was tried: it slowed the baselines, native reads
to half, probably as the freed memory was reported back during the next step.)  Under the
table: the CPU seconds of the daemons and of SeaweedFS in each phase, the daemons' memory
in each phase, ERROR and WARNING lines of their logs (STORE/cachefs.log) and their error
counters, and the CPU that other processes used meanwhile (figures taken on a busy machine
are not worth much).
Run from the repository root, as root (FUSE)::

    .venv/bin/python scripts/bench_remote.py                 # 1 GiB, 5,000 files, 3 runs
    .venv/bin/python scripts/bench_remote.py --large 64M --small-count 500 --runs 1

With the defaults it takes about 15 minutes on a 2-core machine, and needs about 4 GiB of
disk (per run, in --dir) and 2 GiB of memory in this process (the random bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import obstore
from obstore.store import S3Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachefs.engine import Digest, Store
from cachefs.remote._packs import parse_index
from tests import clients
from tests.mounting import Mount, cachefs, content_digest, live_stats, start, stop
from tests.seaweed import BUCKET, Seaweed, seaweed

MIB = 1 << 20
PIECE = MIB
PREFIX = "team"
SHARES = ("large", "tree", "ccache")
#: Seconds before a push is taken as hung.
PUSH_TIMEOUT = 900.0
#: B's --local-max-size that drops the large file there, then the one it reads it with.
DROPPED_LIMIT, READ_LIMIT = 32 * MIB, 4 << 30
TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1:].isalpha() else int(text)


def human(n: float) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MIB:g} MiB"


# --- what the processes use -----------------------------------------------------------


def memory_of(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of a process in bytes; None once it is gone."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                fields[name] = int(value.split()[0]) * 1024
    return (fields["VmRSS"], fields.get("RssAnon", 0)) if "VmRSS" in fields else None


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of a live process; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent on anything but idle and iowait since boot."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Monitor:
    """The daemons' memory, sampled every ``period`` seconds, and the CPU seconds of the
    daemons and of SeaweedFS, per phase."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        #: Processes watched: the daemons ("A", "B", memory and CPU) and "SeaweedFS" (CPU).
        self.pids: dict[str, int] = {}
        self.phase = "setup and waits"
        #: (phase, process) -> peak (VmRSS, RssAnon) over the runs
        self.peaks: dict[tuple[str, str], tuple[int, int]] = {}
        #: phase -> one {process or "wall": seconds} per run
        self.cpu: dict[str, list[dict[str, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> None:
        for name, pid in list(self.pids.items()):
            now = memory_of(pid) if name != "SeaweedFS" else None
            if now is not None:
                rss, anon = self.peaks.get((self.phase, name), (0, 0))
                self.peaks[self.phase, name] = (max(rss, now[0]), max(anon, now[1]))

    @contextlib.contextmanager
    def watching(self, name: str, pid: int) -> Iterator[None]:
        self.pids[name] = pid
        try:
            yield
        finally:
            self.pids.pop(name, None)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.sample()
        self.phase = phase
        pids = dict(self.pids)
        before = {name: cpu_of(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        try:
            yield
        finally:
            used = {name: cpu_of(pid) - before[name] for name, pid in pids.items()}
            self.cpu.setdefault(phase, []).append(used | {"wall": time.perf_counter() - start})
            self.sample()
            self.phase = "setup and waits"


# --- the data ---------------------------------------------------------------------------


def random_pieces(total: int) -> list[bytes]:
    """``total`` random bytes in pieces of at most PIECE (incompressible, no dedup)."""
    return [os.urandom(min(PIECE, total - start)) for start in range(0, total, PIECE)]


def random_tree(count: int, rng: random.Random) -> dict[str, bytes]:
    """``count`` files of 4-16 KiB by relative path, ccache's layout: ``x/y/<hex>``."""
    tree = {}
    for _ in range(count):
        name = rng.randbytes(16).hex()
        tree[f"{name[0]}/{name[1]}/{name[2:]}"] = os.urandom(rng.randrange(4 << 10, 16 << 10))
    return tree


# --- SeaweedFS and the mounts -----------------------------------------------------------


@contextlib.contextmanager
def throwaway_seaweed(directory: Path) -> Iterator[Seaweed]:
    """``tests.seaweed.seaweed``, killed at the end instead of stopped: a graceful stop
    takes 25 s, and its data is thrown away."""
    with seaweed(directory) as weed:
        try:
            yield weed
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(weed.process.pid, signal.SIGKILL)


def remote(mnt: Path) -> dict[str, Any]:
    doc: dict[str, Any] = live_stats(mnt)["remote"]
    return doc


def mount(store: Path, mnt: Path, url: str, memory_limit: str, large: int = 0) -> Mount:
    """A mount with the remote, and SHARES made shared cache directories; a
    file of ``large`` bytes is published whole, at its fsync (not in parts)."""
    threshold = ["--publish-threshold", str(2 * large)] if large > 1 << 29 else []
    m = start(store, mnt, "--remote", url, "--memory-limit", memory_limit, *threshold)
    for name in SHARES:
        (mnt / name).mkdir()
        cachefs("cache", "set", str(mnt / name), "--max-size", "10G", "--shared")
    return m


def wait_pushed(mnt: Path, entries: int = 0, timeout: float = PUSH_TIMEOUT) -> float:
    """Wait until ``entries`` shared entries (counted since the mount started) are on
    the remote and nothing waits to be pushed; returns when (perf_counter)."""

    def done() -> bool:
        r = remote(mnt)
        return bool(r["pushed_entries"] >= entries and r["queue"] == 0 and not r["shared_settling"])

    deadline = time.monotonic() + timeout
    while True:
        if done():
            at = time.perf_counter()
            if done():  # stats.json is not one atomic snapshot: ask twice
                return at
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt}: not pushed after {timeout:.0f} s: {remote(mnt)}")
        time.sleep(0.05)


def file_count(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def log_problems(store: Path, label: str) -> list[str]:
    """ERROR/WARNING lines (and tracebacks) of a daemon's log."""
    path = store / "cachefs.log"
    if not path.exists():
        return []
    bad = (" ERROR ", " WARNING ", " CRITICAL ", "Traceback")
    lines = path.read_text(errors="replace").splitlines()
    return [f"{label}: {line.strip()}" for line in lines if any(b in line for b in bad)]


def counter_problems(stats: dict[str, Any], label: str) -> list[str]:
    r = stats["remote"]
    counters = {
        "errors": stats["errors"],
        "corruptions": stats["corruptions"],
        "push_failures": r["push_failures"],
        "fetch_errors": r["fetch_errors"],
        "fetch_misses": r["fetch_misses"],
    }
    return [f"{label}: {name} = {value}" for name, value in counters.items() if value]


# --- the direct baselines ----------------------------------------------------------------


def direct_store(endpoint: str) -> S3Store:
    return S3Store(
        BUCKET,
        prefix=PREFIX,
        endpoint=endpoint,
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},  # bodies signed, as cachefs signs them over http
    )


def chunks_of(store: Path, digests: list[str]) -> list[Digest]:
    """The distinct chunks of the objects, from the store's recipes (read-only: the
    mount may go on)."""
    with Store.open(store, readonly=True) as s:
        chunks = [Digest(h, n) for d in digests for h, n in s.recipe(Digest.parse(d)) if h]
    return list(dict.fromkeys(chunks))


def direct_get(s3: S3Store, chunks: list[Digest], threads: int) -> float:
    """Seconds to GET every chunk on ``threads`` threads, each checked as cachefs
    does, as the bucket holds it: the packs that hold chunks (their indexes read
    first, untimed), whole, and the other chunks one object each."""
    places: dict[bytes, tuple[str, int]] = {}
    for page in obstore.list(s3, "index"):
        for meta in page:
            for record in parse_index(bytes(obstore.get(s3, meta["path"]).bytes())):
                offset = 0
                for chunk in record.chunks:
                    places.setdefault(chunk.hash, (f"packs/{record.name.hex()}", offset))
                    offset += chunk.size
    packs: dict[str, list[tuple[Digest, int]]] = {}
    loose: list[Digest] = []
    for chunk in chunks:
        if chunk.hash in places:
            key, offset = places[chunk.hash]
            packs.setdefault(key, []).append((chunk, offset))
        else:
            loose.append(chunk)

    def check(chunk: Digest, data: bytes | memoryview) -> int:
        if len(data) != chunk.size or hashlib.sha256(data).digest() != chunk.hash:
            raise RuntimeError(f"direct GET of {chunk} came back wrong")
        return len(data)

    def get(chunk: Digest) -> int:
        return check(chunk, memoryview(obstore.get(s3, f"cas/{chunk.hex}").bytes()))

    def get_pack(key: str) -> int:
        data = memoryview(obstore.get(s3, key).bytes())
        return sum(check(c, data[at : at + c.size]) for c, at in packs[key])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(get_pack, packs)) + sum(pool.map(get, loose))
    seconds = time.perf_counter() - start
    assert got == sum(c.size for c in chunks)
    return seconds


def direct_put(s3: S3Store, pieces: list[bytes]) -> float:
    """Seconds of a multipart upload of ``pieces``."""
    start = time.perf_counter()
    obstore.put(s3, "direct/large", iter(pieces))
    seconds = time.perf_counter() - start
    meta = obstore.head(s3, "direct/large")
    assert meta["size"] == sum(map(len, pieces)), meta
    return seconds


def direct_chunk_put(s3: S3Store, store: Path, digest: str, threads: int) -> float:
    """Seconds to send an object's distinct chunks as objects ``cas/<hex>`` as
    the issue's layout has cachefs do it, with nothing else: a HEAD of each
    (all missing), then a PUT of each, read from the store, on ``threads``
    threads -- the most that layout allows with this client and server."""
    with Store.open(store, readonly=True) as s:
        chunks = [Digest(h, n) for h, n in s.recipe(Digest.parse(digest)) if h]
        chunks = list(dict.fromkeys(chunks))

        def missing(chunk: Digest) -> bool:
            try:
                obstore.head(s3, f"cas/{chunk.hex}")
            except (obstore.exceptions.NotFoundError, FileNotFoundError):
                return True
            return False

        def put(chunk: Digest) -> None:
            obstore.put(s3, f"cas/{chunk.hex}", bytes(s.read_chunk(chunk.hash)))

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            lacking = [c for c, m in zip(chunks, pool.map(missing, chunks), strict=True) if m]
            list(pool.map(put, lacking))
        seconds = time.perf_counter() - start
    assert len(lacking) == len(chunks), "the fresh SeaweedFS had some chunks already"
    return seconds


# --- through the mounts ------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_and_push(mnt: Path, pieces: list[bytes]) -> tuple[float, float, float]:
    """Write the large file in A's shared directory: seconds until written and
    fsynced, until its content is on the remote (the mount's one object pushed),
    and until its entry is too (queued once the file has rested ``SETTLE``)."""
    before = remote(mnt)
    start = time.perf_counter()
    with open(mnt / "large" / "blob", "wb", buffering=0) as f:
        for piece in pieces:
            f.write(piece)
        os.fsync(f.fileno())
    written = time.perf_counter()
    deadline = time.monotonic() + PUSH_TIMEOUT
    while remote(mnt)["pushed_objects"] <= before["pushed_objects"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt}: the large file not pushed after {PUSH_TIMEOUT:.0f} s")
        time.sleep(0.05)  # as wait_pushed: each look has the daemon make its whole stats
    content = time.perf_counter()
    with_entry = wait_pushed(mnt, before["pushed_entries"] + 1)
    pushed = remote(mnt)["pushed_objects"] - before["pushed_objects"]
    if pushed != 1:  # the content figure stopped at the first
        raise RuntimeError(
            f"{mnt}: {pushed} objects were pushed, not the large file alone (published in "
            "parts, or another object first)"
        )
    return written - start, content - start, with_entry - start


def ccache_log(stem: Path) -> dict[str, str]:
    """The environment that has ccache log every step to ``stem``.log (with times)."""
    return {"CCACHE_LOGFILE": str(stem.with_suffix(".log"))}


#: ccache's steps (the log line that begins one, the one that ends it) that
#: touch the cache directory: where a warm-shared build's time goes.
CCACHE_STEPS = {
    "manifest looked up and read": ("Manifest key:", ""),
    "result looked up and read": ("Result key:", ""),
    "stats file locked": ("Acquiring ", "Acquired "),
    "stats file updated": ("Acquired ", "Releasing "),
    "all of ccache": ("=== CCACHE", None),
}


def ccache_steps(log: Path) -> dict[str, float]:
    """Milliseconds per compilation that ccache's processes spent in each of
    ``CCACHE_STEPS`` (a step with no end line ends at the next line; the
    last, at the process's last line), from a ``CCACHE_LOGFILE`` log."""
    lines: dict[str, list[tuple[float, str]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        head, _, message = line.partition("] ")
        stamp, _, pid = head.lstrip("[").partition(" ")
        with contextlib.suppress(ValueError):
            at = datetime.datetime.fromisoformat(stamp).timestamp()
            lines.setdefault(pid.strip(), []).append((at, message))
    spent = dict.fromkeys(CCACHE_STEPS, 0.0)
    compilations = 0
    for process in lines.values():
        compilations += any(m.startswith("Result key:") for _, m in process)
        for step, (begins, ends) in CCACHE_STEPS.items():
            for i, (at, message) in enumerate(process):
                if not message.startswith(begins):
                    continue
                if ends is None:
                    spent[step] += process[-1][0] - at
                else:
                    after = process[i + 1 :]
                    end = next((t for t, m in after if m.startswith(ends)), None)
                    spent[step] += (end if end is not None else at) - at
    return {step: 1000 * s / max(1, compilations) for step, s in spent.items()}


def write_tree(mnt: Path, tree: dict[str, bytes]) -> float:
    """Write the tree in A's shared directory: seconds until it is pushed."""
    entries = remote(mnt)["pushed_entries"] + len(tree)
    start = time.perf_counter()
    for rel, data in tree.items():
        path = mnt / "tree" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return wait_pushed(mnt, entries) - start


def read_file(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(PIECE):
            pass
    return time.perf_counter() - start


def read_tree(mnt: Path, tree: dict[str, bytes], threads: int) -> float:
    """Seconds to read every file of the tree by name on ``threads`` threads."""
    got: dict[str, bytes] = {}

    def read(rel: str) -> None:
        got[rel] = (mnt / "tree" / rel).read_bytes()

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, tree))
    seconds = time.perf_counter() - start
    wrong = [rel for rel, data in tree.items() if got.get(rel) != data]
    if wrong:
        raise RuntimeError(f"{len(wrong)} files of the tree read back wrong, e.g. {wrong[0]}")
    return seconds


# --- one run --------------------------------------------------------------------------


@dataclass
class Results:
    """What one run measured: figures (seconds; a baseline's key ends in " base"),
    other figures worth a look, bytes moved (for MB/s), and what went wrong."""

    figures: dict[str, float] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Run:
    """One run: a fresh SeaweedFS, mounts A and B on fresh stores, every figure."""

    def __init__(self, number: int, args: argparse.Namespace, work: Path, monitor: Monitor) -> None:
        self.number, self.args, self.work, self.monitor = number, args, work, monitor
        self.out = Results()
        self.mounts: dict[str, Mount] = {}
        self.stores = {"A": work / "store-a", "B": work / "store-b"}
        #: The large file's digest (once A holds it).
        self.large = ""

    def log(self, message: str) -> None:
        log(f"run {self.number + 1}: {message}")

    def problem(self, message: str) -> None:
        self.out.problems.append(f"run {self.number + 1}: {message}")

    def execute(self) -> Results:
        args, out = self.args, self.out
        self.log(f"generating {human(args.large)} and {args.small_count:,} small files")
        pieces = random_pieces(args.large)
        tree = random_tree(args.small_count, random.Random(self.number))
        out.sizes = {
            "large": args.large,
            "push": args.large,
            "push entry": args.large,
            "push chunks": args.large,
            "tree": sum(map(len, tree.values())),
            "dropped": args.large,
        }
        with (
            throwaway_seaweed(self.work / "weed") as weed,
            self.monitor.watching("SeaweedFS", weed.process.pid),
        ):
            try:
                self.shared(weed, pieces, tree)
            finally:
                self.unmount()
        for label, store in self.stores.items():
            out.problems += log_problems(store, f"run {self.number + 1}: {label}'s log")
        self.log(f"direct multipart upload of {human(args.large)} to a fresh SeaweedFS")
        with (
            throwaway_seaweed(self.work / "weed-put") as weed,
            self.monitor.watching("SeaweedFS", weed.process.pid),
            self.monitor.during("direct multipart PUT"),
        ):
            out.figures["push base"] = direct_put(direct_store(weed.s3), pieces)
        self.log("direct HEAD and PUT of the large file's chunks to that SeaweedFS")
        with (
            throwaway_seaweed(self.work / "weed-chunks") as weed,
            self.monitor.watching("SeaweedFS", weed.process.pid),
            self.monitor.during("direct chunk PUTs"),
        ):
            out.figures["push chunks base"] = direct_chunk_put(
                direct_store(weed.s3), self.stores["A"], self.large, self.args.threads
            )
        out.figures["push chunks"] = out.figures["push"]
        out.figures["push entry base"] = out.figures["push base"]
        return out

    def restart_b(self, url: str, local_max_size: int) -> Mount:
        """B mounted anew with ``--local-max-size``."""
        self.monitor.pids.pop("B", None)
        if status := stop(self.mounts["B"]):
            self.problem(f"B's daemon exited {status}")
        b = self.mounts["B"] = start(
            self.stores["B"], self.work / "b", "--remote", url,
            "--memory-limit", self.args.memory_limit, "--local-max-size", str(local_max_size),
        )  # fmt: skip
        self.monitor.pids["B"] = b.process.pid
        return b

    def start(self, label: str, url: str) -> Mount:
        store = self.stores[label]
        m = self.mounts[label] = mount(
            store, self.work / label.lower(), url, self.args.memory_limit, self.args.large
        )
        self.monitor.pids[label] = m.process.pid
        return m

    def unmount(self) -> None:
        for label, m in self.mounts.items():
            self.monitor.pids.pop(label, None)
            try:
                if m.process.poll() is None:
                    self.out.problems += counter_problems(
                        live_stats(m.path), f"run {self.number + 1}: {label}"
                    )
            finally:
                status = stop(m)
            if status:
                self.problem(f"{label}'s daemon exited {status}")

    def shared(self, weed: Seaweed, pieces: list[bytes], tree: dict[str, bytes]) -> None:
        args, out, monitor = self.args, self.out, self.monitor
        url = weed.url(BUCKET, PREFIX)
        a = self.start("A", url)
        self.log(f"push of {human(args.large)} from A")
        with monitor.during("push large (A)"):
            out.info["push: write + fsync s"], out.figures["push"], out.figures["push entry"] = (
                write_and_push(a.path, pieces)
            )
        large = self.large = content_digest(a.path / "large" / "blob")
        self.log(f"{args.small_count:,} small files written on A and pushed")
        with monitor.during("push tree (A)"):
            out.info["tree: write until pushed s"] = write_tree(a.path, tree)
        tree_digests = [content_digest(a.path / "tree" / rel) for rel in tree]
        if not args.no_ccache:
            self.log("ccache builds on A: cold, then warm")
            src = clients.c_project(self.work / "src-a")
            with monitor.during("ccache build cold (A)"):
                entries = remote(a.path)["pushed_entries"]
                first = clients.ccache_build(src, a.path / "ccache", jobs=args.jobs)
                wait_pushed(a.path, entries + file_count(a.path / "ccache"))
            with monitor.during("ccache build warm (A)"):
                warm = clients.ccache_build(
                    src, a.path / "ccache", jobs=args.jobs, env=ccache_log(self.work / "warm-a")
                )
            out.info["ccache: cold build on A s"] = first.seconds
            out.info["ccache: misses of the cold build"] = first.misses
            out.figures["ccache base"] = warm.seconds
            if warm.misses or first.errors or warm.errors:
                self.problem(f"A's warm build missed: {warm.stats}")

        b = self.start("B", url)
        self.cold_reads(direct_store(weed.s3), large, tree, tree_digests)
        if not args.no_ccache:
            self.log("ccache build on B (warm-shared)")
            src = clients.c_project(self.work / "src-b")
            with monitor.during("ccache build warm-shared (B)"):
                shared = clients.ccache_build(
                    src, b.path / "ccache", jobs=args.jobs, env=ccache_log(self.work / "shared-b")
                )
            out.figures["ccache"] = shared.seconds
            logs = [self.work / "warm-a.log", self.work / "shared-b.log"]
            if not all(log.exists() for log in logs):
                self.problem(f"ccache wrote no log: {[str(p) for p in logs if not p.exists()]}")
            else:
                on_a, on_b = (ccache_steps(log) for log in logs)
                for step in CCACHE_STEPS:
                    out.info[f"ccache per compilation, {step}: A's warm, ms"] = on_a[step]
                    out.info[f"ccache per compilation, {step}: B's warm-shared, ms"] = on_b[step]
            out.info["ccache: hits on B"] = shared.hits
            if shared.hits != first.misses or shared.misses or shared.errors:
                self.problem(f"B's build hit {shared.hits} of A's {first.misses}: {shared.stats}")
            if shared.outputs != first.outputs:
                self.problem("B's build made other objects than A's")
        stats = remote(b.path)
        out.info["B: MB fetched"] = stats["fetched_bytes"] / 1e6
        out.info["B: objects pushed back (fetched ones)"] = stats["pushed_objects"]
        self.dropped(url, direct_store(weed.s3), large)

    def dropped(self, url: str, s3: S3Store, large: str) -> None:
        """B again with ``--local-max-size``: the large file's chunks dropped
        there; then B once more, with room (as a large cache in front of the
        bucket), and the file and its baseline read cold, taking turns going first."""
        args, out, monitor = self.args, self.out, self.monitor
        chunks = chunks_of(self.stores["B"], [large])
        self.log(f"B again with --local-max-size {human(DROPPED_LIMIT)}: the large file dropped")
        b = self.restart_b(url, DROPPED_LIMIT)
        deadline = time.monotonic() + PUSH_TIMEOUT
        while live_stats(b.path)["stored_bytes"] > DROPPED_LIMIT:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"B dropped too little after {PUSH_TIMEOUT:.0f} s: {remote(b.path)}"
                )
            time.sleep(0.2)
        b = self.restart_b(url, READ_LIMIT)
        self.log("cold read of the dropped file on B and direct GETs")
        steps: list[tuple[str, Callable[[], float]]] = [
            ("cachefs", lambda: read_file(b.path / "large" / "blob")),
            ("direct", lambda: direct_get(s3, chunks, args.threads)),
        ]
        for who, step in steps[:: -1 if self.number % 2 else 1]:
            with monitor.during(f"cold read dropped: {who}"):
                out.figures["dropped" if who == "cachefs" else "dropped base"] = step()
        if content_digest(b.path / "large" / "blob") != large:
            raise RuntimeError("B's dropped copy of the large file read back wrong")

    def cold_reads(
        self, s3: S3Store, large: str, tree: dict[str, bytes], tree_digests: list[str]
    ) -> None:
        """The cold reads through B and their baselines, taking turns going first."""
        args, out, monitor = self.args, self.out, self.monitor
        b = self.mounts["B"].path
        large_chunks = chunks_of(self.stores["A"], [large])
        tree_chunks = chunks_of(self.stores["A"], tree_digests)
        out.info["large: chunks"] = len(large_chunks)
        out.info["tree: chunks"] = len(tree_chunks)
        steps: dict[str, list[tuple[str, Callable[[], float]]]] = {
            "large": [
                ("cachefs", lambda: read_file(b / "large" / "blob")),
                ("direct", lambda: direct_get(s3, large_chunks, args.threads)),
            ],
            "tree": [
                ("cachefs", lambda: read_tree(b, tree, args.threads)),
                ("direct", lambda: direct_get(s3, tree_chunks, args.threads)),
            ],
        }
        for kind, pair in steps.items():
            self.log(f"cold read of the {kind} file(s) on B and direct GETs")
            for who, step in pair[:: -1 if self.number % 2 else 1]:
                with monitor.during(f"cold read {kind}: {who}"):
                    out.figures[kind if who == "cachefs" else f"{kind} base"] = step()
                if who == "cachefs":
                    with monitor.during(f"cold read {kind}: B pushes back"):
                        out.info[f"{kind}: B pushes back s"] = timed(lambda: wait_pushed(b))
        if content_digest(b / "large" / "blob") != large:
            raise RuntimeError("B's copy of the large file has another digest than A's")


# --- report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    baseline: str
    higher_is_better: bool  # ratio baseline / cachefs if so, else cachefs / baseline
    goal: float | None


def figures(args: argparse.Namespace) -> list[Figure]:
    return [
        Figure("large", f"cold read, {human(args.large)} file", "direct GETs", True, 0.7),
        Figure("tree", f"cold read, {args.small_count:,} small files", "direct GETs", True, None),
        Figure(
            "dropped",
            f"cold read, {human(args.large)} file dropped here (--local-max-size)",
            "direct GETs",
            True,
            0.7,
        ),
        Figure("push", f"push of a {human(args.large)} write", "multipart PUT", True, 0.7),
        Figure(
            "push entry",
            f"push of a {human(args.large)} write and its shared entry",
            "multipart PUT",
            True,
            None,
        ),
        Figure(
            "push chunks",
            f"push of a {human(args.large)} write (the layout's best)",
            "its chunks as objects: HEAD + PUT",
            True,
            None,
        ),
        Figure("ccache", "ccache build, warm-shared on B", "warm on A", False, 1.3),
    ]


def report(args: argparse.Namespace, runs: list[Results], monitor: Monitor) -> None:
    limit = size(args.memory_limit)
    print(
        f"\ncachefs remote benchmark: {len(runs)} run(s), medians; {os.cpu_count()} CPUs; "
        f"--memory-limit {args.memory_limit}; --threads {args.threads}\n"
    )
    print("| figure | cachefs | baseline | ratio | goal | result |")
    print("|---|---:|---:|---:|---|---|")
    per_run = []
    for f in figures(args):
        if not all(f.key in r.figures for r in runs):
            continue
        mine = [r.figures[f.key] for r in runs]
        base = [r.figures[f"{f.key} base"] for r in runs]
        nbytes = runs[0].sizes.get(f.key, 0)
        m, b = statistics.median(mine), statistics.median(base)
        ratio = b / m if f.higher_is_better else m / b
        goal, verdict = "-", "-"
        if f.goal is not None:
            goal = f"{'>=' if f.higher_is_better else '<='} {f.goal:.2f}x"
            met = ratio >= f.goal if f.higher_is_better else ratio <= f.goal
            verdict = "met" if met else "UNMET"

        def cell(seconds: float, nbytes: int = nbytes) -> str:
            return f"{seconds:.2f} s" + (f" ({nbytes / seconds / 1e6:,.0f} MB/s)" if nbytes else "")

        cells = [f.label, cell(m), f"{cell(b)} ({f.baseline})", f"{ratio:.2f}x", goal, verdict]
        print("| " + " | ".join(cells) + " |")
        runs_text = ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(mine, base, strict=True))
        per_run.append(f"  {f.label}: {runs_text}")
    memory = {
        d: max((rss for (_, p), (rss, _) in monitor.peaks.items() if p == d), default=0)
        for d in "AB"
    }
    peak = max(memory.values(), default=0)
    print(
        f"| daemon peak VmRSS (A, B) | {memory.get('A', 0) / MIB:,.0f}, "
        f"{memory.get('B', 0) / MIB:,.0f} MiB | limit {limit / MIB:,.0f} MiB "
        f"| {peak / limit:.2f}x | <= 1.00x | {'met' if peak <= limit else 'UNMET'} |"
    )
    print(
        "\nRatios of the medians: for reads and the push baseline s / cachefs s (higher is "
        "better); for ccache B's s / A's warm s (lower is better)."
    )
    print("\nper run, cachefs s / baseline s:")
    print("\n".join(per_run))
    print("\nother figures (medians):")
    for key in runs[0].info:
        print(f"  {key}: {statistics.median(r.info[key] for r in runs if key in r.info):,.2f}")
    print("\nper phase (medians): wall s; CPU s of A, B, SeaweedFS; peak VmRSS / RssAnon MiB")
    for phase, used in monitor.cpu.items():
        names = [n for n in ("A", "B", "SeaweedFS") if any(n in u for u in used)]
        cpu = ", ".join(f"{n} {statistics.median(u.get(n, 0) for u in used):.1f}" for n in names)
        rss = ", ".join(
            f"{d} {r / MIB:,.0f} / {a / MIB:,.0f}"
            for (p, d), (r, a) in sorted(monitor.peaks.items())
            if p == phase
        )
        wall = statistics.median(u["wall"] for u in used)
        print(f"  {phase}: {wall:.1f} s; CPU {cpu}; memory {rss or '-'}")
    for (phase, d), (r, a) in sorted(monitor.peaks.items()):
        if phase not in monitor.cpu:
            print(f"  {phase}: memory {d} {r / MIB:,.0f} / {a / MIB:,.0f}")
    problems = [p for r in runs for p in r.problems]
    print(f"\nproblems (daemon logs, error counters, ccache counts): {len(problems)}")
    for line in problems[:30]:
        print(f"  {line}")
    if len(problems) > 30:
        print(f"  ... {len(problems) - 30} more")


# --- main -----------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large", type=size, default=1 << 30, help="large file (1G)")
    parser.add_argument("--small-count", type=int, default=5000, help="small files (5000)")
    parser.add_argument("--memory-limit", default="256M", help="of both daemons (256M)")
    parser.add_argument("--threads", type=int, default=16, help="readers and baselines (16)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="make -jN")
    parser.add_argument("--no-ccache", action="store_true", help="skip the ccache builds")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="for the temp dirs")
    args = parser.parse_args()
    if min(args.runs, args.large, args.small_count, args.threads, args.jobs) < 1:
        parser.error("--runs, --large, --small-count, --threads and --jobs must be positive")
    if os.geteuid() != 0:
        print("bench_remote.py: run as root (FUSE mounts)", file=sys.stderr)
        return 2
    if not args.no_ccache:
        clients.require_ccache()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # cleanup in the finally blocks
    started, busy, own = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()
    runs: list[Results] = []
    with Monitor() as monitor:
        for number in range(args.runs):
            work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=args.dir))
            try:
                runs.append(Run(number, args, work, monitor).execute())
            finally:
                shutil.rmtree(work, ignore_errors=True)
            log(f"run {number + 1}: {runs[-1].figures}")
    wall = time.perf_counter() - started
    others = (machine_busy_seconds() - busy - (own_cpu_seconds() - own)) / wall
    report(args, runs, monitor)
    print(f"\ntotal wall time: {wall:.0f} s")
    print(
        f"CPU used by other processes meanwhile: {max(0.0, others):.2f} of {os.cpu_count()} "
        "cores on average" + (" - figures are disturbed" if others > 0.2 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
