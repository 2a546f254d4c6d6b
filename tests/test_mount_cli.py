"""The command-line contract of ``cachefs mount`` and ``cachefs umount``, and of
the store commands given a mount point, on real mounts (kernel FUSE).

``cachefs mount`` (without --foreground) returns only once the mount is ready,
creating the store if missing; ``cachefs umount`` returns once the daemon has
published everything and exited.  Every failure is one line on stderr,
``cachefs: error: ...``, with a non-zero exit code and no traceback, and
leaves nothing half done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefs.daemon import _mount as mounting
from cachefs.daemon import mounted_fstype
from cachefs.errors import MountError
from cachefs.format.header import HEADER_NAME
from tests.mounting import CACHEFS, cachefs, require_fuse

TIMEOUT = 60


# --- helpers ------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def daemon_pid(mnt: Path) -> int:
    return int(json.loads((mnt / ".cachefs" / "stats.json").read_bytes())["pid"])


def mount_options(mnt: Path) -> list[str]:
    """The options of the mount at ``mnt`` in /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mnt):
                return fields[3].split(",")
    raise AssertionError(f"{mnt} is not in /proc/mounts")


class Mounts:
    """Daemonised mounts made by a test, always torn down afterwards."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def mount(self, store: Path, mnt: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``cachefs mount STORE MNT`` (creating MNT); fails the test if it fails."""
        require_fuse()
        mnt.mkdir(parents=True, exist_ok=True)
        self.paths.append(mnt)
        return cachefs("mount", str(store), str(mnt), *args, timeout=TIMEOUT)

    def try_mount(self, store: Path, mnt: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``cachefs mount STORE MNT`` that is expected to fail."""
        require_fuse()
        self.paths.append(mnt)
        return cachefs("mount", str(store), str(mnt), *args, check=False, timeout=TIMEOUT)

    def cleanup(self) -> None:
        for mnt in self.paths:
            if not os.path.ismount(mnt):
                continue
            try:
                pid: int | None = daemon_pid(mnt)
            except (OSError, ValueError, KeyError):
                pid = None
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
            deadline = time.monotonic() + 30
            while pid is not None and alive(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    break
                time.sleep(0.05)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    made = Mounts()
    try:
        yield made
    finally:
        made.cleanup()


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *fragments: str, code: int | None = None
) -> str:
    """A failure: non-zero exit, one line ``cachefs: error: ...`` naming ``fragments``."""
    assert result.returncode != 0, f"expected a failure: {result.stdout}{result.stderr}"
    if code is not None:
        assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("cachefs: error: "), line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), line
    return line


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (names and bytes), to check that nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def settle(mnt: Path) -> None:
    """Publish every write the daemon holds (``/.cachefs/control``: ``sync``)."""
    fd = os.open(mnt / ".cachefs" / "control", os.O_RDWR)
    try:
        os.write(fd, b"sync")
        assert json.loads(os.pread(fd, 1 << 16, 0))["ok"]
    finally:
        os.close(fd)


def stats_json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cachefs("stats", str(path), "--json").stdout)
    return doc


# --- mount and umount ----------------------------------------------------------------------


def test_mount_returns_ready_and_umount_waits_for_the_daemon(
    tmp_path: Path, mounts: Mounts
) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    assert not store.exists()
    result = mounts.mount(store, mnt)
    assert result.stderr == ""
    # Ready the moment the command returns.
    assert os.path.ismount(mnt)
    live = json.loads((mnt / ".cachefs" / "stats.json").read_bytes())
    assert (store / HEADER_NAME).is_file()  # created
    assert Path(live["store"]) == store
    pid = int(live["pid"])
    assert alive(pid)
    data = os.urandom(300_000)
    (mnt / "kept").write_bytes(data)  # not fsynced: umount publishes it
    (mnt / "dir").mkdir()
    (mnt / "dir" / "small").write_text("small\n")
    result = cachefs("umount", str(mnt), timeout=TIMEOUT)
    assert result.stderr == ""
    assert not os.path.ismount(mnt)
    assert not alive(pid), "the daemon still runs after umount returned"
    # A new mount finds it all.
    mounts.mount(store, mnt)
    assert daemon_pid(mnt) != pid
    assert (mnt / "kept").read_bytes() == data
    assert (mnt / "dir" / "small").read_text() == "small\n"
    cachefs("umount", str(mnt), timeout=TIMEOUT)
    assert not os.path.ismount(mnt)


def test_the_daemon_logs_to_the_store(tmp_path: Path, mounts: Mounts) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mounts.mount(store, mnt)
    log = store / "cachefs.log"
    assert log.is_file()
    text = log.read_text()
    assert "mounted" in text
    assert str(mnt) in text
    cachefs("umount", str(mnt), timeout=TIMEOUT)
    assert "unmounted" in log.read_text()


def test_missing_mount_point(tmp_path: Path, mounts: Mounts) -> None:
    store = tmp_path / "store"
    result = mounts.try_mount(store, tmp_path / "nowhere")
    assert_one_line_error(result, "does not exist", str(tmp_path / "nowhere"))
    assert not store.exists(), "a failed mount must not create the store"


def test_mount_point_is_a_file(tmp_path: Path, mounts: Mounts) -> None:
    store, target = tmp_path / "store", tmp_path / "file"
    target.write_text("not a directory\n")
    result = mounts.try_mount(store, target)
    assert_one_line_error(result, "not a directory")
    assert not store.exists()
    assert target.read_text() == "not a directory\n"


def test_mount_point_already_mounted(tmp_path: Path, mounts: Mounts) -> None:
    mnt = tmp_path / "mnt"
    mounts.mount(tmp_path / "one", mnt)
    (mnt / "f").write_text("one\n")
    result = mounts.try_mount(tmp_path / "two", mnt)
    assert_one_line_error(result, "already a mount point")
    assert not (tmp_path / "two").exists()
    # The first mount is untouched.
    assert (mnt / "f").read_text() == "one\n"
    assert Path(json.loads((mnt / ".cachefs" / "stats.json").read_bytes())["store"]) == (
        tmp_path / "one"
    )


def test_store_locked_by_another_mount(tmp_path: Path, mounts: Mounts) -> None:
    store, first, second = tmp_path / "store", tmp_path / "first", tmp_path / "second"
    mounts.mount(store, first)
    second.mkdir()
    result = mounts.try_mount(store, second)
    assert_one_line_error(result, "open for writing by another process", code=5)
    assert not os.path.ismount(second)
    (first / "still").write_text("works\n")
    assert (first / "still").read_text() == "works\n"


def test_store_of_a_newer_format_is_refused_untouched(tmp_path: Path, mounts: Mounts) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    cachefs("init", str(store))
    header = store / HEADER_NAME
    doc = json.loads(header.read_text())  # plain JSON, no checksum (see cachefs/header.py)
    doc["format_version"] += 1
    header.write_text(json.dumps(doc, indent=2) + "\n")
    before = tree_bytes(store)
    listing = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    mnt.mkdir()
    result = mounts.try_mount(store, mnt)
    assert_one_line_error(result, "format version", code=6)
    assert not os.path.ismount(mnt)
    assert tree_bytes(store) == before
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == listing
    # In the foreground too.
    result = mounts.try_mount(store, mnt, "--foreground")
    assert_one_line_error(result, "format version", code=6)
    assert tree_bytes(store) == before


def test_fusermount3_missing(tmp_path: Path) -> None:
    require_fuse()
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "cachefs", "mount", str(store), str(mnt)],
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )
    assert_one_line_error(result, "fusermount3")
    assert not os.path.ismount(mnt)
    assert not store.exists()


def test_no_dev_fuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounting, "FUSE_DEVICE", str(tmp_path / "no-fuse-here"))
    with pytest.raises(MountError) as raised:
        mounting.check_fuse()
    assert "/dev/fuse" in str(raised.value)
    assert raised.value.exit_code != 0
    # mount() checks before it creates anything.
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(MountError):
        mounting.mount(store, mnt, [], foreground=True)
    assert not store.exists()
    assert not os.path.ismount(mnt)


def test_umount_of_something_else(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert_one_line_error(
        cachefs("umount", str(plain), check=False, timeout=TIMEOUT), "not a cachefs mount"
    )
    assert_one_line_error(
        cachefs("umount", str(tmp_path / "nowhere"), check=False, timeout=TIMEOUT),
        "does not exist",
    )
    assert plain.is_dir()


def test_umount_detaches_the_mount_of_a_killed_daemon(tmp_path: Path, mounts: Mounts) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mounts.mount(store, mnt)
    pid = daemon_pid(mnt)
    os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mounted_fstype(mnt) == "fuse.cachefs"  # dead, still in the table
    result = cachefs("umount", str(mnt), check=False, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert mounted_fstype(mnt) is None
    mounts.mount(store, mnt)  # and it mounts again
    assert os.path.ismount(mnt)
    cachefs("umount", str(mnt), timeout=TIMEOUT)


def test_umount_while_a_file_is_open_is_refused(tmp_path: Path, mounts: Mounts) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mounts.mount(store, mnt)
    (mnt / "held").write_bytes(b"held open\n")
    pid = daemon_pid(mnt)
    with open(mnt / "held", "rb") as held:
        result = cachefs("umount", str(mnt), check=False, timeout=TIMEOUT)
        assert_one_line_error(result, "busy")
        # Nothing changed: still mounted, still served.
        assert os.path.ismount(mnt)
        assert alive(pid)
        assert held.read() == b"held open\n"
        (mnt / "after").write_text("written after the refusal\n")
        assert json.loads((mnt / ".cachefs" / "stats.json").read_bytes())["pid"] == pid
    cachefs("umount", str(mnt), timeout=TIMEOUT)
    assert not os.path.ismount(mnt)
    assert not alive(pid)
    mounts.mount(store, mnt)
    assert (mnt / "after").read_text() == "written after the refusal\n"


# --- store commands on a mount point -------------------------------------------------------


def test_stats_fsck_gc_on_the_mount_point(tmp_path: Path, mounts: Mounts) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mounts.mount(store, mnt)
    one = os.urandom(1 << 20)
    (mnt / "a").write_bytes(one)
    (mnt / "b").write_bytes(one)  # a duplicate
    (mnt / "c").write_bytes(os.urandom(500_000))
    settle(mnt)
    # Overwriting c leaves its old chunks unreferenced: garbage for gc.
    replacement = os.urandom(200_000)
    (mnt / "c").write_bytes(replacement)
    settle(mnt)

    on_mount, on_store = stats_json(mnt), stats_json(store)
    # The mount point adds the daemon's own figures to the store's.
    assert {key: on_mount[key] for key in on_store} == on_store
    assert on_mount["caches"] == [] and on_mount["memory_limit"] == 512 << 20
    assert on_mount["store"] == str(store)
    assert on_mount["files"] == 3
    assert on_mount["logical_bytes"] == 2 * len(one) + len(replacement)
    live = json.loads((mnt / ".cachefs" / "stats.json").read_bytes())
    for key in ("files", "objects", "logical_bytes", "stored_bytes", "chunks", "chunk_bytes"):
        assert live[key] == on_mount[key], key
    text = cachefs("stats", str(mnt)).stdout
    assert str(store) in text

    fsck = cachefs("fsck", str(mnt), check=False, timeout=TIMEOUT)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "clean" in fsck.stdout

    # gc goes through the daemon (it holds the store's writer lock).
    gc = cachefs("gc", str(mnt), "--json", timeout=TIMEOUT)
    report = json.loads(gc.stdout)
    assert report["chunks_removed"] > 0, report
    after = stats_json(mnt)
    assert after["chunks"] < on_mount["chunks"]
    assert after["logical_bytes"] == on_mount["logical_bytes"]
    assert "removed" in cachefs("gc", str(mnt), timeout=TIMEOUT).stdout
    # Nothing referenced was lost.
    assert (mnt / "a").read_bytes() == one
    assert (mnt / "b").read_bytes() == one
    assert (mnt / "c").read_bytes() == replacement
    assert cachefs("fsck", str(mnt), check=False, timeout=TIMEOUT).returncode == 0
    # And on the store path (read-only beside the daemon).
    assert cachefs("fsck", str(store), check=False, timeout=TIMEOUT).returncode == 0


# --- mount options -------------------------------------------------------------------------


def test_default_options_as_root(tmp_path: Path, mounts: Mounts) -> None:
    if os.geteuid() != 0:
        pytest.skip("allow_other is a default only for root")
    mnt = tmp_path / "mnt"
    mounts.mount(tmp_path / "store", mnt)
    options = mount_options(mnt)
    assert "allow_other" in options
    assert "default_permissions" in options
    assert "rw" in options
    # The kernel reads ahead a FUSE request's largest, not its default 128 KiB.
    device = mnt.stat().st_dev
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    assert int(setting.read_text()) == mounting.READ_AHEAD_KB > 128


def test_option_removes_a_default(tmp_path: Path, mounts: Mounts) -> None:
    mnt = tmp_path / "mnt"
    mounts.mount(tmp_path / "store", mnt, "-o", "noallow_other")
    options = mount_options(mnt)
    assert "allow_other" not in options
    assert "default_permissions" in options


def test_read_only_mount(tmp_path: Path, mounts: Mounts) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mounts.mount(store, mnt)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "f").write_bytes(b"content\n")
    cachefs("umount", str(mnt), timeout=TIMEOUT)
    digest_before = hashlib.sha256((store / HEADER_NAME).read_bytes()).hexdigest()

    mounts.mount(store, mnt, "-o", "ro")
    assert "ro" in mount_options(mnt)
    assert (mnt / "dir" / "f").read_bytes() == b"content\n"
    attempts: list[Callable[[], object]] = [
        lambda: (mnt / "new").write_bytes(b"x"),
        lambda: open(mnt / "dir" / "f", "ab").close(),
        (mnt / "dir2").mkdir,
        (mnt / "dir" / "f").unlink,
        lambda: (mnt / "dir" / "f").chmod(0o600),
        lambda: os.setxattr(mnt / "dir" / "f", "user.x", b"1"),
        lambda: (mnt / "dir" / "f").rename(mnt / "dir" / "g"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS
    cachefs("umount", str(mnt), timeout=TIMEOUT)
    assert hashlib.sha256((store / HEADER_NAME).read_bytes()).hexdigest() == digest_before
    mounts.mount(store, mnt)
    assert sorted(p.name for p in (mnt / "dir").iterdir()) == ["f"]
    assert not (mnt / "new").exists()


def test_foreground_mount_runs_until_unmounted(tmp_path: Path) -> None:
    """--foreground keeps the command running; an unmount from outside ends it with 0."""
    require_fuse()
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    process = subprocess.Popen(
        [*CACHEFS, "mount", "--foreground", str(store), str(mnt)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (mnt / ".cachefs" / "stats.json").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the mount never became ready"
            time.sleep(0.02)
        assert daemon_pid(mnt) == process.pid
        (mnt / "f").write_text("foreground\n")
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        _out, err = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, err
        assert b"Traceback" not in err
    finally:
        if process.poll() is None:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
            process.kill()
            process.communicate()
    stats = stats_json(store)
    assert stats["files"] == 1


def test_sigterm_stops_the_daemon_as_umount_does(tmp_path: Path, mounts: Mounts) -> None:
    """systemd stops a mount with SIGTERM: everything written is published,
    the mount goes, and the daemon exits 0 (its log says so)."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mounts.mount(store, mnt)
    (mnt / "f").write_bytes(b"written before the signal\n")
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT
    while alive(pid):
        assert time.monotonic() < deadline, "the daemon did not stop on SIGTERM"
        time.sleep(0.05)
    assert not os.path.ismount(mnt)
    assert "signal 15: stopping" in (store / "cachefs.log").read_text()
    mounts.mount(store, mnt)
    assert (mnt / "f").read_bytes() == b"written before the signal\n"
