"""The hidden ``/.cachefs`` tree called directly (no mount): names that are
not there, the objects under ``cas/`` and their lookup counts, and the
commands of ``control`` with their errors."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from pathlib import Path

import pytest

from cachefs.engine import ROOT_INODE, CachefsError, Digest, FsError, Inode, Store, check_store
from cachefs.fs import Filesystem, _file_io
from cachefs.fs._control import CAS_INO, COMMAND_INO, CONTROL_INO, FUNCTION_INO, STATS_INO


async def _command(fs: Filesystem, text: str) -> dict[str, object]:
    fh, _ = await fs.open(COMMAND_INO, os.O_RDWR)
    try:
        await fs.write(fh, 0, text.encode())
        answer: dict[str, object] = json.loads(bytes(await fs.read(fh, 0, 1 << 20)))
        return answer
    finally:
        await fs.release(fh)


async def _file(fs: Filesystem, data: bytes) -> Inode:
    """The file ``/f`` with ``data``, published."""
    inode = fs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)
    fh, _ = await fs.open(inode.ino, os.O_RDWR)
    await fs.write(fh, 0, data)
    await fs.release(fh)
    return inode


async def _open_object(fs: Filesystem, data: bytes) -> tuple[Inode, Digest, int, int]:
    """``/f`` with ``data``, and its object open under ``cas/``: the file's
    inode, the digest, the object's inode and its handle."""
    inode = await _file(fs, data)
    digest = fs.digest_of(inode.ino)
    found = fs.lookup(FUNCTION_INO, digest.hash.hex().encode())
    fh, _ = await fs.open(found.ino, os.O_RDONLY)
    return inode, digest, found.ino, fh


def _delete(fs: Filesystem, inode: Inode) -> None:
    """Unlink ``/f``, which the kernel then forgets."""
    fs.unlink(ROOT_INODE, b"f")
    fs.forget([(inode.ino, 1)])


async def test_the_cas_tree_finds_stored_objects_by_name_only(store: Store) -> None:
    data = random.Random(4).randbytes(50_000)
    fs = Filesystem(store)
    try:
        inode = await _file(fs, data)
        digest = fs.digest_of(inode.ino)
        control = fs.lookup(ROOT_INODE, b".cachefs")
        assert control.ino == CONTROL_INO and control.is_dir
        function = fs.lookup(fs.lookup(CONTROL_INO, b"cas").ino, b"sha256")
        assert function.ino == FUNCTION_INO
        for bad in [b"zz", "é".encode(), b"ab" * 31, b"00" * 32]:
            with pytest.raises(FsError) as raised:
                fs.lookup(FUNCTION_INO, bad)
            assert raised.value.errno == errno.ENOENT, bad
        for parent, name in [(CONTROL_INO, b"nothing"), (STATS_INO, b"x")]:
            with pytest.raises(FsError) as raised:
                fs.lookup(parent, name)
            assert raised.value.errno == errno.ENOENT
        found = fs.lookup(FUNCTION_INO, digest.hash.hex().encode())
        assert found.size == len(data)
        assert fs.lookup(FUNCTION_INO, digest.hash.hex().encode()).ino == found.ino
        assert fs.digest_of(found.ino) == digest
        fh, _ = await fs.open(found.ino, os.O_RDONLY)
        assert bytes(await fs.read(fh, 0, len(data) + 1)) == data
        assert bytes(await fs.read(fh, len(data), 10)) == b""
        await fs.release(fh)
        with pytest.raises(FsError) as raised:
            await fs.open(found.ino, os.O_WRONLY)
        assert raised.value.errno == errno.EACCES
        with pytest.raises(FsError) as raised:
            await fs.open(CAS_INO, os.O_RDONLY)
        assert raised.value.errno == errno.EISDIR
        # Objects are found by name, never listed; files are not directories.
        fh = fs.opendir(FUNCTION_INO)
        assert fs.readdir(fh, 0) == []
        fs.releasedir(fh)
        fh = fs.opendir(CONTROL_INO)
        assert [name for name, _ in fs.readdir(fh, 0)] == [b"cas", b"control", b"stats.json"]
        fs.releasedir(fh)
        with pytest.raises(FsError) as raised:
            fs.control.entries(STATS_INO)
        assert raised.value.errno == errno.ENOTDIR
        # The kernel forgets the object's two lookups: its inode goes.
        fs.forget([(found.ino, 1)])
        assert fs.getattr(found.ino).size == len(data)
        fs.forget([(found.ino, 1)])
        for call in (lambda: fs.getattr(found.ino), lambda: fs.digest_of(found.ino)):
            with pytest.raises(FsError):
                call()
        fs.forget([(found.ino, 1)])  # once more: nothing left to forget
    finally:
        fs.close()


