"""The engine's paths off the common road: gc over damaged segments and on a
failing disk, stray segment files, the store's reserve on a full disk, and the
errors of opening a store the wrong way."""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import random
import struct
import threading
from pathlib import Path

import lmdb
import pytest

from cachefs import faults, fsutil
from cachefs.engine import (
    CachefsError,
    Digest,
    Store,
    StoreOptions,
    _segments,
    check_store,
    collect_garbage,
    lmdb_error,
)
from cachefs.engine._index import Index
from cachefs.engine._reads import ChunkCache
from cachefs.engine._segments import SegmentMaps, SegmentWriter
from cachefs.errors import (
    ConfigError,
    CorruptDataError,
    IndexCorruptError,
    StoreFullError,
    StoreNotFoundError,
)
from cachefs.format.header import StoreConfig
from cachefs.format.segment import (
    RECORD_CHECKED,
    RECORD_HEADER,
    SEGMENT_SUFFIX,
    encode_record_header,
    encode_segment_header,
    record_checksum,
)
from tests.conftest import SMALL_CONFIG, compressible, flip_first_chunk


def _two_files(store: Store) -> tuple[bytes, bytes, Digest, Digest]:
    rng = random.Random(8)
    a, b = rng.randbytes(40_000), rng.randbytes(40_000)
    return a, b, store.put(a), store.put(b)


def test_gc_moves_past_damage_in_a_record_nothing_uses(store: Store) -> None:
    _a, b, da, db = _two_files(store)
    flip_first_chunk(store, da)
    assert store.unref(da)
    report = collect_garbage(store, threshold=1.0)
    assert not report.skipped and report.segments_compacted >= 1
    assert store.read(db) == b
    assert check_store(store).clean


def test_gc_leaves_a_segment_with_damaged_live_records_to_fsck(store: Store) -> None:
    _a, _b, da, db = _two_files(store)
    flip_first_chunk(store, db)
    assert store.unref(da)
    report = collect_garbage(store, threshold=1.0)
    assert any("damaged live records" in line for line in report.skipped), report.skipped
    assert store.needs_fsck


