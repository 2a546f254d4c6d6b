"""Checksummed metadata: every index value is sealed, damage never passes silently.

LMDB keeps no checksums of its own; a flipped bit in an entry of the index
used to give a wrong name or wrong metadata that fsck did not notice.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner

from cachefs.cli import cli
from cachefs.cli import fsck as fsck_cli
from cachefs.engine import (
    CacheRecords,
    Namespace,
    Store,
    StoreOptions,
    _index,
    check_store,
    collect_garbage,
)
from cachefs.errors import CachefsError, FormatVersionError, IndexCorruptError
from cachefs.format.schema import (
    CACHE_DATABASES,
    INDEX_NAME,
    INO_KEY,
    NAMESPACE_DATABASES,
    REBUILT_TABLES,
    ROOT_INODE,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SEGMENT_KEY,
    STORE_SETTINGS,
    seal,
    unseal,
)
from tests.conftest import SMALL_CONFIG, compressible, strip_seals
from tests.mounting import mounted


def damage_entry(store_path: Path, db: bytes, key: bytes) -> None:
    """Flip a bit of one value of the (closed) store's index."""
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32, map_size=1 << 40)
    try:
        handle = env.open_db(db)
        with env.begin(write=True) as txn:
            value = txn.get(key, db=handle)
            assert value is not None
            raw = bytearray(value)
            raw[0] ^= 0x10
            txn.put(key, bytes(raw), db=handle)
    finally:
        env.close()


def test_a_sealed_value_round_trips_and_any_flipped_bit_fails_it() -> None:
    key, value = b"key", b"the value of an entry"
    sealed = seal(key, value)
    assert unseal(key, sealed) == value
    for bit in range(len(sealed) * 8):
        flipped = bytearray(sealed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert unseal(key, bytes(flipped)) is None
    assert unseal(b"kez", sealed) is None  # the key is covered too
    assert unseal(key, b"short") is None


def test_a_damaged_object_entry_is_an_error_then_repaired(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        kept = store.put(compressible(50_000, 1))
        damaged = store.put(compressible(60_000, 2))
    damage_entry(store_path, b"objects", damaged.hash)
    with Store.open(store_path) as store:
        with pytest.raises(IndexCorruptError, match=f"objects/{damaged.hash.hex()}"):
            store.read(damaged)
        assert store.needs_fsck and store.corruptions == 1
        assert store.read(kept) == compressible(50_000, 1)
    with Store.open(store_path, readonly=True) as store:
        report = check_store(store)
        assert [p.kind for p in report.problems] == ["bad-entry"]
        assert damaged.hash.hex() in report.problems[0].message
    with Store.open(store_path) as store:
        report = check_store(store, repair=True)
        assert "bad-entry" in {p.kind for p in report.problems}
        assert not store.contains(damaged)
        assert store.read(kept) == compressible(50_000, 1)
    with Store.open(store_path) as store:
        assert check_store(store).clean
        assert not store.needs_fsck
        assert store.put(compressible(60_000, 2)) == damaged  # stored again


def test_get_many_is_get_of_each_and_checks_every_seal(store_path: Path) -> None:
    """``Table.get_many`` (a server's batch of lookups) answers what ``get``
    does for each key, present or not, and a damaged entry is an error."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digests = [store.put(compressible(20_000, seed)) for seed in range(5)]
    damage_entry(store_path, b"objects", digests[2].hash)
    with Store.open(store_path) as store:
        table = store.index.objects
        keys = [d.hash for d in digests if d != digests[2]] + [b"\1" * 32]
        with store.index.read() as txn:
            assert table.get_many(txn, keys) == [table.get(txn, k) for k in keys]
            assert table.get_many(txn, keys)[-1] is None
            with pytest.raises(IndexCorruptError, match=f"objects/{digests[2].hash.hex()}"):
                table.get_many(txn, [digests[0].hash, digests[2].hash])


def test_a_damaged_segment_entry_is_rebuilt_from_its_file(store_path: Path) -> None:
    data = [compressible(40_000, seed) for seed in range(6)]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digests = [store.put(d) for d in data]
        with store.index.read() as txn:
            segment_id = next(iter(store.index.iter_segments(txn)))[0]
    damage_entry(store_path, b"segments", SEGMENT_KEY.pack(segment_id))
    damage_entry(store_path, b"counters", b"next_segment_id")
    with Store.open(store_path, readonly=True) as store:
        assert {p.kind for p in check_store(store).problems} == {"bad-entry"}
    with Store.open(store_path) as store:
        check_store(store, repair=True)
        assert [store.read(d) for d in digests] == data  # nothing lost
        with store.index.read() as txn:
            ids = [i for i, _ in store.index.iter_segments(txn)]
            assert store.index.counter(txn, "next_segment_id") > max(ids)
        report = check_store(store)
        assert report.clean, [str(p) for p in report.problems]
        store.put(b"more after the repair" * 1000)
        assert check_store(store).clean


def run_fsck(store: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachefs", "fsck", *options, str(store)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize("table", [b"chunks", b"objects", b"segments", b"counters", b"recipes"])
def test_an_index_that_lost_a_table_is_damaged_not_made_anew(
    store_path: Path, table: bytes
) -> None:
    """A flipped bit in the index's main database can lose a table's record
    (seen in the flip experiment: ``mdb_dbi_open: MDB_NOTFOUND``).  Every open
    says the index is damaged, with the remedy; a writer does not make the
    table anew (empty: every chunk of the store would be lost)."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(compressible(40_000, 1))
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(table, txn=txn), delete=True)
    env.close()
    remedy = "fsck --repair" if table in REBUILT_TABLES else "restore index.lmdb"
    for readonly in (True, False):
        with pytest.raises(IndexCorruptError, match=f"damaged: its table {table.decode()}") as e:
            Store.open(store_path, readonly=readonly)
        assert remedy in (e.value.hint or "")
    fsck = run_fsck(store_path)
    assert fsck.returncode == IndexCorruptError.exit_code and "damaged" in fsck.stderr, fsck
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=16, readonly=True)
    with env.begin() as txn:
        assert txn.get(table) is None  # not made again
    env.close()


