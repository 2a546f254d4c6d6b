"""What the filesystem does on its own while files stay open (no FUSE needed):
publishing a file whose unpublished bytes pass the publish threshold, and
restarting the journal once it passes its limit, carrying over what is still
unpublished.  Each one also when the disk fails it (``cachefs.faults``)."""

from __future__ import annotations

import collections
import errno
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cachefs import faults
from cachefs.engine import ROOT_INODE, CachefsError, FsError, Store, check_store
from cachefs.errors import IndexCorruptError
from cachefs.fs import Filesystem, FsEvents
from tests.conftest import SMALL_CONFIG, flip_first_chunk

PIECE = 64 * 1024


async def _write(fs: Filesystem, name: bytes, data: bytes) -> tuple[int, int]:
    """Create ``name`` and write ``data`` in pieces; returns (ino, open handle)."""
    inode = fs.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
    fh, _ = await fs.open(inode.ino, os.O_RDWR)
    for at in range(0, len(data), PIECE):
        await fs.write(fh, at, data[at : at + PIECE])
    return inode.ino, fh


async def _write_closed(fs: Filesystem, contents: list[bytes]) -> list[int]:
    """Files ``f0``, ``f1``... with ``contents``, each written and closed; their inodes."""
    inos = []
    for n, data in enumerate(contents):
        ino, fh = await _write(fs, f"f{n}".encode(), data)
        await fs.release(fh)
        inos.append(ino)
    return inos


async def _wait_for(condition: object, what: str, seconds: float = 20.0) -> None:
    with trio.move_on_after(seconds):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.01)
        return
    pytest.fail(f"{what} did not happen within {seconds}s")


async def _read_all(fs: Filesystem, ino: int, size: int) -> bytes:
    fh, _ = await fs.open(ino, os.O_RDONLY)
    try:
        return bytes(await fs.read(fh, 0, size))
    finally:
        await fs.release(fh)


class _Written(FsEvents):
    """Counts the ``written`` events of each inode."""

    def __init__(self) -> None:
        self.told: collections.Counter[int] = collections.Counter()

    def written(self, ino: int, size: int) -> None:
        self.told[ino] += 1


async def test_a_file_past_the_threshold_is_published_while_open(store_path: Path) -> None:
    data = random.Random(1).randbytes(1 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store, publish_threshold=256 * 1024)
        written = _Written()
        fs.listeners.add(written)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            ino, fh = await _write(fs, b"big", data)
            # Published in the background, the handle still open.
            await _wait_for(lambda: fs.digest_of(ino).size > 0, "a background publication")
            assert written.told[ino] >= 1  # a trace records each such write
            await fs.fsync(fh)
            assert fs.digest_of(ino).size == len(data)
            await fs.release(fh)
            assert await _read_all(fs, ino, len(data)) == data
            await fs.flush_all()
            nursery.cancel_scope.cancel()
        fs.close()
        assert fs.errors == 0
        assert check_store(store).clean


