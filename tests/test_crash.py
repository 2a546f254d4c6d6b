"""Crash safety under real ``kill -9``: a child process writes, the parent kills it.

The child ingests objects in a loop (puts, ``put_files``, unrefs and gc
runs) and acknowledges each finished operation on stdout.  The
parent kills it with SIGKILL at a random moment, reopens the same store (which
runs recovery) and checks that every acknowledged object is there byte for
byte, that reference counts match what was acknowledged (give or take the one
operation in flight when the kill landed), that ``fsck`` is clean and that the
statistics agree.  The store is reused across kills so damage would accumulate.

The kill is of the process only (the page cache survives), so these tests check
the ordering of writes and transactions, not fsync itself.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from cachefs.engine import Store, check_store
from cachefs.format.digest import Digest
from cachefs.format.header import ChunkingParams, SegmentParams, StoreConfig
from cachefs.format.segment import list_segment_files

#: Small segments (many rotations, shards and compactions), chunks small enough
#: that most objects have several, large enough that checking after every kill
#: stays cheap.
CRASH_CONFIG = StoreConfig(
    chunking=ChunkingParams(min_size=2048, avg_size=8192, max_size=32768),
    segments=SegmentParams(max_size=1 << 20),
)


def kill(proc: subprocess.Popen[bytes], reader: threading.Thread) -> str:
    """SIGKILL the child, wait for it and for its stdout reader; its stderr."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=60)
    assert proc.stderr is not None
    return proc.stderr.read().decode()


def payload(seed: int, counter: int) -> bytes:
    """The bytes of object ``counter`` of a run seeded ``seed`` (pure function).

    A mix of sizes (empty and tiny, a few chunks, hundreds of KiB), of random
    and compressible bytes, exact duplicates of earlier objects and objects
    that share a prefix (hence chunks) with an earlier one.
    """
    rng = random.Random(seed * 1_000_003 + counter)
    kind = rng.random()
    if kind < 0.2:
        size = rng.randint(0, 200)
    elif kind < 0.6:
        size = rng.randint(2_000, 60_000)
    else:
        size = rng.randint(100_000, 400_000)
    if rng.random() < 0.5:
        data = rng.randbytes(size)
    else:
        # Text over a five-letter alphabet: zstd packs it to about a third.
        data = rng.randbytes(size).translate(bytes(b"abcd "[i % 5] for i in range(256)))
    share = rng.random()
    if counter > 0 and share < 0.1:
        return payload(seed, rng.randrange(max(0, counter - 30), counter))
    if counter > 0 and share < 0.25:
        earlier = payload(seed, rng.randrange(max(0, counter - 30), counter))
        return earlier[: len(earlier) // 2] + data
    return data


def sha256_digest(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).digest(), len(data))


# The child: argv = store, seed, first counter, scratch directory, file of live
# digests (one line per reference).  It prints "ready" once the store is open,
# then for every operation an intent line ("put? C...", "unref? D", "gc?") and,
# once the operation has returned, its acknowledgement ("put C DIGEST",
# "unref DIGEST", "gc").
CHILD_CODE = (
    textwrap.dedent(
        """
        import os
        import random
        import sys
        from pathlib import Path

        from cachefs.engine import Digest, Store, StoreOptions, collect_garbage
        """
    )
    + inspect.getsource(payload)
    + textwrap.dedent(
        """
        def ack(line):
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

        def main():
            path, seed, counter, scratch, live_file = sys.argv[1:]
            seed, counter, scratch = int(seed), int(counter), Path(scratch)
            rng = random.Random(seed * 7919 + counter)
            live = [Digest.parse(line) for line in Path(live_file).read_text().split()]
            store = Store.open(path, options=StoreOptions(workers=2))
            ack("ready")
            while True:
                # Unref more once the store is large, so that it stays small.
                weights = [60, 12, 15 if len(live) < 80 else 150, 10]
                op = rng.choices(["put", "files", "unref", "gc"], weights)[0]
                if op == "put":
                    ack(f"put? {counter}")
                    digest = store.put(payload(seed, counter), durable=True)
                    ack(f"put {counter} {digest}")
                    live.append(digest)
                    counter += 1
                elif op == "files":
                    counters = list(range(counter, counter + rng.randint(2, 4)))
                    paths = []
                    for c in counters:
                        p = scratch / f"{c}.bin"
                        p.write_bytes(payload(seed, c))
                        paths.append(p)
                    ack("put? " + " ".join(map(str, counters)))
                    for p, digest in store.put_files(paths, durable=True):
                        ack(f"put {p.stem} {digest}")
                        live.append(digest)
                    counter += len(counters)
                elif op == "unref":
                    if live:
                        digest = live.pop(rng.randrange(len(live)))
                        ack(f"unref? {digest}")
                        store.unref(digest)
                        ack(f"unref {digest}")
                else:
                    ack("gc?")
                    collect_garbage(store, threshold=0.9)
                    ack("gc")

        main()
        """
    )
)


