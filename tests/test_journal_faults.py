"""Writes that returned survive the death of the daemon through the moments a
review found them lost or wrong (``cachefs/fs/_journal.py``, ``_publish.py``):
a publication committed whose index sync failed, a carry-over of the journal
that failed half way, a truncation to nothing killed in its middle, a spool
that lost its tail.  A child process drives a running filesystem, arms fault
or kill points and is killed (SIGKILL); the parent replays the journal."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio

from cachefs import faults
from cachefs.engine import ROOT_INODE, CachefsError, Store
from cachefs.fs import Filesystem, _lookups
from tests.conftest import SMALL_CONFIG
from tests.test_spooled_journal import replayed

ROOT = Path(__file__).resolve().parents[1]
DATA = random.Random(4).randbytes(1 << 20)
PIECE = 64 * 1024


PRELUDE = textwrap.dedent(
    """
    import os, random, signal, stat, sys
    import trio
    from cachefs import faults
    from cachefs.engine import ROOT_INODE, Store, CachefsError
    from cachefs.fs import Filesystem, _journal, _streams
    from tests.killpoints import die_at

    _streams.STREAM_MIN = 256 * 1024
    PIECE = 64 * 1024
    DATA = random.Random(4).randbytes(1 << 20)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    async def main(path):
        store = Store.open(path)
        fs = Filesystem(store, **FS_KW)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)

            async def create(name):
                inode = fs.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
                fh, _ = await fs.open(inode.ino, os.O_RDWR)
                return inode.ino, fh

            async def stream(fh, data, start=0):
                for at in range(0, len(data), PIECE):
                    await fs.write(fh, start + at, data[at : at + PIECE])
                    await trio.sleep(0)

    """
)

EPILOGUE = textwrap.dedent(
    """
            kill()

    trio.run(main, sys.argv[1])
    """
)


def run_child(store_path: Path, body: str, fs_kw: str = "{}") -> subprocess.CompletedProcess[str]:
    Store.open(store_path, create=True, config=SMALL_CONFIG).close()
    src = (
        PRELUDE.replace("FS_KW", fs_kw) + textwrap.indent(textwrap.dedent(body), " " * 8) + EPILOGUE
    )
    result = subprocess.run(
        [sys.executable, "-c", src, str(store_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    return result


def test_a_write_after_a_publication_whose_index_sync_failed_survives(store_path: Path) -> None:
    """A publication committed whose index fdatasync failed (EIO): fsync
    fails; a later write returns; kill -9: the write is replayed over the
    content that was committed (which the journal's next base names)."""
    run_child(
        store_path,
        """
        ino, fh = await create(b"f")
        await fs.write(fh, 0, DATA[:PIECE])
        faults.arm("index.sync", "eio")
        try:
            await fs.fsync(fh)
        except CachefsError as exc:
            print("fsync failed:", exc)
        else:
            raise SystemExit("fsync did not fail")
        faults.disarm()
        n = await fs.write(fh, PIECE, b"X" * 100)
        assert n == 100
    """,
    )
    got = replayed(store_path)[b"f"]
    assert got == DATA[:PIECE] + b"X" * 100, (len(got), got == DATA[:PIECE])


def test_a_streamed_file_killed_while_emptied_is_as_before_or_empty(store_path: Path) -> None:
    """A streamed file truncated to 0, the daemon killed in the middle (the
    index dropped the content; the empty base is not logged yet, the spool
    not cut yet): replayed whole or empty, never its first bytes and zeros."""
    run_child(
        store_path,
        """
        ino, fh = await create(b"f")
        await stream(fh, DATA)
        assert fs.files.get(ino).spool_id is not None
        die_at(_journal.FileJournal, "emptied")
        await fs.truncate(ino, 0)
    """,
    )
    got = replayed(store_path)[b"f"]
    assert got in (DATA, b""), len(got)


def test_a_spool_that_lost_its_tail_ends_the_file_where_its_bytes_do(store_path: Path) -> None:
    """The spool lost its tail (a crash of the machine before it reached the
    disk, the journal synced by another file's fsync): the file ends where
    the spool's bytes do, with no zeros up to the records' offsets."""
    run_child(
        store_path,
        """
        ino, fh = await create(b"f")
        await stream(fh, DATA)
    """,
    )
    (spool,) = (store_path / "journal" / "spools").iterdir()
    with open(spool, "r+b") as f:
        f.truncate(400 * 1024)
    got = replayed(store_path)[b"f"]
    assert got == DATA[: 400 * 1024], len(got)


def test_a_write_after_a_streamed_publication_whose_index_sync_failed_survives(
    store_path: Path,
) -> None:
    run_child(
        store_path,
        """
        ino, fh = await create(b"f")
        await stream(fh, DATA)
        assert fs.files.get(ino).stream is not None
        faults.arm("index.sync", "eio")
        try:
            await fs.fsync(fh)
        except CachefsError as exc:
            print("fsync failed:", exc)
        else:
            raise SystemExit("fsync did not fail")
        faults.disarm()
        assert await fs.write(fh, len(DATA), b"X" * 100) == 100
    """,
    )
    got = replayed(store_path)[b"f"]
    assert got == DATA + b"X" * 100, (len(got), got == DATA)


def test_a_streamed_file_written_every_other_way_after_is_replayed(store_path: Path) -> None:
    """Two handles, an overwrite inside what streamed, an append, a truncation,
    a write past the end, and streaming again from further on."""
    run_child(
        store_path,
        """
        ino, fh = await create(b"f")
        await stream(fh, DATA)
        fh2, _ = await fs.open(ino, os.O_RDWR)
        await fs.write(fh2, 100_000, b"A" * 5000)          # overwrite inside the streamed part
        await fs.write(fh, len(DATA), b"B" * 70_000)        # append
        await fs.truncate(ino, 900_000)
        await fs.write(fh2, 950_000, b"C" * 10)             # past the end
        await stream(fh, DATA[:300_000], start=960_000)
    """,
    )
    exp = bytearray(DATA)
    exp[100_000:105_000] = b"A" * 5000
    exp += b"B" * 70_000
    del exp[900_000:]
    exp += bytes(50_000) + b"C" * 10
    exp += bytes(960_000 - len(exp)) + DATA[:300_000]
    got = replayed(store_path)[b"f"]
    assert got == bytes(exp)


@pytest.mark.parametrize(
    ("point", "at"),
    [("journal.append", 1), ("journal.append", 3), ("journal.checkpoint", 1)],
    ids=["first-record", "half-way", "new-journal"],
)
def test_a_carry_over_that_fails_loses_no_write(store_path: Path, point: str, at: int) -> None:
    """The journal restarts carrying over the unpublished writes, and the disk
    is full: logging them again (at once, or half way, after a new base was
    logged), or writing the new journal.  The old journal stays whole; the
    mount goes on, a later write returns; kill -9."""
    run_child(
        store_path,
        f"""
        ino, fh = await create(b"f")
        for at in reversed(range(0, 300 * 1024, PIECE)):  # never streams: logged whole
            await fs.write(fh, at, DATA[at : at + PIECE])
        faults.arm("{point}", "enospc", at={at})
        await fs.io._carry_over()   # what a write past log_limit starts; it logs the error
        faults.disarm()
        assert fs.files.get(ino).changed
        assert await fs.write(fh, 300 * 1024, b"X" * 100) == 100
    """,
    )
    got = replayed(store_path)[b"f"]
    exp = bytearray(DATA[: 320 * 1024])
    exp[300 * 1024 : 300 * 1024 + 100] = b"X" * 100
    assert got == bytes(exp), len(got)


#: Child code: files "a" and "b" published together, committed, their index
#: sync failing (EIO); then "a" written again (``fh1``, its state ``s1``).
BATCH_COMMITTED_UNSYNCED = """
    ino1, fh1 = await create(b"a")
    ino2, fh2 = await create(b"b")
    await fs.write(fh1, 0, b"A" * 1000)
    await fs.write(fh2, 0, b"B" * 1000)
    s1, s2 = fs.files.get(ino1), fs.files.get(ino2)
    faults.arm("index.sync", "eio")
    await fs.publisher.publish_together([s1, s2])
    faults.disarm()
    assert await fs.write(fh1, 1000, b"X" * 100) == 100
"""


def test_a_write_after_a_batch_committed_unsynced_survives_a_failed_publication(
    store_path: Path,
) -> None:
    """Files published together, committed, whose index sync fails (EIO); one
    is written again, and its own publication fails before it commits
    (segment EIO): that write is still there (nothing takes the batch's
    commit for this one)."""
    r = run_child(
        store_path,
        BATCH_COMMITTED_UNSYNCED
        + """
    faults.arm("segment.append", "eio", repeat=True)
    try:
        await fs.publisher.publish(s1, durable=False)
    except CachefsError as exc:
        print("publish failed:", exc)
    faults.disarm()
    got = await fs.read(fh1, 0, 4096)
    assert bytes(got) == b"A" * 1000 + b"X" * 100, len(got)
    print("READ OK", flush=True)
""",
    )
    assert "READ OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_a_write_after_a_batch_committed_unsynced_survives(store_path: Path) -> None:
    """Files published together, committed, whose index sync fails: a later
    write to one returns; kill -9: it is replayed over what was committed."""
    run_child(store_path, BATCH_COMMITTED_UNSYNCED)
    got = replayed(store_path)[b"a"]
    assert got == b"A" * 1000 + b"X" * 100, len(got)


REPLAY_CHILD = textwrap.dedent(
    """
    import os, stat, sys, signal
    import trio
    from cachefs import faults
    from cachefs.engine import ROOT_INODE, Store
    from cachefs.fs import Filesystem

    async def main(path):
        store = Store.open(path)
        faults.arm("index.sync", "eio")
        fs = Filesystem(store)
        faults.disarm()
        ino = fs.namespace.lookup(ROOT_INODE, b"f")
        st = fs.files.get(ino)
        print("ADOPTED", st is not None, flush=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            fh, _ = await fs.open(ino, os.O_RDWR)
            assert await fs.write(fh, 1000, b"X" * 100) == 100
            os.kill(os.getpid(), signal.SIGKILL)

    trio.run(main, sys.argv[1])
    """
)


def test_a_write_after_a_replay_committed_unsynced_survives(store_path: Path) -> None:
    """A replay publishes a file, committed, whose index sync fails (the file
    is kept as unpublished); a write after the mount started; kill -9: it is
    replayed over what the first replay committed."""
    run_child(
        store_path,
        """
        ino, fh = await create(b"f")
        await fs.write(fh, 0, b"A" * 1000)
    """,
    )
    r = subprocess.run(
        [sys.executable, "-c", REPLAY_CHILD, str(store_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr[-3000:]
    assert "ADOPTED True" in r.stdout
    got = replayed(store_path)[b"f"]
    assert got == b"A" * 1000 + b"X" * 100, len(got)


async def test_an_aborted_group_commit_is_not_taken_as_committed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit whose transaction fails, shared by a large file's
    publication (a worker thread) and an empty file's fsync (its sync after
    its own commit): the empty file's error says "committed", the large
    file's does not, and the large file keeps its writes."""
    monkeypatch.setattr(_lookups, "RELEASE_DELAY", 3600.0)
    async with trio.open_nursery() as running:
        fs = Filesystem(store)
        await running.start(fs.run)
        await _aborted_group_commit(fs)
        running.cancel_scope.cancel()
    fs.close()


async def _aborted_group_commit(fs: Filesystem) -> None:
    data = random.Random(1).randbytes(300 * 1024)  # > INLINE_PUBLISH: a worker thread
    a = fs.create(ROOT_INODE, b"a", stat.S_IFREG | 0o644, 0, 0)
    fha, _ = await fs.open(a.ino, os.O_RDWR)
    assert await fs.write(fha, 0, data) == len(data)
    b = fs.create(ROOT_INODE, b"b", stat.S_IFREG | 0o644, 0, 0)
    fhb, _ = await fs.open(b.ino, os.O_RDWR)
    await fs.write(fhb, 0, b"")  # changed, empty
    sa, sb = fs.files.get(a.ino), fs.files.get(b.ino)
    assert sa is not None and sb is not None
    assert sa.changed and sb.changed and sb.size == 0

    publisher = fs.store.publisher
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with publisher.commit_lock:
            held.set()
            release.wait(10)

    threading.Thread(target=hold, daemon=True).start()
    held.wait(5)
    errors: list[CachefsError] = []

    async def publish_a() -> None:
        try:
            await fs.publisher.publish(sa, durable=False)
        except CachefsError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_a)
        for _ in range(500):  # a's ticket queued, its thread waits for the lock
            if publisher._queue:
                break
            await trio.sleep(0.01)
        assert len(publisher._queue) == 1
        faults.arm("index.commit", "eio", at=2)  # 1: b's clear_content; 2: the group commit
        threading.Timer(0.3, release.set).start()
        try:
            await fs.fsync(fhb)  # on this thread: b's ticket joins a's
        except CachefsError as exc:
            errors.append(exc)
        finally:
            faults.disarm()
    assert len(errors) == 2 and errors[0] is not errors[1]
    assert [e.committed for e in errors] in ([False, True], [True, False])
    inode = fs.namespace.get(a.ino)
    # The transaction was aborted: the inode does not name a's new content...
    assert inode.digest is None
    # ...so a's state must still hold its writes.
    assert sa.changed, "a's state took the aborted commit's content as published"
    got = await fs.read(fha, 0, len(data))
    assert bytes(got) == data
