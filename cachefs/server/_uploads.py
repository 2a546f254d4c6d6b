"""Uploads in progress, resumable (server layer).

A ByteStream upload may be cut short (the client stops, or its connection is
lost) and resumed: the client asks ``QueryWriteStatus`` how much was committed
and writes on from there.  What arrives is stored as it comes, as a file of the
cache directory's ``.uploads/`` (``RemoteCache.store_upload``), so the bytes are
written once: when the client finishes, the file's digest is checked and the
file is moved into its place in the CAS (``RemoteCache.commit_upload``).  When
a write stops short, its file holds what arrived; a resumed write stores that
again followed by what comes next (the old part's chunks are in the store
already: they are read and hashed, not written) and the old file goes.

A compressed upload counts its committed bytes in the compressed stream, and
keeps its decompressor between writes, so that a resumed write decompresses on
from where the last one stopped.  An upload nobody has touched for ``EXPIRY``
seconds is forgotten and its file removed; the server's start empties
``.uploads/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

from cachefs.engine import Digest

#: Seconds an unfinished upload is kept without being written to.
EXPIRY = 3600.0


@dataclass(frozen=True)
class StoredUpload:
    """The file of ``.uploads/`` that holds what an upload committed."""

    directory: int
    name: bytes
    #: Its content: the blob's bytes that arrived (decompressed).
    digest: Digest


class Upload:
    """One upload: how much of it was committed, and where that is."""

    def __init__(self, compressed: bool) -> None:
        self.compressed = compressed
        #: Held while a stream writes to it (a second stream of it waits).
        self.lock = threading.Lock()
        self.committed = 0
        self.touched = time.monotonic()
        self.stored: StoredUpload | None = None
        self.decompressor: Any = None
        self.reset()

    def reset(self) -> StoredUpload | None:
        """Start over (a write from offset 0); returns the file to drop."""
        old, self.stored = self.stored, None
        self.committed = 0
        if self.compressed:
            self.decompressor = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        return old


class Uploads:
    """The uploads in progress, by resource name."""

    def __init__(self, drop: Callable[[StoredUpload], None]) -> None:
        """``drop`` removes an upload's file (without waiting)."""
        self._drop = drop
        self._uploads: dict[str, Upload] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Upload | None:
        with self._lock:
            return self._uploads.get(name)

    def begin(self, name: str, *, compressed: bool) -> Upload:
        """The upload of resource ``name``, made if there is none."""
        with self._lock:
            self._expire()
            upload = self._uploads.get(name)
            if upload is None:
                upload = Upload(compressed)
                self._uploads[name] = upload
            upload.touched = time.monotonic()
            return upload

    def finish(self, name: str, upload: Upload, *, drop: bool) -> None:
        """The upload is over (stored, or refused); ``drop``: its file goes too."""
        with self._lock:
            if self._uploads.get(name) is upload:
                del self._uploads[name]
        if drop and upload.stored is not None:
            self._drop(upload.stored)

    def _expire(self) -> None:
        old = time.monotonic() - EXPIRY
        for name, upload in list(self._uploads.items()):
            if upload.touched < old and not upload.lock.locked():
                del self._uploads[name]
                if upload.stored is not None:
                    self._drop(upload.stored)