@dataclass
class Model:
    """What the parent knows: acknowledged references, and what was in flight."""

    seed: int
    refs: Counter[Digest] = field(default_factory=Counter)
    counter_of: dict[Digest, int] = field(default_factory=dict)

    def live_lines(self) -> str:
        return "".join(f"{d}\n" * n for d, n in sorted(self.refs.items()) if n > 0)

    def apply(self, lines: list[str]) -> tuple[Counter[Digest], Digest | None, set[Digest]]:
        """Apply a run's acknowledgements; return what was in flight at the kill:
        digests a put may have added, a digest an unref may have dropped, and
        the digests of this run's acknowledged puts."""
        put_flight: Counter[Digest] = Counter()
        unref_flight: Digest | None = None
        acked: set[Digest] = set()
        for line in lines:
            word, *rest = line.split()
            if word == "put?":
                put_flight = Counter(sha256_digest(payload(self.seed, int(c))) for c in rest)
            elif word == "put":
                counter, text = int(rest[0]), rest[1]
                digest = Digest.parse(text)
                assert digest == sha256_digest(payload(self.seed, counter)), line
                self.refs[digest] += 1
                self.counter_of.setdefault(digest, counter)
                acked.add(digest)
                put_flight[digest] -= 1
                if put_flight[digest] <= 0:
                    del put_flight[digest]
            elif word == "unref?":
                unref_flight = Digest.parse(rest[0])
            elif word == "unref":
                digest = Digest.parse(rest[0])
                assert digest == unref_flight, line
                assert self.refs[digest] > 0, line
                self.refs[digest] -= 1
                unref_flight = None
            else:
                assert word in ("ready", "gc?", "gc"), line
        return put_flight, unref_flight, acked


def _collect_lines(stdout: IO[bytes], lines: list[str], first: threading.Event) -> None:
    """Read complete lines until EOF; set ``first`` at the first line (or at EOF)."""
    for raw in stdout:
        if not raw.endswith(b"\n"):
            break  # a line cut short by the kill: not acknowledged
        lines.append(raw.decode())
        first.set()
    first.set()


