"""Shared cache directories: a cache directory that is one cache for a team (filesystem layer).

A cache directory marked ``shared=NAME`` (``cachefs cache set DIR --shared``)
is shared through the store's remote tiers (``cachefs.remote``):

* **Out.**  Every file published in it, at any depth, is queued in the
  store's push queue with its entry -- the path relative to the directory,
  its mode and mtime -- once it has settled (``SETTLE`` seconds after its last
  publication, rename or link, so that a tool's temporary name is not pushed
  in place of its final one, and not while it is open for writing).  The
  pusher sends the content first, then the entry, and the entries of the
  directories above it (``_lists.py`` in
  ``cachefs.remote`` says how tiers keep them).  The queue survives a crash;
  an entry whose file settled in the last ``SETTLE`` seconds before a crash
  is not pushed (its content is).
* **In.**  A lookup in the directory that finds no local entry asks the read
  tiers for one (:meth:`SharedDirs.resolve`); a directory is made, a file is
  fetched (verified, chunk by chunk) and stored, with the entry's mode (no
  set-id bits) and mtime, owned by the directory's owner (in the group of a
  set-gid directory, as POSIX has it), all in the one transaction that
  publishes it.  From then on it is a file of the
  cache directory like any other (budget, eviction, policy).  A tier that
  fails is skipped for a while (its breaker), so a lookup misses rather than
  hangs; negative lookups are cached by the kernel for ``NEGATIVE_TIMEOUT``
  (1 s, ``cachefs.fuse``) at most, and the tiers' answers as long
  (``Tiers.known_entry``: what a bucket's listing of the directory says,
  answered here without a thread).  A name in a directory that the tiers
  have no entry for is a miss without a request (a tool's temporary files);
  the tiers' answer about a directory is kept ``DIRECTORY_TTL`` seconds.

Deleting or evicting a file is local: entries on the tiers age out by the
tiers' own lifecycle.  Sparse files are not shared.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Sequence

import trio

from cachefs.engine import (
    ROOT_INODE,
    CachefsError,
    Digest,
    FsError,
    Inode,
    Namespace,
    Source,
    Store,
)
from cachefs.errors import RemoteError
from cachefs.format.schema import NO_CONTENT, may_be_sparse
from cachefs.fs._caches import CacheDir, CacheDirs, Reservation
from cachefs.fs._events import Entry, FsEvents, Listeners
from cachefs.fs._files import OpenFiles
from cachefs.fs._stored_files import FileAttrs, StoredFiles
from cachefs.remote import INLINE_MAX, SharedEntry, Tiers

log = logging.getLogger(__name__)

#: Seconds a file must rest after its last publication, rename or link before
#: its entry is queued.
SETTLE = 1.0
#: Seconds the tiers' answer about a directory (there or not) is kept: a file
#: that another machine puts in a directory new to the tiers is found this
#: much later at most.  And how many such answers are kept.
DIRECTORY_TTL, DIRECTORIES_KEPT = 10.0, 100_000


class SharedDirs(FsEvents):
    """Pushes the entries of shared cache directories and resolves their misses."""

    def __init__(
        self,
        store: Store,
        namespace: Namespace,
        caches: CacheDirs,
        files: OpenFiles,
        stored: StoredFiles,
        listeners: Listeners,
        tiers: Tiers,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.caches = caches
        self.files = files
        self.stored = stored
        self.listeners = listeners
        self.tiers = tiers
        self.pushes = store.pushes if tiers.writers else None
        #: Files of shared directories to queue, and when they last changed.
        self._settling: dict[int, float] = {}
        #: Files being made from the tiers' entries (not to be pushed back).
        self._arriving: set[int] = set()
        #: (shared directory, first component of a path) not shared: a server's
        #: uploads in progress.
        self._private: set[tuple[int, str]] = set()
        #: (share, directory) -> whether the tiers have it, and since when.
        self._directories: dict[tuple[str, str], tuple[bool, float]] = {}
        #: (directory, name, whether a directory may be made) being resolved:
        #: set when that is done, and its answer (none: no answer, a tier
        #: failed or it was cancelled).
        self._resolving: dict[tuple[int, bytes, bool], tuple[trio.Event, list[bool]]] = {}
        #: (shared directory, directory in it) -> the latter's path relative to
        #: the former (inodes are never reused; forgotten when a directory
        #: moves: ``_moves`` counts those).
        self._paths: dict[tuple[int, int], bytes] = {}
        self._moves = 0
        self.counts = {"shared_entries_queued": 0, "shared_fetches": 0, "shared_misses": 0}

    # --- out: entries queued once files settle -----------------------------------------

    def _touched(self, ino: int) -> None:
        if self.pushes is None:
            return
        cache = self.caches.members.get(ino)
        if cache is not None and cache.shared is not None and ino not in self._arriving:
            self._settling[ino] = time.monotonic()

    def written(self, ino: int, size: int) -> None:
        self._touched(ino)  # settling from now: its publication may wait a moment

    def published(self, ino: int, size: int) -> None:
        self._touched(ino)

    def renamed(self, moved: Inode, old: Entry, new: Entry, exchanged: Inode | None) -> None:
        self._touched(moved.ino)
        if exchanged is not None:
            self._touched(exchanged.ino)
        if stat.S_ISDIR(moved.mode) or (exchanged is not None and stat.S_ISDIR(exchanged.mode)):
            self._moves += 1
            self._paths.clear()

    def linked(self, parent: int, name: bytes, inode: Inode) -> None:
        self._touched(inode.ino)

    async def run(self) -> None:
        """Queue the entries of settled files, until cancelled."""
        if self.pushes is None:
            return
        while True:
            # Until the next file settles (a file touched meanwhile settles
            # later), looking again at least every SETTLE / 2 (a file that
            # settled open for writing is queued once it is closed) and at
            # most every SETTLE / 10 (files written one after the other settle
            # together, in one look over them all).
            now = time.monotonic()
            due = [at + SETTLE - now for at in self._settling.values() if now - at < SETTLE]
            await trio.sleep(max(SETTLE / 10, min([SETTLE / 2, *due])))
            now = time.monotonic()
            ready = {
                ino: at
                for ino, at in self._settling.items()
                if now - at >= SETTLE and not self._writing(ino)
            }
            if not ready:
                continue
            entries = self._entries(list(ready))
            if entries:
                try:
                    await trio.to_thread.run_sync(self._queue, entries)
                except CachefsError as exc:
                    log.error("shared directories: could not queue %d entries: %s",
                              len(entries), exc)  # fmt: skip
                else:
                    self.counts["shared_entries_queued"] += len(entries)
            # Settled only once queued (stats say so); touched meanwhile: settles again.
            for ino, at in ready.items():
                if self._settling.get(ino) == at:
                    del self._settling[ino]

    def _writing(self, ino: int) -> bool:
        """Whether the file is open for writing: it settles once closed (a
        writer that pauses must not share half a file)."""
        state = self.files.get(ino)
        return state is not None and state.writers > 0

    def flush(self) -> None:
        """Queue the entries of every file still settling (the filesystem
        closes: a runner that writes its cache and unmounts shares it all)."""
        if self.pushes is None or not self._settling:
            return
        entries = self._entries(list(self._settling))
        self._settling.clear()
        try:
            self._queue(entries)
        except CachefsError as exc:
            log.error("shared directories: could not queue %d entries: %s", len(entries), exc)

    def _entries(self, inos: list[int]) -> list[tuple[Digest, bytes]]:
        """(content, entry document) of each name of each settled file."""
        out = []
        for ino in inos:
            cache = self.caches.members.get(ino)
            state = self.files.get(ino)
            if cache is None or cache.shared is None or (state and state.unpublished_bytes):
                continue  # gone, or written again: its publication touches it again
            try:
                inode = self.namespace.get(ino)
            except CachefsError:
                continue
            if inode.content == NO_CONTENT:
                digest = Digest(self.store.digest_function.hash(b""), 0)
            elif may_be_sparse(inode.content):
                continue
            else:
                digest = Digest(inode.content, inode.size)
            for parent, name in cache.names.get(ino, []):
                try:
                    path = self._path_here(cache, parent, name)
                except CachefsError:
                    continue
                if (cache.ino, path.split("/", 1)[0]) in self._private:
                    continue
                doc = {
                    "share": cache.shared,
                    "path": path,
                    "mode": stat.S_IMODE(inode.mode),
                    "mtime_ns": inode.mtime_ns,
                }
                out.append((digest, json.dumps(doc).encode()))
        return out

    def _queue(self, entries: list[tuple[Digest, bytes]]) -> None:
        assert self.pushes is not None
        for digest, doc in entries:
            self.pushes.add_entry(digest, doc)

    async def _path(self, cache: CacheDir, parent: int, name: bytes) -> str:
        """The path of ``name`` in ``parent`` relative to the shared directory."""
        if (cache.ino, parent) not in self._paths:
            moves = self._moves
            relative = await trio.to_thread.run_sync(self._relative, cache.ino, parent)
            if moves == self._moves:
                self._keep_path(cache.ino, parent, relative)
        return self._path_here(cache, parent, name)

    def _path_here(self, cache: CacheDir, parent: int, name: bytes) -> str:
        """:meth:`_path` without a thread: what it does not know, it reads
        from the namespace here (a directory that moved since its last lookup)."""
        relative = self._paths.get((cache.ino, parent))
        if relative is None:
            relative = self._relative(cache.ino, parent)
        return os.fsdecode(relative + b"/" + name if relative else name)

    def _relative(self, top: int, directory: int) -> bytes:
        """The path of ``directory`` relative to ``top``, from the namespace
        (each step scans a directory: not on the trio thread)."""
        return self.namespace.path_of(directory)[len(self.namespace.path_of(top)) :].strip(b"/")

    def _keep_path(self, top: int, directory: int, relative: bytes) -> None:
        if len(self._paths) >= DIRECTORIES_KEPT:
            self._paths.clear()
        self._paths[top, directory] = relative

    def keep_private(self, directory: int, name: bytes) -> None:
        """Files under ``name`` in shared directory ``directory`` are not shared."""
        self._private.add((directory, os.fsdecode(name)))

    # --- in: lookups that miss ------------------------------------------------------

    async def resolve_path(self, parts: Sequence[bytes]) -> bool:
        """Make the file at path ``parts`` below the root, and the directories
        above it, from the tiers' entries where they are missing here (a
        server's miss: a blob's or an action's file); whether that file is
        there now.  A tier's directory entry at its name makes nothing there
        (a directory under a blob's name would keep the blob out)."""
        ino = ROOT_INODE
        for i, part in enumerate(parts):
            try:
                ino = self.namespace.lookup(ino, part)
                continue
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    return False
            if not await self.resolve(ino, part, directory=i < len(parts) - 1):
                return False
            try:
                ino = self.namespace.lookup(ino, part)
            except FsError:
                return False
        try:
            return self.namespace.get(ino).is_reg
        except FsError:
            return False

    async def resolve(
        self, parent: int, name: bytes, *, again: bool = True, directory: bool = True
    ) -> bool:
        """Make ``name`` in ``parent`` from the tiers' entry, if ``parent`` is in a
        shared directory and a tier has one; whether it is there now.  Lookups
        of a name that one is resolving wait for it (one fetch, not one each);
        if it got no answer (a tier failed, or it was cancelled) they ask once
        more (``again``), together again.  Without ``directory``, a directory's
        entry makes nothing (a miss)."""
        if not self.tiers.readers:
            return False
        key = (parent, name, directory)
        running = self._resolving.get(key)
        if running is not None:
            done, answer = running
            await done.wait()
            if not answer and again:  # that lookup got no answer: ask once more
                return await self.resolve(parent, name, again=False, directory=directory)
            try:
                self.namespace.lookup(parent, name)
            except FsError:
                return False
            return True
        done, answer = self._resolving[key] = (trio.Event(), [])
        try:
            there = await self._resolve(parent, name, directory)
            if there is not None:
                answer.append(there)
            return bool(there)
        finally:
            del self._resolving[key]
            done.set()

    async def _resolve(self, parent: int, name: bytes, directory: bool) -> bool | None:
        """Whether ``name`` is there now; None if that could not be known (a
        tier failed, gave a chunk of other bytes, or was skipped: logged by
        the tiers).  Any other failure (the store is full, the tiers lack the
        content, the whole of it has another digest) is logged here and
        answers False."""
        cache = self.caches.cache_of(parent)
        if cache is None or cache.shared is None:
            return False
        share = cache.shared
        moves = self._moves  # a directory moved meanwhile: the path is not kept
        try:
            path = await self._path(cache, parent, name)
            above = path.rpartition("/")[0]
            if above and not await self._on_tiers(share, above):
                self.counts["shared_misses"] += 1  # nothing below a directory they lack
                return False
            known, entry = self.tiers.known_entry(share, path)
            arrived: _Arrival | None = None
            if not known:
                # A file that comes inside its entry is stored in the same hop
                # when it fits now (one thread hop per file, not two).
                room = min(INLINE_MAX, cache.max_size)
                fits = self.caches.eviction.fits(cache, room)
                top = self.namespace.get(cache.ino)
                entry, arrived = await trio.to_thread.run_sync(
                    self._find_entry, share, path, parent, name, top, room if fits else 0
                )
        except RemoteError:
            return None  # the tiers logged it
        except CachefsError as exc:
            log.warning("shared directory %s: lookup of %r: %s", share, name, exc)
            return False
        if entry is None:
            self.counts["shared_misses"] += 1
            return False
        if entry.digest is None:
            self._keep_answer(share, path, True)
            if not directory:
                self.counts["shared_misses"] += 1
                return False
            made = self._directory(parent, name, self.namespace.get(cache.ino))
            if made is not None and moves == self._moves:
                self._keep_path(cache.ino, made, os.fsencode(path))
            return made is not None
        digest = entry.digest
        held: Reservation | None = None  # the room, until the file is counted
        try:
            if arrived is None:
                if digest.size > cache.max_size:  # the tier's word: never evict for it
                    log.warning("shared directory %s: %s (%s) is larger than the cache's budget",
                                share, path, digest)  # fmt: skip
                    self.counts["shared_misses"] += 1
                    return False
                try:
                    # Room is made once a tier has the content (its chunk list, or
                    # the blob, came): an entry of content none holds evicts nothing.
                    source: Source = (
                        entry.contents
                        if entry.contents is not None
                        else await trio.to_thread.run_sync(self.tiers.fetch, digest)
                    )
                    # Held for bytes in hand only: chunks a tier sends as they
                    # are stored would hold it as long as the tier stalls.
                    in_hand = isinstance(source, bytes | bytearray | memoryview)
                    held = await self.stored.make_room(parent, digest.size, in_hand)
                    attrs = self._attrs(entry, self.namespace.get(cache.ino))
                    inode = await trio.to_thread.run_sync(
                        self._fetch, parent, name, digest, attrs, source
                    )
                    arrived = _MEANWHILE if inode is None else inode
                except CachefsError as exc:
                    arrived = exc
            return self._arrived(share, path, parent, name, digest, arrived)
        finally:
            if held is not None:
                held.release()

    def _arrived(
        self, share: str, path: str, parent: int, name: bytes, digest: Digest, arrived: _Arrival
    ) -> bool | None:
        """:meth:`_resolve`'s answer once a fetch came to ``arrived``."""
        if isinstance(arrived, CachefsError):
            log.warning("shared directory %s: fetching %s (%s): %s", share, path, digest, arrived)
            return None if isinstance(arrived, RemoteError) else False
        if isinstance(arrived, _Meanwhile):
            return True
        self._arriving.add(arrived.ino)  # its arrival is not pushed back; later changes are
        try:
            self.stored.added(parent, name, arrived)
        finally:
            self._arriving.discard(arrived.ino)
        self.counts["shared_fetches"] += 1
        return True

    @staticmethod
    def _attrs(entry: SharedEntry, top: Inode) -> FileAttrs:
        """A fetched file's: the entry's mode and mtime, the directory's
        owner, no set-id bits from elsewhere."""
        return FileAttrs(entry.mode & 0o777, top.uid, top.gid, entry.mtime_ns)

    def _find_entry(
        self, share: str, path: str, parent: int, name: bytes, top: Inode, room: int
    ) -> tuple[SharedEntry | None, _Arrival | None]:
        """The tiers' entry of ``path``, and the file stored when its bytes came
        inside the entry and it takes at most ``room`` bytes (what fits in the
        cache now; an error storing it is returned, not raised); else None:
        the caller makes room and fetches it."""
        entry = self.tiers.find_entry(share, path)
        if entry is None or entry.digest is None or entry.contents is None:
            return entry, None
        if entry.digest.size > room:
            return entry, None
        try:
            inode = self._fetch(parent, name, entry.digest, self._attrs(entry, top), entry.contents)
        except CachefsError as exc:
            return entry, exc
        return entry, _MEANWHILE if inode is None else inode

    async def _on_tiers(self, share: str, directory: str) -> bool:
        """Whether the tiers have an entry for ``directory`` of ``share``
        (every file's entry comes with those of the directories above it, so
        without one there is nothing below it to ask for); known for
        ``DIRECTORY_TTL`` seconds."""
        now = time.monotonic()
        kept = self._directories.get((share, directory))
        if kept is not None and now - kept[1] < DIRECTORY_TTL:
            return kept[0]
        known, entry = self.tiers.known_entry(share, directory)
        if not known:
            entry = await trio.to_thread.run_sync(self.tiers.find_entry, share, directory)
        there = entry is not None and entry.digest is None
        self._keep_answer(share, directory, there)
        return there

    def _keep_answer(self, share: str, directory: str, there: bool) -> None:
        if len(self._directories) >= DIRECTORIES_KEPT:
            self._directories.clear()
        self._directories[share, directory] = (there, time.monotonic())

    def _fetch(
        self, parent: int, name: bytes, digest: Digest, attrs: FileAttrs, source: Source
    ) -> Inode | None:
        """Store the entry's file, made with ``attrs``: its bytes came in the
        entry, or come from the tiers (``Tiers.fetch``); checked as they are
        stored."""
        pushes = self.store.pushes
        if pushes is None:
            return self.stored.store_file(parent, name, source, expect=digest, attrs=attrs)
        pushes.from_tiers.add(digest)  # not pushed back where it came from
        try:
            return self.stored.store_file(parent, name, source, expect=digest, attrs=attrs)
        finally:
            pushes.from_tiers.discard(digest)

    def _directory(self, parent: int, name: bytes, top: Inode) -> int | None:
        """Make the directory ``name`` (made meanwhile: fine); its inode
        number (None: it could not be made)."""
        mode = stat.S_IFDIR | stat.S_IMODE(top.mode)
        try:
            inode = self.namespace.create(parent, name, mode, top.uid, top.gid)
        except FsError as exc:
            if exc.errno != errno.EEXIST:
                return None
            try:
                return self.namespace.lookup(parent, name)
            except FsError:
                return None
        for listener in self.listeners:
            listener.created(parent, name, inode)
        return inode.ino

    def figures(self) -> dict[str, int]:
        return dict(self.counts) | {"shared_settling": len(self._settling)}


class _Meanwhile:
    """A fetched file's name was made meanwhile (by another lookup, or here)."""


_MEANWHILE = _Meanwhile()
#: What a fetch came to: the file stored, the name made meanwhile, or the error.
_Arrival = Inode | CachefsError | _Meanwhile


__all__ = ["SETTLE", "SharedDirs"]
