"""The store's one journal after a crash: the mount's logged writes are replayed,
a torn tail is cut, damage in the middle drops what follows (no FUSE needed).

A child process writes through ``Filesystem`` (every write logged to the
journal, nothing published) and kills itself with SIGKILL; the parent tears
the journal as a crash or bad disk would, then opens the store again.  The
same crashed store, laid out as cachefs 0.1 left it (two logs), is upgraded
to the one journal and replayed, or refused untouched when it holds staged
writes of 0.1's removed API.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from cachefs.engine import (
    ROOT_INODE,
    CachefsError,
    CorruptDataError,
    FormatVersionError,
    Store,
    StoreFullError,
    check_store,
)
from cachefs.format import journal as fmt
from cachefs.format.header import HEADER_NAME, STORE_FORMAT_VERSION, read_header
from cachefs.format.schema import SCHEMA_VERSION
from cachefs.fs import Filesystem, OpenFile
from cachefs.fs._publish import FilePublisher
from tests.conftest import SMALL_CONFIG, strip_seals

FILE_A = random.Random(1).randbytes(50_000)
FILE_B = b"the last record of the journal " * 100

#: Writes file "a" in three records (the second overwrites part of the first, a
#: truncation cuts its end), then file "b" in one, and dies before publishing.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import trio
    from cachefs.engine import ROOT_INODE, Store
    from cachefs.fs import Filesystem

    async def main(path, a, b):
        store = Store.open(path)
        fs = Filesystem(store)
        for name, writes in ((b"a", [(0, a), (20_000, b"x" * 1000)]), (b"b", [(0, b)])):
            inode = fs.create(ROOT_INODE, name, 0o100644, 0, 0)
            fh, _ = await fs.open(inode.ino, os.O_RDWR)
            for offset, data in writes:
                await fs.write(fh, offset, data)
            if name == b"a":
                await fs.truncate(inode.ino, 40_000)
        os.kill(os.getpid(), signal.SIGKILL)  # nothing was published

    trio.run(main, sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]))
    """
)


def expected_a() -> bytes:
    data = bytearray(FILE_A)
    data[20_000:21_000] = b"x" * 1000
    return bytes(data[:40_000])


@pytest.fixture
def crashed(store_path: Path) -> Path:
    """A store whose mount died with every write only in the journal."""
    Store.open(store_path, create=True, config=SMALL_CONFIG).close()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_path), FILE_A.hex(), FILE_B.hex()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    return store_path


def journal_path(store_path: Path) -> Path:
    return store_path / fmt.DIRECTORY / fmt.FILE_NAME


def records(store_path: Path) -> list[tuple[int, int]]:
    """(offset, kind) of every record in the journal."""
    raw = journal_path(store_path).read_bytes()
    _, found, _ = fmt.parse(raw, "journal")
    offsets, offset = [], fmt.HEADER.size
    for record in found:
        offsets.append((offset, record.kind))
        offset += fmt.RECORD.size + len(record.payload)
    return offsets


def contents(fs: Filesystem) -> dict[bytes, bytes]:
    out = {}
    for name, inode in fs.namespace.entries(ROOT_INODE):
        digest = inode.digest
        out[name] = b"" if digest is None else fs.store.read(digest)
    return out


def reopen(store_path: Path) -> tuple[Store, Filesystem]:
    store = Store.open(store_path)
    return store, Filesystem(store)


async def test_logged_writes_are_replayed_and_the_journal_restarts(crashed: Path) -> None:
    kinds = [kind for _, kind in records(crashed)]
    file_a = [fmt.FILE_BASE, fmt.FILE_WRITE, fmt.FILE_WRITE, fmt.FILE_TRUNCATE]
    assert kinds == [*file_a, fmt.FILE_BASE, fmt.FILE_WRITE]
    store, fs = reopen(crashed)
    try:
        assert contents(fs) == {b"a": expected_a(), b"b": FILE_B}
        assert journal_path(crashed).stat().st_size == fmt.HEADER.size  # checkpointed
        assert check_store(store).clean
    finally:
        fs.close()
        store.close()
    store, fs = reopen(crashed)  # nothing is replayed twice
    try:
        assert store.stats().files == 2
    finally:
        fs.close()
        store.close()