def drop_tables(store_path: Path, *tables: bytes) -> None:
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32)
    with env.begin(write=True) as txn:
        for table in tables:
            txn.drop(env.open_db(table, txn=txn), delete=True)
    env.close()


@pytest.mark.parametrize("lost", [(b"segments",), (b"counters",), (b"segments", b"counters")])
def test_fsck_repair_rebuilds_a_lost_segments_or_counters_table(
    store_path: Path, lost: tuple[bytes, ...]
) -> None:
    """``segments`` and ``counters`` say nothing the segment files and the
    other tables do not: ``fsck --repair`` makes them whole again (each
    segment's entry from its file, the counters recounted) where the only
    remedy was a backup.  Nothing stored is lost, and the store goes on."""
    data = [random.Random(n).randbytes(120_000) for n in range(3)]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digests = [store.put(d) for d in data]
        namespace = Namespace(store)
        made = [
            namespace.create(ROOT_INODE, b"f%d" % n, stat.S_IFREG | 0o644, 0, 0) for n in (1, 2)
        ]
        with store.index.read() as txn:
            counters = store.index.counters_dict(txn)
            segments = dict(store.index.iter_segments(txn))
    drop_tables(store_path, *lost)
    check = run_fsck(store_path)
    assert check.returncode == IndexCorruptError.exit_code and "fsck --repair" in check.stderr
    repair = run_fsck(store_path, "--repair")
    assert repair.returncode == 1, repair  # problems found, all repaired
    for table in lost:
        assert f"had lost its table {table.decode()}" in repair.stdout, repair
    again = run_fsck(store_path)
    assert again.returncode == 0, again
    with Store.open(store_path) as store:
        assert [store.read(d) for d in digests] == data
        with store.index.read() as txn:
            assert store.index.counters_dict(txn) == counters
            assert dict(store.index.iter_segments(txn)) == segments
        # New inodes and segments do not reuse numbers in use.
        inode = Namespace(store).create(ROOT_INODE, b"after", stat.S_IFREG | 0o644, 0, 0)
        assert inode.ino > max(m.ino for m in made)
        store.put(random.Random(9).randbytes(120_000))
        assert check_store(store).clean