async def test_control_commands_answer_in_json(store: Store, tmp_path: Path) -> None:
    fs = Filesystem(store)
    try:
        fs.control.info["mountpoint"] = str(tmp_path / "mnt")
        assert await _command(fs, "sync") == {"ok": True}
        answer = await _command(fs, "frobnicate now")
        assert answer == {"ok": False, "error": "unknown command 'frobnicate now'"}
        answer = await _command(fs, "scrub 0")
        assert answer["ok"] is False and "positive" in str(answer["error"])
        answer = await _command(fs, "gc notanumber")
        assert answer["ok"] is False
        # A trace inside the mount would trace its own writes: refused.
        answer = await _command(fs, f"trace start {tmp_path / 'mnt' / 'trace.jsonl'}")
        assert answer["ok"] is False and "outside" in str(answer["error"])
        trace = tmp_path / "a trace.jsonl"
        answer = await _command(fs, f"trace start {trace}")
        assert answer == {"ok": True, "trace": str(trace)}
        fs.create(ROOT_INODE, b"traced", stat.S_IFREG | 0o644, 0, 0)
        answer = await _command(fs, "trace stop")
        assert answer["ok"] is True and int(str(answer["records"])) >= 1
        assert trace.read_text().strip()
        stats = fs.control.open(STATS_INO, writable=False)
        assert json.loads(stats.content)["mountpoint"] == str(tmp_path / "mnt")  # type: ignore[union-attr]
    finally:
        fs.close()


async def test_an_open_object_is_kept_until_its_release(store: Store) -> None:
    """An object open under ``cas/`` is kept as an unlinked open file is: its
    last file deleted, gc run, it still reads whole; released, it goes, and
    the store is consistent at every step."""
    data = random.Random(5).randbytes(300_000)
    fs = Filesystem(store)
    try:
        inode, digest, _, fh = await _open_object(fs, data)
        files = store.stats().files
        _delete(fs, inode)
        await fs.flush_all()
        await fs.collect_garbage(0.0)
        assert store.contains(digest) and check_store(store).clean
        assert store.stats().files == files - 1  # the file went; its holder stays
        assert bytes(await fs.read(fh, 0, len(data))) == data
        assert bytes(await fs.read(fh, 299_000, 5_000)) == data[299_000:]
        await fs.release(fh)
        assert not store.contains(digest)
        assert store.stats().files == files - 2 and check_store(store).clean
    finally:
        fs.close()


async def test_an_object_held_at_a_crash_goes_at_the_next_mount(store: Store) -> None:
    data = random.Random(6).randbytes(50_000)
    fs = Filesystem(store)
    try:
        inode, digest, _, _ = await _open_object(fs, data)  # never released: the daemon dies
        _delete(fs, inode)
    finally:
        fs.close()
    assert store.contains(digest) and check_store(store).clean  # an orphan, as fsck expects
    Filesystem(store).close()
    assert not store.contains(digest) and check_store(store).clean


async def test_an_object_that_cannot_be_kept_reads_as_stale_once_deleted(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that cannot take the holder (full, say) opens the object unkept,
    with a warning; once its last file is gone, a read says so with ESTALE (a
    read may not answer ENOENT).  An object gone before the open: ENOENT."""
    data = random.Random(7).randbytes(300_000)
    fs = Filesystem(store)
    try:

        def full(namespace: object, digest: Digest) -> int:
            raise CachefsError("No space left on device (index.lmdb)")

        monkeypatch.setattr(_file_io, "hold", full)
        inode, digest, found, fh = await _open_object(fs, data)
        assert "without being kept" in caplog.text and "No space left" in caplog.text
        assert bytes(await fs.read(fh, 0, 1000)) == data[:1000]
        _delete(fs, inode)
        await fs.flush_all()
        assert not store.contains(digest)
        with pytest.raises(FsError) as raised:
            await fs.read(fh, 1000, 1000)
        assert raised.value.errno == errno.ESTALE
        assert str(digest) in str(raised.value)
        await fs.release(fh)
        monkeypatch.undo()
        with pytest.raises(FsError) as raised:
            await fs.open(found, os.O_RDONLY)  # the kernel still knew its name
        assert raised.value.errno == errno.ENOENT and "no longer stored" in str(raised.value)
    finally:
        fs.close()
