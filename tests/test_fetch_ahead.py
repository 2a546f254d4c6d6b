"""Reads of a file whose chunks only the remote tiers hold (dropped here under
``--local-max-size``): fetched ahead of a sequential reader, in the file's
order, as far as ``AHEAD`` past its reads; only a span where a reader jumps;
no further once it is closed; and an error, never a hang, when the tiers do
not give a chunk (``cachefs/fs/_fetch_ahead.py``)."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import Mock

import pytest
import trio

from cachefs.engine import ROOT_INODE, Digest, Store, drop_held
from cachefs.errors import RemoteError, StoreFullError
from cachefs.fs import Filesystem, _fetch_ahead
from cachefs.fuse import Operations
from cachefs.remote import Tier, _tiers, _transfer
from tests.conftest import SMALL_CONFIG
from tests.test_tiers import PUSHING, Verifying, drain

SPAN, AHEAD = 64 << 10, 256 << 10
SIZE = 2 << 20


@dataclass
class Dropped:
    """A filesystem whose file ``ino`` (``data``, content ``digest``) the tier
    ``remote`` holds and the store here does not."""

    fs: Filesystem
    store: Store
    remote: Verifying
    ino: int
    digest: Digest
    data: bytes
    #: Other files dropped alike: (inode number, digest, bytes).
    others: list[tuple[int, Digest, bytes]]


@asynccontextmanager
async def dropped_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    running: bool = True,
    remote: Verifying | None = None,
    files: int = 1,
) -> AsyncIterator[Dropped]:
    """A filesystem (``running``, or not: no nursery) with ``files`` files of
    ``SIZE`` random bytes in small chunks, every chunk of which was pushed,
    then dropped here."""
    monkeypatch.setattr(_fetch_ahead, "SPAN", SPAN)
    monkeypatch.setattr(_fetch_ahead, "AHEAD", AHEAD)
    monkeypatch.setattr(_fetch_ahead, "OWN", SPAN)
    remote = remote or Verifying("mem")
    with Store.open(tmp_path / "s", create=True, config=SMALL_CONFIG, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote, durable=True)])
        try:
            made = []
            for i in range(files):
                data = os.urandom(SIZE)
                inode = fs.create(ROOT_INODE, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0)
                fh, _ = await fs.open(inode.ino, os.O_RDWR)
                await fs.write(fh, 0, data)
                await fs.release(fh)
                await fs.flush_all()
                made.append((inode.ino, fs.digest_of(inode.ino), data))
            assert fs.remote.pusher is not None
            drain(fs.remote.pusher)
            drop_held(store, 0, fs.remote.tiers.held)
            store.chunks.cache.clear()
            assert all(here(store, digest) == 0 for _, digest, _ in made)
            dropped = Dropped(fs, store, remote, *made[0], others=made[1:])
            if not running:
                yield dropped
                return
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                yield dropped
                nursery.cancel_scope.cancel()
        finally:
            fs.close()


def here(store: Store, digest: Digest) -> int:
    """Bytes of the content that the store here holds (not held remotely)."""
    return digest.size - sum(n for _, n in store.reader.held_remotely(digest, 0, digest.size))


async def fetched(fs: Filesystem) -> None:
    """Wait until no fetch runs ahead of a reader."""
    with trio.fail_after(10):
        while fs.io.ahead.running:
            await trio.sleep(0.005)


async def test_a_sequential_reader_is_fetched_ahead_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with dropped_file(tmp_path, monkeypatch) as d:
        fs, store, digest, data = d.fs, d.store, d.digest, d.data
        fh, _ = await fs.open(d.ino, os.O_RDONLY)
        piece = 16 << 10
        # The first read waits for its chunk; the fetch takes one span then.
        assert bytes(await fs.read(fh, 0, piece)) == data[:piece]
        await fetched(fs)
        assert SPAN <= here(store, digest) < SPAN + SMALL_CONFIG.chunking.max_size
        # Reading on from there, the fetch goes AHEAD past each read, no further.
        for offset in range(piece, SIZE // 2, piece):
            got = await fs.read(fh, offset, piece)
            assert bytes(got) == data[offset : offset + piece]
            assert here(store, digest) <= offset + piece + AHEAD + SPAN + (16 << 10)
        await fetched(fs)
        assert here(store, digest) >= SIZE // 2 + AHEAD - 2 * piece
        assert here(store, digest) < SIZE  # not all of it: nobody read that far
        calls = d.remote.calls
        # Closed: nothing more is fetched.
        await fs.release(fh)
        await fetched(fs)
        assert d.remote.calls == calls and here(store, digest) < SIZE
        assert fs.io.ahead._fetches == {}
        # Read to the end by another handle: every byte right.
        fh, _ = await fs.open(d.ino, os.O_RDONLY)
        for offset in range(0, SIZE, 1 << 18):
            assert bytes(await fs.read(fh, offset, 1 << 18)) == data[offset : offset + (1 << 18)]
        await fs.release(fh)
        await fetched(fs)
        assert here(store, digest) == SIZE
        assert not store.needs_fsck and store.corruptions == 0


async def test_a_reader_that_jumps_takes_a_span_where_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with dropped_file(tmp_path, monkeypatch) as d:
        fs, store, digest, data = d.fs, d.store, d.digest, d.data
        fh, _ = await fs.open(d.ino, os.O_RDONLY)
        at = [SIZE // 2, 3 * SIZE // 4, SIZE // 8]
        for offset in at:
            assert bytes(await fs.read(fh, offset, 100)) == data[offset : offset + 100]
            await fetched(fs)
        # A span (and the chunks it cuts) at each place, nothing between.
        assert here(store, digest) <= len(at) * (SPAN + 2 * SMALL_CONFIG.chunking.max_size)
        for offset in at:
            assert not store.reader.held_remotely(digest, offset, SPAN)
        assert store.reader.held_remotely(digest, SIZE // 8 + 2 * SPAN, SIZE // 8)
        await fs.release(fh)


@pytest.mark.parametrize("running", [True, False], ids=["fetched-ahead", "no-nursery"])
async def test_a_chunk_no_tier_gives_is_an_error_and_nothing_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running: bool
) -> None:
    """The tier lost a chunk: a read that reaches it fails with a RemoteError
    (EIO), the bytes before it read right, nothing is recorded as damage, and
    a tier that fails is the same error at once."""
    async with dropped_file(tmp_path, monkeypatch, running=running) as d:
        fs, store, data = d.fs, d.store, d.data
        recipe = store.recipe(d.digest)
        lost = len(recipe) // 2
        del d.remote.blobs[Digest(*recipe[lost])]  # the tier lost a chunk in the middle
        start = sum(n for _, n in recipe[:lost])
        fh, _ = await fs.open(d.ino, os.O_RDONLY)
        piece = 8 << 10
        offset = 0
        with trio.fail_after(20):
            while offset + piece <= start:
                assert bytes(await fs.read(fh, offset, piece)) == data[offset : offset + piece]
                offset += piece
            with pytest.raises(RemoteError, match=r"held only by the .*remote tiers"):
                await fs.read(fh, start, piece)
            d.remote.down = True
            with pytest.raises(RemoteError):
                await fs.read(fh, SIZE - piece, piece)
        await fs.release(fh)
        await fetched(fs)
        assert not store.needs_fsck and store.corruptions == 0


class Gated(Verifying):
    """A tier whose reads of the chunks in ``slow`` wait until ``gate`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.slow: set[Digest] = set()
        self.gate = threading.Event()

    def read(self, digest: Digest) -> bytes:
        if digest in self.slow:
            assert self.gate.wait(20)
        return super().read(digest)


async def test_a_read_elsewhere_fetches_its_own_while_the_fetch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a fetch runs ahead of one reader (held up by a slow tier), a read
    far from it fetches its own bytes at once and leaves that fetch where it
    goes; the first reader then reads on, every byte right."""
    monkeypatch.setattr(_transfer, "FETCH_AHEAD", 2)  # the slow requests hold 2 threads
    gated = Gated("mem")
    async with dropped_file(tmp_path, monkeypatch, remote=gated) as d:
        fs, store, digest, data = d.fs, d.store, d.digest, d.data
        recipe, starts = store.recipe(digest), [0]
        for _, n in recipe:
            starts.append(starts[-1] + n)
        gated.slow = {
            Digest(c, n)
            for (c, n), at in zip(recipe, starts[:-1], strict=True)
            if SPAN < at < 3 * SPAN
        }
        first, _ = await fs.open(d.ino, os.O_RDONLY)
        assert bytes(await fs.read(first, 0, 4096)) == data[:4096]
        await fetched(fs)  # the first span
        assert bytes(await fs.read(first, 4096, 4096)) == data[4096:8192]  # reads on
        (fetch,) = fs.io.ahead._fetches.values()
        with trio.fail_after(5):
            while fetch.fetching != SPAN:  # held up in its second span
                await trio.sleep(0.005)
        second, _ = await fs.open(d.ino, os.O_RDONLY)
        far = SIZE - 100_000
        with trio.fail_after(5):
            assert bytes(await fs.read(second, far, 4096)) == data[far : far + 4096]
        assert fetch.fetching == SPAN and fetch.start == 0  # not moved
        assert not store.reader.held_remotely(digest, far, 4096)
        gated.gate.set()
        for offset in range(8192, SIZE, 1 << 18):
            got = await fs.read(first, offset, 1 << 18)
            assert bytes(got) == data[offset : offset + (1 << 18)]
        await fs.release(first)
        await fs.release(second)
        await fetched(fs)
        assert here(store, digest) == SIZE


async def test_so_many_fetches_run_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While ``FETCHES`` fetches run (held up by a slow tier), a reader of
    other content fetches its own bytes, at once, and starts no fetch."""
    monkeypatch.setattr(_transfer, "FETCH_AHEAD", 2)
    monkeypatch.setattr(_fetch_ahead, "FETCHES", 1)
    gated = Gated("mem")
    async with dropped_file(tmp_path, monkeypatch, remote=gated, files=2) as d:
        fs, store = d.fs, d.store
        ((other, other_digest, other_data),) = d.others
        recipe = store.recipe(d.digest)
        gated.slow = {Digest(*chunk) for chunk in recipe[1:]}
        first, _ = await fs.open(d.ino, os.O_RDONLY)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.read, first, 0, 4096)  # waits: its span is held up
            with trio.fail_after(5):
                while not fs.io.ahead.running:
                    await trio.sleep(0.005)
            second, _ = await fs.open(other, os.O_RDONLY)
            with trio.fail_after(5):
                assert bytes(await fs.read(second, 0, 4096)) == other_data[:4096]
            assert fs.io.ahead.running == 1 and len(fs.io.ahead._fetches) == 1
            gated.gate.set()
        await fs.release(first)
        await fs.release(second)
        await fetched(fs)
        assert fs.io.ahead._fetches == {}
        assert not store.reader.held_remotely(other_digest, 0, 4096)


class Broken(Verifying):
    """A tier whose reads raise an unexpected error (a bug in a client
    library, say) while ``broken`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.broken = False

    def read(self, digest: Digest) -> bytes:
        if self.broken:
            raise ValueError("a client library's bug")
        return super().read(digest)


