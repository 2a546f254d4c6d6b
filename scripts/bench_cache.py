"""Trace-driven evaluation of the eviction policies of cache directories.

This is a benchmark, not a test: it asserts nothing.  It replays a trace of
file accesses through the policies of ``cachefs/policy.py`` (LRU, LFU with
dynamic aging, ARC), driven through the same public interface the mount uses,
and through two offline references that know the future:

* belady: evicts the file whose next request is farthest away (files never
  requested again first) -- Belady's MIN, optimal for the object hit ratio
  when all files have one size;
* belady-size: evicts the file with the largest (distance to its next
  request) x (size), files never requested again first, largest first.

Reported per budget: the byte hit ratio (bytes of requests served from the
cache / bytes requested) and the object hit ratio (requests served / requests)
of each policy, whether each is at least LRU's, and ARC's ratios to Belady's.
The trace's summary line also gives the ratios of an unbounded cache (only
first requests miss): no policy can do better.

The trace is JSON lines, as ``cachefs mount --trace FILE`` records them
(``cachefs/trace.py``); one object per line::

    {"t": 12.5, "op": "open", "path": "ccache/a/b.result", "size": 4096}

* ``open``: an existing file opened, a request of ``size`` bytes;
* ``miss``: the lookup of a missing name, a request; its size is that of the
  next ``write`` of the path (or of the file renamed onto it), and the
  request is left out when none follows;
* ``create``: a file created (size 0); ``write``: a file's content published,
  ``size`` its length; ``rename``: ``path`` moved to ``dest``; ``unlink``:
  ``path`` removed.

Other fields (``t``, ``cache``) are ignored; unknown ops are counted and
skipped.  Keys are paths, for resident files and ghosts alike.  The replay:
a request of a resident file is a hit (``hit``); an ``open`` of a file that
is not resident is a miss, and the file is fetched (``miss`` + ``admit``); a
``miss`` of a file that is not resident calls ``miss``, the file comes with
the ``create``/``write`` that follow.  ``create`` and ``write`` admit the file
or resize it (a write is not a request), ``unlink`` discards it, ``rename``
discards the file at ``dest`` and moves the one at ``path`` there (``discard``
+ ``admit``).  After every admission or growth, victims are evicted until the
cache is within its budget, never the file just admitted; a file larger than
the budget is not admitted.

Budgets default to 5%, 10%, 25% and 50% of the trace's distinct bytes (the
sum, over the paths requested, of the largest size requested).

Run from the repository root::

    .venv/bin/python scripts/bench_cache.py --zipf
    .venv/bin/python scripts/bench_cache.py --zipf --alpha 0.7 --one-time 0.3 --save z.jsonl
    .venv/bin/python scripts/bench_cache.py trace.jsonl --budgets 64M,256M,10%

Options: ``TRACE`` (a trace file) or ``--zipf`` (a synthetic trace: ``--files
N`` (20000) files with log-normal sizes (median 32 KiB, 1% over 1 MiB, the
largest about 15 MiB), ``--requests N`` (200000) requests with Zipf popularity of exponent
``--alpha A`` (0.9), a fraction ``--one-time F`` (0) of them to files used
only once (a scan); the first request of a file is a ``miss`` followed by its
``create`` and ``write``; ``--seed N`` (1); ``--save PATH`` writes it as
JSONL), ``--budgets LIST`` (comma-separated: ``10%``, ``0.1`` or a size like
``64M``; powers of 1024), ``--json PATH`` (also write the results as JSON).
The default zipf trace replays in about half a minute on one core.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Benchmark the checkout this script belongs to, whatever is installed.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from cachefs.fs import POLICIES, Policy, make_policy  # noqa: E402

MiB = 1 << 20
DEFAULT_BUDGETS = "5%,10%,25%,50%"
OFFLINE = ("belady", "belady-size")
#: A next use that never comes.
NEVER = 1 << 62

# Steps of a replay program; OPEN and MISS are the requests.
OPEN, MISS, CREATE, WRITE, RENAME, UNLINK = range(6)
_OPS = {"open", "miss", "create", "write", "rename", "unlink"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


# --- traces -------------------------------------------------------------------------------


@dataclass
class Trace:
    """A trace compiled for replay.

    ``steps`` are ``(kind, path, size, dest, after)``: ``after`` is the index
    of the next request of the file this step leaves at ``path`` (``dest``
    for a rename), or NEVER when it is removed or not requested again first.
    """

    name: str
    steps: list[tuple[int, str, int, str, int]]
    events: int = 0
    requests: int = 0
    files: int = 0
    distinct_bytes: int = 0
    skipped_misses: int = 0
    malformed: int = 0
    unknown: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "events": self.events,
            "requests": self.requests,
            "files": self.files,
            "distinct_bytes": self.distinct_bytes,
            "skipped_misses": self.skipped_misses,
            "malformed_lines": self.malformed,
            "unknown_ops": dict(self.unknown),
        }


def read_records(path: Path) -> Iterator[dict[str, Any] | None]:
    """The records of a JSONL trace; None for a line that is not an object."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                yield None
                continue
            yield record if isinstance(record, dict) else None


