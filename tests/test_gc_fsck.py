"""Garbage collection, compaction and the consistency checker.

gc: exactly the unreferenced chunks go, sparse segments are compacted, live
objects are untouched, and a crash at any step leaves a consistent store.
fsck: every kind of damage is found; repair drops exactly what lost data and
leaves a store that checks clean.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.engine import FsckReport, GcReport, Store, check_store, collect_garbage
from cachefs.errors import CorruptDataError, ReadOnlyError
from cachefs.format.digest import Digest
from cachefs.format.schema import ChunkEntry, ObjectEntry, SegmentEntry
from cachefs.format.segment import (
    RECORD_HEADER,
    list_segment_files,
    scan_segment,
    segment_path,
)
from tests import killpoints
from tests.conftest import SMALL_CONFIG, compressible, flip_first_chunk


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).digest(), len(data))


def chunks(store: Store) -> dict[bytes, ChunkEntry]:
    with store.index.read() as txn:
        return dict(store.index.iter_chunks(txn))


def segments(store: Store) -> dict[int, SegmentEntry]:
    with store.index.read() as txn:
        return dict(store.index.iter_segments(txn))


def segment_files(store: Store) -> dict[int, Path]:
    return dict(list_segment_files(store.segments_root))


def segment_file(store: Store, segment_id: int) -> Path:
    entry = segments(store)[segment_id]
    return segment_path(store.segments_root, entry.shard, segment_id, store.config.segments)


def object_refcounts(store: Store) -> dict[Digest, int]:
    with store.index.read() as txn:
        return {Digest(k, e.size): e.refcount for k, e in store.index.iter_objects(txn)}


def chunk_set(store: Store, digest: Digest) -> set[bytes]:
    return {chunk for chunk, _ in store.recipe(digest)}


def assert_clean(store: Store) -> FsckReport:
    report = check_store(store)
    assert report.problems == [], [str(p) for p in report.problems]
    return report


def assert_intact_after_reopen(store_path: Path, corpus: Corpus) -> None:
    with Store.open(store_path) as again:
        assert_reads_back(again, corpus)
        assert_clean(again)


def assert_files_match_index(store: Store) -> None:
    assert set(segment_files(store)) == set(segments(store))


@dataclass
class Corpus:
    """Objects with known sharing: ``x`` and ``y`` share their leading chunks."""

    data: dict[str, bytes]
    digests: dict[str, Digest]

    def items(self) -> Iterator[tuple[str, bytes, Digest]]:
        for name, data in self.data.items():
            yield name, data, self.digests[name]


def make_corpus(store: Store) -> Corpus:
    x = random.Random(10).randbytes(120_000)
    data = {
        "x": x,
        "y": x[:60_000] + random.Random(11).randbytes(50_000),
        "z": compressible(150_000, 12),
        "w": b"tiny object",
        "v": random.Random(13).randbytes(70_000),
    }
    digests = {name: store.put(blob) for name, blob in data.items()}
    for name, blob in data.items():
        assert digests[name] == digest_of(blob)
    return Corpus(data, digests)


def assert_reads_back(store: Store, corpus: Corpus, names: set[str] | None = None) -> None:
    for name, data, digest in corpus.items():
        if names is None or name in names:
            assert store.contains(digest), name
            assert store.read(digest) == data, name


# --- gc ----------------------------------------------------------------------------


def test_gc_removes_exactly_the_unreferenced_chunks(store: Store, store_path: Path) -> None:
    corpus = make_corpus(store)
    d = corpus.digests
    store.put(corpus.data["z"])  # z has two references now
    shared = chunk_set(store, d["x"]) & chunk_set(store, d["y"])
    assert shared, "x and y should share chunks"
    assert store.unref(d["x"]) is True
    assert store.unref(d["z"]) is False  # one reference left
    assert store.unref(d["v"]) is True
    survivors = {"y", "z", "w"}
    live_chunks = set().union(*(chunk_set(store, d[n]) for n in survivors))
    with store.index.read() as txn:
        recipes = {n: store.index.get_object(txn, d[n].hash) for n in corpus.data}
    assert recipes["x"] is None and recipes["v"] is None
    before = chunks(store)
    dead = {c for c, e in before.items() if e.refcount == 0}
    assert dead == set(before) - live_chunks
    assert shared <= live_chunks and not shared & dead
    stats_before = store.stats()
    segments_before = segments(store)
    files_before = segment_files(store)
    sizes_before = {s: p.stat().st_size for s, p in files_before.items()}

    # Which segments fall below the threshold once the dead chunks are gone.
    threshold = 0.99
    live_after = {s: e.live_bytes for s, e in segments_before.items()}
    for chunk in dead:
        live_after[before[chunk].segment_id] -= RECORD_HEADER.size + before[chunk].stored_len
    victims = {s for s, e in segments_before.items() if live_after[s] < threshold * e.length}
    assert victims and set(segments_before) - victims  # some are compacted, some not

    report = collect_garbage(store, threshold=threshold)

    after = chunks(store)
    assert set(after) == set(before) - dead
    assert report.chunks_removed == len(dead)
    removed_bytes = sum(RECORD_HEADER.size + before[c].stored_len for c in dead)
    assert report.stored_bytes_removed == removed_bytes
    for chunk, entry in after.items():
        assert entry.refcount == before[chunk].refcount
    stats = store.stats()
    assert stats.chunks == stats_before.chunks - len(dead)
    assert stats.chunk_bytes == stats_before.chunk_bytes - sum(before[c].raw_len for c in dead)
    assert stats.stored_bytes == stats_before.stored_bytes - removed_bytes
    assert (stats.objects, stats.files) == (3, 3)
    assert stats.logical_bytes == sum(len(corpus.data[n]) for n in ("y", "z", "w"))

    # Every victim segment was compacted (or deleted) and its file is gone.
    now = segments(store)
    assert not victims & set(now)
    for segment_id in victims:
        assert not files_before[segment_id].exists()
    assert set(segments_before) - victims <= set(now)
    assert report.segments_compacted + report.segments_deleted == len(victims)
    assert report.bytes_reclaimed == sum(sizes_before[s] for s in victims)
    assert report.bytes_reclaimed > 0
    assert report.skipped == []
    assert_files_match_index(store)

    assert_reads_back(store, corpus, survivors)
    assert_clean(store)
    store.close()
    with Store.open(store_path) as again:
        assert_reads_back(again, corpus, survivors)
        assert not again.contains(d["x"])
        assert_clean(again)


def test_gc_with_threshold_one_rewrites_every_segment(store: Store, store_path: Path) -> None:
    corpus = make_corpus(store)
    store.unref(corpus.digests["v"])
    old = segment_files(store)
    sizes = {s: p.stat().st_size for s, p in old.items()}
    report = collect_garbage(store, threshold=1.0)
    assert report.segments_compacted + report.segments_deleted == len(old)
    assert not set(old) & set(segments(store))
    assert all(not path.exists() for path in old.values())
    assert report.bytes_reclaimed == sum(sizes.values())
    assert_files_match_index(store)
    assert_reads_back(store, corpus, {"x", "y", "z", "w"})
    assert_clean(store)
    # Puts keep working after every active segment was compacted away.
    extra = random.Random(99).randbytes(50_000)
    assert store.read(store.put(extra)) == extra
    assert_clean(store)
    store.close()
    with Store.open(store_path) as again:
        assert_reads_back(again, corpus, {"x", "y", "z", "w"})
        assert again.read(digest_of(extra)) == extra
        assert_clean(again)


def test_gc_with_nothing_to_collect_is_a_no_op(store: Store) -> None:
    corpus = make_corpus(store)
    stats = store.stats().as_dict()
    files = {s: p.stat().st_size for s, p in segment_files(store).items()}
    index_before = (chunks(store), segments(store), object_refcounts(store))
    report = collect_garbage(store)
    assert report == GcReport()
    assert store.stats().as_dict() == stats
    assert {s: p.stat().st_size for s, p in segment_files(store).items()} == files
    assert (chunks(store), segments(store), object_refcounts(store)) == index_before
    assert_clean(store)
    assert_reads_back(store, corpus)


def test_gc_of_everything_leaves_an_empty_store(store: Store, store_path: Path) -> None:
    corpus = make_corpus(store)
    for digest in corpus.digests.values():
        assert store.unref(digest)
    report = collect_garbage(store)
    assert report.segments_deleted > 0
    stats = store.stats()
    assert (stats.objects, stats.files, stats.chunks, stats.stored_bytes) == (0, 0, 0, 0)
    assert (stats.segments, stats.chunk_bytes, stats.logical_bytes) == (0, 0, 0)
    assert segment_files(store) == {}
    assert_clean(store)
    # The store is usable again: the same objects go back in.
    for name, data, digest in corpus.items():
        assert store.put(data) == digest, name
    assert_reads_back(store, corpus)
    assert_clean(store)
    store.close()
    assert_intact_after_reopen(store_path, corpus)


def test_gc_makes_each_compaction_durable_before_deleting_the_old_segment(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fsync on, a machine crash must not undo a compaction transaction
    whose old segment was already deleted: the index is synced before unlink."""
    corpus = make_corpus(store)
    store.unref(corpus.digests["v"])
    events: list[str] = []
    real_sync = store.index.sync

    def recording_sync() -> None:
        events.append("sync")
        real_sync()

    monkeypatch.setattr(store.index, "sync", recording_sync)
    delete = store.segments.delete

    def recording_delete(segment_id: int, path: Path) -> int:
        events.append("unlink")
        return delete(segment_id, path)

    monkeypatch.setattr(store.segments, "delete", recording_delete)
    report = collect_garbage(store, threshold=1.0)
    assert report.segments_compacted + report.segments_deleted > 1
    assert "unlink" in events
    for i, event in enumerate(events):
        if event == "unlink":
            before = events[:i]
            last_unlink = max((j for j, e in enumerate(before) if e == "unlink"), default=-1)
            assert "sync" in before[last_unlink + 1 :], events


