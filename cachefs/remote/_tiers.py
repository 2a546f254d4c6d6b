"""Tiers: the remotes behind a store, and moving objects to and from them (remote layer).

A store's tiers are remotes in order (``Tier``: one endpoint or a shard group,
with a direction).  What moves is the store's own chunking (``_lists.py``):

* **Push** (``Tiers.push``): an object's chunks that a write tier lacks
  (asked first, in batches), then -- unless it is one chunk, which is then
  the object's blob itself -- its chunk list and the action cache entry
  that names it, and -- for tiers that serve other clients, REAPI and Bazel
  HTTP caches -- the whole object as one blob too, so that Bazel sees it:
  spliced from its chunks by a REAPI server that offers SpliceBlob, else
  uploaded (streamed when large; to an HTTP cache, which takes single PUTs,
  objects up to ``WHOLE_MAX`` only, larger ones travel as chunks only).  The
  :class:`Pusher` thread drains the store's durable queue
  (``engine.PushQueue``) into the write tiers, oldest first, and backs off
  while they fail.  A bucket takes the chunks of a push of ``PACK_MIN`` or
  more in packs (``_packs.py``: a few large PUTs and an index, not one PUT
  and a HEAD per chunk); what its packs hold is not asked about again.
* **Fetch** (``Tiers.fetch``): an object that is not in the local store is
  looked for in the read tiers in order: its chunk list, then the chunks the
  local store lacks, ``FETCH_AHEAD`` requests (``FETCH_BYTES``) in flight
  ahead of the consumer (from a bucket's packs, chunks that lie back to back
  come in one request);
  or, with no list, the whole blob.  Each chunk is verified as a blob, and the
  caller stores the object with its digest as ``expect``: nothing wrong is
  ever published or served.
* **Heal and restore** (``Tiers.heal``, ``Tiers.restore``): a chunk damaged
  here, or held only by the tiers (dropped under ``--local-max-size``:
  ``Tiers.held`` says which chunks a read-write tier holds), fetched,
  verified and stored here again; the chunks a reader wants are fetched as
  an object's are (runs of a pack in one request) and stored as they come.

* **Shared entries** (``Tiers.find_entry``, ``Tiers.push_entry``): in the
  action cache, or as documents where a tier keeps them (a bucket): there a
  file's entry is read by its key, and the first name that is not a file
  lists the directory, which then answers every lookup in it: absent names
  for ``LISTING_TTL`` seconds, directories for ``LISTED_DIRECTORY_TTL``.  A
  name no tier has is not asked about again for ``ABSENT_TTL`` seconds (the
  kernel looks a name up afresh before it creates it, whatever its negative
  cache says).

Sparse objects (files with holes) are pushed as chunks and list; they are not
uploaded whole (their key is not the digest of their content).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field

from cachefs import tracing
from cachefs.engine import (
    CachefsError,
    Digest,
    DigestFunction,
    KnownChunks,
    ObjectNotFoundError,
    QueuedPush,
    Store,
    heal_chunk,
    restore_chunks,
)
from cachefs.errors import ConfigError, CorruptDataError, RemoteError, RemoteRecordError
from cachefs.protocol import re_pb2
from cachefs.remote._blobs import Remote, action_result
from cachefs.remote._early import EarlyPush
from cachefs.remote._lists import (
    INLINE_MAX,
    SharedEntry,
    directory_prefix,
    entry_document,
    entry_key,
    entry_result,
    list_key,
    list_result,
    listed_blob,
    listed_names,
    pack_list,
    parse_entry,
    unpack_list,
)
from cachefs.remote._packs import PACK_MIN
from cachefs.remote._shards import Breaker
from cachefs.remote._transfer import FETCH_AHEAD, fetch_chunks, push_packed
from cachefs.signing import Signer, Verifier

log = logging.getLogger(__name__)

#: A tier's directions.
DIRECTIONS = ("read-write", "read-only", "write-only")
#: Objects at most this large are uploaded whole to tiers that want them.
WHOLE_MAX = 64 << 20
#: Objects up to this size are looked for as one blob first, then by their
#: chunk list (one of at most the largest chunk is pushed as that chunk alone).
WHOLE_FIRST = 256 << 10
#: Objects pushed lately that a second push (their shared entry's) skips.
PUSHED_KEPT = 4096
#: Seconds after which a shared directory's entry is put on a tier again, and
#: how many directories' are kept in mind.
DIRECTORY_REFRESH, DIRECTORY_ENTRIES_KEPT = 6 * 3600.0, 100_000
#: Seconds that a tier's clock may be ahead of this machine's.
CLOCK_SKEW = 300.0
#: Digests asked about in one find_missing call.
ASK_BATCH = 1000
#: Seconds a tier's listing of a shared directory is kept, and a name that no
#: tier has is a miss without asking: as long as the kernel keeps a negative
#: lookup there (``cachefs.fuse.NEGATIVE_TIMEOUT``; a file another machine
#: puts there is found within both, about 2 s).  Names listed at most per
#: directory: a larger one is asked about name by name, and listed again only
#: after ``TOO_LARGE_TTL`` seconds.  Listings and names kept.
LISTING_TTL, LISTING_MAX, TOO_LARGE_TTL, LISTINGS_KEPT = 1.0, 4000, 300.0, 10_000
#: Seconds the directories a listing shows are taken for there (as long as the
#: filesystem keeps the tiers' answer about a directory: ``DIRECTORY_TTL`` of
#: ``cachefs.fs._shared``).  Entries leave a tier only by its lifecycle.
LISTED_DIRECTORY_TTL = 10.0
ABSENT_TTL, ABSENT_KEPT = 1.0, 10_000
#: Bytes of fetched chunks that a restore stores here in its first
#: publication (a reader waits for it), and in each one after (each syncs
#: every segment it wrote: about 17 ms on this machine's disk).
RESTORE_FIRST, RESTORE_BATCH = 1 << 20, 16 << 20
#: Objects the pusher takes from the queue at a time, and pushes at once.
PUSH_BATCH, PUSH_OBJECTS = 64, 4
#: The pusher's back-off after a failure (seconds, doubling) and its idle wait.
RETRY_FIRST, RETRY_MAX, IDLE = 1.0, 30.0, 5.0


#: What each tier's figures count of what came from it.
TIER_COUNTS = ("fetched_objects", "fetched_chunks", "fetched_bytes", "healed_chunks")


@dataclass
class Tier:
    """One tier: a remote (endpoint or shard group) and which way data flows."""

    remote: Remote
    direction: str = "read-write"
    #: Upload whole objects too (for REAPI and HTTP remotes' other clients).
    whole: bool = False
    #: Keeps what it is given (an object store; not a cache that evicts): what
    #: it holds may be dropped here under --local-max-size.
    durable: bool = False
    #: Skips the tier for a while once it fails (lookups must not hang a build).
    breaker: Breaker = field(default_factory=Breaker)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                f"tier {self.remote.name}: direction {self.direction!r} is none of "
                + ", ".join(DIRECTIONS)
            )

    @property
    def readable(self) -> bool:
        return self.direction != "write-only"

    @property
    def writable(self) -> bool:
        return self.direction != "read-only"


def _whole(remote: Remote, digest: Digest) -> bytes | None:
    try:
        return remote.read(digest)
    except ObjectNotFoundError:
        return None


def _healthy(tier: Tier) -> bool:
    """Whether no failure of ``tier`` waits for a request that succeeds."""
    return not tier.breaker.tripped


def _failed(tier: Tier, exc: RemoteError) -> None:
    if tier.breaker.failed(exc.message):
        log.warning("remote %s skipped for %.0f s: %s", tier.remote.name,
                    tier.breaker.backoff, exc.message)  # fmt: skip


class Tiers:
    """The tiers of one store, and what has moved through them."""

    def __init__(self, store: Store, tiers: Sequence[Tier]) -> None:
        self.store = store
        self.function = store.digest_function
        self.tiers = list(tiers)
        self.readers = [t for t in self.tiers if t.readable]
        self.writers = [t for t in self.tiers if t.writable]
        self._pool = ThreadPoolExecutor(FETCH_AHEAD, thread_name_prefix="cachefs-tier")
        self._lock = threading.Lock()
        self.counts = {
            "pushed_objects": 0,
            "pushed_chunks": 0,
            "pushed_bytes": 0,
            "fetched_objects": 0,
            "fetched_chunks": 0,
            "fetched_bytes": 0,
            "fetch_misses": 0,
            "fetch_errors": 0,
            "pushed_entries": 0,
            "healed_chunks": 0,
            "spliced_objects": 0,
            "early_chunks": 0,
        }
        #: What came from each tier (``TIER_COUNTS``), by its name.
        self.by_tier: dict[str, dict[str, int]] = {}
        #: Signs what is published; takes only what trusted keys signed (``cachefs.signing``).
        self.signer: Signer | None = None
        self.verifier: Verifier | None = None
        #: Objects this process pushed lately (not asked about again).
        self._pushed: OrderedDict[Digest, None] = OrderedDict()
        #: Directory entries of shares this process put, or found listed.
        self._directories = _DirectoryEntries({t.remote.key for t in self.writers})
        #: Tiers' listings of shared directories.
        self._listings = _Listings(self.function, self._directories)
        #: Names that no tier had, (share, path) -> when that was the answer.
        self._absent: dict[tuple[str, str], float] = {}
        #: The early push to each write tier that keeps packs, by ``id(tier)``.
        self.early: dict[int, EarlyPush] = {}
        if self.readers and not store.readonly:
            store.chunks.healer = self.heal
            store.chunks.restorer = self.restore

    def _count(self, tier: str | None = None, **deltas: int) -> None:
        """Add to the counts, and to ``tier``'s (a tier's name: what came from it)."""
        with self._lock:
            for name, delta in deltas.items():
                self.counts[name] += delta
            if tier is not None:
                mine = self.by_tier.setdefault(tier, dict.fromkeys(TIER_COUNTS, 0))
                for name, delta in deltas.items():
                    mine[name] += delta

    def _fetched(self, tier: str, chunks: int, size: int) -> None:
        self._count(tier, fetched_chunks=chunks, fetched_bytes=size)

    def push_early(self) -> None:
        """Send the chunks the store appends to each write tier that keeps
        packs as they come, before their objects are published (``_early.py``)."""
        for tier in self.writers:
            packs = tier.remote.packs
            if packs is not None and not self.store.readonly and id(tier) not in self.early:
                self.early[id(tier)] = EarlyPush(
                    tier.remote.name, packs, self.store, self._pool,
                    functools.partial(_healthy, tier), self._sent_early,
                )  # fmt: skip
        if self.early:
            self.store.ingest.on_appended = self._appended

    def _appended(self, chunks: list[tuple[bytes, int]]) -> None:
        for early in self.early.values():
            early.offer(chunks)

    def _sent_early(self, chunks: int, size: int) -> None:
        self._count(pushed_chunks=chunks, pushed_bytes=size, early_chunks=chunks)

    def close(self) -> None:
        if self.store.ingest.on_appended == self._appended:
            self.store.ingest.on_appended = None
        for early in self.early.values():
            early.close()
        if self.store.chunks.healer == self.heal:
            self.store.chunks.healer = None
        if self.store.chunks.restorer == self.restore:
            self.store.chunks.restorer = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        for tier in self.tiers:
            tier.remote.close()

    # --- push ------------------------------------------------------------------

    def push(self, digest: Digest) -> None:
        """Make every write tier hold the object (ObjectNotFoundError: it is
        not in the store any more; RemoteError: a tier failed)."""
        if digest.size == 0:
            return  # the empty blob: every tier has it
        with self._lock:
            if digest in self._pushed:
                return  # just pushed (a shared entry follows its object in the queue)
        chunks = self.store.recipe(digest)
        with tracing.span("cachefs push", attributes={"cachefs.digest": str(digest)}):
            for tier in self.writers:
                self._push_to(tier, digest, chunks)
        self._count(pushed_objects=1)
        with self._lock:
            self._pushed[digest] = None
            if len(self._pushed) > PUSHED_KEPT:
                self._pushed.popitem(last=False)

    def _push_to(self, tier: Tier, digest: Digest, chunks: list[tuple[bytes, int]]) -> None:
        remote = tier.remote
        early = self.early.get(id(tier))
        if early is not None:  # what it sent counts, what waits is this push's
            early.settle({d for d, _ in chunks if d})
        blobs = list(dict.fromkeys(Digest(d, n) for d, n in chunks if d))
        packs = remote.packs
        if packs is not None:  # what a pack holds is not asked about again
            blobs = packs.missing(blobs)
        if packs is not None and len(blobs) >= PACK_MIN:
            push_packed(self._pool, self.store, packs, blobs)
            self._count(pushed_chunks=len(blobs), pushed_bytes=sum(d.size for d in blobs))
        else:
            missing: list[Digest] = []
            for start in range(0, len(blobs), ASK_BATCH):
                missing.extend(remote.find_missing(blobs[start : start + ASK_BATCH]))
            push = tracing.in_context(lambda d: self._push_chunk(remote, d))
            sent = sum(self._pool.map(push, missing))
            self._count(pushed_chunks=len(missing), pushed_bytes=sent)
        if len(chunks) == 1 and chunks[0][0] == digest.hash:
            return  # one chunk: the blob is the object (no list needed, nothing else to send)
        listing = pack_list(chunks)
        blob = Digest(self.function.hash(listing), len(listing))
        fits = digest.size <= WHOLE_MAX or remote.streams
        whole = tier.whole and fits and all(d for d, _ in chunks)
        wanted = [blob, digest] if whole else [blob]
        lacking = set(remote.find_missing(wanted))
        if blob in lacking:
            remote.write(blob, listing)
        remote.update_action(list_key(self.function, digest), list_result(blob))
        if digest in lacking and not self._spliced(remote, digest, chunks):
            if digest.size <= WHOLE_MAX:
                remote.write(digest, self.store.read(digest))
            else:
                remote.write_stream(digest, lambda: self.store.iter_object(digest))
            self._count(pushed_bytes=digest.size)

    def _spliced(self, remote: Remote, digest: Digest, chunks: list[tuple[bytes, int]]) -> bool:
        """Whether the remote made the whole object from its chunks (REAPI
        SpliceBlob, where the server offers it; it holds them all by now)."""
        if len(chunks) < 2 or not remote.splices:
            return False
        try:
            remote.splice(digest, [Digest(d, n) for d, n in chunks])
        except RemoteError as exc:
            log.info("%s: splicing %s failed, uploading it whole: %s", remote.name, digest, exc)
            return False
        self._count(spliced_objects=1)
        return True

    def _push_chunk(self, remote: Remote, digest: Digest) -> int:
        remote.write(digest, bytes(self.store.read_chunk(digest.hash)))
        return digest.size

    # --- fetch -----------------------------------------------------------------

    def fetch(self, digest: Digest) -> Iterable[bytes | memoryview]:
        """The bytes of an object the local store lacks, from the first read
        tier that has it, each chunk verified (the caller stores them with
        ``expect=digest``, which checks the whole).  An object fetched by its
        chunk list comes as ``KnownChunks`` (the store keeps the chunks as
        they are, with no cut and no digest of each again) unless the list has
        holes.  ObjectNotFoundError if no tier has it; RemoteError if none
        could be asked and one failed."""
        if digest.size == 0:
            return iter(())
        failure: RemoteError | None = None
        for tier in self.readers:
            if not tier.breaker.admit():
                failure = RemoteError(f"{tier.remote.name} is skipped: {tier.breaker.reason}")
                continue
            try:
                if digest.size <= WHOLE_FIRST:  # most likely one chunk: the blob is the object
                    data = _whole(tier.remote, digest)
                    found = None if data is not None else self._listed(tier.remote, digest)
                else:
                    found = self._listed(tier.remote, digest)
                    data = None if found is not None else _whole(tier.remote, digest)
            except RemoteRecordError as exc:  # that tier's record of it is no use: a miss
                tier.breaker.succeeded()
                log.warning("fetching object %s: %s", digest, exc.message)
                continue
            except RemoteError as exc:
                _failed(tier, exc)
                failure = exc
                continue
            tier.breaker.succeeded()
            if found is not None:
                self._count(tier.remote.name, fetched_objects=1)
                chunks = fetch_chunks(self._pool, self.store, tier.remote, found, self._fetched)
                largest = self.store.chunker.params.max_size
                if all(chunk and 0 < size <= largest for chunk, size in found):
                    return KnownChunks(chunks)
                # Holes, or chunks this store would not make: bytes to cut again.
                return (data for _, data in chunks)
            if data is not None:
                self._count(tier.remote.name, fetched_objects=1, fetched_bytes=len(data))
                return iter((data,))
        if failure is not None:
            self._count(fetch_errors=1)
            raise failure
        self._count(fetch_misses=1)
        raise ObjectNotFoundError(f"object {digest} is in no tier of {self.store.path}")

    # --- self-heal -------------------------------------------------------------------

    def heal(self, chunk: bytes, size: int) -> bytes | None:
        """A chunk damaged here, or held only by the tiers (``--local-max-size``),
        from the first read tier that has it, verified, stored again
        (``engine.heal_chunk``); None if no tier has it."""
        remote = self.store.chunks.held_remotely(chunk)
        with tracing.span("cachefs heal", attributes={"cachefs.chunk": chunk.hex()}):
            found = self._first_copy(Digest(chunk, size))
        if found is None:
            return None
        data, tier = found
        try:
            heal_chunk(self.store, chunk, data)
        except CachefsError as exc:  # read-only, or the disk: the bytes are good
            log.warning("chunk %s: a good copy came, but is not stored: %s", chunk.hex(), exc)
            return data
        if remote:
            self._count(tier, fetched_chunks=1, fetched_bytes=len(data))
        else:
            self._count(tier, healed_chunks=1)
            log.warning("chunk %s was damaged here: healed from %s", chunk.hex(), tier)
        return data

    def _first_copy(self, digest: Digest) -> tuple[bytes, str] | None:
        """A blob from the first read tier that has it (verified), and that tier's name."""
        for tier in self.readers:
            if not tier.breaker.admit():
                continue
            try:
                data = tier.remote.read(digest)
            except ObjectNotFoundError:
                tier.breaker.succeeded()
                continue
            except RemoteError as exc:
                _failed(tier, exc)
                continue
            tier.breaker.succeeded()
            return data, tier.remote.name
        return None

    def restore(
        self, chunks: list[tuple[bytes, int]], landed: Callable[[int], None] | None = None
    ) -> int:
        """Fetch chunks held only by the tiers and store them here again
        (read-ahead for a reader that met one of them); how many were.

        In the order given (a file's), from each read tier in turn that can
        be asked, what the tiers before it did not give: ``FETCH_AHEAD``
        requests in flight, a run of chunks that lie back to back in a
        bucket's pack in one request (``fetch_chunks``), until a chunk it
        lacks.  What none gave so is asked of every tier, chunk by chunk.
        Stored as they come, in publications of ``RESTORE_FIRST`` bytes, then
        of ``RESTORE_BATCH``, each told to ``landed`` (how many chunks it
        stored: a reader waiting for the first goes on while the rest come;
        these bytes are held until stored).  A chunk that no tier gives is
        left held remotely (its own read then says why)."""
        wanted = list(dict.fromkeys(chunks))
        restored = batched = 0
        batch: dict[bytes, bytes | memoryview] = {}
        limit = RESTORE_FIRST

        def add(digest: bytes, data: bytes | memoryview) -> None:
            nonlocal batched
            batch[digest] = data
            batched += len(data)
            if batched >= limit:
                store()

        def store() -> None:
            nonlocal restored, batched, limit
            stored = restore_chunks(self.store, batch, verified=True)  # as they came
            batch.clear()
            restored, batched, limit = restored + stored, 0, RESTORE_BATCH
            if landed is not None:
                landed(stored)

        got: set[bytes] = set()
        for tier in self.readers:
            rest = [(d, n) for d, n in wanted if d not in got]
            if not rest or not tier.breaker.admit():
                continue
            failure: RemoteError | None = None
            try:
                for digest, data in fetch_chunks(
                    self._pool, self.store, tier.remote, rest, self._fetched
                ):
                    got.add(digest)
                    add(digest, data)
            except ObjectNotFoundError:
                pass  # it answered: the next tiers are asked for the rest
            except RemoteError as exc:
                failure = exc
            finally:  # whatever else failed (the store here), the tier did not
                if failure is None:
                    tier.breaker.succeeded()
                else:
                    _failed(tier, failure)
        rest = [(d, n) for d, n in wanted if d not in got and self.store.chunks.held_remotely(d)]
        sources: dict[str, list[int]] = {}
        first = tracing.in_context(self._first_copy)
        asked = [Digest(d, n) for d, n in rest]
        for chunk, found in zip(asked, self._pool.map(first, asked), strict=True):
            if found is not None:
                sources.setdefault(found[1], []).append(len(found[0]))
                add(chunk.hash, found[0])
        if batch:
            store()
        for name, sizes in sources.items():
            self._count(name, fetched_chunks=len(sizes), fetched_bytes=sum(sizes))
        return restored

    def held(self, digests: Sequence[Digest]) -> set[bytes]:
        """Which of these chunks a durable read-write tier holds (so that the
        local store may drop them: they can be fetched back); a tier that
        cannot be asked holds nothing."""
        found: set[bytes] = set()
        for tier in self.readers:
            if not (tier.writable and tier.durable) or not tier.breaker.admit():
                continue
            try:
                for start in range(0, len(digests), ASK_BATCH):
                    batch = [d for d in digests[start : start + ASK_BATCH] if d.hash not in found]
                    missing = set(tier.remote.find_missing(batch)) if batch else set()
                    found.update(d.hash for d in batch if d not in missing)
            except RemoteError as exc:
                _failed(tier, exc)
                continue
            tier.breaker.succeeded()
        return found

    # --- shared entries ------------------------------------------------------------

    def known_entry(self, share: str, path: str) -> tuple[bool, SharedEntry | None]:
        """``(True, find_entry(share, path))`` when that needs no request (a
        name no tier had a moment ago, or what recent listings say: absent, a
        directory); else ``(False, None)``.  Never blocks: a caller on an
        event loop asks this before it hands :meth:`find_entry` to a thread."""
        if self._recently_absent(share, path):
            return True, None
        parent, _, name = path.rpartition("/")
        for tier in self.readers:
            if tier.breaker.open:
                return False, None  # find_entry decides whether to try it
            if self._listings.shows_directory(tier.remote, share, parent, name):
                return True, SharedEntry(path, None)
            names = self._listings.recent(tier.remote, share, parent)[1]
            if names is None or names.get(name) is False:
                return False, None  # a request would say (the file's entry)
            if name in names:
                return True, SharedEntry(path, None)
        return True, None

    def _recently_absent(self, share: str, path: str) -> bool:
        with self._lock:
            since = self._absent.get((share, path))
        return since is not None and time.monotonic() - since < ABSENT_TTL

    def find_entry(self, share: str, path: str) -> SharedEntry | None:
        """The entry ``path`` of share ``share`` in the first read tier that
        has it; None if none has it.  RemoteError if none has it and one
        could not say: it failed now (logged here), or it is failing and
        skipped (a lookup then misses at once: it never waits on such a
        tier).  That is no answer: the name is not kept as absent."""
        if self._recently_absent(share, path):
            return None
        failure: RemoteError | None = None
        for tier in self.readers:
            if not tier.breaker.admit():
                failure = RemoteError(f"{tier.remote.name} is skipped: {tier.breaker.reason}")
                continue
            try:
                found = self._entry_on(tier.remote, share, path)
                tier.breaker.succeeded()
                # A malformed or untrusted entry is a miss there, not a failing tier.
                entry = found if not isinstance(found, re_pb2.ActionResult) else (
                    parse_entry(found, path, tier.remote.name)
                )  # fmt: skip
                if entry is not None and entry.digest is not None and self.verifier:
                    self._trusted(share, path, found, tier.remote.name)
            except RemoteRecordError as exc:
                tier.breaker.succeeded()
                log.warning("shared entry %s/%s: %s", share, path, exc.message)
                continue
            except RemoteError as exc:
                _failed(tier, exc)
                log.warning("shared entry %s/%s: %s", share, path, exc.message)
                failure = exc
                continue
            if entry is not None:
                return entry
        if failure is not None:
            raise failure
        with self._lock:
            if len(self._absent) >= ABSENT_KEPT:
                self._absent.clear()
            self._absent[share, path] = time.monotonic()
        return None

    def _entry_on(
        self, remote: Remote, share: str, path: str
    ) -> SharedEntry | re_pb2.ActionResult | None:
        """What ``remote`` keeps of the entry: from its action cache, or its
        documents (a listing made lately answers for absent names and
        directories; else the file's entry is read, and only if there is none
        is the directory listed)."""
        documents = remote.documents
        if documents is None:
            return remote.get_action(entry_key(self.function, share, path))
        parent, _, name = path.rpartition("/")
        if self._listings.shows_directory(remote, share, parent, name):
            return SharedEntry(path, None)
        listed, names = self._listings.recent(remote, share, parent)
        if names is None or names.get(name) is False:  # not listed, or a file
            data = documents.get_document(entry_document(self.function, share, path, False))
            if data is not None:
                try:
                    return action_result(data, remote.name, f"shared entry {share}/{path}")
                except RemoteError as exc:  # a miss there, not a failing tier
                    log.warning("%s", exc.message)
                    return None
            if not listed:
                names = self._listings.list(remote, share, parent)
            if names is None:  # too large to list: a directory, maybe
                key = entry_document(self.function, share, path, True)
                return SharedEntry(path, None) if documents.get_document(key) else None
        return SharedEntry(path, None) if names.get(name) else None

    def push_entry(self, share: str, entry: SharedEntry) -> None:
        """Put a shared directory's entry (its content pushed before) and the
        entries of the directories above it on every write tier (those not
        put, or found listed, in the last ``DIRECTORY_REFRESH`` seconds)."""
        parts = entry.path.split("/")
        above = ["/".join(parts[:n]) for n in range(1, len(parts))]
        for tier in self.writers:
            for path in above:
                if self._directories.due(tier.remote.key, share, path):
                    self._put_entry(tier.remote, share, SharedEntry(path, None))
                    self._directories.put(tier.remote.key, share, path)
            self._put_entry(tier.remote, share, entry)
        self._count(pushed_entries=1)

    def _trusted(self, share: str, path: str, found: object, where: str) -> None:
        """RemoteRecordError (audited) unless signed by a trusted key (``--trust``)."""
        assert self.verifier is not None and isinstance(found, re_pb2.ActionResult)
        reason = self.verifier.check(entry_key(self.function, share, path), found)
        if reason is not None:
            self.store.audit.record("signature.refused", entry=f"{share}/{path}", tier=where,
                                    reason=reason)  # fmt: skip
            raise RemoteRecordError(f"{where}: the entry is refused: {reason}")

    def _put_entry(self, remote: Remote, share: str, entry: SharedEntry) -> None:
        result = entry_result(entry)
        if self.signer is not None and entry.digest is not None:
            result = self.signer.sign(entry_key(self.function, share, entry.path), result)
        documents = remote.documents
        if documents is None:
            remote.update_action(entry_key(self.function, share, entry.path), result)
            return
        directory = entry.digest is None
        documents.put_document(
            entry_document(self.function, share, entry.path, directory), result.SerializeToString()
        )
        if directory:  # a file's entry there before would hide it (a file is read first)
            documents.delete_document(entry_document(self.function, share, entry.path, False))

    def _listed(self, remote: Remote, digest: Digest) -> list[tuple[bytes, int]] | None:
        """The object's chunk list from ``remote`` (None: it has none)."""
        entry = remote.get_action(list_key(self.function, digest))
        if entry is None:
            return None
        blob = listed_blob(entry, remote.name)
        try:
            data = remote.read(blob)
        except ObjectNotFoundError:
            return None
        return unpack_list(data, digest, remote.name)

    def figures(self) -> dict[str, object]:
        with self._lock:
            counts = dict(self.counts)
            by_tier = {name: dict(mine) for name, mine in self.by_tier.items()}
        zero = dict.fromkeys(TIER_COUNTS, 0)
        tiers = [_describe(t) | by_tier.get(t.remote.name, zero) for t in self.tiers]
        return {"tiers": tiers, **counts}