def test_a_root_made_again_gives_out_no_inode_number_in_use(store_path: Path) -> None:
    """fsck drops a damaged root inode and the namespace makes it again: that
    used to set the next inode back to 2, so the next file took the number
    (and replaced the inode) of a file that was there."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        namespace = Namespace(store)
        made = [
            namespace.create(ROOT_INODE, b"f%d" % n, stat.S_IFREG | 0o644, 0, 0) for n in (1, 2)
        ]
    damage_entry(store_path, b"inodes", INO_KEY.pack(ROOT_INODE))
    assert run_fsck(store_path, "--repair").returncode == 1
    with Store.open(store_path) as store:
        namespace = Namespace(store)
        new = namespace.create(ROOT_INODE, b"new", stat.S_IFREG | 0o644, 0, 0)
        assert new.ino > max(m.ino for m in made)
        assert [namespace.get(m.ino).ino for m in made] == [m.ino for m in made]


def test_damaged_counters_beside_damaged_entries_they_are_counted_from(store_path: Path) -> None:
    """The next inode and segment are counted again once every damaged entry
    is dropped: counted before, a damaged inode or segment entry made every
    repair fail on it (and the hint said to run the repair)."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(random.Random(4).randbytes(100_000))
        namespace = Namespace(store)
        made = [
            namespace.create(ROOT_INODE, b"f%d" % n, stat.S_IFREG | 0o644, 0, 0) for n in (1, 2)
        ]
        with store.index.read() as txn:
            segment = next(iter(dict(store.index.iter_segments(txn))))
    for db, key in [
        (b"counters", b"next_inode"),
        (b"counters", b"next_segment_id"),
        (b"inodes", INO_KEY.pack(made[0].ino)),
        (b"segments", SEGMENT_KEY.pack(segment)),
    ]:
        damage_entry(store_path, db, key)
    assert run_fsck(store_path, "--repair").returncode == 1
    assert run_fsck(store_path).returncode == 0
    with Store.open(store_path) as store:
        new = Namespace(store).create(ROOT_INODE, b"new", stat.S_IFREG | 0o644, 0, 0)
        assert new.ino > max(m.ino for m in made)


def test_a_rebuilt_index_leaves_a_segment_without_records_to_the_writer(store_path: Path) -> None:
    """A segment file with no intact record (a writer that died right after
    making it) gets no entry: the writer's open deletes it as before."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(random.Random(3).randbytes(100_000))
        some = next(iter((store_path / "segments").rglob("*.seg")))
    leftover = some.with_name("9999999999.seg")
    leftover.write_bytes(some.read_bytes()[:48])  # a header, no record
    drop_tables(store_path, b"segments")
    with (
        Store.open(store_path, options=StoreOptions(recover_index=True)) as store,
        store.index.read() as txn,
    ):
        assert 9999999999 not in dict(store.index.iter_segments(txn))
    with Store.open(store_path) as store:
        assert not leftover.exists() and store.read(digest)
        assert check_store(store).clean


def test_a_repair_stopped_after_its_open_leaves_a_whole_index(store_path: Path) -> None:
    """The lost tables are made whole in the transaction that makes them: a
    repair stopped right after its open leaves an index that any writer can
    use (an empty ``segments`` would have made it delete every segment file
    as unpublished, and entries with no live records would be gc's)."""
    data = random.Random(1).randbytes(300_000)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(data)
    files = {p: p.read_bytes() for p in (store_path / "segments").rglob("*") if p.is_file()}
    drop_tables(store_path, b"segments", b"counters")
    with Store.open(store_path, options=StoreOptions(recover_index=True)) as store:
        assert store.index.rebuilt_tables == {b"segments", b"counters"}  # and it stops here
    with Store.open(store_path) as store:
        assert not store.index.rebuilt_tables
        assert {p: p.read_bytes() for p in files} == files  # none deleted or cut
        assert store.read(digest) == data
        assert check_store(store).clean
        collect_garbage(store)  # live figures from the chunk entries: nothing dropped
        assert store.read(digest) == data


@pytest.mark.parametrize("damage", ["a chunk entry", "a segment's header"])
def test_a_lost_table_beside_damage_is_made_from_what_is_intact(
    store_path: Path, damage: str
) -> None:
    """Entries that fail their seals are left out of the recount (fsck drops
    them after), and a segment whose header is damaged still gets its entry
    from the chunk entries that name it: its intact records are kept."""
    data = [random.Random(n).randbytes(100_000) for n in range(4)]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digests = [store.put(d) for d in data]
        with store.index.read() as txn:
            damaged, entry = next(iter(store.index.iter_chunks(txn)))
            path = store.segments.chunk_path(damaged, entry.segment_id)
    if damage == "a chunk entry":
        damage_entry(store_path, b"chunks", damaged)
    else:
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0x40]))
    drop_tables(store_path, b"segments", b"counters")
    repair = run_fsck(store_path, "--repair")
    assert repair.returncode == 1 and "had lost its table segments" in repair.stdout, repair
    assert run_fsck(store_path).returncode == 0
    with Store.open(store_path, readonly=True) as store:
        readable = []
        for d, expected in zip(digests, data, strict=True):
            with contextlib.suppress(CachefsError):
                readable.append(store.read(d) == expected)
    if damage == "a chunk entry":  # what needed the damaged chunk is lost, nothing else
        assert readable.count(True) == len(data) - 1 and False not in readable
    else:
        assert readable == [True] * len(data)


