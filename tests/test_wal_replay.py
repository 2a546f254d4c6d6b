"""Staged objects and the write-ahead log: replay after a crash, exactly once.

A child process stages an object and is killed (SIGKILL, deterministically, by
a patched engine function) at a chosen point of ``commit()``; the parent
reopens the store and checks what replay published.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import killpoints
import pytest
from conftest import SMALL_CONFIG

from cachefs import fsck
from cachefs.digest import Digest
from cachefs.errors import CorruptDataError
from cachefs.store import Store
from cachefs.wal import WAL_HEADER, WAL_RECORD


def staged_data(seed: int, size: int = 300_000) -> bytes:
    """Half random, half text: some chunks compress, some do not."""
    rng = random.Random(seed)
    text = rng.randbytes(size - size // 2).translate(bytes(b"xyz \n"[i % 5] for i in range(256)))
    return rng.randbytes(size // 2) + text


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).digest(), len(data))


CHILD_PRELUDE = (
    inspect.getsource(killpoints)
    + textwrap.dedent(
        """
        import os
        import random
        import signal
        import sys

        from cachefs.store import Store


        def write_staged(staged, data):
            # Out of order, in pieces, with a stretch of junk overwritten later.
            third = len(data) // 3
            staged.write(b"junk" * 1000, third)
            staged.write(data[2 * third :], 2 * third)
            staged.write(data[third : 2 * third], third)
            staged.sync()
            staged.write(data[:third], 0)

        """
    )
    + inspect.getsource(staged_data)
)


def run_child(store_path: Path, body: str, *args: object) -> str:
    """Run ``body`` after the prelude in a child; it must end killed by SIGKILL."""
    code = CHILD_PRELUDE + textwrap.dedent(body)
    with subprocess.Popen(
        [sys.executable, "-c", code, str(store_path), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr
    return stdout


def refcount(store: Store, digest: Digest) -> int:
    with store.index.read() as txn:
        entry = store.index.get_object(txn, digest.hash)
    return 0 if entry is None else entry.refcount


def wal_size(store_path: Path) -> int:
    return (store_path / "wal" / "wal.log").stat().st_size


def assert_clean(store: Store) -> None:
    report = fsck.check(store)
    assert report.problems == [], [str(p) for p in report.problems]


@pytest.fixture
def created(store_path: Path) -> Path:
    Store.open(store_path, create=True, config=SMALL_CONFIG).close()
    return store_path


# Where commit() dies, and whether replay then has to publish the object.
KILL_POINTS = {
    # WAL commit durable, nothing ingested yet.
    "before-ingest": ("Store, '_ingest'", True),
    # Some chunks appended to segments, nothing published.
    "mid-ingest": ("Store, '_store_chunk', 7", True),
    # Ingest done, publish not started.
    "before-publish": ("Store, '_publish'", True),
    # Published (and marked applied), WAL not yet checkpointed.
    "after-publish": ("Store, '_publish', 1, True", False),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_committed_staged_object_is_published_exactly_once(created: Path, point: str) -> None:
    patch, replays = KILL_POINTS[point]
    data = staged_data(1)
    digest = digest_of(data)
    run_child(
        created,
        f"""
        store = Store.open(sys.argv[1])
        staged = store.stage()
        write_staged(staged, staged_data(1))
        die_at({patch})
        staged.commit()
        """,
    )
    with Store.open(created) as store:
        assert store.replayed == ([digest] if replays else [])
        assert wal_size(created) == WAL_HEADER.size  # checkpointed after replay
        assert refcount(store, digest) == 1
        stats = store.stats()
        assert (stats.objects, stats.files, stats.logical_bytes) == (1, 1, len(data))
        assert store.read(digest) == data
        assert_clean(store)
    with Store.open(created) as store:
        assert store.replayed == []
        assert refcount(store, digest) == 1
        assert store.stats().files == 1
        assert store.read(digest) == data
        assert_clean(store)


def test_replay_adds_a_reference_to_an_object_already_stored(created: Path) -> None:
    data = staged_data(2)
    digest = digest_of(data)
    with Store.open(created) as store:
        assert store.put(data) == digest
    run_child(
        created,
        """
        store = Store.open(sys.argv[1])
        staged = store.stage()
        write_staged(staged, staged_data(2))
        die_at(Store, "_publish")
        staged.commit()
        """,
    )
    with Store.open(created) as store:
        assert store.replayed == [digest]
        assert refcount(store, digest) == 1 + 1
        stats = store.stats()
        assert (stats.objects, stats.files, stats.logical_bytes) == (1, 2, 2 * len(data))
        assert store.read(digest) == data
        assert_clean(store)


@pytest.mark.parametrize(
    "patch", ["Store, '_publish'", "Store, '_publish', 1, True"], ids=["before", "after"]
)
def test_crash_during_replay_still_publishes_once(created: Path, patch: str) -> None:
    """The writer opening the store dies while replaying (before or after the
    replayed object's publication); the next one publishes it exactly once."""
    data = staged_data(3)
    digest = digest_of(data)
    run_child(
        created,
        """
        store = Store.open(sys.argv[1])
        staged = store.stage()
        write_staged(staged, staged_data(3))
        die_at(Store, "_publish")
        staged.commit()
        """,
    )
    run_child(
        created,
        f"""
        die_at({patch})
        Store.open(sys.argv[1])
        """,
    )
    with Store.open(created) as store:
        assert store.replayed == ([digest] if patch == "Store, '_publish'" else [])
        assert refcount(store, digest) == 1
        assert store.stats().files == 1
        assert store.read(digest) == data
        assert wal_size(created) == WAL_HEADER.size
        assert_clean(store)
    with Store.open(created) as store:
        assert store.replayed == []
        assert refcount(store, digest) == 1


def test_staged_write_larger_than_one_wal_record_replays_whole(created: Path) -> None:
    data = random.Random(4).randbytes(20 << 20)  # the WAL splits writes at 16 MiB
    digest = digest_of(data)
    run_child(
        created,
        """
        store = Store.open(sys.argv[1])
        staged = store.stage()
        staged.write(random.Random(4).randbytes(20 << 20))
        die_at(Store, "_ingest")
        staged.commit()
        """,
    )
    with Store.open(created) as store:
        assert store.replayed == [digest]
        assert store.read(digest) == data
        assert refcount(store, digest) == 1
        assert_clean(store)


def test_uncommitted_staged_writes_are_discarded(
    created: Path, caplog: pytest.LogCaptureFixture
) -> None:
    committed = staged_data(5)
    uncommitted = staged_data(6)
    aborted = staged_data(7)
    run_child(
        created,
        """
        store = Store.open(sys.argv[1])
        open_one = store.stage()
        write_staged(open_one, staged_data(6))
        with store.stage() as aborted:
            aborted.write(staged_data(7))
            aborted.sync()
            aborted.abort()
        done = store.stage()
        write_staged(done, staged_data(5))
        done.commit()
        open_one.sync()
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert list((created / "tmp").iterdir())  # the open object's spool file is left
    with caplog.at_level(logging.WARNING, logger="cachefs"), Store.open(created) as store:
        assert store.replayed == []  # the committed one was published before the kill
        assert store.contains(digest_of(committed))
        assert refcount(store, digest_of(committed)) == 1
        assert not store.contains(digest_of(uncommitted))
        assert not store.contains(digest_of(aborted))
        assert store.stats().objects == 1
        assert list((created / "tmp").iterdir()) == []
        assert wal_size(created) == WAL_HEADER.size
        assert_clean(store)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("discarded 1 staged object" in m for m in warnings), warnings


def _stage_two(store_path: Path) -> None:
    """WAL: B begins and writes (never committed), then A commits; killed
    before A is published."""
    run_child(
        store_path,
        """
        store = Store.open(sys.argv[1])
        b = store.stage()
        b.write(staged_data(9))
        a = store.stage()
        write_staged(a, staged_data(8))
        die_at(Store, "_publish")
        a.commit()
        """,
    )


def _tear_append_garbage(wal: Path) -> int:
    with open(wal, "ab") as f:
        f.write(random.Random(0).randbytes(100))
    return 100


def _tear_cut_last_record(wal: Path) -> int:
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        f.truncate(size - 10)
    return 24 + 8 - 10  # the COMMIT record: 24-byte header, 8-byte handle


def _tear_flip_last_byte(wal: Path) -> int:
    raw = bytearray(wal.read_bytes())
    raw[-1] ^= 0xFF
    wal.write_bytes(bytes(raw))
    return 24 + 8


@pytest.mark.parametrize(
    ("tear", "a_replayed"),
    [(_tear_append_garbage, True), (_tear_cut_last_record, False), (_tear_flip_last_byte, False)],
    ids=["garbage-after-tail", "cut-commit-record", "damaged-commit-record"],
)
def test_torn_wal_tail_is_cut_and_the_store_opens(
    created: Path, caplog: pytest.LogCaptureFixture, tear: object, a_replayed: bool
) -> None:
    _stage_two(created)
    wal = created / "wal" / "wal.log"
    assert callable(tear)
    cut = tear(wal)
    a = digest_of(staged_data(8))
    with caplog.at_level(logging.WARNING, logger="cachefs"), Store.open(created) as store:
        assert store.wal is not None
        assert store.wal.truncated_bytes == cut
        assert store.replayed == ([a] if a_replayed else [])
        assert store.contains(a) == a_replayed
        assert not store.contains(digest_of(staged_data(9)))
        if a_replayed:
            assert store.read(a) == staged_data(8)
        assert store.stats().objects == int(a_replayed)
        assert wal_size(created) == WAL_HEADER.size
        assert_clean(store)
        # The store works on: a new staged object goes through the new log.
        staged = store.stage()
        staged.write(b"after the tear")
        assert staged.commit() == digest_of(b"after the tear")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"torn or damaged tail of {cut} bytes" in m for m in warnings), warnings
    assert any(f"discarded {1 if a_replayed else 2} staged" in m for m in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cachefs"), Store.open(created) as store:
        assert store.replayed == []
        assert store.contains(digest_of(b"after the tear"))
        assert store.stats().objects == int(a_replayed) + 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_damaged_record_in_the_middle_drops_everything_after_it(created: Path) -> None:
    _stage_two(created)
    wal = created / "wal" / "wal.log"
    raw = bytearray(wal.read_bytes())
    second = WAL_HEADER.size + WAL_RECORD.size  # B's BEGIN has no payload
    raw[second + WAL_RECORD.size + 3] ^= 0x01  # inside B's first WRITE
    wal.write_bytes(bytes(raw))
    with Store.open(created) as store:
        assert store.wal is not None
        assert store.wal.truncated_bytes == len(raw) - second
        assert store.replayed == []
        assert store.stats().objects == 0
        assert_clean(store)


def test_damaged_wal_header_is_refused(created: Path) -> None:
    wal = created / "wal" / "wal.log"
    raw = bytearray(wal.read_bytes())
    raw[3] ^= 0x01
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=r"write-ahead log header is damaged"):
        Store.open(created)
    assert wal.read_bytes() == bytes(raw)