async def test_a_failed_background_publication_is_retried_at_close(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(2).randbytes(1 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store, publish_threshold=256 * 1024)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            faults.arm("segment.append", "eio", repeat=True)
            try:
                ino, fh = await _write(fs, b"big", data)
                await _wait_for(lambda: fs.errors > 0, "a failed background publication")
            finally:
                faults.disarm()
            assert "retried at close" in caplog.text
            assert fs.digest_of(ino).size == 0  # nothing was published ...
            await fs.release(fh)  # ... until the close
            assert fs.digest_of(ino).size == len(data)
            assert await _read_all(fs, ino, len(data)) == data
            await fs.flush_all()
            nursery.cancel_scope.cancel()
        fs.close()
        assert check_store(store).clean


async def test_small_files_released_together_are_published_together(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small new files released within ``BATCH_DELAY`` of each other (a build's
    outputs) are published in one publication: one transaction and one sync
    for all.  One unlinked meanwhile is never published; one opened again
    meanwhile is published once; readers see every file's bytes throughout."""
    fs = Filesystem(store)
    publications: list[int] = []
    publish = store.publisher.publish

    def counted(objects: list[Any], *, durable: bool) -> None:
        publications.append(len(objects))
        publish(objects, durable=durable)

    monkeypatch.setattr(store.publisher, "publish", counted)
    written = _Written()
    fs.listeners.add(written)
    rng = random.Random(3)
    contents = [rng.randbytes(rng.randrange(1, 20_000)) for _ in range(12)]
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        inos = await _write_closed(fs, contents)
        fs.unlink(ROOT_INODE, b"f11")
        assert await _read_all(fs, inos[0], 1 << 20) == contents[0]  # opened again
        gone, fh = await _write(fs, b"gone", b"unlinked while open")
        fs.unlink(ROOT_INODE, b"gone")
        await fs.release(fh)  # closed without a name: not written, never published
        assert publications == [] and all(fs.digest_of(ino).size == 0 for ino in inos[:11])
        assert written.told == dict.fromkeys(inos, 1)  # at each close, not again at a reader's
        assert gone not in written.told
        await _wait_for(lambda: publications, "the publication of the files released")
        assert publications == [11]
        for ino, data in zip(inos[:11], contents, strict=False):
            assert fs.digest_of(ino).size == len(data)
            assert await _read_all(fs, ino, 1 << 20) == data
        # The unlinked ones keep their writes while the kernel knows them (a
        # process that found their names may open them yet), until it forgets.
        assert {state.ino for state in fs.files} == {inos[11], gone}
        fs.forget([(inos[11], 1), (gone, 1)])
        assert len(fs.files) == 0  # every file let go
        await fs.flush_all()
        assert [n for n in publications if n] == [11]  # a sync: nothing left to publish
        nursery.cancel_scope.cancel()
    fs.close()
    assert fs.errors == 0 and store.stats().files == 11
    assert check_store(store).clean


async def test_damage_met_by_files_released_together_is_the_store_s_to_know(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A publication of files released together that meets a damaged index
    counts the damage and turns the mount read-only, as a request would; the
    files keep their writes."""
    fs = Filesystem(store)

    def damaged(*args: Any, **kwargs: Any) -> None:
        raise IndexCorruptError("index page 7 fails its checksum")

    monkeypatch.setattr(store, "put_many", damaged)
    contents = [b"one" * 100, b"two" * 100]
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        inos = await _write_closed(fs, contents)
        await _wait_for(lambda: fs.errors > 0, "the failed publication")
        assert fs.failsafe is not None and store.needs_fsck
        assert "publishing 2 files released together failed" in caplog.text
        assert [fs.digest_of(ino).size for ino in inos] == [0, 0]
        assert [await _read_all(fs, ino, 1000) for ino in inos] == contents
        nursery.cancel_scope.cancel()
    fs.close()


async def test_files_released_together_that_the_disk_fails_are_published_one_by_one(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A publication of files released together that fails (a full disk)
    publishes each on its own: those that fit are published, the others keep
    their writes for the next try, and the error is the file's own."""
    fs = Filesystem(store)
    contents = [bytes([n]) * 5000 for n in range(1, 5)]
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        inos = await _write_closed(fs, contents)
        caplog.set_level(logging.INFO)
        faults.arm("segment.append", "enospc", at=4, repeat=True)  # the 4th file's chunk
        try:
            await _wait_for(lambda: fs.errors > 0, "a failed publication")
            await _wait_for(lambda: len(fs.files) == 1, "the files that fit let go")
        finally:
            faults.disarm()
        assert "publishing 4 files together failed" in caplog.text
        assert "kept for the next sync, open or unmount" in caplog.text
        assert [fs.digest_of(ino).size for ino in inos] == [5000, 5000, 5000, 0]
        assert await _read_all(fs, inos[3], 1 << 20) == contents[3]  # kept its writes
        await fs.flush_all()  # the next try
        assert fs.digest_of(inos[3]).size == 5000
        await _wait_for(lambda: len(fs.files) == 0, "the last file let go")
        nursery.cancel_scope.cancel()
    fs.close()
    assert check_store(store).clean


#: A child writes two files that stay open and unpublished until the journal
#: passes its limit (2 MiB), waits for the carry-over, writes a little more to
#: both, and dies: the next open must replay both whole.
CHILD = textwrap.dedent(
    """
    import os, stat, sys
    import trio
    from cachefs.engine import ROOT_INODE, Store
    from cachefs.fs import Filesystem, FsEvents

    async def main(path, seed):
        import random
        rng = random.Random(seed)
        store = Store.open(path)
        fs = Filesystem(store, log_limit=2 << 20)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            handles = []
            for name, size in ((b"a", 1_500_000), (b"b", 700_000)):
                inode = fs.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
                fh, _ = await fs.open(inode.ino, os.O_RDWR)
                data = rng.randbytes(size)
                for at in range(0, size, 65536):
                    await fs.write(fh, at, data[at : at + 65536])
                handles.append((fh, size))
            while store.journal.size > 1 << 20 or fs.io._carrying_over:
                await trio.sleep(0.01)
            for fh, size in handles:
                await fs.write(fh, size, rng.randbytes(1000))
            print(store.journal.size, flush=True)
            os.kill(os.getpid(), 9)

    trio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


def test_the_journal_carries_over_what_is_unpublished(tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    Store.open(store_path, create=True, config=SMALL_CONFIG).close()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_path), "5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert int(child.stdout) < 2 << 20  # the journal restarted
    rng = random.Random(5)
    a, b = rng.randbytes(1_500_000), rng.randbytes(700_000)
    a += rng.randbytes(1000)
    b += rng.randbytes(1000)

    async def check() -> None:
        with Store.open(store_path) as store:
            fs = Filesystem(store)  # replays the journal
            try:
                for name, want in ((b"a", a), (b"b", b)):
                    ino = fs.namespace.lookup(ROOT_INODE, name)
                    assert await _read_all(fs, ino, len(want) + 10) == want
            finally:
                fs.close()
            assert check_store(store).clean

    trio.run(check)


async def test_a_carry_over_that_cannot_checkpoint_keeps_the_journal(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    data = random.Random(3).randbytes(1_500_000)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store, log_limit=1 << 20)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            faults.arm("journal.checkpoint", "enospc", repeat=True)
            try:
                ino, fh = await _write(fs, b"f", data)
                await _wait_for(lambda: fs.errors > 0, "a failed carry-over")
            finally:
                faults.disarm()
            assert "journal checkpoint failed" in caplog.text
            assert store.journal is not None and store.journal.size > 1 << 20
            await fs.release(fh)
            assert await _read_all(fs, ino, len(data)) == data
            await fs.flush_all()
            nursery.cancel_scope.cancel()
        fs.close()
        assert check_store(store).clean


async def test_files_that_are_not_regular_files_are_refused(store: Store) -> None:
    fs = Filesystem(store)
    try:
        directory = fs.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
        link = fs.create(ROOT_INODE, b"l", stat.S_IFLNK | 0o777, 0, 0, target=b"d")
        fifo = fs.create(ROOT_INODE, b"p", stat.S_IFIFO | 0o644, 0, 0)
        for ino, code in [(directory.ino, errno.EISDIR), (link.ino, errno.EINVAL)]:
            for call in (fs.open(ino, os.O_RDONLY), fs.truncate(ino, 0)):
                with pytest.raises(FsError) as raised:
                    await call
                assert raised.value.errno == code
        with pytest.raises(FsError) as raised:
            await fs.open(fifo.ino, os.O_RDONLY)
        assert raised.value.errno == errno.EINVAL
        with pytest.raises(FsError) as raised:
            await fs.truncate(fifo.ino, -1)
        assert raised.value.errno == errno.EINVAL
    finally:
        fs.close()


async def test_a_truncation_the_disk_fails_changes_nothing(store: Store) -> None:
    data = random.Random(6).randbytes(200_000)
    fs = Filesystem(store)
    try:
        ino, fh = await _write(fs, b"f", data)
        await fs.fsync(fh)
        await fs.release(fh)
        # Truncating to 0 clears the content in the index; to another size it
        # is logged first: the disk fails both.
        for point, flags, size in [
            ("index.commit", os.O_RDWR | os.O_TRUNC, 0),
            ("journal.append", 0, 1000),
        ]:
            faults.arm(point, "eio")
            try:
                with pytest.raises(CachefsError) as raised:
                    if flags:
                        await fs.open(ino, flags)
                    else:
                        await fs.truncate(ino, size)
                assert raised.value.errno == errno.EIO
            finally:
                faults.disarm()
            assert fs.getattr(ino).size == len(data)
            assert await _read_all(fs, ino, len(data)) == data
        assert not fs.files.get(ino)  # no state left behind
    finally:
        fs.close()


async def test_a_journal_record_of_an_unknown_kind_is_skipped_at_replay(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        assert store.journal is not None
        store.journal.append(0x7E, b"from a later cachefs")
    with Store.open(store_path) as store:
        Filesystem(store).close()
    assert "skipping record of unknown kind 126" in caplog.text


async def test_a_flush_publishes_what_it_can_and_reports_what_it_could_not(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``sync`` and unmount publish every file; one the disk refuses keeps its
    writes, does not stop the others, and its error is raised at the end."""
    rng = random.Random(7)
    small, big = rng.randbytes(1000), rng.randbytes(300_000)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        try:
            files = [await _write(fs, name, data) for name, data in ((b"a", small), (b"b", big))]
            faults.arm("segment.append", "enospc", at=2)  # the first file fits
            try:
                with pytest.raises(CachefsError) as raised:
                    await fs.flush_all()
            finally:
                faults.disarm()
            assert raised.value.errno == errno.ENOSPC
            assert "could not publish inode" in caplog.text
            assert [fs.digest_of(ino).size for ino, _ in files] == [len(small), 0]
            await fs.flush_all()
            assert [fs.digest_of(ino).size for ino, _ in files] == [len(small), len(big)]
            for _, fh in files:
                await fs.release(fh)
        finally:
            fs.close()
        assert check_store(store).clean


async def test_a_sparse_digest_that_meets_damage_fails_once_computed(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            ino, fh = await _write(fs, b"sparse", random.Random(8).randbytes(50_000))
            await fs.truncate(ino, 8 << 20)  # a hole of almost 8 MiB after the data
            await fs.fsync(fh)
            await fs.release(fh)
            flip_first_chunk(store, fs.digest_of(ino))
            with pytest.raises(FsError) as raised:
                await fs.getxattr(ino, b"user.cachefs.digest")
            assert raised.value.errno == errno.EAGAIN  # being computed

            async def answer() -> int:
                try:
                    await fs.getxattr(ino, b"user.cachefs.digest")
                except CachefsError as exc:
                    return exc.errno
                return 0

            code = errno.EAGAIN
            with trio.move_on_after(20):
                while code == errno.EAGAIN:
                    await trio.sleep(0.01)
                    code = await answer()
            assert code == errno.EIO
            assert "could not compute the digest" in caplog.text
            nursery.cancel_scope.cancel()
        fs.close()


async def test_a_read_while_a_publication_commits_reads_the_new_content(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publication in a worker thread commits a file's new content, which
    drops its old object, before the loop makes the new one the file's base.
    A read in between found no object: ENOENT, which the kernel's read-ahead
    took for the end of the file (a stress run read files short).  The read
    waits for the publication and gives the new content."""
    rng = random.Random(5)
    old = rng.randbytes(600_000)  # past INLINE_PUBLISH: published in a worker thread
    patch = rng.randbytes(10_000)
    new = old[:300_000] + patch + old[310_000:]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        committed, go_on = threading.Event(), threading.Event()
        store_content = fs.publisher.store_content

        def held(state: Any, *, durable: bool) -> Any:
            digest = store_content(state, durable=durable)
            committed.set()
            go_on.wait(20)
            return digest

        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            ino, fh = await _write(fs, b"f", old)
            await fs.release(fh)
            reader, _ = await fs.open(ino, os.O_RDONLY)
            writer, _ = await fs.open(ino, os.O_RDWR)
            await fs.write(writer, 300_000, patch)
            monkeypatch.setattr(fs.publisher, "store_content", held)
            nursery.start_soon(fs.fsync, writer)
            assert await trio.to_thread.run_sync(committed.wait, 20)

            async def read() -> None:
                got.append(bytes(await fs.read(reader, 0, len(new))))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert not got  # waiting for the publication
            go_on.set()
            await _wait_for(lambda: got, "the read")
            assert got == [new]
            await fs.release(reader)
            await fs.release(writer)
            await fs.flush_all()
            nursery.cancel_scope.cancel()
        fs.close()
        assert fs.errors == 0
        assert check_store(store).clean