@pytest.mark.parametrize("other", [b"objects", b"inodes"])
def test_a_lost_table_beside_another_lost_one_is_refused_with_nothing_written(
    store_path: Path, other: bytes
) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(compressible(40_000, 1))
        Namespace(store).create(ROOT_INODE, b"file", stat.S_IFREG | 0o644, 0, 0)
    drop_tables(store_path, b"segments", other)
    before = index_contents(store_path)
    with pytest.raises(IndexCorruptError, match=other.decode()) as e:
        Store.open(store_path, options=StoreOptions(recover_index=True))
    assert "restore index.lmdb" in (e.value.hint or "")
    repair = run_fsck(store_path, "--repair")
    assert repair.returncode == IndexCorruptError.exit_code, repair
    assert index_contents(store_path) == before


def index_contents(store_path: Path) -> dict[bytes, dict[bytes, bytes]]:
    """Every entry of every table of the (closed) store's index, as stored."""
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32, readonly=True)
    try:
        with env.begin() as txn:
            names = [bytes(name) for name in txn.cursor().iternext(values=False)]
        out = {}
        for name in names:
            handle = env.open_db(name, create=False)
            with env.begin(db=handle) as txn:
                out[name] = {bytes(k): bytes(v) for k, v in txn.cursor()}
        return out
    finally:
        env.close()


@pytest.mark.parametrize("loss", ["the meta table", "the version"])
def test_an_index_that_lost_its_schema_version_is_damaged_not_sealed_again(
    store_path: Path, loss: str
) -> None:
    """An index that records no schema version was taken for a new one: a
    writer made ``meta`` anew, then sealed every value a second time (the
    upgrade to schema 4), and every entry of the store failed to parse after.
    Now every open says the index is damaged, and nothing is written."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(compressible(40_000, 1))
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        if loss == "the meta table":
            txn.drop(meta, delete=True)
        else:
            assert txn.delete(SCHEMA_VERSION_KEY, db=meta)
    env.close()
    before = index_contents(store_path)
    for readonly in (True, False):
        with pytest.raises(IndexCorruptError, match="records no schema version") as e:
            Store.open(store_path, readonly=readonly)
        assert "fsck --repair" in (e.value.hint or "")
    fsck = run_fsck(store_path)
    assert fsck.returncode == IndexCorruptError.exit_code, fsck
    assert "no schema version" in fsck.stderr, fsck
    assert index_contents(store_path) == before


def lose_version(store_path: Path, *tables: bytes, key_only: bool = False) -> None:
    """Drop the (closed) store's ``meta`` table (or only its version) and ``tables``."""
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        if key_only:
            assert txn.delete(SCHEMA_VERSION_KEY, db=meta)
        else:
            txn.drop(meta, delete=True)
        for name in tables:
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()


@pytest.mark.parametrize("key_only", [False, True])
@pytest.mark.parametrize("layout", ["sealed", "schema 4", "unsealed"])
def test_fsck_repair_records_a_lost_schema_version_from_the_entries(
    store_path: Path, layout: str, key_only: bool
) -> None:
    """``fsck --repair`` records the version again: this one's where entries
    are sealed (every later schema only allows more; a schema 4 index, which
    had no ``recipes``, gets it), the last unsealed one where none is (the
    writer's upgrade then seals them).  Nothing is lost."""
    data = [compressible(40_000, seed) for seed in range(3)]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digests = [store.put(d) for d in data]
        file = Namespace(store).create(ROOT_INODE, b"file", stat.S_IFREG | 0o644, 0, 0).ino
    if layout == "unsealed":
        strip_seals(store_path)
    lose_version(store_path, *([b"recipes"] if layout == "schema 4" else []), key_only=key_only)
    repair = run_fsck(store_path, "--repair")
    assert repair.returncode == 1 and "problems repaired" in repair.stdout, repair
    said = "recorded 3 again from its entries, then upgraded to" if layout == "unsealed" else (
        f"recorded {SCHEMA_VERSION} again from its entries"
    )  # fmt: skip
    assert said in repair.stdout, repair
    assert run_fsck(store_path).returncode == 0
    with Store.open(store_path, readonly=True) as store:
        assert store.index.schema_version == SCHEMA_VERSION and store.index.sealed
        assert store.index.recipes is not None
        assert [store.read(d) for d in digests] == data
        assert Namespace(store).lookup(ROOT_INODE, b"file") == file


def flip_every_value(store_path: Path) -> None:
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32)
    with env.begin() as txn:
        names = [bytes(name) for name in txn.cursor().iternext(values=False)]
    for name in names:
        handle = env.open_db(name)
        with env.begin(write=True, db=handle) as txn:
            for key, value in list(txn.cursor()):
                if value:
                    txn.put(key, bytes([value[0] ^ 1]) + value[1:])
    env.close()