def test_gc_is_not_starved_by_a_stream_of_puts(store: Store) -> None:
    """Puts hold the maintenance lock shared while they ingest; three writers
    take turns so that one always does.  gc must still get its turn (it waits
    for the puts in flight, and new ones wait for it) instead of waiting for
    the writers to stop."""
    corpus = make_corpus(store)
    store.unref(corpus.digests["v"])
    stop = threading.Event()
    errors: list[BaseException] = []
    puts = [0, 0, 0]

    def slow_source(seed: int) -> Iterator[bytes]:
        rng = random.Random(seed)
        for _ in range(5):
            time.sleep(0.01)  # the put holds the lock shared meanwhile
            yield rng.randbytes(2000)

    def writer(n: int) -> None:
        time.sleep(n * 0.017)  # staggered: at any moment some put is ingesting
        try:
            while not stop.is_set():
                store.put(slow_source(n * 1_000_000 + puts[n]))
                puts[n] += 1
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in writers:
        thread.start()
    reports: list[GcReport] = []
    try:
        time.sleep(0.3)  # the stream flows
        during = sum(puts)
        collector = threading.Thread(target=lambda: reports.append(collect_garbage(store)))
        collector.start()
        collector.join(timeout=30)
        finished_while_writing = not collector.is_alive() and not stop.is_set()
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=60)
    collector.join(timeout=60)
    assert not errors, errors
    assert finished_while_writing, "gc waited until the writers stopped"
    assert reports and reports[0].chunks_removed > 0
    assert during > 0 and sum(puts) > during
    assert_clean(store)


