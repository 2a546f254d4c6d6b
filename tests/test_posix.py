"""POSIX semantics of a real mount (kernel FUSE), one behaviour per test.

One mount serves the module; every test works in a directory of its own.
Cases that involve other users run shell commands as ``nobody`` and a second
unprivileged user, through the kernel's own permission checks
(``allow_other,default_permissions``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount, as_user, cachefs, content_digest, mounted

NOBODY = 65534
OTHER = 4242  # an unprivileged user that need not exist in /etc/passwd
_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, bytes(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    # Other users must be able to reach the mount point: not under pytest's 0700 tree.
    base = Path(tempfile.mkdtemp(prefix="cachefs-posix-"))
    base.chmod(0o755)
    try:
        with mounted(tmp_path_factory.mktemp("posix") / "store", base / "mnt") as m:
            m.path.chmod(0o755)
            yield m
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def d(mount: Mount, request: pytest.FixtureRequest) -> Path:
    name: str = request.node.name
    path = mount.path / name.replace("[", "_").replace("]", "")
    path.mkdir()
    path.chmod(0o777)
    return path


# --- regular files ---------------------------------------------------------------------


def test_sequential_and_random_writes(d: Path) -> None:
    rng = random.Random(1)
    reference = bytearray(rng.randbytes(3 << 20))
    f = d / "f"
    f.write_bytes(reference)
    with open(f, "r+b") as out:
        for _ in range(50):
            offset = rng.randrange(0, 4 << 20)
            data = rng.randbytes(rng.randrange(1, 70000))
            out.seek(offset)
            out.write(data)
            if offset > len(reference):
                reference.extend(bytes(offset - len(reference)))
            reference[offset : offset + len(data)] = data
            if rng.random() < 0.2:
                out.flush()
                os.fsync(out.fileno())  # publishes: later writes land on a new base
        out.flush()
        out.seek(0)
        assert out.read() == reference  # through the open file
    assert f.read_bytes() == reference  # after release
    assert f.stat().st_size == len(reference)


def test_append_trunc_excl(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"one\n")
    with open(f, "ab") as out:
        out.write(b"two\n")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"three\n")  # O_APPEND ignores the offset
    os.close(fd)
    assert f.read_bytes() == b"one\ntwo\nthree\n"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"x")
    os.close(fd)
    assert f.read_bytes() == b"x"
    with pytest.raises(FileExistsError):
        os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    fd = os.open(d / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    assert stat.S_IMODE((d / "new").stat().st_mode) == 0o640


def test_truncate_up_down_and_holes(d: Path) -> None:
    f = d / "f"
    data = os.urandom(300_000)
    f.write_bytes(data)
    os.truncate(f, 1000)
    assert f.read_bytes() == data[:1000]
    os.truncate(f, 5000)
    assert f.read_bytes() == data[:1000] + bytes(4000)  # never the old bytes back
    with open(f, "r+b") as out:
        out.seek(100_000)
        out.write(b"end")
        out.truncate(50_000)  # ftruncate on an open, written file
        out.seek(0)
        assert out.read() == data[:1000] + bytes(49_000)
    assert f.read_bytes() == data[:1000] + bytes(49_000)
    g = d / "sparse"
    with open(g, "wb") as out:
        out.seek(10 << 20)
        out.write(b"tail")
    assert g.stat().st_size == (10 << 20) + 4
    with open(g, "rb") as inp:
        assert inp.read(4096) == bytes(4096)
        inp.seek(10 << 20)
        assert inp.read() == b"tail"


def test_file_over_4_gib(mount: Mount, d: Path) -> None:
    f = d / "large"
    offset = (4 << 30) + 12345
    with open(f, "wb") as out:
        out.write(b"head")
        out.seek(offset)
        out.write(b"beyond 4 GiB")
        out.flush()
        os.fsync(out.fileno())
    assert f.stat().st_size == offset + 12
    with open(f, "rb") as inp:
        assert inp.read(4) == b"head"
        inp.seek(offset - 3)
        assert inp.read() == bytes(3) + b"beyond 4 GiB"
    digest = content_digest(f)  # a sparse file's is computed on request: EAGAIN until then
    assert digest.endswith(f"/{offset + 12}")
    f.unlink()


def test_unlinked_open_file_stays_readable(mount: Mount, d: Path) -> None:
    f = d / "f"
    data = os.urandom(200_000)
    f.write_bytes(data)
    digest = os.getxattr(f, "user.cachefs.digest").decode()
    cas = mount.path / ".cachefs" / "cas" / "sha256" / digest.split("/")[0]
    with open(f, "rb") as inp:
        f.unlink()
        assert not f.exists()
        assert inp.read() == data
        assert os.fstat(inp.fileno()).st_nlink == 0
    # After the last close (and the kernel's forget), the content is released.
    deadline = time.monotonic() + 10
    while cas.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cas.exists()


def test_an_object_open_by_digest_stays_readable(mount: Mount, d: Path) -> None:
    """``cat .cachefs/cas/sha256/<hex>`` while a build deletes the file:
    the open object is kept, as an unlinked open file is, until it is closed."""
    f = d / "f"
    data = os.urandom(3_000_000)
    f.write_bytes(data)
    digest = os.getxattr(f, "user.cachefs.digest").decode()
    cas = mount.path / ".cachefs" / "cas" / "sha256" / digest.split("/")[0]
    with open(cas, "rb") as inp:
        f.unlink()
        cachefs("gc", "--threshold", "1", str(mount.path))  # compacts every segment
        assert inp.read() == data
    deadline = time.monotonic() + 10
    while cas.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cas.exists()


def test_fsync_fdatasync_sync(d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"abc")
    os.fsync(fd)
    os.write(fd, b"def")
    os.fdatasync(fd)
    os.close(fd)
    os.sync()
    assert f.read_bytes() == b"abcdef"


def test_mmap_shared_and_private(d: Path) -> None:
    f = d / "f"
    f.write_bytes(bytes(8192))
    with open(f, "r+b") as out:
        shared = mmap.mmap(out.fileno(), 8192, mmap.MAP_SHARED)
        shared[10:15] = b"hello"
        shared.flush()
        shared.close()
    assert f.read_bytes()[10:15] == b"hello"
    with open(f, "r+b") as out:
        private = mmap.mmap(out.fileno(), 8192, mmap.MAP_PRIVATE)
        private[0:5] = b"xxxxx"
        assert private[10:15] == b"hello"
        private.close()
    assert f.read_bytes()[0:5] == bytes(5)


# --- directories, links, names ------------------------------------------------------------


def test_directories_and_link_counts(d: Path) -> None:
    (d / "a").mkdir()
    (d / "a" / "b").mkdir()
    (d / "a" / "c").mkdir()
    assert (d / "a").stat().st_nlink == 4
    (d / "a" / "file").write_bytes(b"x")
    with pytest.raises(OSError) as info:
        (d / "a").rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    (d / "a" / "c").rmdir()
    assert (d / "a").stat().st_nlink == 3
    assert sorted(os.listdir(d / "a")) == ["b", "file"]
    with pytest.raises(NotADirectoryError):
        os.listdir(d / "a" / "file")
    with pytest.raises(FileExistsError):
        (d / "a" / "b").mkdir()


def test_symlinks(d: Path) -> None:
    (d / "target").write_bytes(b"data")
    (d / "link").symlink_to("target")
    (d / "dangling").symlink_to("nowhere/at/all")
    assert os.readlink(d / "link") == "target"
    assert (d / "link").read_bytes() == b"data"
    assert stat.S_ISLNK((d / "link").lstat().st_mode)
    assert (d / "dangling").lstat().st_size == len("nowhere/at/all")
    assert not (d / "dangling").exists()


def test_hard_links(d: Path) -> None:
    (d / "a").write_bytes(b"shared")
    os.link(d / "a", d / "b")
    assert (d / "a").stat().st_nlink == 2
    assert (d / "a").stat().st_ino == (d / "b").stat().st_ino
    with open(d / "b", "ab") as out:
        out.write(b"!")
    assert (d / "a").read_bytes() == b"shared!"
    (d / "a").unlink()
    assert (d / "b").stat().st_nlink == 1
    assert (d / "b").read_bytes() == b"shared!"
    with pytest.raises(PermissionError):
        os.link(d, d / "dirlink")


def test_rename_variants(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    os.rename(d / "a", d / "b")  # over an existing file
    assert (d / "b").read_bytes() == b"A" and not (d / "a").exists()
    (d / "c").write_bytes(b"C")
    with pytest.raises(FileExistsError):
        renameat2(d / "c", d / "b", RENAME_NOREPLACE)
    renameat2(d / "c", d / "fresh", RENAME_NOREPLACE)
    renameat2(d / "fresh", d / "b", RENAME_EXCHANGE)
    assert (d / "b").read_bytes() == b"C" and (d / "fresh").read_bytes() == b"A"
    with pytest.raises(FileNotFoundError):
        renameat2(d / "b", d / "missing", RENAME_EXCHANGE)
    (d / "dir1" / "sub").mkdir(parents=True)
    (d / "dir2").mkdir()
    os.rename(d / "dir1" / "sub", d / "dir2" / "sub")
    assert (d / "dir1").stat().st_nlink == 2 and (d / "dir2").stat().st_nlink == 3
    with pytest.raises(OSError) as info:
        os.rename(d / "dir2", d / "dir2" / "sub" / "inside")
    assert info.value.errno == errno.EINVAL
    (d / "dir1" / "x").write_bytes(b"")
    with pytest.raises(OSError) as info:
        os.rename(d / "dir2", d / "dir1")
    assert info.value.errno == errno.ENOTEMPTY
    renameat2(d / "dir2", d / "b", RENAME_EXCHANGE)  # a directory and a file trade places
    assert (d / "b" / "sub").is_dir() and (d / "dir2").read_bytes() == b"C"


def test_names_up_to_255_bytes(d: Path) -> None:
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(name.encode()) == 255
    (d / name).write_bytes(b"ok")
    assert (d / name).read_bytes() == b"ok"
    assert name in os.listdir(d)
    with pytest.raises(OSError) as info:
        (d / (name + "y")).write_bytes(b"no")
    assert info.value.errno == errno.ENAMETOOLONG


def test_special_files(d: Path) -> None:
    os.mkfifo(d / "fifo")
    assert stat.S_ISFIFO((d / "fifo").stat().st_mode)
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = (d / "null").stat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(d / "sock"))
    assert stat.S_ISSOCK((d / "sock").lstat().st_mode)


# --- attributes ---------------------------------------------------------------------


def test_chmod_chown_and_nanosecond_times(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(f.stat().st_mode) == 0o4751
    os.chown(f, NOBODY, NOBODY)
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    utimensat(f, (0, UTIME_OMIT), (5, 123_456_789))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 5_123_456_789)
    before = time.time_ns()
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = f.stat()
    assert st.st_atime_ns >= before - 10**9 and st.st_mtime_ns == 5_123_456_789


def test_mtime_follows_writes(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"a")
    os.utime(f, ns=(0, 0))
    with open(f, "ab") as out:
        out.write(b"b")
    assert f.stat().st_mtime_ns > 0


def test_user_xattrs(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.colour", b"blue")
    assert os.getxattr(f, "user.colour") == b"blue"
    assert "user.colour" in os.listxattr(f)
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.colour", b"red", os.XATTR_CREATE)
    assert info.value.errno == errno.EEXIST
    os.removexattr(f, "user.colour")
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.colour")
    assert info.value.errno == errno.ENODATA
    (d / "dir").mkdir()
    os.setxattr(d / "dir", "user.on-a-dir", b"")
    assert os.getxattr(d / "dir", "user.on-a-dir") == b""


def test_digest_xattr_and_cas(mount: Mount, d: Path) -> None:
    data = os.urandom(100_000)
    f = d / "f"
    f.write_bytes(data)
    digest = os.getxattr(f, "user.cachefs.digest").decode()
    assert digest == f"{hashlib.sha256(data).hexdigest()}/{len(data)}"
    with pytest.raises(PermissionError):
        os.setxattr(f, "user.cachefs.digest", b"0/0")
    with open(f, "ab") as out:  # unpublished writes are published first
        out.write(b"more")
        out.flush()
        assert os.getxattr(f, "user.cachefs.digest").decode().endswith("/100004")
    empty = d / "empty"
    empty.write_bytes(b"")
    assert os.getxattr(empty, "user.cachefs.digest").decode() == (
        hashlib.sha256(b"").hexdigest() + "/0"
    )
    cas = mount.path / ".cachefs" / "cas" / "sha256"
    assert not (cas / digest.split("/")[0]).exists()  # the old content is gone
    digest = os.getxattr(f, "user.cachefs.digest").decode()
    assert (cas / digest.split("/")[0]).read_bytes() == data + b"more"
    assert not (mount.path / ".cachefs" / "cas" / "sha256" / ("0" * 64)).exists()
    assert ".cachefs" not in os.listdir(mount.path)
    doc = json.loads((mount.path / ".cachefs" / "stats.json").read_bytes())
    for key in ("files", "logical_bytes", "stored_bytes", "chunks", "dedup_ratio"):
        assert key in doc
    with pytest.raises(OSError):
        (mount.path / ".cachefs" / "new").write_bytes(b"")


def test_statfs(mount: Mount) -> None:
    st = os.statvfs(mount.path)
    assert st.f_blocks > 0 and 0 < st.f_bavail <= st.f_blocks
    assert st.f_namemax == 255
    assert st.f_files > st.f_ffree


# --- ownership and permissions seen by other users ---------------------------------------


def test_new_files_owned_by_the_caller(d: Path) -> None:
    result = as_user(NOBODY, NOBODY, f"echo hi > {d}/mine && mkdir {d}/mydir")
    assert result.returncode == 0, result.stderr
    for name in ("mine", "mydir"):
        st = (d / name).stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


def test_setgid_directory(d: Path) -> None:
    os.chown(d, 0, 4343)
    os.chmod(d, 0o2777)
    result = as_user(NOBODY, NOBODY, f"touch {d}/f && mkdir {d}/sub")
    assert result.returncode == 0, result.stderr
    assert (d / "f").stat().st_gid == 4343
    sub = (d / "sub").stat()
    assert sub.st_gid == 4343 and sub.st_mode & stat.S_ISGID


def test_permissions_enforced_by_the_kernel(d: Path) -> None:
    secret = d / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    result = as_user(NOBODY, NOBODY, f"cat {secret}")
    assert result.returncode != 0 and "Permission denied" in result.stderr
    result = as_user(NOBODY, NOBODY, f"echo x >> {secret}")
    assert result.returncode != 0
    result = as_user(NOBODY, NOBODY, f"chmod 777 {secret}")
    assert result.returncode != 0 and "not permitted" in result.stderr
    (d / "ro").mkdir(mode=0o755)
    result = as_user(NOBODY, NOBODY, f"touch {d}/ro/x")
    assert result.returncode != 0 and "Permission denied" in result.stderr


def test_sticky_directory(d: Path) -> None:
    os.chmod(d, 0o1777)
    result = as_user(NOBODY, NOBODY, f"touch {d}/nobodys")
    assert result.returncode == 0, result.stderr
    result = as_user(OTHER, OTHER, f"rm -f {d}/nobodys")
    assert result.returncode != 0 and (d / "nobodys").exists()
    result = as_user(NOBODY, NOBODY, f"rm {d}/nobodys")
    assert result.returncode == 0, result.stderr


def test_chown_by_non_owner_refused(d: Path) -> None:
    result = as_user(NOBODY, NOBODY, f"touch {d}/f && chown {OTHER} {d}/f")
    assert result.returncode != 0 and (d / "f").stat().st_uid == NOBODY