async def test_a_file_replay_cannot_publish_is_kept_until_it_can(
    crashed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during replay: the file stays an open file with unpublished
    writes (readable, carried by the journal) and is published at the next sync."""
    real = FilePublisher.publish_now
    failed: list[int] = []

    def full_once(self: FilePublisher, state: OpenFile) -> None:
        if not failed:
            failed.append(state.ino)
            raise StoreFullError("no space left on device while testing")
        real(self, state)

    monkeypatch.setattr(FilePublisher, "publish_now", full_once)
    store, fs = reopen(crashed)
    try:
        (kept,) = failed
        state = fs.files.get(kept)
        assert state is not None and state.changed
        assert journal_path(crashed).stat().st_size > fmt.HEADER.size  # its records stay
        monkeypatch.setattr(FilePublisher, "publish_now", real)
        fs.journal.restart(fs.files)  # a restart must not drop them either
        assert journal_path(crashed).stat().st_size > fmt.HEADER.size
        await fs.flush_all()
        assert fs.files.get(kept) is None
        assert contents(fs) == {b"a": expected_a(), b"b": FILE_B}
    finally:
        fs.close()
        store.close()
    assert journal_path(crashed).stat().st_size == fmt.HEADER.size  # checkpointed at close
    store, fs = reopen(crashed)
    try:
        assert contents(fs) == {b"a": expected_a(), b"b": FILE_B}
        assert check_store(store).clean
    finally:
        fs.close()
        store.close()


def _append_garbage(path: Path) -> int:
    with open(path, "ab") as f:
        f.write(random.Random(0).randbytes(100))
    return 100


def _cut_last_record(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    return fmt.RECORD.size + fmt.FILE_WRITE_HEAD.size + len(FILE_B) - 10


def _flip_last_byte(path: Path) -> int:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    return fmt.RECORD.size + fmt.FILE_WRITE_HEAD.size + len(FILE_B)


@pytest.mark.parametrize(
    ("tear", "b_survives"),
    [(_append_garbage, True), (_cut_last_record, False), (_flip_last_byte, False)],
    ids=["garbage-after-tail", "cut-last-record", "damaged-last-record"],
)
async def test_torn_tail_is_cut_and_the_rest_replayed(
    crashed: Path, caplog: pytest.LogCaptureFixture, tear: object, b_survives: bool
) -> None:
    assert callable(tear)
    cut = tear(journal_path(crashed))
    with caplog.at_level(logging.WARNING, logger="cachefs"):
        store, fs = reopen(crashed)
    try:
        assert store.journal is not None
        assert contents(fs) == {b"a": expected_a(), b"b": FILE_B if b_survives else b""}
        assert check_store(store).clean
    finally:
        fs.close()
        store.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"torn or damaged tail of {cut} bytes" in m for m in warnings), warnings


async def test_damaged_record_in_the_middle_drops_everything_after_it(crashed: Path) -> None:
    first_write = next(offset for offset, kind in records(crashed) if kind == fmt.FILE_WRITE)
    path = journal_path(crashed)
    raw = bytearray(path.read_bytes())
    raw[first_write + fmt.RECORD.size + 100] ^= 0x01  # inside a's first write
    path.write_bytes(bytes(raw))
    store, fs = reopen(crashed)
    try:
        # a's base record survives (a stays empty), nothing of b's does.
        assert contents(fs) == {b"a": b"", b"b": b""}
        assert check_store(store).clean
    finally:
        fs.close()
        store.close()


def test_damaged_journal_header_is_refused_untouched(crashed: Path) -> None:
    path = journal_path(crashed)
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="journal header is damaged"):
        Store.open(crashed)
    assert path.read_bytes() == bytes(raw)
    assert os.path.exists(crashed / "lock")


# --- a store of format 1 (cachefs 0.1: wal/ for staged objects, fswal/ for the mount) ------


def make_format_1(store_path: Path, staged: bytes = b"") -> None:
    """Turn a store into the layout cachefs 0.1 wrote: the mount's log in
    ``fswal/wal.log``, the staged objects' log in ``wal/wal.log`` (holding
    ``staged`` records' worth of payloads), ``wal_applied`` and no ``meta`` in
    the index, format version 1 in the header."""
    (store_path / "fswal").mkdir()
    journal_path(store_path).rename(store_path / "fswal" / "wal.log")
    (store_path / fmt.DIRECTORY).rmdir()
    (store_path / "wal").mkdir()
    old = fmt.encode_header(7)
    if staged:
        old += fmt.encode_record(7, 1, b"") + fmt.encode_record(8, 2, staged)
        old += staged
    (store_path / "wal" / "wal.log").write_bytes(old)
    strip_seals(store_path)  # 0.1 kept no seals on its values
    env = lmdb.open(str(store_path / "index.lmdb"), subdir=False, max_dbs=32, map_size=1 << 40)
    try:
        meta = env.open_db(b"meta")
        applied = env.open_db(b"wal_applied")
        with env.begin(write=True) as txn:
            txn.drop(meta, delete=True)
            txn.put(struct.pack(">Q", 3), bytes(40), db=applied)
    finally:
        env.close()
    rewrite_version(store_path, 1)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store but LMDB's reader table."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "index.lmdb-lock"
    }


async def test_a_format_1_store_is_upgraded_and_its_mount_log_replayed(crashed: Path) -> None:
    make_format_1(crashed)
    store, fs = reopen(crashed)
    try:
        assert contents(fs) == {b"a": expected_a(), b"b": FILE_B}
        assert read_header(crashed).format_version == STORE_FORMAT_VERSION
        assert store.index.schema_version == SCHEMA_VERSION
        assert not store.index.exists(b"wal_applied")
        assert not (crashed / "wal").exists() and not (crashed / "fswal").exists()
        assert journal_path(crashed).stat().st_size == fmt.HEADER.size
        assert check_store(store).clean
    finally:
        fs.close()
        store.close()


def _cut_after_header(store_path: Path) -> None:
    rewrite_version(store_path, 2)


def _cut_after_staged_log(store_path: Path) -> None:
    rewrite_version(store_path, 2)
    shutil.rmtree(store_path / "wal")


def _cut_after_journal_moved(store_path: Path) -> None:
    _cut_after_staged_log(store_path)
    (store_path / fmt.DIRECTORY).mkdir()
    (store_path / "fswal" / "wal.log").rename(journal_path(store_path))


def rewrite_version(store_path: Path, version: int) -> None:
    header = store_path / HEADER_NAME
    doc = json.loads(header.read_text())
    doc["format_version"] = version
    header.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "cut", [_cut_after_header, _cut_after_staged_log, _cut_after_journal_moved]
)
async def test_an_upgrade_cut_short_is_finished_by_the_next_writer(
    crashed: Path, cut: object
) -> None:
    make_format_1(crashed)
    assert callable(cut)
    cut(crashed)  # as a crash in the middle of the upgrade leaves it
    store, fs = reopen(crashed)
    try:
        assert contents(fs) == {b"a": expected_a(), b"b": FILE_B}
        assert store.index.schema_version == SCHEMA_VERSION
        assert not store.index.exists(b"wal_applied")
        assert not (crashed / "wal").exists() and not (crashed / "fswal").exists()
        assert check_store(store).clean
    finally:
        fs.close()
        store.close()


def test_a_format_1_store_is_read_as_it_is(crashed: Path) -> None:
    make_format_1(crashed)
    before = snapshot(crashed)
    with Store.open(crashed, readonly=True) as store:
        assert store.stats().files == 0  # the writes are still only in the mount's log
        assert check_store(store).clean
    assert snapshot(crashed) == before


def test_a_format_1_store_with_staged_writes_is_refused_untouched(crashed: Path) -> None:
    make_format_1(crashed, staged=b"a staged write never published")
    before = snapshot(crashed)
    with pytest.raises(CachefsError, match="staged writes") as raised:
        Store.open(crashed)
    assert "cachefs 0.1" in str(raised.value)
    assert snapshot(crashed) == before


@pytest.mark.parametrize("readonly", [False, True], ids=["write", "readonly"])
def test_an_index_of_a_newer_schema_is_refused_untouched(store_path: Path, readonly: bool) -> None:
    with Store.open(store_path, create=True) as store:
        store.put(b"kept")
        with store.publisher.write_txn("test") as txn:
            store.index.set_schema_version(txn, SCHEMA_VERSION + 1)
    before = snapshot(store_path)
    with pytest.raises(FormatVersionError, match="schema version"):
        Store.open(store_path, readonly=readonly)
    assert snapshot(store_path) == before
