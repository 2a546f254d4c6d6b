"""Model-based test: the mount against a reference directory on tmpfs.

Hypothesis draws sequences of create, write at offsets, truncate, rename (with
RENAME_NOREPLACE / RENAME_EXCHANGE), link, unlink, symlink, mkdir, rmdir,
chmod, setxattr and reads over a small set of paths (so that most operations
meet existing entries, and many fail).  Each operation runs on both trees; the
outcome (result or errno) must be the same, and after every step the trees must
be identical: entries, types, sizes, bytes, modes, link counts, which paths
share an inode, symlink targets and user xattrs.  Each example ends with an
unmount and remount of the store, and the trees are compared once more.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from tests.mounting import Mount, start, stop

NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{p}/{n}" for p in NAMES for n in NAMES]
paths = st.sampled_from(PATHS)
names = st.sampled_from(NAMES)
_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, old.encode(), -100, new.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _outcome(action: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", action()
    except OSError as exc:
        return "error", errno.errorcode.get(exc.errno or 0, exc.errno)


def _snapshot(root: Path) -> dict[str, Any]:
    """Everything the comparison looks at, keyed by relative path."""
    tree: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st_ = path.lstat()
            entry: dict[str, Any] = {"mode": st_.st_mode, "nlink": st_.st_nlink}
            if stat.S_ISREG(st_.st_mode):
                entry["data"] = path.read_bytes()
                entry["size"] = st_.st_size
                inodes.setdefault(st_.st_ino, []).append(rel)
            elif stat.S_ISLNK(st_.st_mode):
                entry["target"] = os.readlink(path)
            if not stat.S_ISLNK(st_.st_mode):
                entry["xattrs"] = {
                    x: os.getxattr(path, x)
                    for x in os.listxattr(path)
                    if x.startswith("user.") and x != "user.cachefs.digest"
                }
            tree[rel] = entry
    tree["<links>"] = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return tree


class MountHolder:
    def __init__(self, mount: Mount) -> None:
        self.mount = mount

    def remount(self) -> None:
        store, path = self.mount.store, self.mount.path
        status = stop(self.mount)
        assert status == 0, self.mount.stderr()
        self.mount = start(store, path)


class FilesystemModel(RuleBasedStateMachine):
    holder: MountHolder
    reference_base: Path
    counter = itertools.count()
    steps = 0

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.real = self.holder.mount.path / f"model-{n}"
        self.ref = self.reference_base / f"model-{n}"
        self.real.mkdir()
        self.ref.mkdir()

    def both(self, action: Callable[[Path], Any]) -> None:
        got = _outcome(lambda: action(self.real))
        want = _outcome(lambda: action(self.ref))
        FilesystemModel.steps += 1
        assert got == want
        self.compare()

    def compare(self) -> None:
        assert _snapshot(self.real) == _snapshot(self.ref)

    @rule(path=paths, data=st.binary(max_size=3000), excl=st.booleans())
    def create(self, path: str, data: bytes, excl: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if excl else 0)

        def act(root: Path) -> None:
            fd = os.open(root / path, flags, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

        self.both(act)

    @rule(
        path=paths,
        offset=st.integers(0, 200_000),
        data=st.binary(min_size=1, max_size=70_000),
        append=st.booleans(),
    )
    def write_at(self, path: str, offset: int, data: bytes, append: bool) -> None:
        flags = os.O_WRONLY | (os.O_APPEND if append else 0)

        def act(root: Path) -> int:
            fd = os.open(root / path, flags)
            try:
                return os.pwrite(fd, data, offset) if not append else os.write(fd, data)
            finally:
                os.close(fd)

        self.both(act)

    @rule(path=paths, size=st.integers(0, 150_000))
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / path, size))

    @rule(path=paths, offset=st.integers(0, 100_000), size=st.integers(0, 100_000))
    def read(self, path: str, offset: int, size: int) -> None:
        def act(root: Path) -> bytes:
            with open(root / path, "rb") as f:
                f.seek(offset)
                return f.read(size)

        self.both(act)

    @rule(src=paths, dst=paths, flags=st.sampled_from([0, 1, 2]))
    def rename(self, src: str, dst: str, flags: int) -> None:
        self.both(lambda root: _renameat2(str(root / src), str(root / dst), flags))

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda root: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda root: os.unlink(root / path))

    @rule(path=paths, link_to=st.sampled_from([*PATHS, "../x", "/nowhere"]))
    def symlink(self, path: str, link_to: str) -> None:
        self.both(lambda root: os.symlink(link_to, root / path))

    @rule(path=paths)
    def mkdir(self, path: str) -> None:
        self.both(lambda root: os.mkdir(root / path, 0o755))

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.both(lambda root: os.rmdir(root / path))

    @rule(path=paths, mode=st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o1777]))
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / path, mode))

    @rule(path=paths, name=names, value=st.binary(max_size=100))
    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.both(lambda root: os.setxattr(root / path, f"user.{name}", value))

    def teardown(self) -> None:
        self.holder.remount()
        self.real = self.holder.mount.path / self.real.name
        self.compare()


@pytest.fixture
def reference_base() -> Iterator[Path]:
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="cachefs-model-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_mount_matches_reference(tmp_path: Path, reference_base: Path) -> None:
    holder = MountHolder(start(tmp_path / "store", tmp_path / "mnt"))
    FilesystemModel.holder = holder
    FilesystemModel.reference_base = reference_base
    try:
        run_state_machine_as_test(
            FilesystemModel,
            settings=settings(
                max_examples=40 if os.environ.get("CI") else 15,
                stateful_step_count=40,
                deadline=None,
            ),
        )
    finally:
        status = stop(holder.mount)
    assert status == 0, holder.mount.stderr()
    examples = next(FilesystemModel.counter)
    print(f"{examples} examples, {FilesystemModel.steps} steps")
    assert FilesystemModel.steps > 5 * examples > 0
