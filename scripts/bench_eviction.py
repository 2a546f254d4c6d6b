"""Benchmark of cache directories on a real mount: eviction cost and memory.

This is a benchmark, not a test: it asserts nothing about time.  Two parts:

* **eviction cost** -- a cache directory of ``--budget`` MiB is filled, then
  ``--files`` files of ``--file-kib`` KiB are written into it (several times
  the budget), each one open + write + close.  Reported: the daemon's own
  figures of how long writes were held back waiting for eviction
  (``throttle_waits`` in ``/.cachefs/stats.json``: p50, p99 and max over the
  writes that waited, and p99 over all writes that were checked), and the
  client's time per file in the cache next to the same files written to a
  directory of the same mount that is not a cache (the baseline, measured in
  the same run).  Goal: p99 of the blocked time < 10 ms.
* **memory** -- ``--long-gib`` GiB of incompressible data go through a cache
  directory (budget ``--long-budget`` MiB) of a mount started with
  ``--memory-limit`` and a store quota, each file read back after it is
  written; the daemon's resident set is sampled every 0.2 s.  Reported: peak
  RSS (VmHWM) against the limit.

Everything runs in a temporary directory under ``--dir`` (default /dev/shm).
Run from the repository root::

    .venv/bin/python scripts/bench_eviction.py
    .venv/bin/python scripts/bench_eviction.py --runs 1 --long-gib 2

Options: ``--runs N`` (3; medians), ``--budget MIB`` (256), ``--files N``
(2000), ``--file-kib N`` (1024), ``--writers N`` (1: threads writing at
once), ``--long-gib N`` (20), ``--long-budget MIB``
(2048), ``--memory-limit MIB`` (256), ``--dir DIR``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cachefs.fs import resident_bytes

CACHEFS = [sys.executable, "-m", "cachefs"]
XATTR = "user.cachefs.cache"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def mounted(base: Path, *args: str) -> Iterator[Path]:
    store, mnt = base / "store", base / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run([*CACHEFS, "mount", str(store), str(mnt), *args], check=True)
    try:
        yield mnt
    finally:
        subprocess.run([*CACHEFS, "umount", str(mnt)], check=True)


def stats(mnt: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((mnt / ".cachefs" / "stats.json").read_bytes())
    return doc


def write_file(path: Path, data: bytes) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return time.perf_counter() - start


def write_files(
    directory: Path, blocks: list[bytes], count: int, salt: int, writers: int
) -> list[float]:
    """Write ``count`` distinct files from ``writers`` threads; seconds per file."""
    times: list[float] = []
    errors: list[BaseException] = []

    def work(start: int) -> None:
        try:
            for i in range(start, count, writers):
                data = blocks[i % len(blocks)][:-8] + (i + salt).to_bytes(8, "little")
                times.append(write_file(directory / f"f{i}", data))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return times


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def eviction_run(base: Path, args: argparse.Namespace) -> dict[str, float]:
    size = args.file_kib * 1024
    budget = args.budget << 20
    blocks = [os.urandom(size) for _ in range(64)]
    with mounted(base) as mnt:
        cache, plain = mnt / "cache", mnt / "plain"
        cache.mkdir()
        plain.mkdir()
        os.setxattr(cache, XATTR, f"max_size={budget} policy=lru".encode())
        for i in range(budget // size):  # fill to the budget
            write_file(cache / f"fill{i}", blocks[i % 64][:-8] + i.to_bytes(8, "little"))
        before = stats(mnt)["throttle_waits"]
        in_cache = write_files(cache, blocks, args.files, 10**6, args.writers)
        after = stats(mnt)
        waits = after["throttle_waits"]
        figures = after["caches"][0]
        baseline = write_files(plain, blocks, args.files, 2 * 10**6, args.writers)
    assert figures["bytes"] <= budget, figures
    return {
        "blocked_writes": waits["blocked"] - before["blocked"],
        "checked_writes": waits["checked"] - before["checked"],
        "blocked_p50_ms": waits["p50_ms"],
        "blocked_p99_ms": waits["p99_ms"],
        "blocked_max_ms": waits["max_ms"],
        "blocked_p99_all_ms": waits["p99_all_ms"],
        "file_p50_ms": percentile(in_cache, 0.5) * 1000,
        "file_p99_ms": percentile(in_cache, 0.99) * 1000,
        "baseline_p50_ms": percentile(baseline, 0.5) * 1000,
        "baseline_p99_ms": percentile(baseline, 0.99) * 1000,
        "evictions": figures["evictions"],
        "cache_bytes_over_budget": figures["bytes"] / budget,
    }


def memory_run(base: Path, args: argparse.Namespace) -> dict[str, float]:
    limit = args.memory_limit << 20
    budget = args.long_budget << 20
    file_size = 64 << 20
    files = (args.long_gib << 30) // file_size
    quota = budget + (budget // 2)
    with mounted(
        base, "--memory-limit", f"{args.memory_limit}M", "--max-store-size", str(quota)
    ) as mnt:
        pid = stats(mnt)["pid"]
        cache = mnt / "cache"
        cache.mkdir()
        os.setxattr(cache, XATTR, f"max_size={budget} policy=arc".encode())
        samples: list[int] = []
        parts = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(resident_bytes(pid, "VmRSS"))
                for part, peak in list(parts.items()):
                    parts[part] = max(peak, resident_bytes(pid, part))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        moved = 0
        try:
            for i in range(files):
                data = os.urandom(file_size)  # nothing dedups: the store grows
                path = cache / f"f{i % 512}"
                write_file(path, data)
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        moved += len(chunk)
                moved += file_size
                if i % 16 == 0:
                    log(f"  memory: {moved / 2**30:.1f} GiB through, RSS {samples[-1] >> 20} MiB")
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - start
        peak = resident_bytes(pid, "VmHWM")
        final = stats(mnt)
    return {
        "gib_through": moved / 2**30,
        "seconds": seconds,
        "peak_rss_mib": peak / 2**20,
        "median_rss_mib": statistics.median(samples) / 2**20,
        "limit_mib": args.memory_limit,
        "peak_over_limit": peak / limit,
        "peak_anon_mib": parts["RssAnon"] / 2**20,
        "peak_file_mib": parts["RssFile"] / 2**20,
        "peak_shmem_mib": parts["RssShmem"] / 2**20,
        "shrinks": final["memory_shrinks"],
        "stored_over_quota": final["stored_bytes"] / quota,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kib", type=int, default=1024)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--long-gib", type=int, default=20)
    parser.add_argument("--long-budget", type=int, default=2048)
    parser.add_argument("--memory-limit", type=int, default=256)
    parser.add_argument("--only", choices=("eviction", "memory"))
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-eviction-") as tmp:
        base = Path(tmp)
        if args.only in (None, "eviction"):
            runs = []
            for run in range(args.runs):
                log(f"eviction cost, run {run + 1}/{args.runs}")
                runs.append(eviction_run(base / f"e{run}", args))
            results["eviction"] = median_of(runs)
        if args.only in (None, "memory"):
            runs = []
            for run in range(args.runs):
                log(f"memory, run {run + 1}/{args.runs}")
                runs.append(memory_run(base / f"m{run}", args))
            results["memory"] = median_of(runs)
    if "eviction" in results:
        e = results["eviction"]
        print(
            f"\nEviction cost (medians of {args.runs} runs; {args.files} files of "
            f"{args.file_kib} KiB through a {args.budget} MiB cache, {args.writers} writers)"
        )
        print("| figure | value |")
        print("|---|---:|")
        print(
            f"| writes held back / writes checked | {e['blocked_writes']:.0f} / "
            f"{e['checked_writes']:.0f} |"
        )
        print(
            f"| blocked time of held-back writes p50 / p99 / max | {e['blocked_p50_ms']:.2f} / "
            f"{e['blocked_p99_ms']:.2f} / {e['blocked_max_ms']:.2f} ms |"
        )
        print(f"| blocked time p99 over all writes | {e['blocked_p99_all_ms']:.2f} ms |")
        print(
            f"| time per file in the cache p50 / p99 | {e['file_p50_ms']:.2f} / "
            f"{e['file_p99_ms']:.2f} ms |"
        )
        print(
            f"| same, outside any cache (baseline) p50 / p99 | {e['baseline_p50_ms']:.2f} / "
            f"{e['baseline_p99_ms']:.2f} ms |"
        )
        print(
            f"| ratio p50 / p99 (cache / baseline) | "
            f"{e['file_p50_ms'] / e['baseline_p50_ms']:.2f}x / "
            f"{e['file_p99_ms'] / e['baseline_p99_ms']:.2f}x |"
        )
    if "memory" in results:
        m = results["memory"]
        print(f"\nMemory ({m['gib_through']:.1f} GiB through the mount in {m['seconds']:.0f} s)")
        print("| figure | value |")
        print("|---|---:|")
        print(
            f"| peak RSS / --memory-limit | {m['peak_rss_mib']:.0f} / {m['limit_mib']:.0f} MiB"
            f" ({m['peak_over_limit']:.2f}x) |"
        )
        print(f"| median RSS | {m['median_rss_mib']:.0f} MiB |")
        print(
            f"| peaks of its parts: anonymous / file / shmem | {m['peak_anon_mib']:.0f} / "
            f"{m['peak_file_mib']:.0f} / {m['peak_shmem_mib']:.0f} MiB |"
        )
        print(f"| cache drops (memory governor) | {m['shrinks']:.0f} |")
        print(f"| stored bytes / quota at the end | {m['stored_over_quota']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
