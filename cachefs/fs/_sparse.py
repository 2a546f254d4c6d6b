"""Sparse files: the bytes they store, and their digests found in the background
(filesystem layer).

A file's holes are stored as holes (``_publish.py``); ``st_blocks`` counts
what is not a hole (:meth:`SparseFiles.allocated`).

A dense file's object is named by the digest of its content, so
``user.cachefs.digest`` costs a lookup.  A sparse file's object is named by
its recipe (``format/schema.py``), so that publishing it never reads its
holes; the digest of its content needs every byte read, holes included (about
1.7 GB/s of SHA-256 here: 64 GiB take 40 s).  The first request starts that
in a thread of its own and gets EAGAIN ("try again"); the digest is kept in
the index when found, and later requests get it at once.  One sparse file is
hashed at a time, so that the rest of the mount never waits for it.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading

import trio

from cachefs.engine import CachefsError, Digest, FsError, Inode, Store
from cachefs.format.schema import may_be_sparse
from cachefs.fs._files import OpenFiles
from cachefs.fs._publish import HOLE_MIN

log = logging.getLogger(__name__)


class SparseFiles:
    """What the mount knows of files with holes."""

    def __init__(self, store: Store, files: OpenFiles) -> None:
        self.store = store
        self.files = files
        self._running: set[Digest] = set()
        self._limiter = trio.CapacityLimiter(1)
        self._failed: dict[Digest, CachefsError] = {}
        self._closing = threading.Event()

    def allocated(self, inode: Inode) -> int:
        """The bytes a file stores: its size less its holes (``st_blocks``)."""
        if not inode.is_reg:
            return inode.size
        state = self.files.get(inode.ino)
        base = inode.digest if state is None else state.base
        try:
            holes = [] if base is None or not may_be_sparse(base.hash) else self.store.holes(base)
        except CachefsError:  # changed meanwhile, or damage that a read reports
            return inode.size
        if state is not None and state.changed:
            holes = state.holes(holes, 0)
        # (A size and holes of different moments, as readdir's snapshot has: clamped.)
        return min(inode.size, max(0, inode.size - sum(stop - start for start, stop in holes)))

    def digest_known(self, inode: Inode) -> bool:
        """Whether ``user.cachefs.digest`` answers at once (listed by listxattr
        only then, so that tools copying every xattr never meet EAGAIN)."""
        state = self.files.get(inode.ino)
        try:
            if state is not None and state.changed:  # sparse once published if it has holes
                base = state.base
                holes = (
                    [] if base is None or not may_be_sparse(base.hash) else self.store.holes(base)
                )
                return state.size < HOLE_MIN or not state.holes(holes, HOLE_MIN)
            digest = inode.digest
            if digest is None or not may_be_sparse(digest.hash):
                return True
            return self.store.content_digest(digest) is not None
        except CachefsError:
            return False

    def close(self) -> None:
        """Stop the digests being computed (the store is about to close)."""
        self._closing.set()

    def content(self, digest: Digest, nursery: trio.Nursery | None) -> Digest:
        """The digest of the content of object ``digest``; EAGAIN while it is
        being computed (started here, in ``nursery``)."""
        if not may_be_sparse(digest.hash):
            return digest  # a dense file's (or the empty file's, which has no object)
        found = self.store.content_digest(digest)
        if found is not None:
            return found
        failed = self._failed.pop(digest, None)
        if failed is not None:
            raise failed
        if digest not in self._running and nursery is not None:
            self._running.add(digest)
            nursery.start_soon(self._compute, digest)
        raise FsError(
            errno.EAGAIN,
            f"the digest of sparse object {digest} is being computed; ask again later",
        )

    async def _compute(self, digest: Digest) -> None:
        try:
            await trio.to_thread.run_sync(
                functools.partial(
                    self.store.content_digest, digest, compute=True, stop=self._closing.is_set
                ),
                limiter=self._limiter,
                abandon_on_cancel=True,
            )
        except CachefsError as exc:
            log.error("could not compute the digest of %s: %s", digest, exc)
            self._failed[digest] = exc
        finally:
            self._running.discard(digest)