class _DirectoryEntries:
    """When each shared directory's entry on a write tier was written, as far
    as this process knows: it put it, or a listing showed it (a push under it
    puts it again once it is ``DIRECTORY_REFRESH`` old: a tier's lifecycle may
    expire it).  A listing is trusted that long: a file's entry that another
    machine puts at the directory's path meanwhile is not replaced before.
    Safe to use from several threads."""

    def __init__(self, writers: set[str]) -> None:
        #: The write tiers' keys (listings of other tiers are not kept).
        self.writers = writers
        #: (tier, share, path) -> when written (``time.monotonic``'s clock);
        #: the least recently written first.
        self._written: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def due(self, tier: str, share: str, path: str) -> bool:
        """Whether to put the entry of directory ``path`` on ``tier`` now."""
        with self._lock:
            written = self._written.get((tier, share, path))
        return written is None or time.monotonic() - written > DIRECTORY_REFRESH

    def put(self, tier: str, share: str, path: str) -> None:
        self._keep([((tier, share, path), time.monotonic())])

    def listed(self, tier: str, share: str, directory: str, written: dict[str, float]) -> None:
        """A listing of ``directory`` on ``tier`` showed these directories'
        entries, written then (seconds since the epoch, the tier's clock).
        One written up to ``CLOCK_SKEW`` s "in the future" (the clocks differ)
        is taken for written now; one further ahead is not kept (it stays due)."""
        if tier not in self.writers:
            return
        now, wall = time.monotonic(), time.time()
        self._keep(
            ((tier, share, f"{directory}/{name}" if directory else name), now - max(0.0, wall - at))
            for name, at in written.items()
            if at <= wall + CLOCK_SKEW
        )

    def _keep(self, written: Iterable[tuple[tuple[str, str, str], float]]) -> None:
        with self._lock:
            for key, at in written:
                if at <= self._written.get(key, -math.inf):
                    continue
                self._written[key] = at
                self._written.move_to_end(key)
                if len(self._written) > DIRECTORY_ENTRIES_KEPT:
                    self._written.popitem(last=False)