@pytest.mark.parametrize("also", ["every value damaged", "chunks lost", "paged, recipes lost"])
def test_fsck_repair_refuses_a_lost_version_it_cannot_tell(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, also: str
) -> None:
    """Where the entries cannot say the version (not one seal verifies, yet
    values have their sealed lengths), where another table is lost too, or
    where ``recipes`` is lost while objects need it, the repair refuses and
    writes nothing (sealing damaged values again, or making a table empty,
    would leave nothing to restore from)."""
    if also == "paged, recipes lost":
        monkeypatch.setattr(_index, "RECIPE_PAGE", 8)  # this object's recipe in pages
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(random.Random(1).randbytes(300_000))
    lose_version(store_path, *{"chunks lost": [b"chunks"], "paged, recipes lost": [b"recipes"]}.get(
        also, []
    ))  # fmt: skip
    if also == "every value damaged":
        flip_every_value(store_path)
    before = index_contents(store_path)
    with pytest.raises(IndexCorruptError) as e:
        Store.open(store_path, options=StoreOptions(recover_index=True))
    assert "restore index.lmdb" in (e.value.hint or "")
    assert {
        "every value damaged": "no entry shows whether",
        "chunks lost": "its table chunks cannot be opened",
        "paged, recipes lost": "recipes is lost (1 objects need it)",
    }[also] in str(e.value)
    assert index_contents(store_path) == before
    repair = run_fsck(store_path, "--repair")
    assert repair.returncode == IndexCorruptError.exit_code, repair
    assert index_contents(store_path) == before


def test_an_index_whose_making_was_cut_short_is_made_whole(store_path: Path) -> None:
    """A crash while a new index is made leaves some of its tables and no
    version: that index holds nothing, so a writer makes the rest (a reader
    is told so)."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG):
        pass
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=16)
    with env.begin(write=True) as txn:
        assert txn.delete(SCHEMA_VERSION_KEY, db=env.open_db(b"meta", txn=txn))
        # (counters too: a finished open wrote its first entry, which a crash
        # before the version is recorded would not have)
        for name in (b"segments", b"counters", b"recipes"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()
    with pytest.raises(CachefsError, match="not made yet: it has no table segments") as e:
        Store.open(store_path, readonly=True)
    assert not isinstance(e.value, IndexCorruptError) and "for writing" in (e.value.hint or "")
    with Store.open(store_path) as store:
        assert store.index.schema_version == SCHEMA_VERSION and store.index.sealed
        digest = store.put(compressible(40_000, 2))
    with Store.open(store_path, readonly=True) as store:
        assert store.read(digest) == compressible(40_000, 2)
        assert check_store(store).clean


def test_an_index_too_new_is_refused_as_such_whatever_its_tables(store_path: Path) -> None:
    """A newer schema may lack a table this one requires: it is too new, not
    damaged."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        store.put(compressible(40_000, 1))
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"recipes", txn=txn), delete=True)
        newer = seal(SCHEMA_VERSION_KEY, struct.pack("<Q", SCHEMA_VERSION + 1))
        txn.put(SCHEMA_VERSION_KEY, newer, db=env.open_db(b"meta", txn=txn))
    env.close()
    for readonly in (True, False):
        with pytest.raises(FormatVersionError, match=f"schema version {SCHEMA_VERSION + 1}"):
            Store.open(store_path, readonly=readonly)


def test_a_damaged_name_in_the_main_database_is_damage(store_path: Path) -> None:
    """A key of the main database that is no table's name (any bytes), in an
    index that lost its version: damage, said in words."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG):
        pass
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=16)
    with env.begin(write=True) as txn:
        assert txn.delete(SCHEMA_VERSION_KEY, db=env.open_db(b"meta", txn=txn))
        txn.put(b"\xff\xfe", b"not a table")
    env.close()
    for readonly in (True, False):
        with pytest.raises(IndexCorruptError, match="records no schema version"):
            Store.open(store_path, readonly=readonly)


@pytest.mark.parametrize("table", [*NAMESPACE_DATABASES, *CACHE_DATABASES])
def test_a_namespace_that_lost_a_table_is_damaged_not_made_anew(
    store_path: Path, table: bytes
) -> None:
    """The namespace's tables (and the cache directories') are made together:
    one missing beside others that hold entries lost its record.  Made anew it
    would be empty: a lost ``inodes`` gave an empty tree with a new root."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        namespace = Namespace(store)
        namespace.create(ROOT_INODE, b"file", stat.S_IFREG | 0o644, 0, 0)
        CacheRecords(namespace).put({STORE_SETTINGS: {"max_size": 1 << 20}})
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(table, txn=txn), delete=True)
    env.close()
    for readonly in (True, False):
        with Store.open(store_path, readonly=readonly) as store:
            assert Namespace.exists(store)
            with pytest.raises(IndexCorruptError, match=f"table {table.decode()} is missing"):
                Namespace(store)
    fsck = run_fsck(store_path)
    assert fsck.returncode == IndexCorruptError.exit_code and "is missing" in fsck.stderr, fsck
    assert table not in index_contents(store_path)  # not made again


