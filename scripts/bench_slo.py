"""Measure what the README's SLOs promise, with the metrics that watch them.

This is a benchmark, not a test: it asserts nothing about time.  Each figure is
the median of ``--runs`` runs, each on a fresh store in a temporary directory
(``--dir``, default /tmp):

* **FUSE reads answered by the daemon**: a 256 MiB file and 2,000 files of
  16 KiB are written through a mount with ``--metrics``, the mount is remounted
  and the page cache dropped, and everything is read twice (the first pass is
  cold: every read reaches the daemon; the second mostly hits the kernel's page
  cache and reaches the daemon only where it missed).  p50/p99 of
  ``cachefs_fuse_request_duration_seconds{operation="read"}`` over both passes,
  from the histogram as Prometheus's ``histogram_quantile`` computes it.
* **GetActionResult at a stated load**: ``cachefs serve --metrics`` holding
  1,000 action results; ``--clients`` threads ask for them at ``--rate``
  requests a second in all for ``--seconds`` (half hits, half misses): p50/p99
  as the clients see them and as the server's histogram says.
* **A restart of the mount's daemon**: files written and fsynced, the daemon
  killed with SIGKILL (what ``Restart=on-failure`` recovers from), the dead
  mount detached, and ``cachefs mount`` run again: the seconds until the mount
  answers (journal replay included), and whether every fsynced byte is there.

Run from the repository root, as root (FUSE, drop_caches)::

    .venv/bin/python scripts/bench_slo.py [--runs 3] [--rate 500] [--clients 8]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachefs.engine import SHA256
from cachefs.metrics import parse_samples
from cachefs.protocol import re_pb2
from tests.reapi import Client, start_serve, stop_serve

CACHEFS = [sys.executable, "-m", "cachefs"]
MIB = 1 << 20


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(*args: str) -> None:
    subprocess.run([*CACHEFS, *args], check=True, capture_output=True)


def stats(mnt: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((mnt / ".cachefs" / "stats.json").read_bytes())
    return doc


def histogram(address: str, name: str, **labels: str) -> dict[float, float]:
    """``{le: cumulative count}`` of a histogram's series matching ``labels``, summed."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        series = parse_samples(response.read().decode()).get(f"{name}_bucket", {})
    buckets: dict[float, float] = {}
    for have, count in series.items():
        found = dict(have)
        if all(found.get(k) == v for k, v in labels.items()):
            le = float(found["le"])
            buckets[le] = buckets.get(le, 0.0) + count
    return buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus's ``histogram_quantile`` over the increase from ``before`` to ``after``."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return bounds[-2]


@contextmanager
def mount(store: Path, mnt: Path, *args: str) -> Iterator[str]:
    """A mount with --metrics: yields its metrics address."""
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", str(store), str(mnt), "--metrics", "127.0.0.1:0", *args)
    try:
        yield str(stats(mnt)["metrics"])
    finally:
        run("umount", str(mnt))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fuse_reads(work: Path) -> dict[str, float]:
    store, mnt = work / "store", work / "mnt"
    big = os.urandom(256 * MIB)
    small = [os.urandom(16 << 10) for _ in range(2000)]
    with mount(store, mnt):
        (mnt / "big").write_bytes(big)
        (mnt / "small").mkdir()
        for n, data in enumerate(small):
            (mnt / "small" / f"{n}").write_bytes(data)
    drop_caches()
    with mount(store, mnt) as address:
        before = histogram(address, "cachefs_fuse_request_duration_seconds", operation="read")
        for _ in range(2):
            assert (mnt / "big").read_bytes() == big
            for n, data in enumerate(small):
                assert (mnt / "small" / f"{n}").read_bytes() == data
        after = histogram(address, "cachefs_fuse_request_duration_seconds", operation="read")
    shutil.rmtree(store)
    requests = after[float("inf")] - before.get(float("inf"), 0.0)
    return {
        "fuse read requests": requests,
        "fuse read p50 ms": quantile(0.50, before, after) * 1000,
        "fuse read p99 ms": quantile(0.99, before, after) * 1000,
    }