def compile_trace(name: str, records: Iterable[dict[str, Any] | None]) -> Trace:
    """Turn trace records into replay steps: sizes of misses resolved, next
    uses computed."""
    trace = Trace(name, [])
    raw: list[list[Any]] = []  # [kind, path, size, dest]; size -1: unresolved miss
    pending: dict[str, list[int]] = {}  # path -> its unresolved misses
    written: dict[str, int] = {}  # path -> size of the file there, when known

    def resolve(path: str, size: int) -> None:
        for index in pending.pop(path, ()):
            raw[index][2] = size

    for record in records:
        trace.events += 1
        if record is None:
            trace.malformed += 1
            continue
        op, path, size = record.get("op"), record.get("path"), record.get("size", 0)
        if op not in _OPS:
            trace.unknown[str(op)] += 1
            continue
        if not isinstance(path, str) or not isinstance(size, int) or size < 0:
            trace.malformed += 1
            continue
        if op == "open":
            raw.append([OPEN, path, size, ""])
        elif op == "miss":
            pending.setdefault(path, []).append(len(raw))
            raw.append([MISS, path, -1, ""])
        elif op == "create":
            raw.append([CREATE, path, 0, ""])
            written.pop(path, None)
        elif op == "write":
            raw.append([WRITE, path, size, ""])
            written[path] = size
            resolve(path, size)
        elif op == "rename":
            dest = record.get("dest")
            if not isinstance(dest, str):
                trace.malformed += 1
                continue
            raw.append([RENAME, path, 0, dest])
            moved = written.pop(path, None)
            if moved is None:
                written.pop(dest, None)
            else:
                written[dest] = moved
                resolve(dest, moved)
        else:
            raw.append([UNLINK, path, 0, ""])
            written.pop(path, None)

    kept = [step for step in raw if step[2] >= 0]
    trace.skipped_misses = len(raw) - len(kept)
    # Next uses, backwards: nxt[path] is the next request of the file now at path.
    after = [NEVER] * len(kept)
    nxt: dict[str, int] = {}
    largest: dict[str, int] = {}
    for i in range(len(kept) - 1, -1, -1):
        kind, path, size, dest = kept[i]
        if kind == RENAME:
            after[i] = nxt.get(dest, NEVER)
            nxt[path] = nxt[dest] = NEVER
            continue
        after[i] = nxt.get(path, NEVER)
        if kind <= MISS:
            nxt[path] = i
            trace.requests += 1
            largest[path] = max(size, largest.get(path, 0))
        elif kind == UNLINK:
            nxt[path] = NEVER
    trace.steps = [(k, p, s, d, a) for (k, p, s, d), a in zip(kept, after, strict=True)]
    trace.files = len(largest)
    trace.distinct_bytes = sum(largest.values())
    return trace


def zipf_records(
    files: int, requests: int, alpha: float, one_time: float, seed: int
) -> list[dict[str, Any]]:
    """A synthetic trace: Zipf popularity over ``files`` files of log-normal
    sizes, plus a fraction ``one_time`` of requests to files used once."""
    rng = random.Random(seed)
    sizes = [
        max(1, min(256 * MiB, int(rng.lognormvariate(math.log(32 << 10), 1.5))))
        for _ in range(files)
    ]
    order = list(range(files))  # popularity rank -> file
    rng.shuffle(order)
    weights = itertools.accumulate(1 / (rank + 1) ** alpha for rank in range(files))
    cumulative = list(weights)
    records: list[dict[str, Any]] = []
    seen: set[int] = set()
    scanned = 0
    for i in range(requests):
        t = round(i * 0.001, 3)
        if rng.random() < one_time:
            path = f"scan/{scanned:07d}.o"
            size = max(1, int(rng.lognormvariate(math.log(32 << 10), 1.5)))
            scanned += 1
        else:
            file = order[rng.choices(range(files), cum_weights=cumulative)[0]]
            path, size = f"obj/{file % 256:02x}/{file:06d}.o", sizes[file]
            if file in seen:
                records.append({"t": t, "op": "open", "path": path, "size": size})
                continue
            seen.add(file)
        records.append({"t": t, "op": "miss", "path": path, "size": 0})
        records.append({"t": t, "op": "create", "path": path, "size": 0})
        records.append({"t": t, "op": "write", "path": path, "size": size})
    return records


