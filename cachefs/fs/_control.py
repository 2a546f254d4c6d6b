"""The hidden control directory ``/.cachefs`` of a mount (filesystem layer).

Not listed by ``readdir`` of the root, but found by name::

    /.cachefs/stats.json          live figures of the store and the mount (JSON)
    /.cachefs/cas/<fn>/<hex>      any stored whole-file object, by digest
                                  (``<fn>`` is the store's digest function)
    /.cachefs/control             write a command, then read its JSON answer
                                  (root only): ``gc [THRESHOLD]``, ``scrub [RATE]``, ``sync``,
                                  ``trace start FILE``, ``trace stop``

These inodes are virtual: numbers from ``VIRTUAL_BASE`` up, never stored.
Objects under ``cas/`` get inode numbers while the kernel knows them (the file
I/O keeps an object while it is open: ``FileIO._hold``).  The tree knows the
store (to find objects) and, through :class:`Commands`, what the filesystem
lets its commands do; nothing else of the filesystem.
"""

from __future__ import annotations

import errno
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cachefs.engine import Digest, FsError, GcReport, Inode, Store
from cachefs.errors import CachefsError
from cachefs.fs._files import CommandHandle, ContentHandle, ObjectHandle
from cachefs.fs._scrub import Scrubber
from cachefs.fs._trace import check_outside

VIRTUAL_BASE = 1 << 62
CONTROL_INO = VIRTUAL_BASE + 1
CAS_INO = VIRTUAL_BASE + 2
FUNCTION_INO = VIRTUAL_BASE + 3
STATS_INO = VIRTUAL_BASE + 4
COMMAND_INO = VIRTUAL_BASE + 5
_OBJECT_BASE = VIRTUAL_BASE + 1024

CONTROL_NAME = b".cachefs"


def is_virtual(ino: int) -> bool:
    return ino >= VIRTUAL_BASE


def is_volatile(ino: int) -> bool:
    """Whether a file's size is unknown until read (the kernel must not cache
    it, and must read it with direct I/O)."""
    return ino in (STATS_INO, COMMAND_INO)


class Commands(Protocol):
    """What the commands of ``/.cachefs/control`` may ask of the filesystem."""

    scrubber: Scrubber

    async def flush_all(self) -> None: ...
    async def collect_garbage(self, threshold: float | None = None) -> GcReport: ...
    def start_trace(self, path: Path) -> None: ...
    def stop_trace(self) -> int: ...