def test_a_table_record_that_is_no_table_is_damage(store_path: Path) -> None:
    """A flipped bit can turn a table's record in the main database into a
    plain entry (MDB_INCOMPATIBLE where it is opened; the flip experiment met
    it): the index is damaged, not "written by an incompatible LMDB"."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        Namespace(store).create(ROOT_INODE, b"file", stat.S_IFREG | 0o644, 0, 0)
    env = lmdb.open(str(store_path / INDEX_NAME), subdir=False, max_dbs=32)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"xattrs", txn=txn), delete=True)
        txn.put(b"xattrs", b"a plain entry")
    env.close()
    with (
        Store.open(store_path, readonly=True) as store,
        pytest.raises(IndexCorruptError, match="its table xattrs cannot be opened"),
    ):
        Namespace(store)
    fsck = run_fsck(store_path)
    assert fsck.returncode == IndexCorruptError.exit_code and "damaged" in fsck.stderr, fsck


# --- the flip experiment -------------------------------------------------------------


def make_tree(root: Path) -> None:
    rng = random.Random(3)
    for d in range(6):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(8):
            (sub / f"file{f}.o").write_bytes(rng.randbytes(rng.randrange(0, 40_000)))
            (root / f"dir{d}" / f"text{f}.txt").write_bytes(compressible(5_000, d * 10 + f))
        os.symlink(f"nested/file{d}.o", root / f"dir{d}" / "link")
        os.chmod(root / f"dir{d}" / "text0.txt", 0o600)


def trees_equal(a: Path, b: Path) -> bool:
    compared = filecmp.dircmp(a, b)
    if compared.left_only or compared.right_only or compared.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
    if mismatch or errors:
        return False
    for name in compared.common:
        sa, sb = os.lstat(a / name), os.lstat(b / name)
        size_a, size_b = (0, 0) if stat.S_ISDIR(sa.st_mode) else (sa.st_size, sb.st_size)
        if (sa.st_mode, size_a, sa.st_nlink) != (sb.st_mode, size_b, sb.st_nlink):
            return False
    return all(trees_equal(a / d, b / d) for d in compared.common_dirs)


def test_flipped_bits_in_the_index_are_found_or_harmless(tmp_path: Path) -> None:
    """Random bits flipped in index.lmdb past its meta pages, many seeds: every
    round either fsck reports damage or the tree is as it was."""
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    pristine = tmp_path / "pristine"
    with mounted(pristine, tmp_path / "mnt") as m:
        shutil.copytree(source, m.path / "tree", symlinks=True)
    rounds = {"found": 0, "harmless": 0, "silent": 0}
    for seed in range(16):
        store = tmp_path / f"store{seed}"
        shutil.copytree(pristine, store)
        index = store / INDEX_NAME
        raw = bytearray(index.read_bytes())
        rng = random.Random(seed)
        # 16 bits as in the issue; every fourth round one bit, which may land where
        # nothing lives (free pages): then the tree must be exactly as it was.
        for _ in range(1 if seed % 4 == 3 else 16):
            bit = rng.randrange(2 * 4096 * 8, len(raw) * 8)
            raw[bit // 8] ^= 1 << (bit % 8)
        index.write_bytes(bytes(raw))
        fsck = run_fsck(store)
        if fsck.returncode != 0:
            # Damage is named: entries by their seals, the tree's structure by the
            # check that LMDB could not finish (a child of fsck, killed by SIGBUS
            # or SIGSEGV, or aborted by an assertion of LMDB).
            assert fsck.returncode > 0, f"fsck crashed: {fsck.stderr}"
            assert "DAMAGE" in fsck.stdout or "damaged" in fsck.stderr, fsck
            rounds["found"] += 1
            continue
        with mounted(store, tmp_path / f"mnt{seed}") as m:
            same = trees_equal(source, m.path / "tree")
        rounds["harmless" if same else "silent"] += 1
        shutil.rmtree(store)
    print(rounds)
    assert rounds["silent"] == 0, rounds
    assert rounds["found"] > 0, rounds


def test_names_whose_entries_were_damaged_are_found_in_lost_and_found(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_tree(source)
    store = tmp_path / "store"
    with mounted(store, tmp_path / "mnt") as m:
        shutil.copytree(source, m.path / "tree", symlinks=True)
        tree = m.path / "tree"
        dir_ino = (tree / "dir1").stat().st_ino
        file_ino = (tree / "dir2" / "text3.txt").stat().st_ino
        tree_ino = tree.stat().st_ino
        parent_ino = (tree / "dir2").stat().st_ino
    damage_entry(store, b"dirents", INO_KEY.pack(tree_ino) + b"dir1")
    damage_entry(store, b"dirents", INO_KEY.pack(parent_ino) + b"text3.txt")
    fsck = subprocess.run(
        [sys.executable, "-m", "cachefs", "fsck", "--repair", str(store)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert fsck.returncode == 1 and "bad-entry" in fsck.stdout, fsck.stdout + fsck.stderr
    again = subprocess.run(
        [sys.executable, "-m", "cachefs", "fsck", str(store)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    with mounted(store, tmp_path / "mnt") as m:
        found = m.path / "lost+found"
        assert stat.S_IMODE(found.stat().st_mode) == 0o700
        assert sorted(os.listdir(found)) == sorted([str(dir_ino), str(file_ino)])
        assert trees_equal(source / "dir1", found / str(dir_ino))
        assert (found / str(file_ino)).read_bytes() == (source / "dir2" / "text3.txt").read_bytes()
        assert not (m.path / "tree" / "dir1").exists()
        assert not (m.path / "tree" / "dir2" / "text3.txt").exists()
        os.rename(found / str(dir_ino), m.path / "tree" / "dir1")  # put back by hand
        assert trees_equal(source / "dir1", m.path / "tree" / "dir1")


@pytest.mark.parametrize("signame", ["SIGBUS", "SIGSEGV", "SIGABRT"])
def test_a_check_killed_by_reading_a_damaged_tree_names_the_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signame: str
) -> None:
    """LMDB reading a tree damaged in its structure dies of SIGBUS or SIGSEGV, or
    fails one of its own assertions and aborts (seen in CI: ``mdb.c: Assertion
    'IS_BRANCH(...)' failed``): fsck names the damage and the remedy.  (The
    child, forked, is told to have died so.)"""
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(os, "fork", lambda: 4_000_000)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    monkeypatch.setattr(os, "waitid", lambda *args: None)
    monkeypatch.setattr(os, "waitpid", lambda pid, options: (pid, getattr(signal, signame)))
    with pytest.raises(IndexCorruptError, match="damaged in its structure") as caught:
        fsck_cli._check_in_a_child(tmp_path)
    assert signame in str(caught.value) and str(tmp_path) in str(caught.value)
    assert "restore" in (caught.value.hint or "")


class CheckRunAgain:
    """The process of a check run again (``subprocess.Popen``), which ends
    with ``returncode``."""

    pid = 4_000_000

    def __init__(self, returncode: int) -> None:
        self.returncode = returncode
        self.sent: list[int] = []

    def send_signal(self, signum: int) -> None:
        self.sent.append(signum)

    def wait(self) -> int:
        return self.returncode


def test_a_check_killed_from_outside_is_not_called_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With another thread running, the check is this command run again."""

    monkeypatch.setattr(threading, "active_count", lambda: 2)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: CheckRunAgain(-signal.SIGKILL))
    monkeypatch.setattr(os, "waitid", lambda *args: None)
    with pytest.raises(CachefsError, match="stopped by SIGKILL") as caught:
        fsck_cli._check_in_a_child(tmp_path)
    assert not isinstance(caught.value, IndexCorruptError)
    assert caught.value.exit_code == 128 + signal.SIGKILL


