"""The engine's activity counters (``Store.activity()``), the publication
observer (``Store.on_publish``) and ``Store.disk_free()``: each counter moves by
exactly what the workload did, where that is known exactly."""

from __future__ import annotations

import logging
import random
import shutil
import threading
from pathlib import Path

import pytest

from cachefs.engine import Store, collect_garbage
from cachefs.format import journal as journal_format
from cachefs.format.digest import Digest
from cachefs.format.segment import (
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    RECORD_HEADER,
    list_segment_files,
)
from tests.conftest import compressible

KEYS = {
    "publications",
    "published_objects",
    "published_bytes",
    "publish_seconds",
    "ingested_bytes",
    "ingested_unique_bytes",
    "ingested_stored_bytes",
    "chunk_cache_hits",
    "chunk_cache_misses",
    "journal_checkpoints",
    "journal_bytes",
    "gc_runs",
    "gc_bytes_reclaimed",
    "gc_seconds",
}


def rand(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The counters that changed, by how much."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def compressed_chunks(store: Store, digest: Digest) -> list[bytes]:
    """The chunks of an object's recipe that are stored compressed, in order."""
    recipe = store.recipe(digest)
    with store.index.read() as txn:
        entries = [(chunk, store.index.get_chunk(txn, chunk)) for chunk, _ in recipe]
    return [
        chunk
        for chunk, entry in entries
        if entry is not None and entry.flags & COMPRESSION_MASK != COMPRESSION_NONE
    ]


def test_a_new_store_has_every_key_at_zero(store: Store) -> None:
    activity = store.activity()
    assert set(activity) == KEYS
    assert store.journal is not None
    assert activity["journal_bytes"] == journal_format.HEADER.size == store.journal.size
    assert all(value == 0 for key, value in activity.items() if key != "journal_bytes")
    assert store.on_publish is None


def test_publications_count_commits_objects_and_logical_bytes(store: Store) -> None:
    a, b, c = rand(30_000, 1), rand(5_000, 2), b"small"
    start = store.activity()
    store.put(a)
    store.put_many([(b, None, None), (c, None, None)])
    store.put(a)  # stored already: still a publication of an object
    store.sync()  # nothing to publish: no publication
    now = store.activity()
    assert now["publications"] - start["publications"] == 3
    assert now["published_objects"] - start["published_objects"] == 4
    assert now["published_bytes"] - start["published_bytes"] == 2 * len(a) + len(b) + len(c)
    assert now["publish_seconds"] > start["publish_seconds"]
    # Content whose digest is not the expected one is ingested, not published.
    wrong = Digest(b"\x00" * 32, 3)
    before = store.activity()
    store.put_many([(b"abc", wrong, None)])
    after = store.activity()
    assert moved(before, after) == {
        "ingested_bytes": 3,
        "ingested_unique_bytes": 3,
        "ingested_stored_bytes": RECORD_HEADER.size + 3,
    }


def test_ingest_counts_logical_unique_and_stored_bytes(store: Store) -> None:
    text = compressible(300_000, seed=3)
    noise = rand(200_000, 4)

    digest = store.put(text)
    activity = store.activity()
    stats = store.stats()
    assert len(store.recipe(digest)) > 10
    assert activity["ingested_bytes"] == len(text)
    # Every chunk was new: exactly what the index now holds, record headers included.
    assert activity["ingested_unique_bytes"] == stats.chunk_bytes == len(text)
    assert activity["ingested_stored_bytes"] == stats.stored_bytes
    assert activity["ingested_stored_bytes"] < len(text) / 2  # compressed

    # The same content again: logical bytes grow, unique and stored ones do not.
    store.put(text)
    again = store.activity()
    assert moved(activity, again).keys() == {
        "ingested_bytes",
        "publications",
        "published_objects",
        "published_bytes",
        "publish_seconds",
    }
    assert again["ingested_bytes"] == 2 * len(text)

    # Incompressible content: stored as it is, plus a record header per chunk.
    noisy = store.put(noise)
    after = store.activity()
    stats = store.stats()
    assert after["ingested_bytes"] == 2 * len(text) + len(noise)
    assert after["ingested_unique_bytes"] == stats.chunk_bytes == len(text) + len(noise)
    assert after["ingested_stored_bytes"] == stats.stored_bytes
    assert compressed_chunks(store, noisy) == []
    headers = after["ingested_stored_bytes"] - again["ingested_stored_bytes"] - len(noise)
    assert headers == len(store.recipe(noisy)) * RECORD_HEADER.size

    # A revision: its whole size is ingested, only the chunks around the change are new.
    changed = bytearray(noise)
    changed[100_000:100_010] = b"x" * 10
    before = store.activity()
    chunks_before = store.stats().chunk_bytes
    store.put_revision(
        noisy, len(changed), [(100_000, 100_010)], lambda s, e: [bytes(changed[s:e])]
    )
    after = store.activity()
    new_bytes = store.stats().chunk_bytes - chunks_before
    assert after["ingested_bytes"] - before["ingested_bytes"] == len(changed)
    assert 0 < after["ingested_unique_bytes"] - before["ingested_unique_bytes"] == new_bytes
    assert new_bytes < len(changed) / 2


def test_concurrent_puts_of_the_same_content_count_its_chunks_once(store: Store) -> None:
    data = rand(400_000, 5)
    threads = [threading.Thread(target=store.put, args=(data,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    activity = store.activity()
    stats = store.stats()
    assert stats.files == 8
    assert activity["published_objects"] == 8
    assert activity["ingested_bytes"] == 8 * len(data)
    assert activity["ingested_unique_bytes"] == stats.chunk_bytes == len(data)
    assert activity["ingested_stored_bytes"] == stats.stored_bytes
    assert 1 <= activity["publications"] <= 8


def test_chunk_cache_hits_and_misses(store: Store) -> None:
    text = compressible(200_000, seed=6)
    digest = store.put(text)
    compressed = compressed_chunks(store, digest)
    assert len(compressed) > 5 and len(set(compressed)) == len(compressed)
    start = store.activity()
    assert store.read(digest) == text
    first = store.activity()
    assert moved(start, first) == {"chunk_cache_misses": len(compressed)}
    assert store.read(digest) == text
    second = store.activity()
    assert moved(first, second) == {"chunk_cache_hits": len(compressed)}
    # A part of the object: only the chunks it touches.
    assert store.read(digest, 0, 10) == text[:10]
    third = store.activity()
    assert store.recipe(digest)[0][0] == compressed[0]
    assert moved(second, third) == {"chunk_cache_hits": 1}
    store.shrink()  # the cache is dropped: misses again
    assert store.read(digest) == text
    assert moved(third, store.activity()) == {"chunk_cache_misses": len(compressed)}

    # Raw chunks are read from the mappings: no cache lookup at all.
    noise = store.put(rand(100_000, 7))
    assert compressed_chunks(store, noise) == []
    before = store.activity()
    store.read(noise)
    store.read(noise)
    after = store.activity()
    assert (after["chunk_cache_hits"], after["chunk_cache_misses"]) == (
        before["chunk_cache_hits"],
        before["chunk_cache_misses"],
    )


def test_journal_counters(store: Store) -> None:
    journal = store.journal
    assert journal is not None
    start = store.activity()
    truncate = journal_format.FILE_TRUNCATE_PAYLOAD.pack(2, 0, 0)
    journal.append(journal_format.FILE_TRUNCATE, truncate)
    journal.append(journal_format.FILE_WRITE, b"head" * 6, b"some data")
    journal.commit()
    written = store.activity()
    # A record is a header and its payload.
    records = 2 * journal_format.RECORD.size + len(truncate) + len(b"head" * 6 + b"some data")
    assert moved(start, written) == {"journal_bytes": records}
    assert written["journal_bytes"] == journal.path.stat().st_size
    journal.checkpoint()
    journal.checkpoint()
    after = store.activity()
    assert after["journal_checkpoints"] == 2
    assert after["journal_bytes"] == journal.path.stat().st_size == journal_format.HEADER.size


def test_a_read_only_store_has_no_journal(store: Store, store_path: Path) -> None:
    store.put(b"content")
    store.close()
    with Store.open(store_path, readonly=True) as reader:
        activity = reader.activity()
        assert set(activity) == KEYS
        assert activity["journal_bytes"] == activity["journal_checkpoints"] == 0


def test_gc_counts_runs_reclaimed_bytes_and_time(store: Store) -> None:
    keep = store.put(rand(600_000, 8))
    gone = store.put(rand(1_500_000, 9))
    store.put(compressible(100_000, seed=10))
    files = {path: path.stat().st_size for _, path in list_segment_files(store.segments_root)}
    store.unref(gone)
    before = store.activity()
    report = collect_garbage(store)
    after = store.activity()
    freed = sum(size for path, size in files.items() if not path.exists())
    assert freed > 0
    assert report.bytes_reclaimed == freed
    assert after["gc_runs"] - before["gc_runs"] == 1
    assert after["gc_bytes_reclaimed"] - before["gc_bytes_reclaimed"] == freed
    assert after["gc_seconds"] > before["gc_seconds"]
    assert set(moved(before, after)) == {"gc_runs", "gc_bytes_reclaimed", "gc_seconds"}

    # Nothing left to collect: a run that frees nothing.
    again = collect_garbage(store)
    last = store.activity()
    assert again.bytes_reclaimed == 0
    assert last["gc_runs"] == after["gc_runs"] + 1
    assert last["gc_bytes_reclaimed"] == after["gc_bytes_reclaimed"]
    assert store.read(keep) == rand(600_000, 8)


def test_on_publish_is_told_of_each_publication_out_of_the_locks(store: Store) -> None:
    calls: list[tuple[float, int, int]] = []
    locked: list[bool] = []

    def observe(seconds: float, objects: int, size: int) -> None:
        locked.append(store.publisher.commit_lock.locked())
        calls.append((seconds, objects, size))

    store.on_publish = observe
    assert store.on_publish is observe
    a, b, c = rand(50_000, 11), rand(3_000, 12), b"c"
    store.put(a)
    store.put_many([(b, None, None), (c, None, None)])
    store.sync()
    assert [(objects, size) for _, objects, size in calls] == [
        (1, len(a)),
        (2, len(b) + len(c)),
    ]
    assert all(seconds > 0 for seconds, _, _ in calls)
    assert locked == [False, False]
    activity = store.activity()
    assert activity["publish_seconds"] == pytest.approx(sum(s for s, _, _ in calls))

    store.on_publish = None
    store.put(b"unobserved")
    assert len(calls) == 2


def test_on_publish_sees_every_object_of_concurrent_puts(store: Store) -> None:
    calls: list[tuple[float, int, int]] = []
    lock = threading.Lock()

    def observe(seconds: float, objects: int, size: int) -> None:
        with lock:
            calls.append((seconds, objects, size))

    store.on_publish = observe
    blobs = [rand(20_000 + i, 100 + i) for i in range(16)]
    threads = [threading.Thread(target=store.put, args=(blob,)) for blob in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    activity = store.activity()
    assert len(calls) == activity["publications"]
    assert sum(objects for _, objects, _ in calls) == len(blobs) == activity["published_objects"]
    assert sum(size for _, _, size in calls) == sum(map(len, blobs))


def test_a_failing_observer_does_not_fail_the_put(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(seconds: float, objects: int, size: int) -> None:
        raise RuntimeError("observer bug")

    store.on_publish = broken
    with caplog.at_level(logging.ERROR):
        digest = store.put(b"still stored")
    assert store.read(digest) == b"still stored"
    assert store.activity()["publications"] == 1
    assert "observer of publications failed" in caplog.text


def test_activity_reads_nothing_from_the_index(store: Store) -> None:
    store.put(compressible(50_000, seed=13))
    before = store.activity()
    store.close()  # the index and the journal are closed: the counters stay readable
    assert store.activity() == before


def test_disk_free(store: Store) -> None:
    free = store.disk_free()
    expected = shutil.disk_usage(store.path).free
    assert free > 0
    assert abs(free - expected) <= 16 << 20