def test_puts_inside_put_files_do_not_wait_for_a_pending_gc(store: Store, tmp_path: Path) -> None:
    """put_files holds the store shared across its yields; the caller may put
    meanwhile even while gc waits for its turn (the thread holds the lock)."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(random.Random(i).randbytes(5000))
    done: list[str] = []

    def caller() -> None:
        files = store.put_files(paths, batch_bytes=1)
        next(files)  # the generator holds the lock shared now
        collector = threading.Thread(
            target=lambda: done.append(str(collect_garbage(store))), daemon=True
        )
        collector.start()
        while not store.maintenance_pending:
            time.sleep(0.001)
        store.put(b"put while gc waits for put_files")  # must not wait for gc
        store.unref(store.put(b"and another"))
        done.extend(str(digest) for _, digest in files)
        collector.join()

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "a put inside put_files waited for gc: deadlock"
    assert len(done) == 3  # the rest of put_files, then gc
    assert_clean(store)


def test_gc_and_repair_need_a_writable_store(store: Store, store_path: Path) -> None:
    make_corpus(store)
    store.close()
    with Store.open(store_path, readonly=True) as reading:
        with pytest.raises(ReadOnlyError):
            collect_garbage(reading)
        with pytest.raises(ReadOnlyError):
            check_store(reading, repair=True)
        assert_clean(reading)


def test_progress_is_reported_up_to_the_total(store: Store) -> None:
    corpus = make_corpus(store)
    store.unref(corpus.digests["v"])
    for run in (
        lambda progress: collect_garbage(store, threshold=1.0, progress=progress),
        lambda progress: check_store(store, progress=progress),
    ):
        calls: list[tuple[int, int]] = []
        run(lambda done, total, calls=calls: calls.append((done, total)))
        assert calls
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
        assert len({total for _, total in calls}) == 1
        assert calls[-1][0] == calls[-1][1] > 0


# --- gc killed at every step --------------------------------------------------------

GC_CHILD = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from cachefs.engine import Store, collect_garbage
    from cachefs.engine import _gc as gc
    from cachefs.engine._index import Index
    from cachefs.engine._segments import SegmentStore, SegmentWriter

    store = Store.open(sys.argv[1])
    gc._BATCH = 3
    die_at({patch})
    collect_garbage(store, threshold=1.0)
    """
)

