"""The trio facade: every engine call runs in a worker thread, the loop keeps serving."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cachefs.aio import AsyncStore
from cachefs.engine import Store
from cachefs.errors import CorruptDataError, ObjectNotFoundError
from cachefs.format.digest import Digest
from cachefs.format.segment import RECORD_HEADER, segment_path, shard_of
from tests.conftest import SMALL_CONFIG, compressible


def sha256_digest(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()}/{len(data)}"


def rand(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_open_put_read_close(store_path: Path) -> None:
    data = compressible(200_000) + rand(100_000)
    async with await AsyncStore.open(store_path, create=True, config=SMALL_CONFIG) as astore:
        digest = await astore.put(data)
        assert str(digest) == sha256_digest(data)
        assert await astore.read(digest) == data
        assert await astore.read(digest, 1000, 50_000) == data[1000:51_000]
        assert await astore.contains(digest)
        assert not await astore.contains(Digest(b"\0" * 32, 1))
        stats = await astore.stats()
        assert (stats.files, stats.objects, stats.logical_bytes) == (1, 1, len(data))
    # Closed on exit: the lock is free for the next writer.
    with Store.open(store_path) as store:
        assert store.read(digest) == data


async def test_put_stream_from_an_async_generator(store: Store) -> None:
    astore = AsyncStore(store)
    pieces = [rand(n, seed=n) for n in (1, 65_536, 1 << 20, 3, 2 << 20, 777_777, 0, 1 << 20)]
    pulled = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal pulled
        for piece in pieces:
            await trio.sleep(0)
            pulled += 1
            yield piece

    digest = await astore.put_stream(stream())
    data = b"".join(pieces)
    assert len(data) > 4 << 20
    assert pulled == len(pieces)
    assert str(digest) == sha256_digest(data)
    assert await astore.read(digest) == data


async def test_put_stream_error_publishes_nothing(store: Store) -> None:
    astore = AsyncStore(store)

    async def failing() -> AsyncIterator[bytes]:
        yield rand(100_000)
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        await astore.put_stream(failing())
    assert (await astore.stats()).files == 0


async def test_get_streams_pieces(store: Store) -> None:
    astore = AsyncStore(store)
    data = rand(500_000, seed=1)
    digest = await astore.put(data)
    pieces = [bytes(p) async for p in astore.get(digest)]
    assert len(pieces) > 10
    assert all(len(p) <= SMALL_CONFIG.chunking.max_size for p in pieces)
    assert b"".join(pieces) == data
    ranged = [bytes(p) async for p in astore.get(digest, 123_456, 100_000)]
    assert b"".join(ranged) == data[123_456:223_456]
    with pytest.raises(ObjectNotFoundError):
        [p async for p in astore.get(Digest(b"\1" * 32, 5))]


async def test_concurrent_puts_in_a_nursery(store: Store) -> None:
    astore = AsyncStore(store)
    shared = rand(100_000, seed=2)
    contents = [shared + rand(20_000, seed=10 + i) + compressible(30_000, seed=i) for i in range(8)]
    contents.append(contents[0])  # the same object twice, at the same time
    results: dict[int, Digest] = {}

    async def put(i: int) -> None:
        results[i] = await astore.put(contents[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(contents)):
            nursery.start_soon(put, i)

    for i, data in enumerate(contents):
        assert str(results[i]) == sha256_digest(data)
        assert await astore.read(results[i]) == data
    stats = await astore.stats()
    assert (stats.files, stats.objects) == (9, 8)
    assert stats.dedup_ratio > 1.5
    report = await astore.fsck()
    assert report.clean, report.problems


async def test_ref_unref_gc_and_fsck(store: Store) -> None:
    astore = AsyncStore(store)
    keep = await astore.put(rand(80_000, seed=3))
    drop = await astore.put(rand(80_000, seed=4))
    dropped_chunks = {c for c, _ in store.recipe(drop)}
    await astore.ref(keep)
    assert await astore.unref(drop) is True
    assert not await astore.contains(drop)
    report = await astore.gc()
    assert report.chunks_removed == len(dropped_chunks)
    assert report.stored_bytes_removed > 80_000
    stats = await astore.stats()
    assert (stats.files, stats.objects, stats.chunk_bytes) == (2, 1, 80_000)
    fsck = await astore.fsck()
    assert fsck.clean, fsck.problems
    assert fsck.objects_checked == 1
    assert await astore.read(keep) == rand(80_000, seed=3)


async def test_fsck_through_the_facade_finds_damage(store: Store) -> None:
    astore = AsyncStore(store)
    digest = await astore.put(rand(50_000, seed=5))
    chunk, _ = store.recipe(digest)[0]
    with store.index.read() as txn:
        entry = store.index.get_chunk(txn, chunk)
    assert entry is not None
    shard = shard_of(chunk, store.config.segments)
    path = segment_path(store.segments_root, shard, entry.segment_id, store.config.segments)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER.size + 7)
        byte = f.read(1)[0]
        f.seek(entry.offset + RECORD_HEADER.size + 7)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(CorruptDataError):
        await astore.read(digest)
    report = await astore.fsck()
    assert not report.clean
    assert {p.kind for p in report.problems} >= {"damaged-chunk", "lost-object"}
    assert report.lost_objects == [digest]


async def test_event_loop_keeps_running_during_a_big_put(default_store: Store) -> None:
    astore = AsyncStore(default_store)
    data = rand(50 << 20, seed=6)
    ticks = 0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            await trio.sleep(0.001)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0)
        start_ticks = ticks
        digest = await astore.put(data)
        put_ticks = ticks - start_ticks
        done.set()
    assert put_ticks >= 3
    assert digest.size == len(data)
    assert await astore.read(digest, 30 << 20, 100) == data[30 << 20 : (30 << 20) + 100]
