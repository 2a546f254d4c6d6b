"""The engine's paths off the common road: gc over damaged segments and on a
failing disk, stray segment files, the store's reserve on a full disk, and the
errors of opening a store the wrong way."""

from __future__ import annotations

import errno
import logging
import os
import random
from pathlib import Path

import pytest

from cachefs import faults
from cachefs.engine import (
    CachefsError,
    Digest,
    Store,
    StoreOptions,
    check_store,
    collect_garbage,
)
from cachefs.errors import ConfigError, StoreFullError, StoreNotFoundError
from cachefs.format.header import StoreConfig
from cachefs.format.segment import SEGMENT_SUFFIX, encode_segment_header
from tests.conftest import SMALL_CONFIG, flip_first_chunk


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
