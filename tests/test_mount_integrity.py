"""What a real mount (kernel FUSE) promises about the data it holds.

* Dedup: a second copy of a tree costs (almost) nothing, and the store's
  ``logical_bytes`` is exactly what the files in the mount add up to.
* Corruption: damage in a segment gives EIO to the reads that need it, never
  wrong bytes; other files read back intact; ``fsck`` finds it (on the store
  and through the mount point); the mount's figures record it.
* Remount: inode numbers, contents, modes, owners, xattrs, symlinks and hard
  links are the same after ``umount`` and a new mount.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import click
import hypothesis
import pytest
import trio
import zstandard

from tests.mounting import Mount, cachefs, mounted

#: Packages of this checkout's venv: real build outputs (.so, .py, .pyi, data),
#: about 36 MB in all.
PACKAGES = [Path(str(m.__file__)).parent for m in (zstandard, hypothesis, trio, click)]


def settle(mount: Mount) -> None:
    """Publish every write the daemon holds (close(2) does not wait for it)."""
    fd = os.open(mount.path / ".cachefs" / "control", os.O_RDWR)
    try:
        os.write(fd, b"sync")
        answer = json.loads(os.pread(fd, 1 << 16, 0))
    finally:
        os.close(fd)
    assert answer["ok"], answer


def live_stats(mount: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((mount.path / ".cachefs" / "stats.json").read_bytes())
    return doc


def cli_stats(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cachefs("stats", str(path), "--json").stdout)
    return doc


def ignore_caches(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


def file_bytes(root: Path) -> int:
    """What the regular files under ``root`` add up to, each inode once.

    This is what the store's ``logical_bytes`` counts for a mount: every
    regular file with content holds one reference to its object (hard links
    share the inode, hence the reference), and an empty file holds none but
    adds nothing.  ``find -printf '%i %s'`` lists inode and size; directories
    and symlinks are left out, unlike ``du``, which adds their sizes too."""
    out = subprocess.run(
        ["find", str(root), "-type", "f", "-printf", "%i %s\\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sizes = dict(line.split() for line in out.splitlines())
    return sum(int(size) for size in sizes.values())


def du_apparent(root: Path) -> int:
    """``du -sb --apparent-size``: files (hard links once), plus directory and
    symlink sizes."""
    out = subprocess.run(
        ["du", "-sb", "--apparent-size", str(root)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[0])


def non_file_bytes(root: Path) -> int:
    """The sizes du adds besides regular files (directories, symlinks)."""
    out = subprocess.run(
        ["find", str(root), "!", "-type", "f", "-printf", "%s\\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line) for line in out.split())


# --- dedup ---------------------------------------------------------------------------------


def test_second_copy_of_a_tree_is_nearly_free(tmp_path: Path) -> None:
    with mounted(tmp_path / "store", tmp_path / "mnt") as m:
        before = live_stats(m)["stored_bytes"]
        for package in PACKAGES:
            shutil.copytree(package, m.path / "one" / package.name, ignore=ignore_caches)
        settle(m)
        first = live_stats(m)["stored_bytes"] - before
        assert first > 5 << 20, "the first copy should store megabytes"
        for package in PACKAGES:
            shutil.copytree(package, m.path / "two" / package.name, ignore=ignore_caches)
        settle(m)
        stats = cli_stats(m.path)
        growth = stats["stored_bytes"] - before - first
        assert growth < 0.01 * first, f"a second copy stored {growth} more bytes (first {first})"
        # The mount's live figures and the command line agree.
        live = live_stats(m)
        for key in ("files", "logical_bytes", "stored_bytes", "chunks"):
            assert live[key] == stats[key], key
        # logical_bytes is what the files in the mount add up to, both copies.
        assert file_bytes(m.path / "one") == file_bytes(m.path / "two")
        assert file_bytes(m.path) == stats["logical_bytes"]
        assert du_apparent(m.path) - non_file_bytes(m.path) == stats["logical_bytes"]
        assert stats["dedup_ratio"] >= 1.9


# --- corruption ----------------------------------------------------------------------------


def make_contents() -> dict[str, bytes]:
    """Compressible and incompressible files, small and spanning many chunks."""
    rng = random.Random(42)
    words = [bytes(rng.choices(b"abcdefghij klmnop\n", k=rng.randint(3, 12))) for _ in range(400)]

    def text(size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words)
        return bytes(out[:size])

    contents = {f"text-{i}": text(size) for i, size in enumerate((200_000, 900_000, 2_500_000))}
    contents |= {
        f"random-{i}": rng.randbytes(size) for i, size in enumerate((50_000, 700_000, 2_000_000))
    }
    contents["small"] = rng.randbytes(3000)
    return contents


def read_in_pieces(path: Path, original: bytes, piece: int = 4096) -> int:
    """Read a file a page at a time; every byte read must be right.  Returns the
    number of pieces that failed with EIO (any other error fails the test)."""
    failed = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, len(original), piece):
            try:
                data = os.pread(fd, piece, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO, f"{path} at {offset}: {exc}"
                failed += 1
                continue
            expected = original[offset : offset + piece]
            assert data == expected, f"{path}: wrong bytes at offset {offset}"
    finally:
        os.close(fd)
    return failed


def flip_bytes_in_a_segment(store: Path) -> Path:
    """Invert 32 bytes in the middle of the largest segment file."""
    segments = sorted(store.glob("segments/**/*.seg"), key=lambda p: (p.stat().st_size, str(p)))
    assert segments, "the store has no segment files"
    victim = segments[-1]
    with open(victim, "r+b") as f:
        middle = victim.stat().st_size // 2
        f.seek(middle)
        data = f.read(32)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))
    return victim


def test_damaged_segment_gives_eio_never_wrong_bytes(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    cachefs(
        "init",
        str(store),
        "--min-chunk",
        "1024",
        "--avg-chunk",
        "4096",
        "--max-chunk",
        "16384",
        "--segment-size",
        "1048576",
    )
    contents = make_contents()
    digests: dict[str, str] = {}
    with mounted(store, mnt) as m:
        for name, data in contents.items():
            with open(m.path / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            digests[name] = os.getxattr(m.path / name, "user.cachefs.digest").decode()
    assert len(list(store.glob("segments/**/*.seg"))) > 1

    victim = flip_bytes_in_a_segment(store)

    # fsck of the stopped store: exit 1, names the damage and what it costs.
    result = cachefs("fsck", str(store), "--json", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert not report["clean"]
    assert report["problems"]
    lost = set(report["lost_objects"])
    damaged = {name for name, digest in digests.items() if digest in lost}
    assert damaged, f"the damage in {victim} cost no file: {report}"
    assert lost <= set(digests.values())
    text = cachefs("fsck", str(store), check=False)
    assert text.returncode == 1
    assert "DAMAGE" in text.stdout
    assert victim.stem in text.stdout or str(victim) in text.stdout, text.stdout

    with mounted(store, mnt) as m:
        assert live_stats(m)["corruptions"] == 0
        failures = {name: read_in_pieces(m.path / name, data) for name, data in contents.items()}
        assert {name for name, n in failures.items() if n} == damaged, failures
        for name in set(contents) - damaged:
            assert (m.path / name).read_bytes() == contents[name]
        for name in damaged:
            with pytest.raises(OSError) as raised:
                (m.path / name).read_bytes()
            assert raised.value.errno == errno.EIO
        stats = live_stats(m)
        assert stats["corruptions"] > 0
        assert stats["needs_fsck"] is True
        # fsck through the mount point, while mounted.
        through_mount = cachefs("fsck", str(m.path), "--json", check=False)
        assert through_mount.returncode == 1, through_mount.stdout + through_mount.stderr
        assert set(json.loads(through_mount.stdout)["lost_objects"]) == lost
        # The daemon's log names the damage and where it is.
        log = (store / "cachefs.log").read_text()
        assert "checksum mismatch" in log
        assert str(victim) in log


# --- remount -------------------------------------------------------------------------------


def build_tree(root: Path) -> None:
    rng = random.Random(3)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(rng.randbytes(200_000))
    (root / "dir" / "sub" / "text").write_text("some text\n" * 500)
    (root / "empty").write_bytes(b"")
    (root / "unsynced").write_bytes(b"written, never fsynced" * 1000)
    with open(root / "synced", "wb") as f:
        f.write(rng.randbytes(50_000))
        os.fsync(f.fileno())
    os.link(root / "dir" / "file", root / "hardlink")
    os.symlink("dir/sub/text", root / "symlink")
    os.symlink("/nowhere", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    (root / "dir" / "file").chmod(0o751)
    (root / "dir" / "sub").chmod(0o710)
    os.chown(root / "dir" / "sub" / "text", 1234, 5678)
    os.chown(root / "symlink", 4321, 8765, follow_symlinks=False)
    os.chown(root / "dir", 0, 100)
    os.setxattr(root / "dir" / "file", "user.origin", b"test")
    os.setxattr(root / "dir" / "file", "user.binary", bytes(range(256)))
    os.setxattr(root / "dir", "user.on-a-dir", b"yes")
    os.setxattr(root / "empty", "user.empty-value", b"")
    os.utime(root / "dir" / "sub" / "text", ns=(1_000_000_001, 1_500_000_000_987_654_321))


def describe(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = str(path.relative_to(root))
        content: object = None
        xattrs: dict[str, bytes] = {}
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        if not stat.S_ISLNK(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
            xattrs = {name: os.getxattr(path, name) for name in sorted(os.listxattr(path))}
        out[rel] = (
            st.st_ino,
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_nlink,
            st.st_size,
            st.st_mtime_ns,
            content,
            xattrs,
        )
    return out


def test_inodes_and_metadata_survive_remount(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt) as m:
        build_tree(m.path)
        before = describe(m.path)
    assert before["hardlink"][0] == before["dir/file"][0]
    assert before["hardlink"][4] == 2
    assert before["."][0] == 1
    with mounted(store, mnt) as m:
        after = describe(m.path)
        assert after == before
        # Still one inode behind the two names: a change through one shows in the other.
        with open(m.path / "hardlink", "r+b") as f:
            f.write(b"changed")
        assert (m.path / "dir" / "file").read_bytes()[:7] == b"changed"
        inos = {rel: entry[0] for rel, entry in after.items()}
    with mounted(store, mnt) as m:
        assert {rel: entry[0] for rel, entry in describe(m.path).items()} == inos
        assert (m.path / "dir" / "file").read_bytes()[:7] == b"changed"


# --- times set after close -----------------------------------------------------------------


def test_times_set_right_after_close_stick(tmp_path: Path) -> None:
    """rsync, tar and make write a file, close it and at once set its times and
    mode by path (the daemon may still be publishing the content then): the
    times and mode set last are the ones that stay, before and after remount."""
    t = 1_500_000_000_123_456_789
    data = random.Random(5).randbytes(3 << 20)
    names = [f"f{i}" for i in range(16)]
    with mounted(tmp_path / "store", tmp_path / "mnt") as m:
        for i, name in enumerate(names):
            tmp = m.path / f".{name}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data[i:] + data[:i])
            finally:
                os.close(fd)
            os.utime(tmp, ns=(t, t + i), follow_symlinks=False)
            tmp.chmod(0o644)
            tmp.rename(m.path / name)
        settle(m)
        wrong = {n: m.path.joinpath(n).stat().st_mtime_ns - (t + i) for i, n in enumerate(names)}
        assert {n: d for n, d in wrong.items() if d} == {}
        assert {stat.S_IMODE(m.path.joinpath(n).stat().st_mode) for n in names} == {0o644}
    with mounted(tmp_path / "store", tmp_path / "mnt") as m:
        assert [m.path.joinpath(n).stat().st_mtime_ns for n in names] == [
            t + i for i in range(len(names))
        ]
