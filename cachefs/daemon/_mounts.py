"""Finding mounted stores and talking to their daemons (daemon layer).

The mount table (``/proc/self/mountinfo``) says where cachefs is mounted
without touching the mounts (a dead one hangs a ``stat``); a live mount's
``/.cachefs/stats.json`` says which daemon and store serve it, and its
``/.cachefs/control`` runs commands in that daemon.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachefs.errors import CachefsError

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
    """The live figures of the cachefs mounted at ``path`` (None if it is not one)."""
    stats = path / ".cachefs" / "stats.json"
    if not os.path.ismount(path):
        return None
    try:
        doc: dict[str, Any] = json.loads(stats.read_bytes())
    except (OSError, ValueError):
        return None
    return doc


def resolve_store(path: Path) -> Path:
    """A store path, or the store of the cachefs mounted at ``path``."""
    info = mount_info(path)
    return Path(info["store"]) if info else path


def control(mountpoint: Path, command: str) -> dict[str, Any]:
    """Run a command in the daemon of a mount (``/.cachefs/control``)."""
    path = mountpoint / ".cachefs" / "control"
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.write(fd, command.encode())
            pieces: list[bytes] = []
            while piece := os.pread(fd, 1 << 16, sum(map(len, pieces))):
                pieces.append(piece)
        finally:
            os.close(fd)
        answer: dict[str, Any] = json.loads(b"".join(pieces))
    except OSError as exc:
        raise CachefsError(
            f"cannot talk to the daemon of {mountpoint}: {exc.strerror}",
            hint="this needs root (or the daemon's user)",
        ) from None
    if not answer.get("ok"):
        raise CachefsError(f"the daemon of {mountpoint} refused {command!r}: {answer.get('error')}")
    return answer
