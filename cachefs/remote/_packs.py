"""Pack files: many chunks in one object of a bucket (remote layer).

An object store answers a request for 75 KB about as slowly as one for
2 MB: pushed as one object each, the chunks of a 1 GiB file are 14,000 PUTs
(and HEADs first), a third of the speed of one multipart upload of the same
bytes, and a cold read of them is 14,000 GETs.  So a bucket keeps the chunks
of a large push in packs, as restic and borg keep theirs, and an index that
says where each chunk is; a chunk stays a blob by digest for everything above
(dedup, fetch, heal, ``--local-max-size``), only its place changes.

Layout under the remote's prefix (names are 32 random hex digits):

* ``packs/<name>``: chunks back to back, nothing else (at most about
  ``PACK_BYTES``; every chunk read from it is verified against its digest).
* ``index/<name>``: where the chunks of one push are, written after every
  pack it names (a failed push leaves packs that no index names: garbage a
  lifecycle rule removes)::

      b"cachefs-packs 1\\n"
      per pack:  b"P" | pack name (16 bytes) | chunk count (u32 LE)
                 per chunk, in the pack's order:
                            hash (32 bytes) | size (u64 LE, 1 to 2**32)
      SHA-256 of all the bytes before it (32 bytes)

  A chunk's offset is the sum of the sizes before it (a pack is less than
  2**40 bytes).  An index that cannot be parsed, or whose checksum is wrong,
  is logged and left out (its chunks are pushed again).  A large push writes
  an index every ``INDEX_PACKS`` packs, so that a failure loses little.

A process keeps the index of the whole bucket in memory (about 130 bytes a
chunk: some 1.8 MB per GiB of distinct chunks the bucket holds), loaded
lazily: the keys under ``index/`` are listed and the ones not seen yet are
read, at most every ``SYNC_PUSH`` seconds for a push's question "which of
these does the bucket lack" (an index a moment old only costs a chunk sent
twice) and every ``SYNC_READ`` seconds when a read meets a chunk it cannot
place; a sync that fails is logged, and counts as one (what is not placed
is asked for as an object of its own meanwhile).  An index no longer listed
has expired, and a pack that a read finds gone or damaged is a miss: the
chunks of either are forgotten here, so they are pushed again.  Lifecycle
rules must expire ``index/`` before ``packs/`` (the README's example): an
index that names a pack gone would keep its chunks from being pushed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from cachefs.errors import ObjectNotFoundError, RemoteError
from cachefs.format.digest import Digest, DigestFunction
from cachefs.remote._blobs import verified

log = logging.getLogger(__name__)

#: A pack is closed at this many bytes (2 MiB PUTs, 8 at once, measured as
#: fast as a multipart upload on SeaweedFS).
PACK_BYTES = 2 << 20
#: A push packs its chunks when at least this many are missing (fewer go up
#: one object each: a pack and an index would be two requests for one).
PACK_MIN = 4
#: Seconds an index loaded is good for: a push's question, a read that misses.
SYNC_PUSH, SYNC_READ = 30.0, 1.0
#: A read of chunks that lie back to back in a pack asks for at most this much:
#: a whole pack in one request (half a pack, as before, fetched 1 GiB about an
#: eighth slower on SeaweedFS, with twice the requests).
RUN_BYTES = PACK_BYTES
#: Packs a push names in one index at most.
INDEX_PACKS = 64
MAGIC = b"cachefs-packs 1\n"
_SUM = 32  # SHA-256
_LARGEST, _PACK_LIMIT = 1 << 32, 1 << 40
_PACK = struct.Struct("<c16sI")
_CHUNK = struct.Struct("<32sQ")
_ERRORS = (BaseError, OSError, ValueError, RuntimeError)


@dataclass(frozen=True)
class PackRecord:
    """A pack written: its name and its chunks, in order (not indexed yet)."""

    name: bytes
    chunks: tuple[Digest, ...]


def parse_index(data: bytes) -> list[PackRecord]:
    """The packs an index object names (ValueError if it is not one)."""
    if not data.startswith(MAGIC):
        raise ValueError("it does not start with the pack index's magic line")
    body = len(data) - _SUM
    if body < len(MAGIC) or hashlib.sha256(data[:body]).digest() != data[body:]:
        raise ValueError("its checksum is wrong (damaged or cut short)")
    records: list[PackRecord] = []
    at = len(MAGIC)
    while at < body:
        if at + _PACK.size > body:
            raise ValueError("it ends inside a pack record")
        kind, name, count = _PACK.unpack_from(data, at)
        if kind != b"P":
            raise ValueError(f"byte {at}: a pack record starts with {kind!r}")
        at += _PACK.size
        end = at + count * _CHUNK.size
        if end > body:
            raise ValueError("it ends inside a pack record")
        chunks = tuple(Digest(*_CHUNK.unpack_from(data, p)) for p in range(at, end, _CHUNK.size))
        if any(not 0 < d.size <= _LARGEST for d in chunks) or (
            sum(d.size for d in chunks) >= _PACK_LIMIT
        ):
            raise ValueError(f"pack {name.hex()}: a chunk size is out of bounds")
        records.append(PackRecord(name, chunks))
        at = end
    return records


def index_bytes(records: Sequence[PackRecord]) -> bytes:
    parts = [MAGIC]
    for record in records:
        parts.append(_PACK.pack(b"P", record.name, len(record.chunks)))
        parts.extend(_CHUNK.pack(d.hash, d.size) for d in record.chunks)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


T = TypeVar("T")


class Measure(Protocol):
    """Runs one request, measured (``_metered._Timed.call``)."""

    def __call__(self, operation: str, fn: Callable[[], T]) -> T: ...


class PackStore(Protocol):
    """What the tiers use of a remote's packs (:class:`Packs`, or it measured)."""

    def missing(self, digests: Sequence[Digest], age: float = SYNC_PUSH) -> list[Digest]: ...

    def placed(self, digest: Digest, age: float | None = None) -> bool: ...

    def run(self, digests: Sequence[Digest], limit: int = RUN_BYTES) -> int: ...

    def read_run(self, digests: Sequence[Digest]) -> list[memoryview]: ...

    def put_pack(self, blobs: Sequence[tuple[Digest, bytes | memoryview]]) -> PackRecord: ...

    def put_index(self, records: Sequence[PackRecord]) -> None: ...


