"""Ingest as the bytes arrive (``cachefs/fs/_streams.py``): a new file written
in order is chunked and stored while it is written, and published from that
ingest; anything else abandons it and the publication goes the usual way,
with the same content.  No FUSE needed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cachefs import faults
from cachefs.engine import ROOT_INODE, CachefsError, Store, check_store
from cachefs.fs import Filesystem, _streams
from cachefs.fs._files import OpenFile
from tests import mounting
from tests.conftest import SMALL_CONFIG

PIECE = 64 * 1024
STREAM_MIN = 256 * 1024


@pytest.fixture(autouse=True)
def small_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_streams, "STREAM_MIN", STREAM_MIN)
    yield


@asynccontextmanager
async def mounted(store: Store) -> AsyncIterator[Filesystem]:
    fs = Filesystem(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        yield fs
        await fs.flush_all()
        nursery.cancel_scope.cancel()
    fs.close()
    assert fs.errors == 0


async def create(fs: Filesystem, name: bytes) -> tuple[int, int]:
    inode = fs.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
    fh, _ = await fs.open(inode.ino, os.O_RDWR)
    return inode.ino, fh


async def write(fs: Filesystem, fh: int, at: int, data: bytes) -> None:
    for offset in range(0, len(data), PIECE):
        await fs.write(fh, at + offset, data[offset : offset + PIECE])


async def read_all(fs: Filesystem, ino: int, size: int) -> bytes:
    fh, _ = await fs.open(ino, os.O_RDONLY)
    try:
        return bytes(await fs.read(fh, 0, size + 1))
    finally:
        await fs.release(fh)


def state_of(fs: Filesystem, ino: int) -> OpenFile:
    state = fs.files.get(ino)
    assert state is not None
    return state


async def until_read(state: OpenFile, position: int) -> None:
    """Wait until the file's stream has read ``position`` bytes of the spool."""
    with trio.fail_after(20):
        while state.stream is None or state.stream.spool.position < position:
            await trio.sleep(0.01)


def streams(fs: Filesystem) -> _streams.Streams:
    return fs.publisher.streams