@pytest.mark.parametrize(
    ("signum", "said", "code"),
    [
        (signal.SIGKILL, "stopped by SIGKILL", 137),
        (signal.SIGILL, "crashed (SIGILL)", 132),
        (
            signal.SIGRTMIN + 2,
            f"stopped by signal {signal.SIGRTMIN + 2}",
            128 + signal.SIGRTMIN + 2,
        ),
    ],
)
def test_a_check_ended_by_a_signal_exits_128_plus_its_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int, said: str, code: int
) -> None:
    """As a shell reports a command a signal ended; not 1, which is damage found."""
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: CheckRunAgain(-signum))
    monkeypatch.setattr(os, "waitid", lambda *args: None)
    result = CliRunner().invoke(cli, ["fsck", str(tmp_path)])
    assert result.exit_code == code and said in result.output, result.output


def test_ctrl_c_stops_the_check_with_exit_code_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C reaches the check's process (fsck's own waits for it): the check
    stops and says so, with 130, not click's "Aborted!" and 1 (damage found)."""

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv(fsck_cli._CHILD, "1")  # this is the check's process
    monkeypatch.setattr(fsck_cli, "_check", interrupted)
    result = CliRunner().invoke(cli, ["fsck", str(tmp_path)])
    assert result.exit_code == 130 and "stopped by SIGINT" in result.output, result.output


