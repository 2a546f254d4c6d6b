"""The cache the servers serve: CAS blobs and action results, as files (server layer).

What clients store lives in the store's namespace, in a cache directory, so
that its budget, eviction policy, hit and miss figures, the store quota, fsck
and ``ls`` are those of every other file::

    /remote-cache/                     a cache directory (``--max-size``, ``--policy``)
      <instance>/cas/<hh>/<hash>       a blob: the file's content is the blob
      <instance>/ac/<hh>/<hash>        an action result: a REAPI ActionResult as
                                       gRPC clients store it, or whatever bytes
                                       an HTTP client PUT under that key
      .uploads/<uuid>                  a ByteStream upload in progress (``_uploads.py``)

``<instance>`` is ``_`` for the empty instance name, else the name
percent-encoded (``_names.instance_directory``); ``<hh>`` are the first two hex
digits of the hash, so that no directory grows past a few thousand entries.  A
blob is present when its file is there and holds exactly that content (a file
changed through a mount is no longer the blob).  The empty blob is always
present.

Threads.  The servers call in from their worker threads (gRPC's pool, or HTTP
handlers through ``trio.to_thread``): lookups, reads and ingest run there.  What
the filesystem does on its trio thread is handed to it through the trio token:
waited for where the answer matters (a directory made, room for a new file,
an action result put in place), not waited for where it is bookkeeping (a new
file, a hit, a miss).
"""

from __future__ import annotations

import errno
import logging
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import trio
import zstandard
from google.protobuf.message import DecodeError

from cachefs.engine import (
    CachefsError,
    Digest,
    DigestMismatchError,
    FsError,
    Inode,
    ObjectNotFoundError,
    Source,
)
from cachefs.fs import Filesystem, Reservation
from cachefs.protocol import re_pb2
from cachefs.server._names import UPLOADS_NAME, BadRequest, instance_directory
from cachefs.server._options import DEFAULT_MAX_SIZE
from cachefs.server._uploads import StoredUpload

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Where a file's directory is, below the namespace's root.
Parts = tuple[bytes, ...]

ROOT = b"remote-cache"
#: The share's name when the cache is shared through remote tiers.
SHARE = "remote-cache"
CAS = b"cas"
AC = b"ac"
#: Uploads in progress (``_uploads.py``): a name no instance directory can have.
UPLOADS = UPLOADS_NAME.encode()