async def test_a_file_written_in_order_is_published_from_its_stream(store_path: Path) -> None:
    data = random.Random(1).randbytes(3 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            ino, fh = await create(fs, b"out.o")
            await write(fs, fh, 0, data[: 1 << 20])
            state = state_of(fs, ino)
            # Read and ingested before any fsync or close.
            await until_read(state, 1 << 20)
            await write(fs, fh, 1 << 20, data[1 << 20 :])
            await fs.fsync(fh)
            assert streams(fs).used == 1 and streams(fs).abandoned == 0
            digest = fs.digest_of(ino)
            assert digest.hash == hashlib.sha256(data).digest() and digest.size == len(data)
            await fs.release(fh)
            assert await read_all(fs, ino, len(data)) == data
            # The recipe is the one a plain put of the same bytes makes.
            recipe = store.reader.recipe(digest)
        with Store.open(store_path.parent / "other", create=True, config=SMALL_CONFIG) as other:
            assert other.reader.recipe(other.put(data)) == recipe
        assert check_store(store).clean


@pytest.mark.parametrize("where", ["below the end", "past the end"])
async def test_a_write_that_is_not_an_append_abandons_the_stream(
    store_path: Path, where: str
) -> None:
    data = bytearray(random.Random(2).randbytes(1 << 20))
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            ino, fh = await create(fs, b"linked")
            await write(fs, fh, 0, bytes(data))
            await until_read(state_of(fs, ino), len(data))
            if where == "below the end":
                await fs.write(fh, 100, b"header")
                data[100:106] = b"header"
            else:
                await fs.write(fh, len(data) + 10, b"tail")
                data += bytes(10) + b"tail"
            await write(fs, fh, len(data), b"more" * 1000)
            data += b"more" * 1000
            await fs.release(fh)
            assert streams(fs).used == 0 and streams(fs).abandoned == 1
            assert fs.digest_of(ino).hash == hashlib.sha256(data).digest()
            assert await read_all(fs, ino, len(data)) == data
        assert check_store(store).clean


async def test_a_truncation_abandons_and_one_to_nothing_lets_it_stream_again(
    store_path: Path,
) -> None:
    first = random.Random(3).randbytes(1 << 20)
    second = random.Random(4).randbytes(1 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            ino, fh = await create(fs, b"f")
            await write(fs, fh, 0, first)
            await until_read(state_of(fs, ino), len(first))
            await fs.truncate(ino, 1000)
            await write(fs, fh, 1000, second)
            await fs.fsync(fh)
            assert (streams(fs).used, streams(fs).abandoned) == (0, 1)
            assert await read_all(fs, ino, 1000 + len(second)) == first[:1000] + second
            # Emptied and written anew (the way a build rewrites an output): it streams.
            await fs.truncate(ino, 0)
            await write(fs, fh, 0, second)
            await fs.release(fh)
            assert (streams(fs).used, streams(fs).abandoned) == (1, 1)
            assert await read_all(fs, ino, len(second)) == second
        assert check_store(store).clean


async def test_gc_does_not_wait_behind_a_stream(store_path: Path) -> None:
    data = random.Random(5).randbytes(2 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            ino, fh = await create(fs, b"open for long")
            await write(fs, fh, 0, data[: 1 << 20])
            await until_read(state_of(fs, ino), 1 << 20)
            # The stream holds the store's maintenance lock shared while it
            # waits for bytes: it lets go for gc instead of keeping it waiting.
            with trio.fail_after(20):
                await fs.collect_garbage()
            await write(fs, fh, 1 << 20, data[1 << 20 :])
            await fs.release(fh)
            assert streams(fs).abandoned == 1
            assert await read_all(fs, ino, len(data)) == data
        assert check_store(store).clean


async def test_an_unlinked_file_is_not_published_from_its_stream(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            ino, fh = await create(fs, b"tmp")
            await write(fs, fh, 0, random.Random(6).randbytes(1 << 20))
            await until_read(state_of(fs, ino), 1 << 20)
            fs.unlink(ROOT_INODE, b"tmp")
            await fs.release(fh)
            fs.forget([(ino, 1)])
            assert (streams(fs).used, streams(fs).abandoned) == (0, 1)
        assert store.stats().objects == 0
        assert check_store(store).clean


async def test_streams_are_bounded_and_each_file_gets_its_bytes(store_path: Path) -> None:
    rng = random.Random(7)
    files = {f"f{i}".encode(): rng.randbytes((1 << 20) + i * 4097) for i in range(4)}
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            opened = {name: await create(fs, name) for name in files}
            for offset in range(0, 2 << 20, PIECE):  # interleaved, as make -j writes
                for name, data in files.items():
                    if offset < len(data):
                        await fs.write(opened[name][1], offset, data[offset : offset + PIECE])
                assert streams(fs).running <= _streams.MAX_STREAMS
            for _ino, fh in opened.values():
                await fs.release(fh)
            assert streams(fs).used == _streams.MAX_STREAMS
            for name, data in files.items():
                assert await read_all(fs, opened[name][0], len(data)) == data
        assert check_store(store).clean


async def test_a_stream_ends_when_the_filesystem_stops(store_path: Path) -> None:
    data = random.Random(8).randbytes(1 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                ino, fh = await create(fs, b"f")
                await write(fs, fh, 0, data)
                await until_read(state_of(fs, ino), len(data))
                nursery.cancel_scope.cancel()  # the stream waits for bytes: it is abandoned
        assert streams(fs).running == 0
        await fs.release(fh)  # published the usual way
        await fs.flush_all()
        assert fs.digest_of(ino).hash == hashlib.sha256(data).digest()
        fs.close()
        assert check_store(store).clean


async def test_a_failed_sync_of_a_streamed_file_fails_its_fsync(store_path: Path) -> None:
    """The disk fails the stream's sync: the fsync says so (EIO), rather than
    a second ingest finding the same appended chunks and syncing nothing."""
    data = random.Random(10).randbytes(1 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        async with mounted(store) as fs:
            ino, fh = await create(fs, b"f")
            await write(fs, fh, 0, data)
            await until_read(state_of(fs, ino), len(data))
            # Once, as Linux reports a writeback error once: a second ingest's
            # sync would then succeed and say nothing of the lost bytes.
            faults.arm("segment.sync", "eio")
            try:
                with pytest.raises(CachefsError) as raised:
                    await fs.fsync(fh)
                assert raised.value.errno == errno.EIO
            finally:
                faults.disarm()
            assert streams(fs).used == 0
            assert state_of(fs, ino).changed  # kept, published again at close
            await fs.release(fh)
            assert await read_all(fs, ino, len(data)) == data
        assert check_store(store).clean


async def test_writes_after_the_filesystem_stopped_do_not_stream(store_path: Path) -> None:
    """Its nursery is closed: a stream cannot start, and the write that would
    have started it still succeeds; the file is published the usual way."""
    data = random.Random(11).randbytes(1 << 20)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            nursery.cancel_scope.cancel()
        ino, fh = await create(fs, b"late")
        await write(fs, fh, 0, data)
        assert state_of(fs, ino).stream is None and streams(fs).running == 0
        with trio.fail_after(20):
            await fs.release(fh)
        await fs.flush_all()
        assert fs.digest_of(ino).hash == hashlib.sha256(data).digest()
        fs.close()
        assert check_store(store).clean


def test_kill9_while_streaming_loses_nothing_that_was_written(tmp_path: Path) -> None:
    """Through FUSE: a large file written in order streams; the daemon killed
    mid-file comes back with every byte that was written (from the journal),
    the stream's chunks are only garbage, and fsck finds the store clean."""
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    data = random.Random(9).randbytes(24 << 20)

    def wait_for(key: str, what: str) -> None:
        deadline = time.monotonic() + 20
        while mounting.live_stats(mountpoint)["ingest_streams"][key] == 0:
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    mount = mounting.start(store, mountpoint)
    try:
        with open(mountpoint / "done.o", "wb") as f:
            f.write(data)
        wait_for("used", "the closed file was not published from its stream")
        fd = os.open(mountpoint / "half.o", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for at in range(0, 12 << 20, 1 << 20):
            os.write(fd, data[at : at + (1 << 20)])
        wait_for("running", "the open file does not stream")
        for at in range(12 << 20, 16 << 20, 1 << 20):
            os.write(fd, data[at : at + (1 << 20)])
        # The streaming file's writes are logged by reference to its spool,
        # which has a name in the journal's directory: the bytes are not in
        # the journal (it holds the first ones, written before the stream began).
        (spool,) = (store / "journal" / "spools").iterdir()
        assert spool.name.startswith(f"{os.fstat(fd).st_ino}-")
        assert spool.stat().st_size == 16 << 20
        assert (store / "journal" / "journal.log").stat().st_size < 14 << 20
    finally:
        mounting.kill(mount)
    with contextlib.suppress(OSError):  # its mount is gone
        os.close(fd)
    with mounting.mounted(store, mountpoint):
        assert (mountpoint / "done.o").read_bytes() == data
        assert (mountpoint / "half.o").read_bytes() == data[: 16 << 20]
        assert not (store / "journal" / "spools").exists()  # gone with the records
    result = mounting.cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