class _Listings:
    """Tiers' listings of shared directories (where a tier keeps documents),
    kept ``LISTING_TTL`` seconds (``TOO_LARGE_TTL`` for a directory too large
    to list); the directories one shows are taken for there
    ``LISTED_DIRECTORY_TTL`` seconds.  Safe to use from several threads."""

    def __init__(self, function: DigestFunction, directories: _DirectoryEntries) -> None:
        self.function = function
        #: Told when each directory a listing shows was written.
        self.directories = directories
        #: (tier, share, directory) -> (name -> is a directory, or None: too
        #: large to list; when listed).
        self.kept: dict[tuple[str, str, str], tuple[dict[str, bool] | None, float]] = {}
        #: Listings in progress, set when done (the same key as ``kept``).
        self.running: dict[tuple[str, str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def recent(
        self, remote: Remote, share: str, directory: str
    ) -> tuple[bool, dict[str, bool] | None]:
        """Whether the directory was listed lately, and its names (None:
        not listed, or too large to list)."""
        with self._lock:
            return self._fresh((remote.key, share, directory))

    def shows_directory(self, remote: Remote, share: str, directory: str, name: str) -> bool:
        """Whether a listing of ``directory`` made in the last
        ``LISTED_DIRECTORY_TTL`` seconds shows ``name`` as a directory."""
        with self._lock:
            known = self.kept.get((remote.key, share, directory))
        if known is None or known[0] is None:
            return False
        names, when = known[0], known[1]
        return names.get(name) is True and time.monotonic() - when < LISTED_DIRECTORY_TTL

    def _fresh(self, key: tuple[str, str, str]) -> tuple[bool, dict[str, bool] | None]:
        """``recent`` by key, with ``_lock`` held."""
        known = self.kept.get(key)
        if known is None:
            return False, None
        names, when = known
        if time.monotonic() - when >= (LISTING_TTL if names is not None else TOO_LARGE_TTL):
            return False, None
        return True, names

    def list(self, remote: Remote, share: str, directory: str) -> dict[str, bool] | None:
        """The names in ``directory`` of ``share`` on ``remote`` (None: too
        many to list), kept ``LISTING_TTL`` seconds.  A thread that finds the
        directory being listed by another waits for that listing (listed
        lately meanwhile: that listing is the answer)."""
        assert remote.documents is not None
        key = (remote.key, share, directory)
        while True:  # until listed lately, or this thread is the one to list it
            with self._lock:
                listed, names = self._fresh(key)
                if listed:
                    return names
                running = self.running.get(key)
                if running is None:
                    mine = self.running[key] = threading.Event()
                    break
            running.wait()  # that listing failed: one of the waiters lists next
        try:
            prefix = directory_prefix(self.function, share, directory)
            keys = remote.documents.list_documents(prefix, LISTING_MAX)
            names, written = (None, {}) if keys is None else listed_names(keys)
            with self._lock:
                if len(self.kept) >= LISTINGS_KEPT:
                    self.kept.clear()
                self.kept[key] = (names, time.monotonic())
            self.directories.listed(remote.key, share, directory, written)
            return names
        finally:
            with self._lock:
                del self.running[key]
            mine.set()


def _describe(tier: Tier) -> dict[str, object]:
    figures: dict[str, object] = {
        "remote": tier.remote.name,
        "direction": tier.direction,
        "failing": tier.breaker.tripped,
    }
    if tier.breaker.open:
        figures["skipped"] = tier.breaker.reason
    members = getattr(tier.remote, "members", None)
    if members is not None:
        figures["endpoints"] = [
            {
                "remote": m.remote.name,
                "open": m.breaker.open,
                "failing": m.breaker.tripped,
                "reason": m.breaker.reason,
            }
            for m in members
        ]
    return figures


class Pusher:
    """A thread that drains the store's push queue into the write tiers."""

    def __init__(self, tiers: Tiers) -> None:
        queue = tiers.store.pushes
        if queue is None:
            raise ConfigError("the store was opened without a push queue (StoreOptions.push)")
        self.queue = queue
        self.tiers = tiers
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cachefs-pusher", daemon=True)
        queue.on_queued = self.kick
        tiers.push_early()
        self._objects = ThreadPoolExecutor(PUSH_OBJECTS, thread_name_prefix="cachefs-push")
        self.failures = 0
        #: Items dropped from the queue: refused for good, or failing here.
        self.dropped = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """Something was queued: look now."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._objects.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            try:
                progressed = self.drain_once()
            except Exception as exc:  # the thread must live on: back off and retry
                if not isinstance(exc, CachefsError):
                    log.exception("push: unexpected error")
                self.failures += 1
                self.last_error = exc.message if isinstance(exc, CachefsError) else repr(exc)
                log.warning("push: %s (retrying in %.0f s)", self.last_error, delay)
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_FIRST
            if not progressed:
                self._wake.wait(IDLE)
                self._wake.clear()

    def drain_once(self) -> bool:
        """Push the next batch of the queue, ``PUSH_OBJECTS`` objects at a time;
        whether there was one.  A tier's failure is raised once what was pushed
        is taken off the queue (what was not started after it is left)."""
        batch = self.queue.peek(PUSH_BATCH)
        futures = [(item, self._objects.submit(self._push_item, item)) for item in batch]
        done: list[bytes] = []
        failure: Exception | None = None
        try:
            for item, future in futures:
                try:
                    if future.result():
                        done.append(item.key)
                except CancelledError:
                    pass
                except Exception as exc:
                    if _permanent(exc):  # it would fail again: it must not block the queue
                        log.error("push: dropped %s from the queue: %s", item.digest, exc)
                        self.dropped += 1
                        done.append(item.key)
                        continue
                    failure = failure or exc
                    for _, later in futures:
                        later.cancel()
        finally:
            self.queue.done(done)
        if done:
            self.last_error = None
        if failure is not None:
            raise failure
        return bool(batch)

    def _push_item(self, item: QueuedPush) -> bool:
        """Push one queued object (or entry); False if stopping first."""
        if self._stop.is_set():
            return False
        if item.entry:
            self._push_entry(item)
        else:
            with contextlib.suppress(ObjectNotFoundError):  # deleted before it was pushed
                self.tiers.push(item.digest)
        return True

    def _push_entry(self, item: QueuedPush) -> None:
        """A shared directory's entry, after its content (an entry whose
        content is gone, or that is unreadable, is dropped)."""
        try:
            doc = json.loads(item.entry)
            entry = SharedEntry(
                str(doc["path"]), item.digest, int(doc["mode"]), int(doc["mtime_ns"])
            )
            share = str(doc["share"])
        except (ValueError, KeyError, TypeError):
            log.error("push queue: dropping an unreadable entry %r", item.entry[:200])
            return
        try:
            self.tiers.push(item.digest)
            if 0 < item.digest.size <= INLINE_MAX:
                entry = dataclasses.replace(entry, contents=self.tiers.store.read(item.digest))
        except ObjectNotFoundError:
            return
        self.tiers.push_entry(share, entry)

    def figures(self) -> dict[str, object]:
        depth, age = self.queue.depth()
        return {
            "queue": depth,
            "oldest_seconds": round(age, 1),
            "push_failures": self.failures,
            "push_dropped": self.dropped,
            "last_error": self.last_error,
        }


def _permanent(exc: Exception) -> bool:
    """Whether pushing an item failed for what it is (a tier refused it for
    good, or it cannot be read or named here), not because a tier is down."""
    if isinstance(exc, RemoteError):
        return exc.permanent
    return not isinstance(exc, CachefsError) or isinstance(exc, CorruptDataError)


__all__ = ["DIRECTIONS", "Pusher", "Tier", "Tiers"]