GC_KILL_POINTS = {
    "mid-drop": "Index, 'write', 2",  # first batch of dead chunks dropped
    "after-drop": "gc, '_drop_unreferenced', 1, True",
    "mid-copy": "SegmentWriter, 'append', 3, True",  # copies written, not synced
    "copies-synced": "SegmentStore, 'snapshot', 1, True",  # before the compaction txn
    "first-unlink": "SegmentStore, 'delete'",  # a compaction committed, old file still there
    "third-unlink": "SegmentStore, 'delete', 3",
    "after-publish": "SegmentStore, 'published', 2, True",
    "before-orphans": "gc, '_delete_orphans'",
}


@pytest.mark.parametrize("point", list(GC_KILL_POINTS))
def test_gc_killed_at_any_step_leaves_a_consistent_store(store_path: Path, point: str) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        corpus = make_corpus(store)
        for name in ("x", "v"):
            store.unref(corpus.digests[name])
        with store.index.read() as txn:
            assert sum(1 for _, e in store.index.iter_chunks(txn) if e.refcount == 0) > 3
    survivors = {"y", "z", "w"}
    code = inspect.getsource(killpoints) + GC_CHILD.format(patch=GC_KILL_POINTS[point])
    with subprocess.Popen(
        [sys.executable, "-c", code, str(store_path)], stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr  # the kill point was reached
    with Store.open(store_path) as store:
        assert_files_match_index(store)
        assert_reads_back(store, corpus, survivors)
        report = assert_clean(store)
        assert report.notes == []
        collect_garbage(store, threshold=1.0)
        assert all(e.refcount > 0 for e in chunks(store).values())
        assert_reads_back(store, corpus, survivors)
        assert_clean(store)
    with Store.open(store_path) as store:
        assert_reads_back(store, corpus, survivors)
        assert_clean(store)
        assert store.stats().files == len(survivors)


# --- fsck: injected damage -------------------------------------------------------


def shared_chunk(store: Store, corpus: Corpus) -> bytes:
    """A chunk of x that y also uses, and no other object."""
    d = corpus.digests
    others = set().union(*(chunk_set(store, d[n]) for n in ("z", "w", "v")))
    candidates = sorted((chunk_set(store, d["x"]) & chunk_set(store, d["y"])) - others)
    assert candidates
    return candidates[0]


def users_of(store: Store, corpus: Corpus, wanted: set[bytes]) -> set[str]:
    return {n for n, _, dg in corpus.items() if chunk_set(store, dg) & wanted}


Damage = Callable[[Store, Corpus], tuple[set[str], set[str]]]
"""Damage an open store; return (problem kinds expected, names of objects lost)."""


def flip_payload_byte(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    chunk = shared_chunk(store, corpus)
    entry = chunks(store)[chunk]
    path = segment_file(store, entry.segment_id)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER.size + entry.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    return {"damaged-record", "damaged-chunk", "lost-object"}, {"x", "y"}


def delete_segment_file(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    entry = chunks(store)[shared_chunk(store, corpus)]
    in_segment = {c for c, e in chunks(store).items() if e.segment_id == entry.segment_id}
    segment_file(store, entry.segment_id).unlink()
    return {"missing-segment", "missing-chunk", "lost-object"}, users_of(store, corpus, in_segment)


def damage_segment_header(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    """A flipped byte in a segment header: its records are intact, nothing is lost."""
    path = segment_file(store, chunks(store)[shared_chunk(store, corpus)].segment_id)
    with open(path, "r+b") as f:
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0x01]))
    return {"damaged-record"}, set()


def truncate_segment(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    """A segment cut short in the middle of a record: that record and those
    after it are lost."""
    entry = chunks(store)[shared_chunk(store, corpus)]
    cut = {
        c
        for c, e in chunks(store).items()
        if e.segment_id == entry.segment_id and e.offset >= entry.offset
    }
    with open(segment_file(store, entry.segment_id), "r+b") as f:
        f.truncate(entry.offset + 10)
    return {"damaged-record", "damaged-chunk", "lost-object"}, users_of(store, corpus, cut)


def refcount_too_high(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    chunk = shared_chunk(store, corpus)
    with store.index.write() as txn:
        entry = store.index.get_chunk(txn, chunk)
        assert entry is not None and entry.refcount == 2
        entry.refcount = 3
        store.index.put_chunk(txn, chunk, entry)
    return {"refcount"}, set()


def refcount_too_low(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    chunk = shared_chunk(store, corpus)
    with store.index.write() as txn:
        entry = store.index.get_chunk(txn, chunk)
        assert entry is not None
        entry.refcount = 1
        store.index.put_chunk(txn, chunk, entry)
    return {"refcount"}, set()


def wrong_segment_stats(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    segment_id = chunks(store)[shared_chunk(store, corpus)].segment_id
    with store.index.write() as txn:
        entry = store.index.get_segment(txn, segment_id)
        assert entry is not None
        entry.live_bytes += 100
        entry.live_records -= 1
        store.index.put_segment(txn, segment_id, entry)
    return {"segment-stats"}, set()


def recipe_names_missing_chunk(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    """An extra object "u" whose recipe is x's plus a chunk the index lacks."""
    missing = hashlib.sha256(b"no such chunk").digest()
    recipe = [*store.recipe(corpus.digests["x"]), (missing, 10)]
    size = sum(n for _, n in recipe)
    fake = Digest(hashlib.sha256(b"object u").digest(), size)
    with store.index.write() as txn:
        store.index.put_object(txn, fake.hash, ObjectEntry(size, 1, recipe))
        for chunk, _ in recipe[:-1]:
            entry = store.index.get_chunk(txn, chunk)
            assert entry is not None
            entry.refcount += 1
            store.index.put_chunk(txn, chunk, entry)
        store.index.add(txn, "objects", 1)
        store.index.add(txn, "files", 1)
        store.index.add(txn, "logical_bytes", size)
    corpus.digests["u"] = fake
    return {"lost-object"}, {"u"}


def recipe_does_not_add_up(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    digest = corpus.digests["w"]
    with store.index.write() as txn:
        entry = store.index.get_object(txn, digest.hash)
        assert entry is not None
        entry.chunks = [(c, n + 1) for c, n in entry.chunks]
        store.index.put_object(txn, digest.hash, entry)
    return {"bad-recipe", "lost-object"}, {"w"}


def recipe_lengths_shifted(store: Store, corpus: Corpus) -> tuple[set[str], set[str]]:
    """z's recipe moves a byte from its first chunk to its second: the lengths
    still add up, but no longer match the chunks."""
    digest = corpus.digests["z"]
    with store.index.write() as txn:
        entry = store.index.get_object(txn, digest.hash)
        assert entry is not None and len(entry.chunks) > 2
        (c0, n0), (c1, n1) = entry.chunks[:2]
        entry.chunks[:2] = [(c0, n0 + 1), (c1, n1 - 1)]
        store.index.put_object(txn, digest.hash, entry)
    return {"bad-recipe", "lost-object"}, {"z"}


DAMAGES: dict[str, Damage] = {
    "flipped-payload-byte": flip_payload_byte,
    "deleted-segment": delete_segment_file,
    "damaged-segment-header": damage_segment_header,
    "truncated-segment": truncate_segment,
    "refcount-too-high": refcount_too_high,
    "refcount-too-low": refcount_too_low,
    "segment-stats": wrong_segment_stats,
    "recipe-names-missing-chunk": recipe_names_missing_chunk,
    "recipe-does-not-add-up": recipe_does_not_add_up,
    "recipe-lengths-shifted": recipe_lengths_shifted,
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_fsck_finds_and_repairs_damage(store_path: Path, kind: str) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        corpus = make_corpus(store)
        assert_clean(store)
        kinds, lost = DAMAGES[kind](store, corpus)
    data = dict(corpus.data)
    with Store.open(store_path) as store:
        report = check_store(store)
        assert not report.clean
        assert {p.kind for p in report.problems} == kinds, [str(p) for p in report.problems]
        lost_digests = {corpus.digests[n] for n in lost}
        assert set(report.lost_objects) == lost_digests
        if "bad-recipe" not in kinds:  # (a bad recipe: see test_store_read_checks_recipe)
            for name in lost & set(data):
                with pytest.raises(CorruptDataError):
                    store.read(corpus.digests[name])

        repaired = check_store(store, repair=True)
        assert repaired.repaired
        assert set(repaired.lost_objects) == lost_digests
        assert {p.kind for p in repaired.problems} == kinds
        assert_clean(store)
        for digest in lost_digests:
            assert not store.contains(digest)
        survivors = set(data) - lost
        assert_reads_back(store, corpus, survivors)
        stats = store.stats()
        assert stats.objects == stats.files == len(survivors)
        assert stats.logical_bytes == sum(len(data[n]) for n in survivors)

        # The store keeps working: what was lost can be stored again, in every shard.
        for name in lost & set(data):
            assert store.put(data[name]) == corpus.digests[name]
        more = random.Random(5).randbytes(200_000)
        assert store.read(store.put(more)) == more
        assert_reads_back(store, corpus, set(data))
        assert_clean(store)
        collect_garbage(store, threshold=1.0)
        assert_clean(store)
    with Store.open(store_path) as store:
        assert_reads_back(store, corpus, set(data))
        assert_clean(store)


@pytest.mark.parametrize("damage", [delete_segment_file, truncate_segment], ids=["deleted", "cut"])
def test_put_after_data_loss_does_not_dedup_against_lost_chunks(
    store_path: Path, damage: Damage
) -> None:
    """A segment was lost while the store was closed (a disk error).  Before
    anyone runs fsck, a durable put of content that includes lost chunks must
    store them again (or refuse loudly): once it returns, the object reads back."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        corpus = make_corpus(store)
        _, lost = damage(store, corpus)
    assert "x" in lost
    with Store.open(store_path) as store:
        assert store.needs_fsck
        try:
            digest = store.put(corpus.data["x"])
        except CorruptDataError:
            return  # refusing to build on lost chunks is acceptable too
        assert store.read(digest) == corpus.data["x"]


def test_store_read_checks_recipe(store: Store) -> None:
    """A recipe whose lengths disagree with its chunks (damaged index): reads
    fail or return the right bytes, never wrong ones."""
    corpus = make_corpus(store)
    recipe_lengths_shifted(store, corpus)
    digest, data = corpus.digests["z"], corpus.data["z"]
    (_, first), (_, second) = store.recipe(digest)[:2]  # as the damaged recipe says
    ranges = [(0, None), (first - 1, 1), (first - 2, 4), (first, 5), (first + 3, second), (0, 9)]
    for offset, length in ranges:
        end = len(data) if length is None else offset + length
        try:
            got = store.read(digest, offset, length)
        except CorruptDataError:
            continue
        assert got == data[offset:end], f"read({offset}, {length}) returned wrong bytes"


def test_repair_of_a_segment_deleted_under_the_writer(store: Store, store_path: Path) -> None:
    """The active segment of a shard vanishes while the store is open; after
    repair, new chunks of that shard must not go to the deleted file."""
    corpus = make_corpus(store)
    segment_id = chunks(store)[shared_chunk(store, corpus)].segment_id
    shard = store.segments.shards[segments(store)[segment_id].shard]
    assert shard.writer is not None and shard.writer.segment_id == segment_id
    in_segment = {c for c, e in chunks(store).items() if e.segment_id == segment_id}
    lost = users_of(store, corpus, in_segment)
    segment_file(store, segment_id).unlink()
    report = check_store(store, repair=True)
    assert set(report.lost_objects) == {corpus.digests[n] for n in lost}
    for name in lost:
        assert store.put(corpus.data[name]) == corpus.digests[name]
    assert_reads_back(store, corpus)
    assert_clean(store)
    store.close()
    assert_intact_after_reopen(store_path, corpus)


@pytest.mark.parametrize(
    "counter", ["objects", "files", "logical_bytes", "chunks", "chunk_bytes", "stored_bytes"]
)
def test_fsck_finds_and_repairs_a_wrong_counter(store: Store, counter: str) -> None:
    corpus = make_corpus(store)
    right = store.stats().as_dict()
    with store.index.write() as txn:
        store.index.add(txn, counter, 7)
    report = check_store(store)
    assert [p.kind for p in report.problems] == ["counter"]
    assert counter in report.problems[0].message
    repaired = check_store(store, repair=True)
    assert repaired.repaired and repaired.lost_objects == []
    assert_clean(store)
    assert store.stats().as_dict() == right
    assert_reads_back(store, corpus)


def test_fsck_of_a_clean_store_is_clean(store: Store) -> None:
    corpus = make_corpus(store)
    report = assert_clean(store)
    assert report.clean and report.notes == [] and report.lost_objects == []
    assert report.objects_checked == len(corpus.data)
    assert report.chunks_checked == len(chunks(store)) == store.stats().chunks
    assert report.segments_checked == len(segments(store))
    assert report.records_checked == len(chunks(store))
    repaired = check_store(store, repair=True)
    assert repaired.clean and not repaired.repaired


# --- fsck beside a running writer ---------------------------------------------------

WRITER_CHILD = textwrap.dedent(
    """
    import random
    import sys

    from cachefs.engine import Store

    store = Store.open(sys.argv[1])
    rng = random.Random(7)
    print("ready", flush=True)
    n = 0
    while True:
        size = rng.choice([10, 3_000, 40_000, 200_000])
        digest = store.put(rng.randbytes(size))
        n += 1
        if n % 10 == 0:
            store.unref(digest)
        print(digest, flush=True)
    """
)


def test_read_only_fsck_beside_a_running_writer(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        make_corpus(store)
    acked: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, str(store_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            stdout = proc.stdout
            reader = threading.Thread(target=lambda: acked.extend(stdout), daemon=True)
            reader.start()
            for _ in range(5):
                # Let the writer get on between checks (and, often, during them).
                target = len(acked) + 5
                while len(acked) < target:
                    assert proc.poll() is None, "the writer stopped"
                    time.sleep(0.005)
                with Store.open(store_path, readonly=True) as reading:
                    report = check_store(reading)
                    assert report.problems == [], [str(p) for p in report.problems]
                    assert report.objects_checked > 0
            proc.kill()
            proc.wait()
            reader.join(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    with Store.open(store_path) as store:
        assert_clean(store)


COMPACTING_CHILD = textwrap.dedent(
    """
    import sys

    from cachefs.engine import Store, collect_garbage

    store = Store.open(sys.argv[1])
    print("ready", flush=True)
    assert sys.stdin.readline() == "gc\\n"
    report = collect_garbage(store, threshold=1.0)
    print("done", report.segments_compacted + report.segments_deleted, flush=True)
    sys.stdin.read()
    store.close()
    """
)


def test_read_only_fsck_does_not_report_what_gc_compacted_meanwhile(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc deletes a segment once the index stops naming it; a check whose
    snapshot still names it looks again in a fresh snapshot before reporting."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        corpus = make_corpus(store)
        for name in ("x", "v", "z"):
            store.unref(corpus.digests[name])  # segments for gc to compact
    with subprocess.Popen(
        [sys.executable, "-c", COMPACTING_CHILD, str(store_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        ran: list[str] = []

        def scan_after_gc(path: Path, limit: int | None = None) -> object:
            if not ran:  # gc runs once, between the snapshot and the first scan
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("gc\n")
                proc.stdin.flush()
                ran.append(proc.stdout.readline())
            return scan_segment(path, limit)

        monkeypatch.setattr("cachefs.engine._fsck.scan_segment", scan_after_gc)
        try:
            with Store.open(store_path, readonly=True) as reading:
                report = check_store(reading)
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
    assert ran and ran[0].startswith("done") and ran[0].split()[1] != "0", ran
    assert report.clean, [str(p) for p in report.problems]
    with Store.open(store_path) as store:
        assert_reads_back(store, corpus, {"y", "w"})
        assert_clean(store)


def test_damage_is_remembered_across_restarts_until_fsck_repairs_it(store_path: Path) -> None:
    data = random.Random(5).randbytes(100_000)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(data)
        path = flip_first_chunk(store, digest)
    with Store.open(store_path) as store:
        assert not store.needs_fsck
        with pytest.raises(CorruptDataError):
            store.read(digest)
        assert (store.needs_fsck, store.corruptions) == (True, 1)
    # A restart remembers it, and so does a read-only opener.
    for readonly in (True, False):
        with Store.open(store_path, readonly=readonly) as store:
            assert (store.needs_fsck, store.corruptions) == (True, 1)
            (recent,) = store.health.recent
            assert "checksum" in recent["message"] and recent["path"] == str(path)
    stats = subprocess.run(
        [sys.executable, "-m", "cachefs", "stats", "--json", str(store_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(stats.stdout)
    assert (doc["needs_fsck"], doc["corruptions"], doc["failsafe"]) == (True, 1, None)
    assert doc["recent_damage"][0]["path"] == str(path)
    text = subprocess.run(
        [sys.executable, "-m", "cachefs", "stats", str(store_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "NEEDS FSCK: 1 damaged reads" in text
    with Store.open(store_path, readonly=True) as store:
        report = check_store(store)
        assert not report.clean
        assert any("marked as needing fsck" in note for note in report.notes)
    with Store.open(store_path) as store:
        assert not check_store(store, repair=True).clean  # repaired
        assert not store.needs_fsck
    with Store.open(store_path) as store:
        assert (store.needs_fsck, store.corruptions, store.health.recent) == (False, 0, [])
        assert check_store(store).clean
    assert not (store_path / "health.json").exists()


def test_an_unreadable_health_record_means_the_store_needs_fsck(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(b"something")
    (store_path / "health.json").write_text("{not json")
    with Store.open(store_path) as store:
        assert store.needs_fsck
        check_store(store, repair=True)
    with Store.open(store_path) as store:
        assert not store.needs_fsck
