"""The FUSE adapter called directly (no mount): what a request that meets
damaged data answers, and what it leaves in the store's figures."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
from pathlib import Path

import pyfuse3
import pytest

from cachefs.engine import ROOT_INODE, FsError, Store, check_store
from cachefs.errors import ReadOnlyError
from cachefs.format.schema import INO_KEY
from cachefs.fs import Filesystem
from cachefs.fs._control import CONTROL_INO
from cachefs.fuse import Operations
from tests.conftest import SMALL_CONFIG, flip_first_chunk


async def test_a_damaged_read_is_eio_and_counts_once(store_path: Path) -> None:
    data = random.Random(3).randbytes(100_000)  # incompressible: raw chunks
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        try:
            ops = Operations(fs)
            inode = fs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)
            fh, _ = await fs.open(inode.ino, os.O_RDWR)
            await fs.write(fh, 0, data)
            await fs.fsync(fh)
            flip_first_chunk(store, fs.digest_of(inode.ino))
            assert (store.corruptions, store.needs_fsck) == (0, False)
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await ops.read(fh, 0, 4096)
            assert raised.value.errno == errno.EIO
            # Counted where the damage was found, not again by the adapter.
            assert (store.corruptions, store.needs_fsck) == (1, True)
            assert fs.figures()["corruptions"] == 1
            assert bytes(await ops.read(fh, 90_000, 100)) == data[90_000:90_100]
            assert store.corruptions == 1
            await fs.release(fh)
        finally:
            fs.close()


async def test_damage_in_the_index_is_eio_and_counts_once(store_path: Path) -> None:
    """Damage the engine meets without counting it (the namespace's records) is
    counted by the filesystem when a request fails on it: once."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        try:
            ops = Operations(fs)
            directory = fs.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
            with store.transaction("damaging the index") as txn:
                assert fs.namespace.parents.delete(txn, INO_KEY.pack(directory.ino))
            fh = await ops.opendir(directory.ino, None)  # type: ignore[arg-type]
            for _ in range(2):
                with pytest.raises(pyfuse3.FUSEError) as raised:
                    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
                assert raised.value.errno == errno.EIO
            assert (store.corruptions, store.needs_fsck) == (2, True)  # two failed requests
            await ops.releasedir(fh)
        finally:
            fs.close()


async def test_the_failsafe_holds_across_mounts_until_fsck_repairs(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        try:
            fs.create(ROOT_INODE, b"before", stat.S_IFREG | 0o644, 0, 0)
            fs.enter_failsafe("the index named an inode twice")
            with pytest.raises(ReadOnlyError):
                fs.create(ROOT_INODE, b"during", stat.S_IFREG | 0o644, 0, 0)
        finally:
            fs.close()
    with Store.open(store_path) as store:
        assert store.needs_fsck
        fs = Filesystem(store)
        try:
            assert fs.failsafe == "the index named an inode twice"
            assert fs.figures()["failsafe"] == fs.failsafe
            with pytest.raises(ReadOnlyError):
                fs.create(ROOT_INODE, b"after", stat.S_IFREG | 0o644, 0, 0)
        finally:
            fs.close()
        check_store(store, repair=True)
        fs = Filesystem(store)
        try:
            assert fs.failsafe is None
            fs.create(ROOT_INODE, b"repaired", stat.S_IFREG | 0o644, 0, 0)
        finally:
            fs.close()


class _Ctx:
    """What a request tells about its caller (pyfuse3.RequestContext)."""

    uid = 0
    gid = 0
    pid = 0
    umask = 0o022


async def test_each_error_becomes_its_errno_and_a_bug_protects_the_store(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx: pyfuse3.RequestContext = _Ctx()  # type: ignore[assignment]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        try:
            ops = Operations(fs)
            directory = fs.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
            inode = fs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)

            async def fails(call: object, code: int) -> None:
                with pytest.raises(pyfuse3.FUSEError) as raised:
                    await call  # type: ignore[misc]
                assert raised.value.errno == code

            await fails(ops.readlink(inode.ino, ctx), errno.EINVAL)
            await fails(ops.opendir(inode.ino, ctx), errno.ENOTDIR)
            await fails(ops.mknod(ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, 0, ctx), errno.EINVAL)
            await fails(ops.removexattr(inode.ino, b"user.cachefs.digest", ctx), errno.EPERM)
            await fails(ops.getxattr(CONTROL_INO, b"user.x", ctx), errno.ENODATA)
            await fails(ops.getxattr(directory.ino, b"user.cachefs.digest", ctx), errno.ENODATA)
            assert await ops.listxattr(CONTROL_INO, ctx) == []
            fh = await ops.opendir(directory.ino, ctx)
            await ops.fsyncdir(fh, False)
            await ops.releasedir(fh)
            fh, _ = await fs.open(inode.ino, os.O_RDONLY)
            with pytest.raises(FsError) as raised:
                fs.readdir(fh, 0)  # a file's handle
            assert raised.value.errno == errno.ENOTDIR
            await fs.release(fh)

            def no_statvfs(path: object) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(os, "statvfs", no_statvfs)
            await fails(ops.statfs(ctx), errno.EIO)
            monkeypatch.undo()

            # An error of no known kind is a bug: EIO, counted, and the mount
            # goes read-only to protect the store.
            def bug(ino: int) -> None:
                raise KeyError(ino)

            monkeypatch.setattr(fs, "getattr", bug)
            await fails(ops.getattr(inode.ino, ctx), errno.EIO)
            monkeypatch.undo()
            assert fs.errors == 1 and fs.failsafe is not None and "getattr" in fs.failsafe
            with pytest.raises(ReadOnlyError):
                fs.create(ROOT_INODE, b"g", stat.S_IFREG | 0o644, 0, 0)
        finally:
            fs.close()
    with Store.open(store_path, readonly=True) as store, pytest.raises(ReadOnlyError):
        Filesystem(store)


@pytest.mark.parametrize("debug", [False, True])
def test_a_reply_the_kernel_no_longer_waits_for_is_no_error(
    debug: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``umount`` right after files were closed ends their releases in the
    kernel while the daemon handles them: pyfuse3's ERROR for each late reply
    is said at DEBUG (shown only when debugging); its other errors stay."""
    pyfuse3_log = logging.getLogger("pyfuse3")
    caplog.set_level(logging.DEBUG if debug else logging.INFO, logger="pyfuse3")
    late = "fuse_release(): fuse_reply_* failed with %s"
    pyfuse3_log.error(late, os.strerror(errno.ENOENT))
    pyfuse3_log.error(late, os.strerror(errno.EINVAL))
    found = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pyfuse3"]
    expected = [("ERROR", late % os.strerror(errno.EINVAL))]
    if debug:
        expected.insert(0, ("DEBUG", late % os.strerror(errno.ENOENT)))
    assert found == expected