class Packs:
    """The packs of one bucket, and where each chunk in them is."""

    def __init__(self, store: S3Store, name: str, function: DigestFunction, pool: Executor) -> None:
        self.store = store
        self.name = name
        self.function = function
        self._pool = pool
        #: Measures the requests a sync makes (``_metered.MeteredPacks`` sets it).
        self.measure: Measure | None = None
        self._lock = threading.Lock()
        #: One sync at a time; when the last one began (monotonic; never: -inf).
        self._syncing = threading.Lock()
        self._synced = float("-inf")
        #: Index objects read (or unreadable), by key: when, and their packs' numbers.
        self._seen: dict[str, tuple[float, list[int]]] = {}
        #: Pack names by number, and each chunk's place: pack number << 40 | offset.
        self._packs: list[str] = []
        self._where: dict[bytes, int] = {}

    def _failed(self, what: str, exc: BaseException) -> RemoteError:
        return RemoteError(f"{self.name}: {what}: {exc}")

    # --- where chunks are ------------------------------------------------------

    def _add(self, key: str, records: Sequence[PackRecord]) -> None:
        with self._lock:
            if key in self._seen:  # a sync listed it before its writer got here
                return
            numbers: list[int] = []
            self._seen[key] = (time.monotonic(), numbers)
            for record in records:
                number = len(self._packs)
                numbers.append(number)
                self._packs.append(record.name.hex())
                offset = 0
                for digest in record.chunks:
                    self._where.setdefault(digest.hash, number << 40 | offset)
                    offset += digest.size

    def _place(self, digest: Digest) -> tuple[int, int] | None:
        where = self._where.get(digest.hash)
        return None if where is None else (where >> 40, where & ((1 << 40) - 1))

    def sync(self, age: float) -> None:
        """Read the index objects not seen yet, unless a sync began less than
        ``age`` seconds ago (one that is running is waited for; one that
        failed counts too: its error is logged, and until the next one this
        process places what it placed before, and asks for the rest as
        objects of their own)."""
        with self._syncing:
            began = time.monotonic()
            if began - self._synced < age:
                return
            try:
                self._sync(began)
            except RemoteError as exc:
                log.warning("%s (until the next try, chunks are asked for one by one)", exc)
            finally:
                self._synced = began

    def _request(self, operation: str, fn: Callable[[], T]) -> T:
        return fn() if self.measure is None else self.measure(operation, fn)

    def _sync(self, began: float) -> None:
        def listing() -> list[str]:
            try:
                pages = obstore.list(self.store, "index", chunk_size=1000)
                return [meta["path"] for page in pages for meta in page]
            except _ERRORS as exc:
                raise self._failed("listing the pack indexes", exc) from None

        keys = self._request("list_pack_indexes", listing)
        listed = set(keys)
        with self._lock:  # expired (a lifecycle rule)
            old = [k for k, (when, _) in self._seen.items() if k not in listed and when < began]
            gone = {n for key in old for n in self._seen.pop(key)[1]}
        if gone:
            self._forget(gone)
        new = [key for key in keys if key not in self._seen]
        try:
            found = list(self._pool.map(self._read_index, new))
        except RuntimeError as exc:  # the pool is shut down: closed
            raise self._failed("reading the pack indexes", exc) from None
        for key, records in zip(new, found, strict=True):
            self._add(key, records)

    def _read_index(self, key: str) -> list[PackRecord]:
        def get() -> bytes | None:
            try:
                return bytes(obstore.get(self.store, key).bytes())
            except (NotFoundError, FileNotFoundError):
                return None  # expired since the listing
            except _ERRORS as exc:
                raise self._failed(f"reading {key}", exc) from None

        data = self._request("read_pack_index", get)
        if data is None:
            return []
        try:
            return parse_index(data)
        except (ValueError, struct.error) as exc:
            log.warning("%s: %s is not a pack index, left out: %s", self.name, key, exc)
            return []

    def missing(self, digests: Sequence[Digest], age: float = SYNC_PUSH) -> list[Digest]:
        """The digests no pack holds (after a sync at most ``age`` s old)."""
        self.sync(age)
        with self._lock:
            return [d for d in digests if d.hash not in self._where]

    def placed(self, digest: Digest, age: float | None = None) -> bool:
        """Whether a pack holds the chunk (with ``age``: after a sync at
        most that old, if this process cannot place it now)."""
        if digest.hash in self._where:
            return True
        if age is None:
            return False
        self.sync(age)
        return digest.hash in self._where

    def run(self, digests: Sequence[Digest], limit: int = RUN_BYTES) -> int:
        """How many of ``digests``, from the first, lie back to back in one
        pack and come to at most ``limit`` bytes (the first always counts);
        0 if no pack holds the first."""
        with self._lock:
            first = self._place(digests[0]) if digests else None
            if first is None:
                return 0
            pack, end = first[0], first[1] + digests[0].size
            count, total = 1, digests[0].size
            for digest in digests[1:]:
                if self._place(digest) != (pack, end) or total + digest.size > limit:
                    break
                count, total, end = count + 1, total + digest.size, end + digest.size
            return count

    # --- reading and writing -------------------------------------------------------

    def read_run(self, digests: Sequence[Digest]) -> list[memoryview]:
        """Chunks that lie back to back in one pack (``run`` says how many),
        in one ranged GET, each verified; ObjectNotFoundError if the pack is
        gone (its chunks are then forgotten here)."""
        with self._lock:
            place = self._place(digests[0])
            pack = "" if place is None else self._packs[place[0]]
        if place is None:
            raise ObjectNotFoundError(f"blob {digests[0]} is in no pack of {self.name}")
        total = sum(d.size for d in digests)
        key = f"packs/{pack}"
        try:
            data = memoryview(obstore.get_range(self.store, key, start=place[1], length=total))
        except (NotFoundError, FileNotFoundError):
            log.warning("%s: pack %s is gone; its chunks will be pushed again", self.name, pack)
            self._forget({place[0]})
            raise ObjectNotFoundError(f"{self.name}: pack {pack} is gone") from None
        except _ERRORS as exc:
            raise self._failed(f"reading {key}", exc) from None
        chunks, at = [], 0
        try:
            for digest in digests:
                chunks.append(
                    verified(self.name, self.function, digest, data[at : at + digest.size])
                )
                at += digest.size
        except RemoteError:  # a damaged pack: what it holds is pushed again
            log.warning("%s: pack %s is damaged; its chunks will be pushed again", self.name, pack)
            self._forget({place[0]})
            raise
        return chunks

    def _forget(self, numbers: set[int]) -> None:
        """Chunks of these packs are no longer placed (nor pushed as held)."""
        with self._lock:
            for chunk in [c for c, w in self._where.items() if w >> 40 in numbers]:
                del self._where[chunk]

    def put_pack(self, blobs: Sequence[tuple[Digest, bytes | memoryview]]) -> PackRecord:
        """Upload one pack of ``blobs`` (not indexed until ``put_index``)."""
        name = os.urandom(16)
        try:
            obstore.put(self.store, f"packs/{name.hex()}", b"".join(data for _, data in blobs))
        except _ERRORS as exc:
            raise self._failed(f"writing pack {name.hex()}", exc) from None
        return PackRecord(name, tuple(d for d, _ in blobs))

    def put_index(self, records: Sequence[PackRecord]) -> None:
        """Upload the index of packs written (``put_pack``): they count from now on."""
        key = f"index/{os.urandom(16).hex()}"
        try:
            obstore.put(self.store, key, index_bytes(records))
        except _ERRORS as exc:
            raise self._failed(f"writing {key}", exc) from None
        self._add(key, records)


def pack_groups(digests: Sequence[Digest], limit: int = PACK_BYTES) -> list[list[Digest]]:
    """``digests`` in order, cut into packs of at most ``limit`` bytes (a
    larger chunk is a pack of its own)."""
    groups: list[list[Digest]] = []
    size = 0
    for digest in digests:
        if not groups or (size + digest.size > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(digest)
        size += digest.size
    return groups


__all__ = [
    "INDEX_PACKS",
    "PACK_BYTES",
    "PACK_MIN",
    "RUN_BYTES",
    "SYNC_PUSH",
    "SYNC_READ",
    "PackRecord",
    "PackStore",
    "Packs",
    "index_bytes",
    "pack_groups",
    "parse_index",
]
