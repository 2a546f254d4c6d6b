"""A full disk: the writer gets ENOSPC, nothing stored before is lost, deleting
files (and gc) frees space, writes succeed again, fsck is clean.  The store
lives on a small tmpfs of its own."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import cachefs, mounted, require_fuse


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_fuse()
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_enospc_and_recovery(small_disk: Path, tmp_path: Path) -> None:
    store = small_disk / "store"
    mnt = tmp_path / "mnt"
    keep = os.urandom(2 << 20)
    with mounted(store, mnt) as mount:
        (mnt / "keep").write_bytes(keep)
        fd = os.open(mnt / "keep", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        written = []
        with pytest.raises(OSError) as info:
            for i in range(200):  # incompressible: ~2 MiB each, far more than the disk
                path = mnt / f"fill-{i}"
                with open(path, "wb") as f:
                    f.write(os.urandom(2 << 20))
                    f.flush()
                    os.fsync(f.fileno())
                written.append(path)
        assert info.value.errno == errno.ENOSPC
        assert written, "the disk was full before anything was written"
        assert (mnt / "keep").read_bytes() == keep
        for path in written:  # fsynced files are intact
            assert len(path.read_bytes()) == 2 << 20
        for path in mnt.glob("fill-*"):
            path.unlink()
        cachefs("gc", str(mnt))
        (mnt / "after").write_bytes(b"room again" * 1000)
        fd = os.open(mnt / "after", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        assert (mnt / "after").read_bytes() == b"room again" * 1000
        assert mount.process.poll() is None  # the daemon survived
    result = cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    with mounted(store, mnt):
        assert (mnt / "keep").read_bytes() == keep
