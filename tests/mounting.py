"""Real mounts for tests: ``mounted()`` starts the daemon in a subprocess, waits
until the mount is usable, and always unmounts (lazily if it must) and reaps
the daemon.  Under ``CI=true`` a test that cannot mount fails; elsewhere it is
skipped when the machine has no FUSE."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CACHEFS = [sys.executable, "-m", "cachefs"]
READY_TIMEOUT = 30.0


def require_fuse() -> None:
    """Skip (fail under CI) when this machine cannot mount FUSE file systems."""
    reason = None
    if not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    elif shutil.which("fusermount3") is None:
        reason = "fusermount3 is not installed"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount FUSE here: {reason}")
        pytest.skip(f"cannot mount FUSE here: {reason}")


@dataclass
class Mount:
    store: Path
    path: Path
    process: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def cachefs(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run the command line; with ``check``, fail the test (showing stderr) on error."""
    result = subprocess.run(
        [*CACHEFS, *args],
        capture_output=True,
        text=True,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    if check and result.returncode != 0:
        pytest.fail(f"cachefs {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result  # type: ignore[no-any-return]


def start(
    store: Path,
    mountpoint: Path,
    *args: str,
    command: list[str] = CACHEFS,
    env: dict[str, str] | None = None,
) -> Mount:
    """Start a foreground daemon (``command``: the command line to run it with)
    and wait until the mount answers."""
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.daemon.log"
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [*command, "mount", "--foreground", str(store), str(mountpoint), *args],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=env,
        )
    mount = Mount(store, mountpoint, process, log)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (mountpoint / ".cachefs" / "stats.json").exists():
        if process.poll() is not None:
            pytest.fail(f"the mount daemon exited ({process.returncode}): {mount.stderr()}")
        if time.monotonic() > deadline:
            stop(mount)
            pytest.fail(f"the mount was not ready after {READY_TIMEOUT}s: {mount.stderr()}")
        time.sleep(0.02)
    return mount


def stop(mount: Mount, *, timeout: float = 120.0) -> int:
    """Unmount (lazily if busy) and reap the daemon; returns its exit status."""
    if os.path.ismount(mount.path):
        result = subprocess.run(
            ["fusermount3", "-u", str(mount.path)], capture_output=True, check=False
        )
        if result.returncode != 0:
            subprocess.run(
                ["fusermount3", "-uz", str(mount.path)], capture_output=True, check=False
            )
    try:
        return mount.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        mount.process.kill()
        mount.process.wait()
        pytest.fail(f"the daemon did not exit within {timeout}s of unmounting: {mount.stderr()}")


def kill(mount: Mount) -> None:
    """kill -9 the daemon, then detach the dead mount."""
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait()
    subprocess.run(["fusermount3", "-uz", str(mount.path)], capture_output=True, check=False)


@contextmanager
def mounted(store: Path, mountpoint: Path, *args: str) -> Iterator[Mount]:
    mount = start(store, mountpoint, *args)
    try:
        yield mount
    finally:
        status = stop(mount)
    assert status == 0, f"the daemon exited with {status}: {mount.stderr()}"


def as_user(
    uid: int, gid: int, script: str, *, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run a shell script as another user (the tests run as root)."""
    return subprocess.run(
        ["/bin/sh", "-c", script],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )


def apparent_size(directory: Path) -> int:
    """``du --apparent-size`` of a tree, in bytes (directories included)."""
    out = subprocess.run(
        ["du", "-s", "--apparent-size", "--block-size=1", str(directory)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def live_stats(mountpoint: Path) -> dict[str, Any]:
    """The mount's ``/.cachefs/stats.json``."""
    doc: dict[str, Any] = json.loads((mountpoint / ".cachefs" / "stats.json").read_bytes())
    return doc


def content_digest(path: Path, timeout: float = 120.0) -> str:
    """``user.cachefs.digest``, asked again while it is being computed (EAGAIN)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.getxattr(path, "user.cachefs.digest").decode()
        except OSError as exc:
            if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise
        time.sleep(0.05)