# --- caches under replay ------------------------------------------------------------------


class Cache(Protocol):
    def __contains__(self, key: str) -> bool: ...
    def size_of(self, key: str) -> int: ...
    def hit(self, key: str, size: int, after: int, now: int) -> None: ...
    def miss(self, key: str) -> None: ...
    def admit(self, key: str, size: int, after: int, now: int) -> None: ...
    def resize(self, key: str, size: int, after: int, now: int) -> None: ...
    def discard(self, key: str) -> None: ...
    def evict_to(self, budget: int, keep: str, now: int) -> int: ...


class OnlineCache:
    """A policy driven as a cache directory drives it."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.sizes: dict[str, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    def size_of(self, key: str) -> int:
        return self.sizes[key]

    def hit(self, key: str, size: int, after: int, now: int) -> None:
        if self.sizes[key] != size:
            self.resize(key, size, after, now)
        self.policy.hit(key)

    def miss(self, key: str) -> None:
        self.policy.miss(key)

    def admit(self, key: str, size: int, after: int, now: int) -> None:
        self.policy.admit(key, size, ghost=key)
        self.sizes[key] = size

    def resize(self, key: str, size: int, after: int, now: int) -> None:
        self.policy.resize(key, size)
        self.sizes[key] = size

    def discard(self, key: str) -> None:
        self.policy.discard(key)
        del self.sizes[key]

    def evict_to(self, budget: int, keep: str, now: int) -> int:
        policy = self.policy
        evicted = 0
        while policy.bytes > budget:
            victim = next((k for k in policy.victims() if k != keep), None)
            if victim is None:
                break
            policy.evict(victim, ghost=victim)
            del self.sizes[victim]
            evicted += 1
        return evicted


class OfflineCache:
    """Belady's MIN (``size_aware=False``) or its size-aware variant.

    A max-heap of (priority, tie, key, version) with lazy invalidation: a
    file's entry is stale once its version moved on.  The size-aware
    priority ``(next use - now) * size`` only falls as time passes, so a
    stored one is an upper bound: the top is re-evaluated and evicted only if
    it still beats the next entry's bound, else pushed back with its value.
    """

    def __init__(self, size_aware: bool) -> None:
        self.size_aware = size_aware
        self.sizes: dict[str, int] = {}
        self.next_use: dict[str, int] = {}
        self.version: dict[str, int] = {}
        self.heap: list[tuple[float, float, str, int]] = []
        self.bytes = 0
        self.clock = itertools.count()

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    def size_of(self, key: str) -> int:
        return self.sizes[key]

    def _priority(self, key: str, now: int) -> tuple[float, float]:
        """(priority, tie-break), both larger for a better victim."""
        after, size = self.next_use[key], self.sizes[key]
        if not self.size_aware:
            return float(after), 0.0
        if after >= NEVER:
            return math.inf, float(size)
        return float((after - now) * size), 0.0

    def _push(self, key: str, now: int) -> None:
        version = next(self.clock)
        self.version[key] = version
        priority, tie = self._priority(key, now)
        heapq.heappush(self.heap, (-priority, -tie, key, version))
        if len(self.heap) > 2 * len(self.sizes) + 1024:
            self.heap = [e for e in self.heap if self.version.get(e[2]) == e[3]]
            heapq.heapify(self.heap)

    def hit(self, key: str, size: int, after: int, now: int) -> None:
        self.resize(key, size, after, now)

    def miss(self, key: str) -> None:
        pass

    def admit(self, key: str, size: int, after: int, now: int) -> None:
        self.sizes[key] = size
        self.bytes += size
        self.next_use[key] = after
        self._push(key, now)

    def resize(self, key: str, size: int, after: int, now: int) -> None:
        self.bytes += size - self.sizes[key]
        self.sizes[key] = size
        self.next_use[key] = after
        self._push(key, now)

    def discard(self, key: str) -> None:
        self.bytes -= self.sizes.pop(key)
        del self.next_use[key], self.version[key]

    def evict_to(self, budget: int, keep: str, now: int) -> int:
        heap, version = self.heap, self.version
        evicted = 0
        kept: list[tuple[float, float, str, int]] = []
        while self.bytes > budget and heap:
            entry = heapq.heappop(heap)
            key = entry[2]
            if version.get(key) != entry[3]:
                continue
            if key == keep:
                kept.append(entry)
                continue
            if self.size_aware:
                priority, tie = self._priority(key, now)
                exact = (-priority, -tie, key, entry[3])
                if heap and exact > heap[0]:  # no longer the best: put it back
                    heapq.heappush(heap, exact)
                    continue
            self.discard(key)
            evicted += 1
        for entry in kept:
            heapq.heappush(heap, entry)
        return evicted


# --- replay -------------------------------------------------------------------------------


@dataclass
class Result:
    requests: int = 0
    hits: int = 0
    bytes_requested: int = 0
    bytes_hit: int = 0
    evictions: int = 0
    seconds: float = 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def object_hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "byte_hit_ratio": round(self.byte_hit_ratio, 6),
            "object_hit_ratio": round(self.object_hit_ratio, 6),
            "requests": self.requests,
            "hits": self.hits,
            "bytes_requested": self.bytes_requested,
            "bytes_hit": self.bytes_hit,
            "evictions": self.evictions,
            "seconds": round(self.seconds, 3),
        }


def replay(trace: Trace, cache: Cache, budget: int) -> Result:
    result = Result()
    start = time.perf_counter()
    for now, (kind, path, size, dest, after) in enumerate(trace.steps):
        if kind <= MISS:
            result.requests += 1
            result.bytes_requested += size
            if path in cache:
                result.hits += 1
                result.bytes_hit += size
                cache.hit(path, size, after, now)
            else:
                cache.miss(path)
                if kind == MISS:
                    continue  # the file comes with the create and write that follow
                cache.admit(path, size, after, now)  # an open: the file is fetched
        elif kind in (CREATE, WRITE):
            if path in cache:
                cache.resize(path, size, after, now)
            else:
                cache.admit(path, size, after, now)
        elif kind == RENAME:
            if dest in cache:
                cache.discard(dest)
            if path in cache:
                moved = cache.size_of(path)
                cache.discard(path)
                cache.admit(dest, moved, after, now)
            continue
        else:
            if path in cache:
                cache.discard(path)
            continue
        if size > budget:
            cache.discard(path)  # larger than the whole cache: not kept
        else:
            result.evictions += cache.evict_to(budget, path, now)
    result.seconds = time.perf_counter() - start
    return result


def make_cache(name: str, budget: int) -> Cache:
    if name in OFFLINE:
        return OfflineCache(size_aware=name == "belady-size")
    return OnlineCache(make_policy(name, budget))


# --- budgets, report ----------------------------------------------------------------------

_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_budget(text: str, distinct_bytes: int) -> tuple[str, int]:
    """``10%``, ``0.1`` (fractions of the distinct bytes) or ``64M`` -> (label, bytes).

    Raises:
        ValueError: not a budget.
    """
    text = text.strip()
    if text.endswith("%"):
        fraction = float(text[:-1]) / 100
    elif "." in text:
        fraction = float(text)
    else:
        match = _SIZE_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a budget: {text!r} (use 10%, 0.1 or 64M)")
        return text, int(match[1]) << _UNITS[match[2].upper()]
    if not fraction > 0:  # NaN too
        raise ValueError(f"a budget must be positive: {text!r}")
    return f"{fraction:.0%}", max(1, round(fraction * distinct_bytes))


def run(trace: Trace, budgets: list[tuple[str, int]]) -> dict[str, Any]:
    names = [*POLICIES, *OFFLINE]
    unbounded = replay(trace, make_cache("lru", NEVER), NEVER)
    results: list[dict[str, Any]] = []
    for label, budget in budgets:
        figures = {}
        for name in names:
            figures[name] = replay(trace, make_cache(name, budget), budget)
            log(f"{label:>8} {name:<12} {figures[name].seconds:6.2f} s")
        arc, belady = figures["arc"], figures["belady"]
        results.append(
            {
                "label": label,
                "budget": budget,
                "policies": {name: figures[name].as_dict() for name in names},
                "arc_vs_belady": {
                    "byte": ratio(arc.byte_hit_ratio, belady.byte_hit_ratio),
                    "object": ratio(arc.object_hit_ratio, belady.object_hit_ratio),
                },
            }
        )
    return {"trace": trace.summary(), "unbounded": unbounded.as_dict(), "budgets": results}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def at_least(value: float, reference: float) -> str:
    return "yes" if value >= reference - 1e-12 else "no"


def print_report(report: dict[str, Any]) -> None:
    summary, unbounded = report["trace"], report["unbounded"]
    print(
        f"trace {summary['name']}: {summary['events']} events, {summary['requests']} requests"
        f" of {summary['files']} files, {human(summary['distinct_bytes'])} distinct"
    )
    if summary["skipped_misses"] or summary["malformed_lines"] or summary["unknown_ops"]:
        unknown = ", ".join(f"{op} x{n}" for op, n in summary["unknown_ops"].items()) or "none"
        print(
            f"  skipped: {summary['skipped_misses']} misses without a size,"
            f" {summary['malformed_lines']} malformed lines, unknown ops: {unknown}"
        )
    print(
        f"unbounded cache: byte hit {unbounded['byte_hit_ratio']:.1%},"
        f" object hit {unbounded['object_hit_ratio']:.1%} (only first requests miss)"
    )
    print()
    header = (
        f"{'budget':<18} {'policy':<12} {'byte hit':>9} {'object hit':>11}"
        f"  {'>= LRU (byte, object)':<22} {'evictions':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in report["budgets"]:
        label = f"{row['label']} ({human(row['budget'])})"
        lru = row["policies"]["lru"]
        for name, figures in row["policies"].items():
            versus = (
                ""
                if name == "lru"
                else f"{at_least(figures['byte_hit_ratio'], lru['byte_hit_ratio'])}, "
                f"{at_least(figures['object_hit_ratio'], lru['object_hit_ratio'])}"
            )
            print(
                f"{label:<18} {name:<12} {figures['byte_hit_ratio']:>9.1%}"
                f" {figures['object_hit_ratio']:>11.1%}  {versus:<22} {figures['evictions']:>9}"
            )
            label = ""
        byte, obj = (fmt_ratio(row["arc_vs_belady"][k]) for k in ("byte", "object"))
        print(f"{'':<18} {'ARC/Belady':<12} {byte:>9} {obj:>11}")
        print()


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Replay a file-access trace through the eviction policies.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("trace", nargs="?", type=Path, help="a JSONL trace (see the docstring)")
    parser.add_argument("--zipf", action="store_true", help="replay a synthetic Zipf trace")
    parser.add_argument("--files", type=int, default=20_000, help="zipf: files")
    parser.add_argument("--requests", type=int, default=200_000, help="zipf: requests")
    parser.add_argument("--alpha", type=float, default=0.9, help="zipf: exponent")
    parser.add_argument(
        "--one-time", type=float, default=0.0, help="zipf: fraction of requests to one-time files"
    )
    parser.add_argument("--seed", type=int, default=1, help="zipf: random seed")
    parser.add_argument("--save", type=Path, help="zipf: also write the trace here (JSONL)")
    parser.add_argument(
        "--budgets", default=DEFAULT_BUDGETS, help="comma-separated: 10%%, 0.1 or 64M"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if (args.trace is None) == (not args.zipf):
        parser.error("give either a TRACE file or --zipf")
    if args.save and not args.zipf:
        parser.error("--save goes with --zipf")
    if args.zipf and not (args.files > 0 and args.requests > 0 and 0 <= args.one_time <= 1):
        parser.error("--files and --requests must be positive, --one-time within [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zipf:
        name = (
            f"zipf(files={args.files}, requests={args.requests}, alpha={args.alpha},"
            f" one-time={args.one_time}, seed={args.seed})"
        )
        records = zipf_records(args.files, args.requests, args.alpha, args.one_time, args.seed)
        if args.save:
            with open(args.save, "w", encoding="utf-8") as out:
                out.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
            log(f"trace written to {args.save}")
        trace = compile_trace(name, records)
    else:
        try:
            trace = compile_trace(str(args.trace), read_records(args.trace))
        except OSError as exc:
            print(f"bench_cache: cannot read the trace: {exc}", file=sys.stderr)
            return 1
    if not trace.requests:
        print("bench_cache: the trace has no requests", file=sys.stderr)
        return 1
    try:
        budgets = [parse_budget(b, trace.distinct_bytes) for b in args.budgets.split(",") if b]
    except ValueError as exc:
        print(f"bench_cache: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = run(trace, budgets)
    report["seconds"] = round(time.perf_counter() - start, 2)
    print_report(report)
    log(f"replayed in {report['seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