class ControlTree:
    """The inodes under ``/.cachefs``."""

    def __init__(
        self, store: Store, figures: Callable[[], dict[str, Any]], commands: Commands
    ) -> None:
        self.store = store
        self.figures = figures
        self.commands = commands
        self.started = time.time_ns()
        self.function_name = store.config.digest_function.encode()
        self._objects: dict[int, tuple[Digest, int]] = {}  # ino -> (digest, lookups)
        self._by_digest: dict[bytes, int] = {}
        self._next = _OBJECT_BASE
        #: Extra figures for stats.json (the mount adds its own).
        self.info: dict[str, Any] = {}
        #: More live figures, each read when the figures are (the servers' tenants).
        self.sources: list[Callable[[], dict[str, Any]]] = []

    def _node(self, ino: int, mode: int, size: int = 0, nlink: int = 1) -> Inode:
        t = self.started
        return Inode(ino, mode, 0, 0, nlink, size, 0, t, t, t)

    def getattr(self, ino: int) -> Inode:
        if ino in (CONTROL_INO, CAS_INO, FUNCTION_INO):
            return self._node(ino, stat.S_IFDIR | 0o555, nlink=2)
        if ino == STATS_INO:
            return self._node(ino, stat.S_IFREG | 0o444)
        if ino == COMMAND_INO:
            return self._node(ino, stat.S_IFREG | 0o600)
        entry = self._objects.get(ino)
        if entry is None:
            raise FsError(errno.ENOENT)
        return self._node(ino, stat.S_IFREG | 0o444, entry[0].size)

    def lookup(self, parent: int, name: bytes) -> Inode:
        children = {
            CONTROL_INO: {b"cas": CAS_INO, b"stats.json": STATS_INO, b"control": COMMAND_INO},
            CAS_INO: {self.function_name: FUNCTION_INO},
        }
        if parent == FUNCTION_INO:
            return self.getattr(self._object_inode(name))
        ino = children.get(parent, {}).get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.getattr(ino)

    def _object_inode(self, name: bytes) -> int:
        try:
            raw = bytes.fromhex(name.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise FsError(errno.ENOENT) from None
        if len(raw) != 32:  # both digest functions make 32 bytes
            raise FsError(errno.ENOENT)
        digest = self.store.find_object(raw)
        if digest is None:
            raise FsError(errno.ENOENT)
        ino = self._by_digest.get(raw)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_digest[raw] = ino
        digest, lookups = self._objects.get(ino, (digest, 0))
        self._objects[ino] = (digest, lookups + 1)
        return ino

    def forget(self, ino: int, count: int) -> None:
        entry = self._objects.get(ino)
        if entry is None:
            return
        digest, lookups = entry
        if lookups - count > 0:
            self._objects[ino] = (digest, lookups - count)
        else:
            del self._objects[ino]
            self._by_digest.pop(digest.hash, None)

    def entries(self, ino: int) -> list[tuple[bytes, Inode]]:
        if ino == CONTROL_INO:
            names = [(b"cas", CAS_INO), (b"control", COMMAND_INO), (b"stats.json", STATS_INO)]
        elif ino == CAS_INO:
            names = [(self.function_name, FUNCTION_INO)]
        elif ino == FUNCTION_INO:
            names = []  # objects are found by name, never listed
        else:
            raise FsError(errno.ENOTDIR)
        return [(name, self.getattr(child)) for name, child in names]

    def digest(self, ino: int) -> Digest:
        entry = self._objects.get(ino)
        if entry is None:
            raise FsError(errno.ENODATA)
        return entry[0]

    def open(self, ino: int, writable: bool) -> CommandHandle | ContentHandle | ObjectHandle:
        """A handle on a control file (the content of ``stats.json`` is fixed now)."""
        if self.getattr(ino).is_dir:
            raise FsError(errno.EISDIR)
        if ino == COMMAND_INO:
            return CommandHandle(ino)
        if writable:
            raise FsError(errno.EACCES)
        if ino == STATS_INO:
            return ContentHandle(ino, self.render(self.figures() | self.live()))
        return ObjectHandle(ino, self.digest(ino))

    def live(self) -> dict[str, Any]:
        """What the daemon adds to the filesystem's figures."""
        doc = dict(self.info)
        for source in self.sources:
            doc |= source()
        return doc

    @staticmethod
    def render(doc: dict[str, Any]) -> bytes:
        return (json.dumps(doc, indent=2) + "\n").encode()

    async def run(self, request: bytes) -> bytes:
        """Run one command written to ``/.cachefs/control``; its JSON answer."""
        words = request.decode("utf-8", "replace").split()
        commands = self.commands
        try:
            if words[:1] == ["sync"] and len(words) == 1:
                await commands.flush_all()
                answer: dict[str, Any] = {"ok": True}
            elif words[:1] == ["gc"] and len(words) <= 2:
                threshold = float(words[1]) if len(words) == 2 else None
                report = await commands.collect_garbage(threshold)
                answer = {"ok": True, "report": report.as_dict()}
                self.store.audit.record("gc", via="control", **answer["report"])
            elif words[:1] == ["scrub"] and len(words) <= 2:
                rate = int(words[1]) if len(words) == 2 else None
                if rate is not None and rate <= 0:
                    raise ValueError("a scrub rate must be positive")
                scrubbed = await commands.scrubber.scrub(rate)
                answer = {"ok": True, "report": scrubbed.as_dict()}
            elif words[:2] == ["trace", "start"] and len(words) >= 3:
                # The rest of the line is the path (it may hold spaces).
                text = request.decode("utf-8", "surrogateescape").strip()
                path = Path(text.split(None, 2)[2])
                mountpoint = self.info.get("mountpoint")
                if mountpoint is not None:
                    path = check_outside(path, Path(mountpoint))
                commands.start_trace(path)
                answer = {"ok": True, "trace": str(path)}
            elif words == ["trace", "stop"]:
                answer = {"ok": True, "records": commands.stop_trace()}
            else:
                answer = {"ok": False, "error": f"unknown command {' '.join(words)!r}"}
        except (CachefsError, ValueError) as exc:
            answer = {"ok": False, "error": str(exc)}
        return self.render(answer)


__all__ = [
    "CONTROL_INO",
    "CONTROL_NAME",
    "VIRTUAL_BASE",
    "Commands",
    "ControlTree",
    "is_virtual",
    "is_volatile",
]