async def test_an_unexpected_error_in_a_fetch_is_logged_and_the_mount_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception no tier should raise, in the fetch ahead of a reader: it
    is logged with its traceback, the read fails (EIO at the kernel) instead
    of waiting, no fetch is left running, and once the tier is mended the
    same read gives the right bytes and the fetch runs ahead again."""
    broken = Broken("mem")
    async with dropped_file(tmp_path, monkeypatch, remote=broken) as d:
        fs, store, digest, data = d.fs, d.store, d.digest, d.data
        fh, _ = await fs.open(d.ino, os.O_RDONLY)
        broken.broken = True
        with trio.fail_after(10), pytest.raises(ValueError, match="client library"):
            await fs.read(fh, 0, 4096)
        await fetched(fs)
        assert "ahead of its readers failed" in caplog.text
        assert "Traceback" in caplog.text  # log.exception: a bug to report, with where
        assert here(store, digest) == 0
        broken.broken = False
        with trio.fail_after(10):
            assert bytes(await fs.read(fh, 0, 4096)) == data[:4096]
        await fetched(fs)
        assert here(store, digest) >= SPAN
        await fs.release(fh)
        await fetched(fs)
        assert fs.io.ahead._fetches == {}
        assert not store.needs_fsck and store.corruptions == 0


@pytest.mark.parametrize("size", [100_000, 1_000_000], ids=["published-on-the-loop", "in-a-thread"])
async def test_a_file_dropped_here_changed_in_place_is_published(tmp_path: Path, size: int) -> None:
    """``echo >> f`` of a file whose chunks were dropped here: the
    publication reads its old content from the tier (a small one too, which
    is published on the event loop, where the tiers are not asked: it moves
    to a worker thread), fsync and close succeed, no damage is recorded."""
    remote = Verifying("mem")
    data = os.urandom(size)
    with Store.open(tmp_path / "s", create=True, config=SMALL_CONFIG, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote, durable=True)])
        try:
            ops = Operations(fs)
            inode = fs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)
            fh, _ = await fs.open(inode.ino, os.O_RDWR)
            await fs.write(fh, 0, data)
            await fs.release(fh)
            await fs.flush_all()
            assert fs.remote.pusher is not None
            drain(fs.remote.pusher)
            assert drop_held(store, 0, fs.remote.tiers.held).chunks > 0
            store.chunks.cache.clear()
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                fh, _ = await fs.open(inode.ino, os.O_RDWR)
                await fs.write(fh, 10, b"XYZ")
                await ops.fsync(fh, False)
                await fs.write(fh, 20, b"ABC")
                await ops.release(fh)
                await fs.flush_all()
                nursery.cancel_scope.cancel()
            assert not store.needs_fsck and store.corruptions == 0
            expected = data[:10] + b"XYZ" + data[13:20] + b"ABC" + data[23:]
            assert store.read(fs.digest_of(inode.ino)) == expected
        finally:
            fs.close()


@pytest.mark.parametrize("cache", [None, 64 << 10], ids=["cache", "small-cache"])
async def test_a_read_of_chunks_dropped_here_is_served_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: int | None
) -> None:
    """The tier gives the chunks, the store cannot keep them (its disk is
    full): the read is served all the same (the bytes are right), as the
    engine's own reads are, instead of failing with ENOSPC; fetching only
    what the read needs, which a small cache of decoded chunks holds too."""
    async with dropped_file(tmp_path, monkeypatch) as d:
        if cache is not None:
            d.store.chunks.cache.capacity = cache  # --memory-limit 512K: an eighth of it
        full = StoreFullError("no space left on device")
        monkeypatch.setattr(_tiers, "restore_chunks", Mock(side_effect=full))
        monkeypatch.setattr(_tiers, "heal_chunk", Mock(side_effect=full))
        healer, asked = d.store.chunks.healer, []
        assert healer is not None

        def counted(chunk: bytes, size: int) -> bytes | None:
            asked.append(chunk)
            return healer(chunk, size)

        d.store.chunks.healer = counted
        ops = Operations(d.fs)
        fh, _ = await d.fs.open(d.ino, os.O_RDONLY)
        try:
            with trio.fail_after(20):
                for offset in (0, 4096, SIZE // 2, SIZE - 8192):
                    got = await ops.read(fh, offset, 4096)
                    assert bytes(got) == d.data[offset : offset + 4096]
        finally:
            await d.fs.release(fh)
        # Only the chunks each read needs: at most 4 KiB / their least size, and one.
        assert len(asked) <= 4 * ((4 << 10) // SMALL_CONFIG.chunking.min_size + 1)
        assert here(d.store, d.digest) == 0  # nothing could be stored
        assert not d.store.needs_fsck and d.store.corruptions == 0