def test_a_check_stops_with_the_command_that_runs_it(tmp_path: Path) -> None:
    """SIGTERM or SIGHUP sent to fsck alone (``timeout``, ``kill``, a closed
    terminal) is passed on to the forked process that runs the check, which
    stops: it does not run on (perhaps repairing) after the command is gone."""
    # The check: a process that waits (the child returns from _check_in_a_child).
    probe = (
        "import signal, sys, time\n"
        "from pathlib import Path\n"
        "from cachefs.cli import fsck\n"
        "for signum in fsck.PASSED_ON:  # as a shell would start it, whatever pytest's are\n"
        "    signal.signal(signum, signal.SIG_DFL)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, fsck.PASSED_ON)\n"
        "try:\n"
        "    fsck._check_in_a_child(Path(sys.argv[1]))\n"
        "except fsck.CachefsError as e:  # as the command line reports it\n"
        "    print(f'error: {e}', file=sys.stderr)\n"
        "    sys.exit(e.exit_code)\n"
        "print('checking', flush=True)\n"
        "time.sleep(60)\n"
    )
    for signum in fsck_cli.PASSED_ON:
        children: list[str] = []
        command = subprocess.Popen(
            [sys.executable, "-c", probe, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert command.stdout is not None
            assert select.select([command.stdout], [], [], 60)[0], "the check did not start"
            assert command.stdout.readline() == "checking\n"
            children = Path(f"/proc/{command.pid}/task/{command.pid}/children").read_text().split()
            assert len(children) == 1
            command.send_signal(signum)
            _, err = command.communicate(timeout=30)
            assert f"stopped by {signal.Signals(signum).name}" in err
            assert command.returncode == 128 + signum  # not 1: damage found
            assert not Path(f"/proc/{children[0]}").exists()
        finally:
            for pid in map(int, children):  # the check, if it runs on (a pid reused is not it)
                with contextlib.suppress(OSError):
                    if probe.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
            command.kill()  # if it runs on
            command.wait()


def test_a_check_run_again_stops_with_the_command_that_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same when the check is this command run again (another thread runs);
    every handler is as it was afterwards."""
    check = CheckRunAgain(-signal.SIGTERM)

    def signalled_while_waiting(*args: object) -> None:
        assert callable(signal.getsignal(signal.SIGTERM))  # else it would end pytest
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # to this process alone

    monkeypatch.setattr(threading, "active_count", lambda: 2)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: check)
    monkeypatch.setattr(os, "waitid", signalled_while_waiting)
    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    before = [signal.getsignal(signum) for signum in handled]
    with pytest.raises(CachefsError, match="stopped by SIGTERM"):
        fsck_cli._check_in_a_child(tmp_path)
    assert check.sent == [signal.SIGTERM]
    assert [signal.getsignal(signum) for signum in handled] == before


def break_table_root(store: Path, table: bytes) -> None:
    """Point ``table``'s record in the main database (an MDB_db: its root page
    number at byte 40) past the end of the file, in every page that holds a
    copy of the record: a flipped bit of the flip experiment did so."""
    raw = bytearray((store / INDEX_NAME).read_bytes())
    node = struct.pack("<HHHH", 48, 0, 0x02, len(table)) + table  # F_SUBDATA, 48 bytes
    found, at = 0, raw.find(node)
    while at >= 0:
        root = at + len(node) + 40
        struct.pack_into("<Q", raw, root, struct.unpack_from("<Q", raw, root)[0] | 1 << 43)
        found, at = found + 1, raw.find(node, at + 1)
    assert found
    (store / INDEX_NAME).write_bytes(bytes(raw))


def test_a_table_whose_root_is_past_the_end_is_damage(store_path: Path) -> None:
    """LMDB answers a walk of that table with MDB_BAD_TXN, not with the page it
    could not find (seen in CI): fsck names the table, and any command that
    meets it says the index is damaged, with the remedy."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(compressible(40_000, 3))
    break_table_root(store_path, b"objects")
    fsck = run_fsck(store_path)
    assert fsck.returncode == IndexCorruptError.exit_code, fsck
    assert "its table objects cannot be read" in fsck.stderr, fsck
    assert "restore index.lmdb" in fsck.stderr, fsck
    cat = subprocess.run(
        [sys.executable, "-m", "cachefs", "cat", str(store_path), str(digest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cat.returncode == IndexCorruptError.exit_code, cat
    assert "the index is damaged" in cat.stderr and "restore index.lmdb" in cat.stderr, cat