def action_lookups(work: Path, args: argparse.Namespace) -> dict[str, float]:
    server = start_serve(work / "served", "--metrics", "127.0.0.1:0", http_on=False)
    try:
        address = str(json.loads(
            subprocess.run(
                [*CACHEFS, "stats", "--json", str(work / "served")],
                check=True, capture_output=True, text=True,
            ).stdout
        )["metrics"])  # fmt: skip
        keys = []
        with Client(server.grpc, SHA256) as client:
            for n in range(1000):
                output = f"output {n}".encode()
                client.update_blobs([output])
                key = client.digest(f"action {n}".encode())
                result = re_pb2.ActionResult(
                    output_files=[re_pb2.OutputFile(path="out", digest=client.digest(output))]
                )
                client.ac.UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
                )
                keys.append(key)
                keys.append(client.digest(f"absent {n}".encode()))  # a miss
        name = "cachefs_server_request_duration_seconds"
        before = histogram(address, name, method="GetActionResult")
        latencies: list[float] = []
        lock = threading.Lock()
        interval = args.clients / args.rate
        deadline = time.monotonic() + args.seconds

        def client_loop(first: int) -> None:
            mine: list[float] = []
            with Client(server.grpc, SHA256) as client:
                n, due = first, time.monotonic()
                while due < deadline:
                    time.sleep(max(0.0, due - time.monotonic()))
                    start = time.perf_counter()
                    try:
                        client.ac.GetActionResult(
                            re_pb2.GetActionResultRequest(action_digest=keys[n % len(keys)]),
                            timeout=30,
                        )
                    except Exception as exc:  # NOT_FOUND: a miss, half of them
                        if "NOT_FOUND" not in str(exc):
                            raise
                    mine.append(time.perf_counter() - start)
                    n += args.clients
                    due += interval
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        after = histogram(address, name, method="GetActionResult")
    finally:
        stop_serve(server)
    latencies.sort()
    return {
        "GetActionResult rate /s": len(latencies) / elapsed,
        "GetActionResult client p50 ms": latencies[len(latencies) // 2] * 1000,
        "GetActionResult client p99 ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "GetActionResult server p99 ms": quantile(0.99, before, after) * 1000,
    }


def restart(work: Path) -> dict[str, float]:
    store, mnt = work / "store", work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", str(store), str(mnt))
    pid = int(str(stats(mnt)["pid"]))
    digests = {}
    for n in range(500):
        data = os.urandom(64 << 10)
        with open(mnt / f"f{n}", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        digests[f"f{n}"] = hashlib.sha256(data).hexdigest()
    with open(mnt / "unsynced", "wb") as f:  # in the journal, not published
        f.write(os.urandom(64 * MIB))
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.01)
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)
    start = time.monotonic()
    run("mount", str(store), str(mnt))
    seconds = time.monotonic() - start
    lost = sum(
        hashlib.sha256((mnt / name).read_bytes()).hexdigest() != digest
        for name, digest in digests.items()
    )
    run("umount", str(mnt))
    shutil.rmtree(store)
    return {"restart to mounted s": seconds, "fsynced files lost": float(lost)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="GetActionResult/s in all")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--seconds", type=float, default=20.0, help="of GetActionResult load")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    figures: dict[str, list[float]] = {}
    for n in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="cachefs-slo-", dir=args.dir))
        try:
            measures: list[tuple[str, Callable[[], dict[str, float]]]] = [
                ("FUSE reads", functools.partial(fuse_reads, work)),
                ("GetActionResult load", functools.partial(action_lookups, work, args)),
                ("restart", functools.partial(restart, work)),
            ]
            for what, measure in measures:
                log(f"run {n}: {what}")
                for key, value in measure().items():
                    figures.setdefault(key, []).append(value)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"cachefs SLO figures: medians of {args.runs} runs; {os.cpu_count()} CPUs")
    print(f"GetActionResult load: {args.clients} clients, {args.rate:.0f}/s asked, half misses")
    print("| figure | median | runs |\n|---|---:|---|")
    for key, values in figures.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {key} | {statistics.median(values):.2f} | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
