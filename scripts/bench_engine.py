"""Benchmark of the cachefs storage engine against single-core baselines.

This is a benchmark, not a test: it asserts nothing about time.  It prints the
engine's throughput as ratios against baselines measured in the same run, on the
same bytes, with the data already in memory, so that the figures mean something
whatever the machine:

* single-core ``zstandard.ZstdCompressor(level=L).compress`` of each whole file,
  single-core decompression of those frames, single-core ``hashlib.sha256`` of
  each file, and a plain copy of each file (``bytes(memoryview(data))``);
* ingest: ``Store.open(create=True)`` + ``list(store.put_files(paths,
  processes=N))`` + ``close()`` (the parallel path the CLI uses, with its worker
  processes: ``--processes``, one per CPU and at most 4 by default), timed wall-clock;
* re-ingest of the same paths into the same (reopened) store: all dedup hits;
* reads: every object read back through ``iter_object`` (pieces, no join) and
  through ``read`` (joined into one ``bytes``), from a freshly opened store; the
  build-artifact store is read with ``StoreOptions(cache_size=0)`` so that every
  compressed chunk is decompressed (cold decompressed-chunk cache);
* space: ``stats()`` after one and after two ingests of the build-artifact mix,
  compared with the sum of the whole-file zstd frames;
* peak RSS of a child process (this script with a hidden ``--child-ingest``
  mode) that ingests the build-artifact mix, and the peak of its RSS and its
  worker processes' together (sampled every 20 ms).

Two data sets, both copied to a temporary directory on tmpfs (``/dev/shm`` when
it exists) so that disk noise does not dominate:

* random: 8 files of ``--random-mib / 8`` MiB from ``os.urandom``;
* mix: real build artifacts found on this machine (.so, .a, .pyc under /usr/lib,
  /usr/local/lib, ~/.pyenv, sys.prefix ...), symlinks and files over 64 MiB
  skipped, hard links counted once.  Candidates are sorted by path and then
  ordered by a hash of the path (deterministic, and spread over the whole tree
  rather than the alphabetically first directory); files are taken per kind up
  to about 45% .so, 30% .a and 25% .pyc of ``--mix-mib``; a kind that runs short
  leaves its share to the others.

Every figure is measured ``--runs`` times in fresh stores and the median is
reported.  MB/s are 10**6 bytes per second of logical (uncompressed) data.

Run from the repository root::

    .venv/bin/python scripts/bench_engine.py
    .venv/bin/python scripts/bench_engine.py --mix-mib 40 --random-mib 64 --runs 1
    .venv/bin/python scripts/bench_engine.py --json bench.json

Options: ``--mix-mib N`` (300), ``--random-mib N`` (512), ``--runs N`` (3),
``--store-dir DIR`` (a temporary directory is made inside it; default /dev/shm
or the system temp dir), ``--level N`` (zstd level of the stores; default the
store default), ``--json PATH`` (also write the results as JSON).  With the
defaults it takes a few minutes on a 2-core machine and needs about 2.5 GiB of
memory (data in tmpfs, the same bytes in memory, the stores in tmpfs).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Benchmark the checkout this script belongs to, whatever is installed.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import zstandard  # noqa: E402

from cachefs.engine import Store, StoreOptions, default_put_processes  # noqa: E402
from cachefs.errors import CachefsError  # noqa: E402
from cachefs.format.digest import DIGEST_FUNCTIONS, Digest, digest_function  # noqa: E402
from cachefs.format.header import CompressionParams, StoreConfig  # noqa: E402
from cachefs.format.segment import RECORD_HEADER  # noqa: E402

MiB = 1 << 20
MB = 1e6
MAX_FILE = 64 * MiB
MIX_SHARES = {"so": 0.45, "a": 0.30, "pyc": 0.25}
MIX_ROOTS = (
    "/usr/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/gcc",
    "/usr/local/lib",
    "/root/.pyenv",
    "~/.pyenv",
    sys.prefix,
    sys.base_prefix,
)
_SO_RE = re.compile(r"\.so(\.\d+)*$")

# Targets, printed next to the figures (never asserted: this is a benchmark).
TARGET_MIX_INGEST_VS_ZSTD = 1.3
TARGET_RANDOM_INGEST_VS_SHA = 0.6
TARGET_REINGEST_VS_SHA = 0.8
TARGET_COMPRESSED_READ_VS_ZSTD_D = 0.8
TARGET_SPACE_GROWTH_PCT = 0.5
TARGET_COMPRESSION_VS_ZSTD = 0.95
TARGET_RSS_BASE_MIB = 150


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- data sets --------------------------------------------------------------------


@dataclass
class DataSet:
    name: str
    paths: list[Path]
    blobs: list[bytes] = field(default_factory=list)
    kinds: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (files, bytes)

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.blobs)

    def load(self) -> None:
        self.blobs = [p.read_bytes() for p in self.paths]


def make_random(directory: Path, total_mib: int, files: int = 8) -> DataSet:
    directory.mkdir(parents=True)
    size = total_mib * MiB // files
    paths = []
    for i in range(files):
        path = directory / f"random-{i:02d}.bin"
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n
        paths.append(path)
    data = DataSet("random", paths)
    data.kinds["random"] = (files, size * files)
    return data


def kind_of(name: str) -> str | None:
    if name.endswith(".pyc"):
        return "pyc"
    if name.endswith(".a"):
        return "a"
    if _SO_RE.search(name):
        return "so"
    return None


def find_artifacts(roots: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
    """Every regular .so/.a/.pyc file under ``roots``: kind -> [(path, size)], path-sorted."""
    found: dict[str, list[tuple[str, int]]] = {k: [] for k in MIX_SHARES}
    seen_inodes: set[tuple[int, int]] = set()
    seen_paths: set[str] = set()
    real_roots = sorted({os.path.realpath(os.path.expanduser(r)) for r in roots})
    for root in real_roots:
        if not os.path.isdir(root):
            continue
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    kind = kind_of(entry.name)
                    if kind is None or not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not 0 < st.st_size <= MAX_FILE or entry.path in seen_paths:
                    continue
                if (st.st_dev, st.st_ino) in seen_inodes:
                    continue  # a hard link of a file already taken
                seen_paths.add(entry.path)
                seen_inodes.add((st.st_dev, st.st_ino))
                found[kind].append((entry.path, st.st_size))
    for files in found.values():
        files.sort()
    return found


def _spread_key(item: tuple[str, int]) -> bytes:
    return hashlib.blake2b(item[0].encode(), digest_size=8).digest()


def select_mix(found: dict[str, list[tuple[str, int]]], total: int) -> list[tuple[str, str]]:
    """Choose (kind, path) pairs: about MIX_SHARES of ``total`` bytes, deterministically."""
    order = {kind: sorted(files, key=_spread_key) for kind, files in found.items()}
    taken: dict[str, int] = dict.fromkeys(MIX_SHARES, 0)
    chosen: list[tuple[str, str]] = []
    used: set[str] = set()

    def fill(kind: str, budget: int) -> None:
        for path, size in order[kind]:
            if budget - taken[kind] < 4096:
                break
            if path in used or taken[kind] + size > budget:
                continue
            used.add(path)
            chosen.append((kind, path))
            taken[kind] += size

    for kind, share in MIX_SHARES.items():
        fill(kind, int(total * share))
    # A kind that ran short leaves its share to the others, in the same order.
    for kind in MIX_SHARES:
        short = total - sum(taken.values())
        if short > 4096:
            fill(kind, taken[kind] + short)
    return chosen


def make_mix(directory: Path, total_mib: int) -> DataSet:
    directory.mkdir(parents=True)
    found = find_artifacts(MIX_ROOTS)
    log(
        "found candidates: "
        + ", ".join(
            f"{len(v)} .{k} ({sum(s for _, s in v) / MiB:.0f} MiB)" for k, v in found.items()
        )
    )
    chosen = select_mix(found, total_mib * MiB)
    paths: list[Path] = []
    kinds: dict[str, tuple[int, int]] = dict.fromkeys(MIX_SHARES, (0, 0))
    for kind, src in chosen:
        dst = directory / f"{len(paths):05d}-{kind}-{os.path.basename(src)}"
        try:
            shutil.copyfile(src, dst)
        except OSError as exc:
            log(f"skipping unreadable {src}: {exc}")
            continue
        paths.append(dst)
        files, size = kinds[kind]
        kinds[kind] = (files + 1, size + dst.stat().st_size)
    data = DataSet("mix", paths)
    data.kinds = kinds
    return data


# --- measurements -------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


#: Digest function of the stores under test (--digest-function).
DIGEST_FUNCTION = "sha256"
#: Worker processes of put_files (--processes; the default is the CLI's).
PROCESSES = default_put_processes()


def store_config(level: int) -> StoreConfig:
    return StoreConfig(digest_function=DIGEST_FUNCTION, compression=CompressionParams(level=level))


def put_all(store: Store, paths: list[Path]) -> list[Digest]:
    """put_files over ``paths``; an error result is a failure of the benchmark."""
    digests: list[Digest] = []
    errors: list[tuple[Path, CachefsError]] = []
    for path, result in store.put_files(paths, processes=PROCESSES):
        if isinstance(result, Digest):
            digests.append(result)
        else:
            errors.append((path, result))
    if errors:
        shown = "\n".join(f"  {p}: {e!r}" for p, e in errors[:10])
        raise RuntimeError(f"put_files reported {len(errors)} error(s):\n{shown}")
    return digests


def ingest(store_path: Path, paths: list[Path], config: StoreConfig) -> tuple[float, list[Digest]]:
    """Open (creating if needed), put_files, close: (seconds, digests)."""
    digests: list[Digest] = []

    def run() -> None:
        store = Store.open(store_path, create=True, config=config)
        try:
            digests.extend(put_all(store, paths))
        finally:
            store.close()

    return timed(run), digests


def store_stats(store_path: Path) -> dict[str, int]:
    with Store.open(store_path, readonly=True) as store:
        stats = store.stats()
    on_disk = sum(p.stat().st_size for p in (store_path / "segments").rglob("*.seg"))
    return {
        "logical_bytes": stats.logical_bytes,
        "chunk_bytes": stats.chunk_bytes,
        "stored_bytes": stats.stored_bytes,
        "chunks": stats.chunks,
        "objects": stats.objects,
        "files": stats.files,
        "segments": stats.segments,
        "segment_bytes": stats.segment_bytes,
        "segment_file_bytes": on_disk,
    }


def read_pass(store_path: Path, digests: list[Digest], options: StoreOptions, join: bool) -> float:
    """Seconds to read every object from a freshly opened (read-only) store."""
    store = Store.open(store_path, readonly=True, options=options)
    total = 0

    def by_pieces() -> None:
        nonlocal total
        for digest in digests:
            for piece in store.iter_object(digest):
                total += len(piece)

    def by_read() -> None:
        nonlocal total
        for digest in digests:
            total += len(store.read(digest))

    try:
        seconds = timed(by_read if join else by_pieces)
    finally:
        store.close()
    expected = sum(d.size for d in digests)
    if total != expected:
        raise RuntimeError(f"read {total} bytes from {store_path}, expected {expected}")
    return seconds


def verify(store_path: Path, data: DataSet, digests: list[Digest]) -> None:
    """Untimed: every object reads back as the original bytes, with the right digest."""
    bad = []
    with Store.open(store_path, readonly=True) as store:
        for path, blob, digest in zip(data.paths, data.blobs, digests, strict=True):
            expected = digest_function(DIGEST_FUNCTION).hash(blob)
            if digest.size != len(blob) or digest.hash != expected:
                bad.append(
                    f"{path.name}: digest {digest} is not {DIGEST_FUNCTION}/size of the file"
                )
            elif store.read(digest) != blob:
                bad.append(f"{path.name}: read back differs from the original")
    if bad:
        raise RuntimeError(f"{data.name}: {len(bad)} object(s) wrong:\n  " + "\n  ".join(bad[:10]))
    log(f"verified {len(digests)} {data.name} objects (digests and contents)")


def _sha256_all(blobs: list[bytes]) -> None:
    for blob in blobs:
        hashlib.sha256(blob).digest()


def _copy_all(blobs: list[bytes], buf: bytearray) -> None:
    # memcpy into a buffer allocated and touched beforehand: no allocator or page-fault noise.
    view = memoryview(buf)
    for blob in blobs:
        view[: len(blob)] = blob


def _copy_alloc_all(blobs: list[bytes]) -> None:
    # One fresh copy per file, alive one at a time (what read() has to do).
    for blob in blobs:
        bytes(memoryview(blob))


def baselines(data: DataSet, level: int, with_zstd: bool) -> dict[str, float]:
    blobs = data.blobs
    out: dict[str, float] = {}
    out["sha256_s"] = timed(lambda: _sha256_all(blobs))
    buf = bytearray(max(len(b) for b in blobs))
    out["copy_s"] = timed(lambda: _copy_all(blobs, buf))
    out["copy_alloc_s"] = timed(lambda: _copy_alloc_all(blobs))
    if with_zstd:
        cctx = zstandard.ZstdCompressor(level=level)
        frames: list[bytes] = []
        out["zstd_c_s"] = timed(lambda: frames.extend(cctx.compress(b) for b in blobs))
        dctx = zstandard.ZstdDecompressor()

        def decompress_all() -> None:
            for frame in frames:
                dctx.decompress(frame)

        out["zstd_d_s"] = timed(decompress_all)
        out["zstd_bytes"] = sum(len(f) for f in frames)
    return out


def child_rss(src_dir: Path, store_path: Path, level: int) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--level",
        str(level),
        "--processes",
        str(PROCESSES),
        "--child-ingest",
        str(src_dir),
        str(store_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child ingest failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _rss_with_descendants_kib(pid: int) -> int:
    """VmRSS of ``pid`` and of every process below it (the put's worker processes)."""
    total, todo = 0, [pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            continue  # it ended meanwhile
    return total


def child_main(src_dir: Path, store_path: Path, level: int) -> int:
    rss_start = _status_kib("VmRSS")
    paths = sorted(p for p in src_dir.iterdir() if p.is_file())
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_with_descendants_kib(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    store = Store.open(store_path, create=True, config=store_config(level))
    try:
        digests = put_all(store, paths)
    finally:
        store.close()
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    result = {
        "with_workers_peak_kib": peak[0],
        "vmhwm_kib": _status_kib("VmHWM"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_before_ingest_kib": rss_start,
        "seconds": seconds,
        "bytes": sum(d.size for d in digests),
    }
    print(json.dumps(result))
    return 0


def run_once(
    number: int, rand: DataSet, mix: DataSet, level: int, workdir: Path
) -> dict[str, float]:
    run_dir = workdir / f"run-{number}"
    run_dir.mkdir()
    config = store_config(level)
    r: dict[str, float] = {}
    try:
        log(f"run {number}: baselines")
        for prefix, data, with_zstd in (("rand", rand, True), ("mix", mix, True)):
            for key, value in baselines(data, level, with_zstd).items():
                r[f"{prefix}_{key}"] = value

        for prefix, data in (("rand", rand), ("mix", mix)):
            store_path = run_dir / f"store-{data.name}"
            log(f"run {number}: ingest {data.name}")
            r[f"{prefix}_ingest_s"], digests = ingest(store_path, data.paths, config)
            once = store_stats(store_path)
            if number == 0:
                verify(store_path, data, digests)
            log(f"run {number}: re-ingest {data.name}")
            r[f"{prefix}_reingest_s"], again = ingest(store_path, data.paths, config)
            if again != digests:
                raise RuntimeError(f"{data.name}: re-ingest returned different digests")
            twice = store_stats(store_path)
            for key, value in once.items():
                r[f"{prefix}_once_{key}"] = value
                r[f"{prefix}_twice_{key}"] = twice[key]
            log(f"run {number}: reads {data.name}")
            options = StoreOptions() if prefix == "rand" else StoreOptions(cache_size=0)
            r[f"{prefix}_read_pieces_s"] = read_pass(store_path, digests, options, join=False)
            r[f"{prefix}_read_bytes_s"] = read_pass(store_path, digests, options, join=True)
            shutil.rmtree(store_path)

        log(f"run {number}: peak RSS of a child ingesting the mix")
        child = child_rss(mix.paths[0].parent, run_dir / "store-child", level)
        r["child_vmhwm_kib"] = child["vmhwm_kib"]
        r["child_with_workers_peak_kib"] = child["with_workers_peak_kib"]
        r["child_ru_maxrss_kib"] = child["ru_maxrss_kib"]
        r["child_rss_before_ingest_kib"] = child["rss_before_ingest_kib"]
        r["child_ingest_s"] = child["seconds"]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return r


# --- report ---------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    result: str = ""


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB if seconds > 0 else float("inf")


def judge(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "MISS"


def build_report(
    med: dict[str, float], rand: DataSet, mix: DataSet, cache_size: int, level: int
) -> tuple[list[Row], dict[str, float]]:
    rows: list[Row] = []
    fig: dict[str, float] = {}
    rb, mb = rand.total, mix.total

    def rate(key: str, nbytes: int) -> float:
        fig[key] = mbps(nbytes, med[key + "_s"])
        return fig[key]

    # Baselines.
    rows.append(Row("baselines (single core, data in memory)", ""))
    base_rows = (
        (f"  zstd -{level} compress, mix, whole files", "mix_zstd_c", mb),
        (f"  zstd -{level} decompress, mix, whole-file frames", "mix_zstd_d", mb),
        ("  SHA-256, mix", "mix_sha256", mb),
        (f"  zstd -{level} compress, random, whole files", "rand_zstd_c", rb),
        ("  SHA-256, random", "rand_sha256", rb),
        ("  copy into a preallocated buffer, random", "rand_copy", rb),
        ("  copy bytes(memoryview) (allocates), random", "rand_copy_alloc", rb),
        ("  copy into a preallocated buffer, mix", "mix_copy", mb),
    )
    for label, key, nbytes in base_rows:
        rows.append(Row(label, f"{rate(key, nbytes):8.1f} MB/s"))

    def vs(
        label: str, key: str, nbytes: int, base_label: str, base_key: str, target: float | None
    ) -> None:
        value = rate(key, nbytes)
        ratio = value / fig[base_key]
        fig[key + "_ratio_vs_" + base_key] = ratio
        rows.append(
            Row(
                label,
                f"{value:8.1f} MB/s",
                f"{base_label} {fig[base_key]:.1f}",
                f"{ratio:5.2f}x",
                "" if target is None else f">= {target}x",
                "" if target is None else judge(ratio, target, True),
            )
        )

    rows.append(Row("ingest (open + put_files + close)", ""))
    vs("  ingest mix", "mix_ingest", mb, "zstd-c 1c", "mix_zstd_c", TARGET_MIX_INGEST_VS_ZSTD)
    vs("  ingest mix", "mix_ingest", mb, "SHA-256 1c", "mix_sha256", None)
    vs(
        "  ingest random",
        "rand_ingest",
        rb,
        "SHA-256 1c",
        "rand_sha256",
        TARGET_RANDOM_INGEST_VS_SHA,
    )
    vs("  ingest random", "rand_ingest", rb, "zstd-c 1c", "rand_zstd_c", None)
    rows.append(Row("re-ingest, same paths, same store (all dedup hits)", ""))
    vs("  re-ingest mix", "mix_reingest", mb, "SHA-256 1c", "mix_sha256", TARGET_REINGEST_VS_SHA)
    vs(
        "  re-ingest random",
        "rand_reingest",
        rb,
        "SHA-256 1c",
        "rand_sha256",
        TARGET_REINGEST_VS_SHA,
    )
    rows.append(Row("reads, every object once, freshly opened store", ""))
    vs(
        "  random, raw chunks, iter_object pieces",
        "rand_read_pieces",
        rb,
        "copy 1c",
        "rand_copy",
        None,
    )
    vs("  random, raw chunks, read() -> bytes", "rand_read_bytes", rb, "copy 1c", "rand_copy", None)
    vs(
        "  mix, cold cache, iter_object pieces",
        "mix_read_pieces",
        mb,
        "zstd-d 1c",
        "mix_zstd_d",
        TARGET_COMPRESSED_READ_VS_ZSTD_D,
    )
    vs("  mix, cold cache, iter_object pieces", "mix_read_pieces", mb, "copy 1c", "mix_copy", None)
    vs(
        "  mix, cold cache, read() -> bytes",
        "mix_read_bytes",
        mb,
        "zstd-d 1c",
        "mix_zstd_d",
        TARGET_COMPRESSED_READ_VS_ZSTD_D,
    )

    # Space.
    logical = med["mix_once_logical_bytes"]
    chunk_bytes = med["mix_once_chunk_bytes"]
    stored = med["mix_once_stored_bytes"]
    chunks = med["mix_once_chunks"]
    zbytes = med["mix_zstd_bytes"]
    headers = chunks * RECORD_HEADER.size
    growth = 100.0 * (med["mix_twice_stored_bytes"] - stored) / stored
    disk_growth = (
        100.0
        * (med["mix_twice_segment_file_bytes"] - med["mix_once_segment_file_bytes"])
        / med["mix_once_segment_file_bytes"]
    )
    dedup = logical / chunk_bytes
    raw_vs_zstd = zbytes / stored
    # What the store would hold without dedup, if the deduplicated chunks compress
    # like the rest: stored * logical / chunk_bytes.
    nodedup_vs_zstd = zbytes / (stored * logical / chunk_bytes)
    fig.update(
        mix_stored_over_logical=stored / logical,
        mix_dedup_ratio=dedup,
        mix_stored_growth_pct=growth,
        mix_segment_file_growth_pct=disk_growth,
        mix_whole_file_zstd_bytes=zbytes,
        mix_compression_vs_zstd_raw=raw_vs_zstd,
        mix_compression_vs_zstd_nodedup=nodedup_vs_zstd,
        mix_header_overhead_pct=100.0 * headers / stored,
    )
    rows.append(Row("space (mix)", ""))
    rows.append(
        Row(
            "  stored / logical after 1 ingest",
            f"{stored / logical:8.4f}",
            f"zstd/logical {zbytes / logical:.4f}",
        )
    )
    rows.append(Row("  dedup: logical / unique chunk bytes", f"{dedup:8.4f}"))
    rows.append(
        Row(
            "  record headers (56 B/chunk) in stored",
            f"{100 * headers / stored:7.2f} %",
            f"{int(chunks)} chunks",
        )
    )
    rows.append(
        Row(
            "  stored_bytes growth, 2nd ingest",
            f"{growth:7.3f} %",
            "",
            "",
            f"<= {TARGET_SPACE_GROWTH_PCT}%",
            judge(growth, TARGET_SPACE_GROWTH_PCT, False),
        )
    )
    rows.append(
        Row(
            "  segment file bytes growth, 2nd ingest",
            f"{disk_growth:7.3f} %",
            "",
            "",
            f"<= {TARGET_SPACE_GROWTH_PCT}%",
            judge(disk_growth, TARGET_SPACE_GROWTH_PCT, False),
        )
    )
    for label, value in (
        ("  compression vs whole-file zstd (raw)", raw_vs_zstd),
        ("  compression vs whole-file zstd (no dedup)", nodedup_vs_zstd),
    ):
        rows.append(
            Row(
                label,
                f"{value:8.4f}",
                f"zstd {zbytes / MiB:.1f} MiB",
                f"{value:5.2f}x",
                f">= {TARGET_COMPRESSION_VS_ZSTD}x",
                judge(value, TARGET_COMPRESSION_VS_ZSTD, True),
            )
        )

    # Memory.
    hwm = med["child_vmhwm_kib"] / 1024
    limit = TARGET_RSS_BASE_MIB + cache_size / MiB
    fig.update(child_peak_rss_mib=hwm, rss_limit_mib=limit)
    rows.append(Row("memory", ""))
    rows.append(
        Row(
            "  peak RSS (VmHWM), child ingesting mix",
            f"{hwm:7.1f} MiB",
            f"cache_size {cache_size / MiB:.0f} MiB",
            "",
            f"<= {TARGET_RSS_BASE_MIB}+{cache_size / MiB:.0f} MiB",
            judge(hwm, limit, False),
        )
    )
    rows.append(
        Row(
            f"  peak RSS, child + {PROCESSES} worker processes",
            f"{med['child_with_workers_peak_kib'] / 1024:7.1f} MiB",
            "(sum, sampled every 20 ms)",
        )
    )
    rows.append(
        Row(
            "  RSS of the child before ingest",
            f"{med['child_rss_before_ingest_kib'] / 1024:7.1f} MiB",
            "(interpreter + imports)",
        )
    )
    return rows, fig


def format_table(rows: list[Row]) -> str:
    header = Row("figure", "median", "baseline (MB/s)", "ratio", "target", "result")
    cols = list(
        zip(
            *[
                (r.figure, r.value, r.baseline, r.ratio, r.target, r.result)
                for r in [header, *rows]
            ],
            strict=True,
        )
    )
    widths = [max(len(c) for c in col) for col in cols]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = (row.figure, row.value, row.baseline, row.ratio, row.target, row.result)
        if i > 0 and not row.value:
            lines.append(row.figure)
            continue
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


NOTES = """\
Notes:
* Ratios compare the engine (all cores, through its public API, including open/close for
  ingests) with one core doing only the named operation on the same bytes in memory.
* "zstd-c/-d 1c": zstandard.ZstdCompressor(level=L).compress / ZstdDecompressor().decompress
  of each whole file.  "copy 1c": memcpy of each file into a preallocated, already touched
  buffer.  The allocating copy bytes(memoryview(data)) is shown for context only: for large
  files its speed depends on whether malloc hands out fresh (page-faulting) memory, which
  varies between runs by 5x or more, and read() of a large object pays the same.
* Reads open the store read-only first (not timed); the mix store is opened with
  StoreOptions(cache_size=0), so every compressed chunk is decompressed.  iter_object yields
  views on the segment mappings for raw chunks; read() joins them into one bytes object.
* Space: "stored" is stats().stored_bytes (record header + payload of every unique chunk);
  "unique chunk bytes" is stats().chunk_bytes (raw bytes of unique chunks).
  "compression vs whole-file zstd (raw)" = sum of whole-file zstd frames / stored_bytes: it
  credits the store with dedup between (and within) files, which whole-file zstd cannot do,
  and charges it the 56-byte record headers.  "(no dedup)" divides that advantage out:
  zstd bytes / (stored_bytes * logical / chunk_bytes), i.e. compression per stored byte
  only - the fair comparison of chunk-wise zstd against whole-file zstd.  > 1 is better.
* "stored_bytes growth" is the index counter; "segment file bytes growth" is what the
  segment files grew on disk (it also catches records appended but never indexed).
* Peak RSS is VmHWM of a separate process that opens a new store and put_files the mix."""


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    mine = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        mine += usage.ru_utime + usage.ru_stime
    return busy, mine


def default_base_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the cachefs engine against single-core baselines."
    )
    parser.add_argument("--mix-mib", type=int, default=300, help="build-artifact mix size")
    parser.add_argument("--random-mib", type=int, default=512, help="random data size")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="where to make the temporary directory (default: /dev/shm if it exists)",
    )
    parser.add_argument(
        "--level",
        type=int,
        default=CompressionParams().level,
        help="zstd level of the stores and the baseline (default: the store default)",
    )
    parser.add_argument(
        "--digest-function",
        choices=sorted(DIGEST_FUNCTIONS),
        default="sha256",
        help="digest function of the stores (the baselines stay single-core SHA-256)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=PROCESSES,
        help="worker processes of put_files (default: the CLI's, one per CPU, at most 4; "
        "0: threads only)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--child-ingest", nargs=2, metavar=("DIR", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.mix_mib < 1 or args.random_mib < 1:
        parser.error("--runs, --mix-mib and --random-mib must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global DIGEST_FUNCTION, PROCESSES  # settings of the whole run
    DIGEST_FUNCTION, PROCESSES = args.digest_function, args.processes
    if args.child_ingest:
        return child_main(Path(args.child_ingest[0]), Path(args.child_ingest[1]), args.level)

    started = time.perf_counter()
    cpu_start = _cpu_seconds()
    base = args.store_dir or default_base_dir()
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-", dir=base))
    cache_size = StoreOptions().cache_size
    try:
        log(f"working in {workdir} ({fs_type(workdir)})")
        rand = make_random(workdir / "data-random", args.random_mib)
        mix = make_mix(workdir / "data-mix", args.mix_mib)
        rand.load()
        mix.load()
        log(f"data ready: random {rand.total / MiB:.0f} MiB, mix {mix.total / MiB:.1f} MiB")
        runs = [run_once(i, rand, mix, args.level, workdir) for i in range(args.runs)]
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        rows, figures = build_report(med, rand, mix, cache_size, args.level)
        wall = time.perf_counter() - started
        cpu_end = _cpu_seconds()
        others = max(0.0, (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])) / wall

        print(
            f"cachefs engine benchmark: {args.runs} run(s), medians; "
            f"python {platform.python_version()}, zstandard {zstandard.__version__}, "
            f"{os.cpu_count()} CPUs ({cpu_model()})"
        )
        print(
            f"store: {args.digest_function}, zstd level {args.level}, "
            f"StoreOptions defaults (workers="
            f"{StoreOptions().workers}, cache_size={cache_size // MiB} MiB, fsync=True), "
            f"put_files with {PROCESSES} worker processes; "
            f"data and stores on {fs_type(workdir)} ({base})"
        )
        print(f"random: {len(rand.paths)} files, {rand.total:,} bytes")
        kinds = ", ".join(f"{n} .{k} ({b / MiB:.1f} MiB)" for k, (n, b) in mix.kinds.items())
        print(f"mix:    {len(mix.paths)} files, {mix.total:,} bytes: {kinds}")
        print()
        print(format_table(rows))
        print()
        print(NOTES)
        print()
        print(f"total wall time: {wall:.1f} s")
        print(
            f"CPU used by other processes during the run: {others:.2f} of {os.cpu_count()} "
            "cores on average"
            + (" - figures are disturbed, rerun on a quiet machine" if others > 0.2 else "")
        )

        if args.json:
            doc = {
                "config": {
                    "mix_mib": args.mix_mib,
                    "random_mib": args.random_mib,
                    "runs": args.runs,
                    "level": args.level,
                    "cache_size": cache_size,
                    "workers": StoreOptions().workers,
                    "store_dir": str(base),
                    "filesystem": fs_type(workdir),
                    "cpus": os.cpu_count(),
                    "cpu": cpu_model(),
                    "python": platform.python_version(),
                    "zstandard": zstandard.__version__,
                },
                "datasets": {
                    "random": {"files": len(rand.paths), "bytes": rand.total},
                    "mix": {
                        "files": len(mix.paths),
                        "bytes": mix.total,
                        "kinds": {k: {"files": n, "bytes": b} for k, (n, b) in mix.kinds.items()},
                    },
                },
                "figures": figures,
                "rows": [r.__dict__ for r in rows if r.value],
                "median_raw": med,
                "runs_raw": runs,
                "wall_seconds": wall,
                "other_processes_cores": others,
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            log(f"wrote {args.json}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