def run_child_until_killed(
    store_path: Path, model: Model, first_counter: int, scratch: Path, rng: random.Random
) -> list[str]:
    """Start the child, kill it at a random moment, return its complete lines."""
    live_file = scratch / "live.txt"
    live_file.write_text(model.live_lines())
    argv = [str(store_path), str(model.seed), str(first_counter), str(scratch), str(live_file)]
    lines: list[str] = []
    ready = threading.Event()
    with subprocess.Popen(
        [sys.executable, "-c", CHILD_CODE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            reader = threading.Thread(
                target=_collect_lines, args=(proc.stdout, lines, ready), daemon=True
            )
            reader.start()
            if rng.random() < 0.2:
                # Measured from the start: may land during start-up and recovery.
                time.sleep(rng.uniform(0.05, 0.3))
            else:
                ready.wait(timeout=60)
                time.sleep(rng.uniform(0.02, 0.4))
            stderr = kill(proc, reader)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr
    return lines


def object_refcounts(store: Store) -> dict[Digest, int]:
    with store.index.read() as txn:
        return {Digest(key, e.size): e.refcount for key, e in store.index.iter_objects(txn)}


def check_after_kill(store_path: Path, model: Model, lines: list[str]) -> None:
    put_flight, unref_flight, acked = model.apply(lines)
    with Store.open(store_path) as store:
        # Reference counts: exactly what was acknowledged, give or take the
        # one operation in flight when the kill landed.
        actual = object_refcounts(store)
        for digest in set(actual) | {d for d, n in model.refs.items() if n > 0}:
            expected = model.refs[digest]
            low = expected - (1 if digest == unref_flight else 0)
            high = expected + put_flight[digest]
            found = actual.get(digest, 0)
            assert low <= found <= high, (
                f"object {digest}: refcount {found}, acknowledged {expected}, "
                f"in flight +{put_flight[digest]} -{int(digest == unref_flight)}"
            )
            model.refs[digest] = found
        # Every live object reads back byte for byte.
        for digest, refs in model.refs.items():
            if refs == 0:
                continue
            assert store.contains(digest)
            data = store.read(digest)
            assert sha256_digest(data) == digest
            if digest in acked and digest in model.counter_of:
                assert data == payload(model.seed, model.counter_of[digest])

        # Nothing half-published: fsck is clean, recovery left no debris.
        report = check_store(store)
        assert report.problems == [], [str(p) for p in report.problems]
        assert report.notes == []
        with store.index.read() as txn:
            published = {segment_id for segment_id, _ in store.index.iter_segments(txn)}
            chunk_count = sum(1 for _ in store.index.iter_chunks(txn))
        assert {segment_id for segment_id, _ in list_segment_files(store.segments_root)} == (
            published
        )
        assert list(store.tmp_root.iterdir()) == []

        # The statistics agree with what is visible.
        stats = store.stats()
        live = {d: n for d, n in model.refs.items() if n > 0}
        assert stats.objects == len(live)
        assert stats.files == sum(live.values())
        assert stats.logical_bytes == sum(d.size * n for d, n in live.items())
        assert stats.chunks == chunk_count
        assert stats.segments == len(published)


def kill_loop(tmp_path: Path, seed: int, iterations: int) -> Model:
    store_path = tmp_path / "store"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    Store.open(store_path, create=True, config=CRASH_CONFIG).close()
    model = Model(seed)
    rng = random.Random(seed)
    for iteration in range(iterations):
        lines = run_child_until_killed(store_path, model, iteration * 10_000, scratch, rng)
        check_after_kill(store_path, model, lines)
    return model


def test_kill_9_loop(tmp_path: Path) -> None:
    model = kill_loop(tmp_path, seed=1, iterations=30)
    # The loop did real work: objects were acknowledged and survive.
    assert sum(model.refs.values()) > 0


@pytest.mark.slow
def test_kill_9_loop_long(tmp_path: Path) -> None:
    model = kill_loop(tmp_path, seed=2, iterations=60)
    assert sum(model.refs.values()) > 0


def large_payload(seed: int) -> bytes:
    """64 MiB: 40 MiB of random bytes, then 1 MiB of text 24 times (chunks repeat)."""
    rng = random.Random(seed)
    text = b" ".join(rng.choices([b"alpha", b"beta", b"gamma", b"delta"], k=300_000))[: 1 << 20]
    return rng.randbytes(40 << 20) + text * 24


LARGE_CHILD_CODE = (
    "import random, sys, time\nfrom cachefs.engine import Store\n"
    + inspect.getsource(large_payload)
    + textwrap.dedent(
        """
        data = large_payload(int(sys.argv[2]))
        store = Store.open(sys.argv[1])
        print("ready", flush=True)
        digest = store.put(data, durable=True)
        print(f"put {digest}", flush=True)
        time.sleep(600)
        """
    )
)


def test_kill_during_large_put(tmp_path: Path) -> None:
    """A 64 MiB object killed mid-put is wholly there or wholly absent."""
    store_path = tmp_path / "store"
    config = StoreConfig(segments=SegmentParams(max_size=8 << 20))
    Store.open(store_path, create=True, config=config).close()
    rng = random.Random(64)
    duration = 1.0
    present: set[Digest] = set()
    for iteration in range(8):
        seed = 1000 + iteration
        digest = sha256_digest(large_payload(seed))
        acked = threading.Event()
        lines: list[str] = []
        with subprocess.Popen(
            [sys.executable, "-c", LARGE_CHILD_CODE, str(store_path), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                assert proc.stdout is not None and proc.stderr is not None
                assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()
                started = time.monotonic()
                reader = threading.Thread(
                    target=_collect_lines, args=(proc.stdout, lines, acked), daemon=True
                )
                reader.start()
                if iteration == 0:
                    # Let the first put finish, to learn how long one takes here.
                    acked.wait(timeout=120)
                    duration = max(0.2, time.monotonic() - started)
                else:
                    time.sleep(rng.uniform(0.02, 0.98) * duration)
                stderr = kill(proc, reader)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == -signal.SIGKILL, stderr
        assert lines in ([], [f"put {digest}\n"])
        with Store.open(store_path) as store:
            if lines:
                assert store.contains(digest)
            if store.contains(digest):
                assert hashlib.sha256(store.read(digest)).digest() == digest.hash
                present.add(digest)
            for earlier in present:
                assert store.contains(earlier)
            report = check_store(store)
            assert report.problems == [], [str(p) for p in report.problems]
            stats = store.stats()
            assert stats.objects == stats.files == len(present)
            assert stats.logical_bytes == sum(d.size for d in present)