class RemoteCache:
    """CAS blobs and action results of every instance, kept in the namespace."""

    def __init__(self, fs: Filesystem, root: int, token: trio.lowlevel.TrioToken) -> None:
        self.fs = fs
        #: The cache directory (``/remote-cache``).
        self.root = root
        self.stored = fs.stored
        self.store = fs.store
        self.digest_function = fs.store.digest_function
        self._token = token
        self.empty = Digest(self.digest_function.hash(b""), 0)
        #: Misses are looked for in the remote tiers (the cache is shared).
        self.tiered = bool(fs.shared.tiers.readers)
        #: When an entry was last audited as refused (``_trusted``), by key.
        self._refusals: dict[bytes, float] = {}

    @classmethod
    def open(
        cls, fs: Filesystem, *, max_size: int | None = None, policy: str = "lru"
    ) -> RemoteCache:
        """On the filesystem's trio thread: the cache, its directory made and
        marked as a cache (``max_size`` sets its budget; by default a new one
        gets DEFAULT_MAX_SIZE and an existing one keeps its own)."""
        root = fs.stored.directory([ROOT])
        if root not in fs.caches.dirs and max_size is None:
            max_size = DEFAULT_MAX_SIZE
        # With remote tiers, what clients store is shared through them.
        shared = SHARE if fs.shared.tiers.tiers else None
        fs.stored.mark_cache(root, max_size, policy, shared)
        fs.shared.keep_private(root, UPLOADS)
        uploads = fs.stored.lookup_path([ROOT, UPLOADS])
        if uploads is not None:  # uploads in progress do not outlive the server
            _empty(fs, uploads)
        return cls(fs, root, trio.lowlevel.current_trio_token())

    def max_blob(self) -> int:
        """The largest blob there could be room for: the cache's budget."""
        cache = self.fs.caches.dirs.get(self.root)
        return (1 << 62) if cache is None else cache.max_size

    # --- calls into the filesystem's thread -----------------------------------------

    def _wait(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _soon(self, fn: Callable[..., object], *args: Any) -> None:
        self._token.run_sync_soon(fn, *args)

    @contextmanager
    def _room(self, parent: int, size: int, source: Source) -> Iterator[Reservation]:
        """Room for a new file in ``parent`` (StoreFullError if none), held while
        the block stores it if ``source`` is in hand (bytes, a file), and let go
        as the file is counted (``_added``), or at the end."""
        in_hand = isinstance(source, bytes | bytearray | memoryview) or hasattr(source, "seek")
        reservation = self._wait(self.stored.make_room, parent, size, in_hand)
        try:
            yield reservation
        finally:
            self._soon(reservation.release)  # nothing if _added did

    def _from_tiers(self, parts: Parts, name: bytes) -> bool:
        """A file missing here, made from the remote tiers' entry if they have
        one (``SharedDirs.resolve_path``, on the trio thread); whether it is."""
        return self.tiered and bool(self._wait(self.fs.shared.resolve_path, (*parts, name)))

    # --- where things are -------------------------------------------------------------

    def _place(self, instance: str, kind: bytes, digest: Digest) -> tuple[Parts, bytes]:
        hex_ = digest.hex.encode()
        return (ROOT, instance_directory(instance), kind, hex_[:2]), hex_

    def _directory(self, parts: Parts, *, make: bool) -> int | None:
        """The directory at ``parts``, made (on the trio thread) when missing
        and ``make``; else None when missing."""
        ino = self.stored.lookup_path(parts)
        if ino is None and make:
            return self._run(self.stored.directory, parts)
        return ino

    def _find(
        self, instance: str, kind: bytes, digest: Digest
    ) -> tuple[int | None, bytes, Inode | None]:
        parts, name = self._place(instance, kind, digest)
        parent = self.stored.lookup_path(parts)
        inode = None if parent is None else self.stored.lookup(parent, name)
        return parent, name, inode

    def _blob_files(
        self, instance: str, hashes: list[bytes]
    ) -> tuple[Parts, list[bytes], dict[bytes, int | None], list[_File | None]]:
        """The files of the blobs of these hashes, all looked up in one read
        transaction and one call to the namespace (batches of thousands): the
        instance's CAS directory, each blob's name, the directories by the
        first two digits of a name (None: missing), and the regular file at
        each name, if any."""
        top = (ROOT, instance_directory(instance), CAS)
        names = [h.hex().encode() for h in hashes]
        with self.stored.reading() as txn:
            parents = {
                hh: self.stored.lookup_path((*top, hh), txn) for hh in {n[:2] for n in names}
            }
            files = self.stored.find_files([(parents[n[:2]] or 0, n) for n in names], txn)
        return top, names, parents, files

    def _find_blobs(self, instance: str, digests: list[Digest]) -> list[_Found]:
        """:meth:`_blob_files`, a :class:`_Found` for each blob."""
        top, names, parents, files = self._blob_files(instance, [d.hash for d in digests])
        return [
            _Found((*top, name[:2]), parents[name[:2]], name, file, digest)
            for digest, name, file in zip(digests, names, files, strict=True)
        ]

    # --- blobs --------------------------------------------------------------------------

    def _blob(self, instance: str, digest: Digest) -> tuple[int | None, bytes, Inode | None]:
        parent, name, inode = self._find(instance, CAS, digest)
        changed = inode is not None and (inode.content, inode.size) != (digest.hash, digest.size)
        if changed and digest.size > 0:
            inode = None  # changed through a mount: it is not that blob any more
        return parent, name, inode

    def blob_named(self, instance: str, hash_: bytes) -> Digest | None:
        """The digest of the instance's blob of hash ``hash_``, or None (a
        miss): the HTTP protocol names blobs by their hash alone."""
        if hash_ == self.empty.hash:
            return self.empty
        parent, name, inode = self._find(instance, CAS, Digest(hash_, 0))
        if inode is None and self._from_tiers(*self._place(instance, CAS, Digest(hash_, 0))):
            parent, name, inode = self._find(instance, CAS, Digest(hash_, 0))
        if inode is None or inode.digest is None or inode.digest.hash != hash_:
            if parent is not None:
                self._soon(self.stored.miss, parent, name)
            return None
        return inode.digest

    def contains(self, instance: str, digest: Digest) -> bool:
        return digest == self.empty or self._blob(instance, digest)[2] is not None

    def find_missing(
        self, instance: str, digests: list[tuple[bytes, int]], *, use: bool = False
    ) -> list[int]:
        """The indices in ``digests`` (``(hash, size)`` pairs) of the blobs the
        instance does not have (all looked up in one read transaction, in one
        call to the namespace).  With ``use``, those it has count as used:
        their lives are extended (the policy sees a hit), as the API asks for
        blobs a client was told are there."""
        files = self._blob_files(instance, [h for h, _ in digests])[3]
        missing: list[int] = []
        used: list[tuple[int, int]] = []
        empty = self.empty.hash
        # The hottest loop of a cache server: no _Found, no calls.
        for i, ((hash_, size), file) in enumerate(zip(digests, files, strict=True)):
            if file is not None and file[1] == size and file[2] == hash_:
                if use:
                    used.append((file[0], size))
            elif size or hash_ != empty:  # the empty blob is always there
                missing.append(i)
        if used:
            self._soon(self.stored.hits, used)
        return missing

    def read_blob(
        self, instance: str, digest: Digest, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes | memoryview]:
        """The blob's bytes (or a range), verified as they are read; a hit.
        ObjectNotFoundError (a miss) when the instance does not have it."""
        if digest == self.empty:
            return iter(())
        parent, name, inode = self._blob(instance, digest)
        if inode is None and self._from_tiers(*self._place(instance, CAS, digest)):
            parent, name, inode = self._blob(instance, digest)
        if inode is None:
            if parent is not None:
                self._soon(self.stored.miss, parent, name)
            raise ObjectNotFoundError(f"blob {digest} is not in the cache")
        self._soon(self.stored.hit, inode)
        return self.store.iter_object(digest, offset, length)

    def read_blobs(self, instance: str, digests: list[Digest]) -> list[bytes | CachefsError]:
        """Whole blobs, each verified, or the error of each that could not be
        read (ObjectNotFoundError: a miss): :meth:`read_blob` of a batch, looked
        up together and told to the filesystem's thread in one call."""
        out: list[bytes | CachefsError] = []
        hits: list[tuple[int, int]] = []
        misses: list[tuple[int, bytes]] = []
        present: list[tuple[int, tuple[int, int]]] = []  # (index, file)
        found_blobs = self._find_blobs(instance, digests)
        if self.tiered and any(not f.present and f.digest != self.empty for f in found_blobs):
            fetched = [
                self._from_tiers(f.parts, f.name)
                for f in found_blobs
                if not f.present and f.digest != self.empty
            ]
            if any(fetched):
                found_blobs = self._find_blobs(instance, digests)
        for found in found_blobs:
            digest = found.digest
            if digest == self.empty:
                out.append(b"")
            elif found.present:
                present.append((len(out), found.used))
                out.append(b"")  # read below, all together
            else:
                if found.parent is not None:
                    misses.append((found.parent, found.name))
                out.append(ObjectNotFoundError(f"blob {digest} is not in the cache"))
        read = self.store.read_objects([digests[i] for i, _ in present])
        for (i, used), data in zip(present, read, strict=True):
            out[i] = data
            if not isinstance(data, CachefsError):
                hits.append(used)
        if hits or misses:
            self._soon(self._looked_up, hits, misses)
        return out

    def _looked_up(self, hits: list[tuple[int, int]], misses: list[tuple[int, bytes]]) -> None:
        self.stored.hits(hits)
        for parent, name in misses:
            self.stored.miss(parent, name)

    def touch(self, instance: str, digests: list[Digest]) -> bool:
        """Whether every blob is there (those only in the remote tiers are
        fetched); those that are count as used."""
        missing = self.find_missing(instance, [(d.hash, d.size) for d in digests], use=True)
        if missing and self.tiered:
            for i in missing:
                self._from_tiers(*self._place(instance, CAS, digests[i]))
            # Looked at again: a tier's entry under a blob's name may have made
            # a file of other content there, which is no copy of the blob.
            wanted = [(digests[i].hash, digests[i].size) for i in missing]
            return not self.find_missing(instance, wanted, use=True)
        return not missing

    def write_blob(self, instance: str, digest: Digest, source: Source) -> bool:
        """Store a blob whose content must have ``digest`` (DigestMismatchError
        otherwise: nothing is stored); False if the instance had it already.
        StoreFullError when no room can be made for it."""
        if digest == self.empty:
            return False
        for attempt in (0, 1):
            parts, name = self._place(instance, CAS, digest)
            parent = self._directory(parts, make=True)
            assert parent is not None
            there = self._find(instance, CAS, digest)[2]
            if there is not None and there.digest == digest:
                return False
            with self._room(parent, digest.size, source) as room:
                try:
                    if there is not None:  # a file changed through a mount: replaced
                        self._store_replacing(parent, name, source, digest, room)
                        return True
                    inode = self.stored.store_file(parent, name, source, expect=digest)
                except FsError as exc:
                    again = isinstance(source, bytes | bytearray | memoryview)
                    if exc.errno == errno.ENOENT and attempt == 0 and again:
                        continue  # its directory went meanwhile (rm -r in a mount): again
                    raise
                if inode is not None:
                    self._soon(self._added, [(parent, name, inode)], room)
                    return True
            # The name was taken meanwhile: by the blob, or else?
            now = self._find(instance, CAS, digest)[2]
            if now is not None and now.digest == digest:
                return False
            if attempt == 0 and isinstance(source, bytes | bytearray | memoryview):
                continue  # a file of other content: replaced
            raise FsError(
                errno.EEXIST,
                f"blob {digest}: its name in the store is taken by what is not that blob "
                "(a directory made there in a mount?): remove it",
            )
        raise AssertionError("unreachable")

    def write_blobs(
        self, instance: str, blobs: list[tuple[Digest, bytes]]
    ) -> list[CachefsError | None]:
        """Store blobs that arrived together (a batch), as :meth:`write_blob`
        each, but published together: one transaction and one fdatasync for
        the batch, and one call into the filesystem's thread for their
        directories and one for the room they take.  For each blob, in order,
        None (stored, or there already) or the error that refused it."""
        out: list[CachefsError | None] = [None] * len(blobs)
        wanted: dict[Digest, list[int]] = {}
        for i, (digest, _) in enumerate(blobs):
            if digest != self.empty:
                wanted.setdefault(digest, []).append(i)
        found = {f.digest: f for f in self._find_blobs(instance, list(wanted))}
        missing = [d for d, f in found.items() if f.file is None]
        changed = [d for d, f in found.items() if f.file is not None and not f.present]
        directories = {f.parts: f.parent for f in found.values()}
        for digest in changed:  # replaced, each on its own (it is rare)
            for i in wanted[digest]:
                out[i] = _outcome(self.write_blob, instance, digest, blobs[i][1])
        if not missing:
            return out
        absent = [parts for parts, ino in directories.items() if ino is None]
        if absent:
            made = self._run(self.stored.directories, absent)
            directories.update(zip(absent, made, strict=True))
        size = sum(d.size for d in missing)
        try:
            reservation = self._wait(self.stored.make_room, self.root, size, True)
        except CachefsError as exc:
            # Not all of them fit: each blob on its own, so that those that fit are stored.
            for digest in missing:
                for i in wanted[digest]:
                    out[i] = (
                        exc
                        if len(missing) == 1
                        else _outcome(self.write_blob, instance, digest, blobs[i][1])
                    )
            return out
        try:
            files = []
            for digest in missing:
                parent = directories[found[digest].parts]
                assert parent is not None
                files.append((parent, found[digest].name, blobs[wanted[digest][0]][1], digest))
            try:
                results = self.stored.store_files(files)
            except CachefsError as exc:  # the store refused them all (disk full, failing)
                for digest in missing:
                    for i in wanted[digest]:
                        out[i] = exc
                return out
            added = []
            again = []
            for (parent, name, data, digest), result in zip(files, results, strict=True):
                if isinstance(result, FsError) and result.errno == errno.ENOENT:
                    again.append((digest, data))  # its directory went meanwhile: alone, again
                    continue
                if isinstance(result, Inode):
                    added.append((parent, name, result))
                    result = None
                for i in wanted[digest]:
                    out[i] = result
            if added:
                self._soon(self._added, added, reservation)
        finally:
            self._soon(reservation.release)  # nothing if _added did
        for digest, data in again:  # (rm -r in a mount) with room of their own
            result = _outcome(self.write_blob, instance, digest, data)
            for i in wanted[digest]:
                out[i] = result
        return out

    def _added(self, files: list[_Named], room: Reservation | None = None) -> None:
        """Count stored files, then let go of the ``room`` they held (one call:
        the evictor that counting them may wake never sees them twice)."""
        try:
            for parent, name, inode in files:
                self.stored.added(parent, name, inode)
        finally:
            if room is not None:
                room.release()

    # --- uploads in progress (``_uploads.py``) ---------------------------------------------

    def store_upload(self, source: Source, size: int) -> StoredUpload:
        """Store what an upload brought (``size``: what the blob will take) as
        a new file of ``.uploads/``, durable at the next sync."""
        parts = (ROOT, UPLOADS)
        parent = self._directory(parts, make=True)
        assert parent is not None
        name = uuid.uuid4().hex.encode()
        with self._room(parent, size, source) as room:
            inode = self.stored.store_file(parent, name, source, durable=False)
            assert inode is not None  # a fresh name
            self._soon(self._added, [(parent, name, inode)], room)
        return StoredUpload(parent, name, inode.digest or self.empty)

    def read_upload(self, upload: StoredUpload) -> Iterator[bytes | memoryview]:
        """What an upload committed so far."""
        return self.store.iter_object(upload.digest)

    def commit_upload(self, instance: str, digest: Digest, upload: StoredUpload) -> bool:
        """Move a finished upload into its place as the instance's blob, durably:
        DigestMismatchError (and the file removed) when it is not that blob;
        False when the instance had the blob already (the file is removed)."""
        if upload.digest != digest:
            self.drop_upload(upload)
            raise DigestMismatchError(f"the upload's digest is {upload.digest}, not {digest}")
        parts, name = self._place(instance, CAS, digest)
        parent = self._directory(parts, make=True)
        assert parent is not None
        moved = self._run(self.stored.move, upload.directory, upload.name, parent, name)
        self.store.sync()
        return moved

    def drop_upload(self, upload: StoredUpload) -> None:
        """Remove an upload's file (without waiting)."""
        self._soon(self.stored.remove, upload.directory, upload.name)

    def split(self, instance: str, digest: Digest) -> list[Digest]:
        """The chunks the store keeps a blob in, each made a blob of the
        instance too (ObjectNotFoundError when the instance lacks the blob)."""
        if digest == self.empty:
            return []
        if not self.contains(instance, digest):
            raise ObjectNotFoundError(f"blob {digest} is not in the cache")
        chunks = [Digest(chunk, size) for chunk, size in self.store.recipe(digest)]
        for chunk in chunks:
            if not self.contains(instance, chunk):
                self.write_blob(instance, chunk, self.store.read_chunk(chunk.hash))
        return chunks

    # --- action results -------------------------------------------------------------------

    def get_action(self, instance: str, key: Digest) -> bytes | None:
        """The bytes stored under an action key, or None (a miss)."""
        parent, name, inode = self._find(instance, AC, key)
        if inode is None and self._from_tiers(*self._place(instance, AC, key)):
            parent, name, inode = self._find(instance, AC, key)
        if inode is None:
            if parent is not None:
                self._soon(self.stored.miss, parent, name)
            return None
        try:
            data = b"".join(self.store.iter_object(inode.digest)) if inode.digest else b""
        except ObjectNotFoundError:  # replaced meanwhile
            return None
        if not self._trusted(key, data):
            return None
        self._soon(self.stored.hit, inode)
        return data

    def _trusted(self, key: Digest, data: bytes) -> bool:
        """Whether an entry may be served: always, unless the server trusts only
        signed entries (``--trust``; ``cachefs.signing``): then only an
        ``ActionResult`` signed by a trusted key is (anything else is a miss)."""
        verifier = self.fs.shared.tiers.verifier
        if verifier is None:
            return True
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            result = re_pb2.ActionResult()  # no ActionResult: it cannot be signed
        reason = verifier.check(key, result)
        if reason is not None:
            log.info("action cache entry %s is refused: %s", key.hex, reason)
            now = time.monotonic()  # audited once a minute a key: lookups repeat
            if now - self._refusals.get(key.hash, -60.0) >= 60.0:
                if len(self._refusals) > 10_000:
                    self._refusals.clear()
                self._refusals[key.hash] = now
                self.store.audit.record("signature.refused", entry=f"ac {key.hex}", reason=reason)
        return reason is None

    def put_action(self, instance: str, key: Digest, data: bytes, *, by: str) -> None:
        """Store ``data`` under an action key, in the place of what was there;
        the write is audited (``by``: who asked, as the server knows them).
        With a signing key, an ``ActionResult`` is stored signed; bytes that do
        not come back the same from parsing are another client's own (ccache's,
        over HTTP) and are stored as they came."""
        signer = self.fs.shared.tiers.signer
        if signer is not None:
            result = re_pb2.ActionResult()
            try:
                result.ParseFromString(data)
            except DecodeError:
                pass
            else:
                if result.SerializeToString() == data:
                    data = signer.sign(key, result).SerializeToString()
        parts, name = self._place(instance, AC, key)
        parent = self._directory(parts, make=True)
        assert parent is not None
        with self._room(parent, len(data), data) as room:
            self._store_replacing(parent, name, data, None, room)
        entry = Digest(self.digest_function.hash(data), len(data))
        self.store.audit.record(
            "ac.write", instance=instance, key=key.hash.hex(), result=str(entry), by=by
        )

    def _store_replacing(
        self, parent: int, name: bytes, source: Source, expect: Digest | None, room: Reservation
    ) -> None:
        """Store a file in the place of what is at ``name`` (stored under a
        name of its own first, then renamed over it), durably: one sync once
        it is in place.  ``room``, which it held, is let go as it is counted."""
        temporary = name + b".tmp-" + uuid.uuid4().hex.encode()
        inode = self.stored.store_file(parent, temporary, source, expect=expect, durable=False)
        assert inode is not None  # a fresh name
        self._run(self._put_in_place, parent, temporary, name, inode, room)
        self.store.sync()

    def _put_in_place(
        self, parent: int, temporary: bytes, name: bytes, inode: Inode, room: Reservation
    ) -> None:
        try:
            self.stored.added(parent, temporary, inode)
            self.stored.replace(parent, temporary, name)
        finally:
            room.release()


#: A file stored: its directory, name and inode.
_Named = tuple[int, bytes, Inode]
#: A regular file: (ino, size, content).
_File = tuple[int, int, bytes]


class _Found(NamedTuple):
    """Where a blob's file is (``parent`` None: its directory is missing), and
    the regular file there as ``(ino, size, content)``, if any."""

    parts: Parts
    parent: int | None
    name: bytes
    file: _File | None
    digest: Digest

    @property
    def present(self) -> bool:
        """The file is the blob (not one changed through a mount)."""
        return self.file is not None and self.file[1:] == (self.digest.size, self.digest.hash)

    @property
    def used(self) -> tuple[int, int]:
        """``(ino, size)``, as the filesystem is told of a hit."""
        assert self.file is not None
        return self.file[0], self.file[1]


def _outcome(store: Callable[..., object], *args: Any) -> CachefsError | None:
    """None, or the error ``store(*args)`` raised."""
    try:
        store(*args)
    except CachefsError as exc:
        return exc
    return None


def groups(
    source: Iterator[bytes | memoryview], size: int
) -> Iterator[tuple[list[bytes | memoryview], int]]:
    """``source``'s pieces in groups of about ``size`` bytes, each with its length."""
    buffer: list[bytes | memoryview] = []
    held = 0
    for piece in source:
        buffer.append(piece)
        held += len(piece)
        if held >= size:
            yield buffer, held
            buffer, held = [], 0
    if buffer:
        yield buffer, held


def _empty(fs: Filesystem, directory: int) -> None:
    """Remove everything in ``directory``: files, and directories with what
    they hold (no upload makes one, but earlier servers let an instance named
    ``.uploads`` put its blobs there)."""
    for name, inode in fs.stored.namespace.entries(directory):
        if stat.S_ISDIR(inode.mode):
            _empty(fs, inode.ino)
            fs.unlink(directory, name, directory=True)
        else:
            fs.stored.remove(directory, name)


def pieces(source: Iterator[bytes | memoryview], size: int) -> Iterator[bytes]:
    """``source`` again, in pieces of about ``size`` bytes (fewer messages to send)."""
    for group, _ in groups(source, size):
        yield b"".join(group)


#: Bytes of a zstd stream decompressed per call.  A call gives all that its
#: input holds, and a block of 4 bytes can hold 128 KiB: a slice of 1 KiB
#: gives 32 MiB at most, so that what a stream holds is checked (against its
#: digest's size) before more is decoded (a 32 KiB stream can hold 1 GiB).
ZSTD_SLICE = 1 << 10


def unzstd(source: Iterator[bytes | memoryview], decompressor: Any = None) -> Iterator[bytes]:
    """``source``, a zstd stream, decompressed (BadRequest if it is not one),
    in pieces of about 1 MiB (at most 33: ``ZSTD_SLICE``); ``decompressor``:
    one that has taken the stream's beginning already."""
    if decompressor is None:
        decompressor = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    out: list[bytes] = []
    held = 0
    for piece in source:
        view = memoryview(piece)
        for at in range(0, len(view), ZSTD_SLICE):
            try:
                decoded = decompressor.decompress(view[at : at + ZSTD_SLICE])
            except zstandard.ZstdError as exc:
                raise BadRequest(f"not a zstd stream: {exc}") from None
            if decoded:
                out.append(decoded)
                held += len(decoded)
                if held >= 1 << 20:  # gathered: pieces of 1 KiB cost their reader more
                    yield out[0] if len(out) == 1 else b"".join(out)
                    out, held = [], 0
        if out:  # what this piece of the stream brought, before more is awaited
            yield out[0] if len(out) == 1 else b"".join(out)
            out, held = [], 0
