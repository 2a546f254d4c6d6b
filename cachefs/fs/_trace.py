"""Recording a file-access trace of a mount (filesystem layer).

``cachefs mount --trace FILE`` (or the control command ``trace start FILE``)
appends one JSON object per line to FILE for every access to a regular file,
for ``scripts/bench_cache.py`` to replay through the eviction policies::

    {"t": 12.5, "op": "open", "path": "ccache/a/b.result", "size": 4096}

``t`` is seconds since the recording started; ``path`` is relative to the
mount's root.  Ops: ``open`` (an existing file opened: a request of ``size``
bytes), ``miss`` (the lookup of a missing name), ``create`` (a file created),
``write`` (a file's new content complete: closed or fsynced after writes,
``size`` its length), ``rename``
(``path`` moved to ``dest``), ``unlink`` (an entry removed).  Files under a
cache directory carry ``"cache"``: that directory's path.

Paths are resolved from the names the kernel looked up or created, so that
recording costs no extra metadata reads for files.  The recorder is a listener
of the filesystem's events (``_events.py``); it knows of the rest only the
path of a directory and the cache directory a directory is in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cachefs.engine import ROOT_INODE, Inode
from cachefs.errors import CachefsError, ConfigError, from_oserror
from cachefs.fs._events import Entry, FsEvents

log = logging.getLogger(__name__)

#: File names remembered for the trace (inode -> (parent, name)).
_NAMES = 1 << 18


def check_outside(path: Path, mountpoint: Path) -> Path:
    """Refuse a trace file inside the mount it records: the daemon would wait
    on itself.  Decided on the names alone (nothing is looked up)."""
    path = Path(os.path.abspath(path))
    mount = os.path.abspath(mountpoint)
    if os.path.commonpath([str(path), mount]) == mount:
        raise ConfigError(
            f"the trace file {path} is inside the mount it records",
            hint="write the trace outside the mount",
        )
    return path


class TraceRecorder(FsEvents):
    """Appends access records of a mount's files to a JSON-lines file."""

    def __init__(
        self,
        path: Path,
        path_of: Callable[[int], bytes],
        cache_of: Callable[[int], int | None],
        on_failure: Callable[[], object],
    ) -> None:
        """``path_of``: a directory's path from the root; ``cache_of``: the cache
        directory a directory is in (None: none); ``on_failure``: told when the
        trace file cannot be written (the recording stops)."""
        self.path = path
        self._on_failure = on_failure
        self._path_of = path_of
        self._cache_of = cache_of
        try:
            self._out: IO[str] | None = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise from_oserror(exc, f"opening the trace file {path}") from None
        self._start = time.monotonic()
        self._names: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self._dirs: dict[int, str] = {ROOT_INODE: ""}
        self.records = 0

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(OSError):  # what is left in the buffer may not fit
                out.close()

    # --- names ---------------------------------------------------------------------

    def _named(self, ino: int, parent: int, name: bytes) -> None:
        self._names[ino] = (parent, name)
        self._names.move_to_end(ino)
        if len(self._names) > _NAMES:
            self._names.popitem(last=False)

    def _dir(self, ino: int) -> str:
        path = self._dirs.get(ino)
        if path is None:
            try:
                raw = self._path_of(ino)
            except CachefsError:
                raw = f"/<inode {ino}>".encode()
            path = raw.decode("utf-8", "surrogateescape").lstrip("/")
            self._dirs[ino] = path
        return path

    def _path(self, parent: int, name: bytes) -> str:
        directory = self._dir(parent)
        leaf = name.decode("utf-8", "surrogateescape")
        return f"{directory}/{leaf}" if directory else leaf

    # --- records -------------------------------------------------------------------

    def _emit(self, op: str, parent: int, name: bytes, size: int, **extra: Any) -> None:
        if self._out is None:
            return
        doc: dict[str, Any] = {
            "t": round(time.monotonic() - self._start, 6),
            "op": op,
            "path": self._path(parent, name),
            "size": size,
        }
        cache = self._cache_of(parent)
        if cache is not None:
            doc["cache"] = self._dir(cache)
        doc.update(extra)
        try:
            self._out.write(json.dumps(doc) + "\n")
            self.records += 1
        except OSError as exc:
            log.error("stopped recording the trace to %s: %s", self.path, exc)
            self.close()
            self._on_failure()

    def _file_event(self, op: str, ino: int, size: int) -> None:
        where = self._names.get(ino)
        if where is not None:
            self._emit(op, where[0], where[1], size)

    # --- events of the filesystem ------------------------------------------------------

    def looked_up(self, parent: int, name: bytes, inode: Inode) -> None:
        if inode.is_reg:
            self._named(inode.ino, parent, name)

    def missed(self, parent: int, name: bytes) -> None:
        self._emit("miss", parent, name, 0)

    def opened(self, ino: int, size: int) -> None:
        self._file_event("open", ino, size)

    def created(self, parent: int, name: bytes, inode: Inode) -> None:
        if inode.is_reg:
            self._named(inode.ino, parent, name)
            self._emit("create", parent, name, 0)

    def removed(self, parent: int, name: bytes, inode: Inode) -> None:
        if inode.is_reg:
            self._emit("unlink", parent, name, inode.size)

    def renamed(self, moved: Inode, old: Entry, new: Entry, exchanged: Inode | None) -> None:
        if moved.is_dir or (exchanged is not None and exchanged.is_dir):
            self._dirs = {ROOT_INODE: ""}  # directory paths worked out so far are stale
        self._emit("rename", old[0], old[1], 0, dest=self._path(*new))
        self._named(moved.ino, *new)

    def written(self, ino: int, size: int) -> None:
        self._file_event("write", ino, size)

    def evicted(self, parent: int, name: bytes, inode: Inode) -> None:
        self._emit("unlink", parent, name, inode.size, evicted=True)


__all__ = ["TraceRecorder"]
