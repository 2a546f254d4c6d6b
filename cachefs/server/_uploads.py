"""Uploads in progress, resumable (server layer).

A ByteStream upload may be cut short (a connection lost) and resumed: the
client asks ``QueryWriteStatus`` how much was committed and writes on from
there.  So what arrives is appended to a spool file in ``STORE/tmp`` (scratch
space that the next start empties) as it comes; once the client finishes the
write (``_grpc_bytestream.py`` ingests a write from offset 0 as it arrives, a
resumed one from the spool), its digest is checked and the spool dropped.  An
upload nobody has touched for ``EXPIRY`` seconds is forgotten.  A compressed
upload spools the compressed stream, and is decompressed as it is ingested.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import BinaryIO

import zstandard

from cachefs.errors import from_oserror

#: Seconds an unfinished upload is kept without being written to.
EXPIRY = 3600.0


class Upload:
    """One upload: its spool and how much of it was committed."""

    def __init__(self, path: Path, compressed: bool) -> None:
        self.path = path
        self.compressed = compressed
        #: Held while a stream writes to it (a second stream of it waits).
        self.lock = threading.Lock()
        self.committed = 0
        self.touched = time.monotonic()
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise from_oserror(exc, "creating an upload's spool file") from None

    def reset(self) -> None:
        """Start over (a write from offset 0)."""
        os.ftruncate(self._fd, 0)
        self.committed = 0

    def append(self, data: bytes) -> None:
        offset = self.committed
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise from_oserror(exc, "writing an upload's spool file") from None
        self.committed += len(data)
        self.touched = time.monotonic()

    def reader(self) -> BinaryIO:
        """What was uploaded, from the start (decompressed when it came compressed)."""
        spool = open(os.dup(self._fd), "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        spool.seek(0)
        if not self.compressed:
            return spool
        return zstandard.ZstdDecompressor().stream_reader(
            spool, closefd=True, read_across_frames=True
        )

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class Uploads:
    """The uploads in progress, by resource name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
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
                key = hashlib.sha256(name.encode()).hexdigest()[:32]
                upload = Upload(self.directory / f"upload-{key}", compressed)
                self._uploads[name] = upload
            return upload

    def finish(self, name: str, upload: Upload) -> None:
        """The upload is over (stored, or refused): drop its spool."""
        with self._lock:
            if self._uploads.get(name) is upload:
                del self._uploads[name]
        upload.close()

    def _expire(self) -> None:
        old = time.monotonic() - EXPIRY
        for name, upload in list(self._uploads.items()):
            if upload.touched < old and not upload.lock.locked():
                del self._uploads[name]
                upload.close()

    def close(self) -> None:
        with self._lock:
            uploads, self._uploads = list(self._uploads.values()), {}
        for upload in uploads:
            upload.close()
