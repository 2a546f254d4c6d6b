"""Finding mounted and served stores and talking to their daemons (daemon layer).

The mount table (``/proc/self/mountinfo``) says where cachefs is mounted
without touching the mounts (a dead one hangs a ``stat``); a live mount's
``/.cachefs/stats.json`` says which daemon and store serve it, and its
``/.cachefs/control`` runs commands in that daemon.  A store served with no
mount (``cachefs serve``) answers the same on ``STORE/control.sock``: a
command line in, a JSON answer out (``stats`` gives the live figures).

``umount`` unmounts through ``fusermount3 -u`` and waits for the daemon to
exit; the daemon's pid and store are found in ``MOUNT/.cachefs/stats.json``.

Nothing here imports the engine, the file system or the servers: the commands
that only find or talk to a daemon start quickly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachefs.errors import CachefsError, ConfigError, MountError, NotFoundError

log = logging.getLogger(__name__)

#: The control socket of a served store (``_serve.py``).
SOCKET_NAME = "control.sock"
#: The daemon's log in its store (``_process.setup_logging``).
LOG_NAME = "cachefs.log"
#: Seconds to wait for a served store's daemon to answer (gc may take long).
_TIMEOUT = 3600.0

FSNAME = "cachefs"
#: The type of a cachefs mount in the mount table.
FSTYPE = f"fuse.{FSNAME}"


def mount_table() -> Iterator[tuple[str, str]]:
    """(mount point, file system type) of every mount of this process's mount
    namespace, in the order they were made (``/proc/self/mountinfo``)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            yield _unescape(fields[4]), fields[separator + 1]


def mounted_fstype(path: Path) -> str | None:
    """The type of the file system mounted exactly at ``path`` (from the mount
    table: never touches the mount itself, which may be dead)."""
    # Resolve symlinks in the parent only: a stat of a dead (or our own) mount hangs.
    absolute = Path(os.path.abspath(path))
    target = os.path.join(os.path.realpath(absolute.parent), absolute.name)
    found = None
    try:
        for point, fstype in mount_table():
            if point == target:
                found = fstype  # the last mount on a path wins
    except (OSError, ValueError):
        return None
    return found


def cachefs_mounts() -> list[Path]:
    """The mount points of every cachefs mount."""
    return [Path(point) for point, fstype in mount_table() if fstype == FSTYPE]


def _unescape(field: str) -> str:
    """Mount table fields escape space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_info(path: Path) -> dict[str, Any] | None:
    """The live figures of the cachefs mounted at ``path``, or of the store at
    ``path`` that ``cachefs serve`` serves (None if it is neither)."""
    if not os.path.ismount(path):
        answer = _ask_server(path, "stats")
        return None if answer is None else json.loads(answer)
    stats = path / ".cachefs" / "stats.json"
    try:
        doc: dict[str, Any] = json.loads(stats.read_bytes())
    except (OSError, ValueError):
        return None
    return doc


def socket_address(dirfd: int) -> str:
    """The control socket of the store open as ``dirfd``, by a path short enough
    for a socket address (at most 108 bytes) however long the store's is."""
    return f"/proc/self/fd/{dirfd}/{SOCKET_NAME}"


def _ask_server(store: Path, command: str) -> bytes | None:
    """The answer of the daemon serving ``store`` to ``command``; None when no
    daemon serves it (no socket, or one that a dead daemon left)."""
    try:
        dirfd = os.open(store, os.O_DIRECTORY | os.O_PATH)
    except OSError:
        return None
    try:
        if not os.path.exists(socket_address(dirfd)):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_TIMEOUT)
            try:
                sock.connect(socket_address(dirfd))
            except (ConnectionRefusedError, FileNotFoundError):
                return None
            sock.sendall(command.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            pieces = []
            while piece := sock.recv(1 << 16):
                pieces.append(piece)
        return b"".join(pieces)
    except OSError as exc:
        raise CachefsError(
            f"cannot talk to the daemon serving {store}: {exc.strerror or exc}",
            hint="this needs root (or the daemon's user)",
        ) from None
    finally:
        os.close(dirfd)


def resolve_store(path: Path) -> Path:
    """A store path, or the store of the cachefs mounted at ``path``."""
    info = mount_info(path)
    return Path(info["store"]) if info else path


def control(path: Path, command: str) -> dict[str, Any]:
    """Run a command in the daemon of a mount (``/.cachefs/control``), or of a
    served store (``STORE/control.sock``)."""
    try:
        if os.path.ismount(path):
            raw = _ask_mount(path, command)
        else:
            served = _ask_server(path, command)
            if served is None:
                raise CachefsError(
                    f"{path} is neither a cachefs mount nor a store that cachefs serves",
                    hint="name the mount point, or the store of a running `cachefs serve`",
                )
            raw = served
        answer: dict[str, Any] = json.loads(raw)
    except OSError as exc:
        raise CachefsError(
            f"cannot talk to the daemon of {path}: {exc.strerror}",
            hint="this needs root (or the daemon's user)",
        ) from None
    except ValueError:
        raise CachefsError(f"the daemon of {path} gave an answer that is not JSON") from None
    if not answer.get("ok"):
        raise CachefsError(f"the daemon of {path} refused {command!r}: {answer.get('error')}")
    return answer


def _ask_mount(mountpoint: Path, command: str) -> bytes:
    path = mountpoint / ".cachefs" / "control"
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, command.encode())
        pieces: list[bytes] = []
        while piece := os.pread(fd, 1 << 16, sum(map(len, pieces))):
            pieces.append(piece)
    finally:
        os.close(fd)
    return b"".join(pieces)


def umount(mountpoint: Path, *, timeout: float = 120.0) -> None:
    """Unmount a cachefs mount and wait until its daemon has exited."""
    mountpoint = mountpoint.absolute()
    # The mount table first: a dead mount's root cannot even be stat'ed (ENOTCONN).
    if mounted_fstype(mountpoint) is None and not os.path.lexists(mountpoint):
        raise NotFoundError(f"{mountpoint} does not exist")
    info = mount_info(mountpoint)
    if info is None and mounted_fstype(mountpoint) == FSTYPE:
        # A cachefs mount whose daemon died (kill -9, crash): detach it.
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False)
        if mounted_fstype(mountpoint) is None:
            log.warning("%s was a dead cachefs mount (its daemon was gone): detached", mountpoint)
            return
    if info is None:
        raise ConfigError(
            f"{mountpoint} is not a cachefs mount",
            hint="give the directory the store is mounted on",
        )
    pid = int(info["pid"])
    result = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        hint = "check that no process uses it"
        if "busy" in reason.lower():
            hint = f"close the files and programs using it (`fuser -vm {mountpoint}`), then retry"
        raise MountError(f"cannot unmount {mountpoint}: {reason}", hint=hint)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise MountError(
                f"{mountpoint} is unmounted but its daemon (pid {pid}) is still running",
                hint=f"it may still be publishing data; see {info['store']}/{LOG_NAME}",
            )
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours (in tests) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