def test_gc_removes_a_stray_segment_file(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _two_files(store)
    stray = store.segments_root / "f" / "000000" / f"{9999:010d}{SEGMENT_SUFFIX}"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(encode_segment_header(15, 9999) + b"\0" * 100)
    report = collect_garbage(store)
    assert not stray.exists() and report.bytes_reclaimed >= 100
    assert store.segments.delete(9999, stray) == 0  # gone already: nothing freed
    assert "removing unpublished segment" in caplog.text


@pytest.mark.parametrize("point", ["index.commit", "gc.move", "segment.sync", "index.sync"])
def test_gc_on_a_failing_disk_stops_with_a_clear_error(store_path: Path, point: str) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        _a, b, da, db = _two_files(store)
        store.unref(da)
        faults.arm(point, "eio", repeat=True)
        try:
            with pytest.raises(CachefsError) as raised:
                collect_garbage(store, threshold=1.0)
        finally:
            faults.disarm()
        assert raised.value.errno == errno.EIO
        assert "Input/output error" in str(raised.value)
        assert store.read(db) == b
    with Store.open(store_path) as store:
        assert store.read(db) == b
        assert check_store(store).clean
        collect_garbage(store, threshold=1.0)  # the disk works again
        assert check_store(store).clean


def test_deleting_on_a_full_disk_uses_the_reserve(store: Store) -> None:
    _a, _b, da, db = _two_files(store)
    assert store.reserve.ensure() and store.reserve.held  # the mount sets it aside
    faults.arm("index.commit", "enospc")  # the first try only
    try:
        assert store.freeing(lambda: store.unref(da))
    finally:
        faults.disarm()
    assert not store.reserve.held and not store.reserve.path.exists()
    faults.arm("index.commit", "enospc", repeat=True)
    try:
        with pytest.raises(StoreFullError):  # no reserve left to give back
            store.freeing(lambda: store.unref(db))
    finally:
        faults.disarm()
    assert store.reserve.ensure() and store.reserve.held


def test_a_reserve_the_disk_cannot_hold_is_not_kept(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.reserve.release()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert not store.reserve.ensure()
    assert not store.reserve.held and not store.reserve.path.exists()
    assert not store.reserve.release()  # nothing to give back


def test_closing_a_store_whose_disk_fails_its_last_sync_warns(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(store_path, create=True, config=SMALL_CONFIG)
    store.put(b"x" * 10_000, durable=False)
    faults.arm("segment.sync", "eio", repeat=True)
    try:
        store.close()
    finally:
        faults.disarm()
    assert "could not sync on close" in caplog.text
    store.close()  # twice is harmless
    with pytest.raises(CachefsError, match="is closed"):
        store.check_writable()


@pytest.mark.parametrize(
    "options, message",
    [
        (StoreOptions(cache_size=-1), "must not be negative"),
        (StoreOptions(workers=0), "at least one worker"),
        (StoreOptions(gc_live_threshold=1.5), "fraction"),
    ],
)
def test_bad_store_options_are_refused(tmp_path: Path, options: StoreOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Store.open(tmp_path / "s", create=True, options=options)
    assert not (tmp_path / "s").exists()


def test_opening_a_store_the_wrong_way_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(ConfigError, match="read-only"):
        Store.open(tmp_path / "s", readonly=True, create=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(CachefsError, match="creating store directory"):
        Store.open(tmp_path / "file" / "s", create=True)
    with Store.open(tmp_path / "s", create=True, config=SMALL_CONFIG):
        pass
    with Store.open(tmp_path / "s", create=True, config=StoreConfig()) as store:
        assert store.config == SMALL_CONFIG  # an existing store keeps its own
    assert "using its own configuration" in caplog.text
    (tmp_path / "s" / "index.lmdb").rename(tmp_path / "index.lmdb")
    with pytest.raises(StoreNotFoundError, match="has no index"):
        Store.open(tmp_path / "s", readonly=True)
    (tmp_path / "index.lmdb").rename(tmp_path / "s" / "index.lmdb")
    (tmp_path / "s" / "lock").unlink()
    (tmp_path / "s" / "lock").mkdir()
    with pytest.raises(CachefsError, match="opening the lock"):
        Store.open(tmp_path / "s")


def test_the_chunk_cache_keeps_what_fits_most_recent_first() -> None:
    cache = ChunkCache(100)
    cache.put(b"huge", b"x" * 101)  # larger than the whole cache: not kept
    assert cache.get(b"huge") is None
    for key in (b"a", b"b", b"c"):
        cache.put(key, b"y" * 40)
    assert cache.get(b"a") is None and cache.get(b"c") == b"y" * 40  # a went first
    cache.put(b"b", b"z" * 10)  # replaced: its old size no longer counts
    cache.put(b"d", b"w" * 50)
    assert cache.get(b"b") == b"z" * 10 and cache.get(b"d") == b"w" * 50


def _entry_of_first_chunk(store: Store, digest: Digest) -> tuple[bytes, object]:
    chunk, _ = store.recipe(digest)[0]
    with store.index.read() as txn:
        entry = store.index.get_chunk(txn, chunk)
    assert entry is not None
    return chunk, entry


def test_damage_met_by_a_read_is_eio_and_counted(store: Store) -> None:
    """Every way the index and a segment can disagree: the read fails, never
    returns wrong bytes, and the store needs fsck."""
    text = compressible(200_000)
    packed = store.put(text)  # compressed chunks
    other = store.put(random.Random(9).randbytes(300_000))
    chunk, entry = _entry_of_first_chunk(store, packed)
    # A compressed chunk whose payload is not zstd, under a checksum that
    # matches (as a buggy writer would leave it): the codec still refuses it.
    path = store.segments.chunk_path(chunk, entry.segment_id)  # type: ignore[attr-defined]
    offset, stored_len = entry.offset, entry.stored_len  # type: ignore[attr-defined]
    with open(path, "r+b") as f:
        f.seek(offset)
        head = bytearray(f.read(RECORD_HEADER.size))
        payload = b"\xff" * stored_len
        struct.pack_into(
            "<Q", head, RECORD_CHECKED, record_checksum(bytes(head[:RECORD_CHECKED]), payload)
        )
        f.seek(offset)
        f.write(bytes(head) + payload)
    store.chunks.cache.clear()
    with pytest.raises(CachefsError, match="cannot decompress"):
        store.read(packed)
    assert store.needs_fsck
    # The index points a chunk at another chunk's record (of the same segment).
    with store.index.write() as txn:
        by_segment: dict[int, list[bytes]] = {}
        for digest, _ in store.recipe(other):
            found = store.index.get_chunk(txn, digest)
            assert found is not None
            by_segment.setdefault(found.segment_id, []).append(digest)
        first, second = next(ds for ds in by_segment.values() if len(set(ds)) > 1)[:2]
        moved, target = store.index.get_chunk(txn, first), store.index.get_chunk(txn, second)
        assert moved is not None and target is not None
        moved.offset, moved.stored_len, moved.flags = target.offset, target.stored_len, target.flags
        store.index.put_chunk(txn, first, moved)
    with pytest.raises(CachefsError, match="does not hold chunk"):
        store.read(other)
    # A chunk the recipe names that the index lost; a recipe that does not add up.
    with store.index.write() as txn:
        store.index.delete_chunk(txn, chunk)
    with pytest.raises(CachefsError, match="missing from the index"):
        store.read(packed)
    whole = store.put(b"whole" * 1000)
    with store.index.write() as txn:
        obj = store.index.get_object(txn, whole.hash)
        assert obj is not None
        obj.chunks[0] = (obj.chunks[0][0], obj.chunks[0][1] + 1)
        store.index.put_object(txn, whole.hash, obj)
    with pytest.raises(CachefsError, match="does not add up"):
        store.read(whole)


def test_segment_files_that_cannot_be_made_or_read(tmp_path: Path) -> None:
    """A segment that cannot be created leaves nothing behind; one shorter
    than a record needs, or gone, is damage for the read that meets it."""
    path = tmp_path / "a" / "b" / "0000000001.seg"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CachefsError, match="opening segment"):
        SegmentWriter(blocker / "x.seg", 0, 1, create=True)
    writer = SegmentWriter(path, 0, 1, create=True)
    offset = writer.append(b"", b"payload")
    writer.sync()
    writer.sync()  # nothing new: no second fdatasync
    writer.close()
    writer.close()
    maps = SegmentMaps(max_maps=1)
    with pytest.raises(CorruptDataError, match="truncated"):
        maps.read(1, path, offset, 1 << 20)
    with pytest.raises(CorruptDataError, match="missing"):
        maps.read(2, tmp_path / "gone.seg", 0, 10)
    # One mapping at most; pages dropped past the resident limit; reads go on.
    records = []
    for number in (3, 4):
        payload = f"record of segment {number}".encode()
        head = encode_record_header(1, 0, len(payload), bytes([number]) * 32, payload)
        at = tmp_path / f"{number:010d}.seg"
        made = SegmentWriter(at, 0, number, create=True)
        records.append((number, at, made.append(head, payload), payload))
        made.close()
    maps = SegmentMaps(max_maps=1, resident_limit=4)
    for _ in range(2):
        for number, at, where, payload in records:
            assert bytes(maps.read(number, at, where, len(payload)).payload) == payload


def _mapped_kib(path: Path) -> int:
    """The resident KiB of this process's mappings of ``path`` (smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_record_s_pages_are_mapped_in_one_call_where_the_kernel_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a record is read, its pages are mapped with MADV_POPULATE_READ
    (not a page fault every few pages); a kernel that does not know the
    advice (EINVAL) is not asked again, and reads go on as before."""
    path = tmp_path / "0000000001.seg"
    writer = SegmentWriter(path, 0, 1, create=True)
    payload = os.urandom(1 << 20)
    head = encode_record_header(1, 0, len(payload), bytes(32), payload)
    offset = writer.append(head, payload)
    writer.close()
    maps = SegmentMaps()
    mapping, _ = maps._map(1, path, offset + len(head) + len(payload))
    assert _mapped_kib(path) < 512
    maps._map_pages(mapping, offset, offset + len(head) + len(payload))
    assert maps._populate
    assert _mapped_kib(path) >= 1024  # mapped, though nothing touched them
    assert bytes(maps.read(1, path, offset, len(payload)).payload) == payload

    monkeypatch.setattr(_segments, "MADV_POPULATE_READ", 0x7FFF)  # advice no kernel has
    maps = SegmentMaps()
    for _ in range(2):
        assert bytes(maps.read(1, path, offset, len(payload)).payload) == payload
        assert not maps._populate


def test_a_growing_segment_starts_its_writeback_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every WRITEBACK_STEP appended bytes, the writeback of what was appended
    since the last one is started (so that a sync has little left to wait
    for): the ranges follow each other, and the bytes are as written."""
    started: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        fsutil.start_writeback(fd, offset, length)

    monkeypatch.setattr(_segments, "WRITEBACK_STEP", 10_000)
    monkeypatch.setattr(_segments, "start_writeback", record)
    path = tmp_path / "0000000001.seg"
    writer = SegmentWriter(path, 0, 1, create=True)
    head_end = writer.length
    pieces = [os.urandom(random.randrange(1, 6000)) for _ in range(40)]
    for piece in pieces:
        writer.append(b"", piece)
    writer.sync()
    writer.close()
    assert path.read_bytes()[head_end:] == b"".join(pieces)
    assert started and started[0][0] == head_end
    assert all(length >= 10_000 for _, length in started)
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(started))
    assert sum(n for _, n in started) > writer.length - head_end - 10_000
    fsutil.start_writeback(-1, 0, 1)  # a hint: a bad descriptor raises nothing


def test_dirty_segments_are_synced_together_and_a_failed_sync_fails_the_put(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable put whose chunks went to several shards' segments syncs them
    in parallel threads; when one sync fails, the put fails with that error,
    and what was stored before is intact."""
    synced: list[tuple[int, str]] = []
    sync = SegmentWriter.sync

    def record(writer: SegmentWriter) -> int:
        synced.append((writer.segment_id, threading.current_thread().name))
        return sync(writer)

    monkeypatch.setattr(SegmentWriter, "sync", record)
    data = os.urandom(4 << 20)
    with Store.open(store_path, create=True) as store:  # the default: 16 shards
        digest = store.put(data)
        in_parallel = {s for s, name in synced if name.startswith("cachefs-sync")}
        assert len(in_parallel) > 1
        faults.arm("segment.sync", "eio", at=2)
        failed = os.urandom(4 << 20)
        try:
            with pytest.raises(CachefsError, match="syncing segment"):
                store.put(failed)
        finally:
            faults.disarm()
        assert not store.contains(Digest(hashlib.sha256(failed).digest(), len(failed)))
    with Store.open(store_path) as store:
        assert store.read(digest) == data
        assert store.stats().objects == 1


def test_lmdb_errors_become_cachefs_errors(store: Store) -> None:
    assert isinstance(lmdb_error(lmdb.MapFullError("full"), "x"), StoreFullError)
    assert isinstance(lmdb_error(lmdb.Error("No space left on device"), "x"), StoreFullError)
    assert isinstance(lmdb_error(lmdb.CorruptedError("bad"), "x"), IndexCorruptError)
    incompatible = lmdb_error(lmdb.VersionMismatchError("v"), "x")
    assert isinstance(incompatible, CorruptDataError) and "incompatible LMDB" in str(incompatible)
    other = lmdb_error(lmdb.Error("strange"), "reading")
    assert type(other) is CachefsError and "index error while reading" in str(other)
    with pytest.raises(CachefsError, match="already open in this process"):
        Index(store.path, readonly=True)
