"""Reads: chunks from the local segments, objects from their recipes (storage engine layer).

:class:`LocalChunks` is the local segment store as a :class:`ChunkBackend`: a
chunk is looked up in the index, its record read through a memory map and
verified (checksum, digest, lengths, decompression), and kept decompressed in
a byte-bounded LRU (:class:`ChunkCache`) when it was compressed.  A raw chunk is
a view on the mapping: no copy in Python.  A read whose segment vanished under
it (gc compaction) looks the chunk up again once.

:class:`ObjectReader` reads objects (or ranges of them) through any
:class:`ChunkBackend`, a window of chunks at a time; the local backend
decompresses the compressed chunks of a window ahead of the reader in the
worker pool, so a large read uses every core and memory stays bounded.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeAlias

import lmdb

from cachefs import tracing
from cachefs.engine._activity import Activity
from cachefs.engine._backend import ChunkBackend
from cachefs.engine._health import Health
from cachefs.engine._index import Index
from cachefs.engine._segments import SegmentStore
from cachefs.engine._workers import Workers
from cachefs.errors import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    HealElsewhere,
    ObjectNotFoundError,
    RemoteError,
)
from cachefs.format.codec import ChunkCodec
from cachefs.format.digest import Digest, DigestFunction
from cachefs.format.schema import HOLE_MARK, ChunkEntry, ObjectEntry, RecipePages, held_remotely
from cachefs.format.segment import COMPRESSION_MASK, COMPRESSION_NONE, TAG_CHUNK

log = logging.getLogger(__name__)

#: Zero bytes that holes are read from (in pieces of at most this many).
_ZEROS = bytes(4 << 20)
#: Object layouts (chunk offsets; of whole recipes or of pages) kept for reads,
#: and the chunks they may hold in all (about 150 bytes each).
_LAYOUTS = 256
_LAYOUT_ENTRIES = 1 << 20
#: An object's chunks and the offset where each starts.
Layout: TypeAlias = tuple[list[tuple[bytes, int]], list[int]]
#: Chunks looked up together when reading; compressed ones among them are
#: decompressed ahead of the reader, in the worker pool.
READ_WINDOW = 16
#: The largest range ``ObjectReader.read_range`` reads into one buffer of its
#: own (a FUSE read is at most 1 MiB).
READ_INTO_MAX = 4 << 20


class Restorer(Protocol):
    """Fetches chunks held only by the remote tiers and stores them here
    again: given ``(digest, length)`` pairs in a file's order, and what to
    tell of each publication that stores some of them (how many it stored);
    returns how many were."""

    def __call__(
        self, chunks: list[tuple[bytes, int]], landed: Callable[[int], None] | None = None
    ) -> int: ...


class ChunkCache:
    """LRU of decompressed chunks, bounded in bytes; its hits and misses are
    counted in ``activity`` (under the cache's lock)."""

    def __init__(self, capacity: int, activity: Activity | None = None) -> None:
        self.capacity = capacity
        self.activity = Activity() if activity is None else activity
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._size = 0

    def get(self, key: bytes) -> bytes | memoryview | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.activity.chunk_cache_misses += 1
            else:
                self.activity.chunk_cache_hits += 1
                self._items.move_to_end(key)
            return value

    def __contains__(self, key: bytes) -> bool:
        """Whether ``key`` is cached (neither a hit nor a miss counted)."""
        with self._lock:
            return key in self._items

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0


class LocalChunks:
    """The chunks of the local segment store (a :class:`ChunkBackend`)."""

    def __init__(
        self,
        index: Index,
        segments: SegmentStore,
        codec: ChunkCodec,
        digest_function: DigestFunction,
        health: Health,
        workers: Workers,
        cache_size: int,
        activity: Activity,
    ) -> None:
        self.index = index
        self.segments = segments
        self.codec = codec
        self.digest_function = digest_function
        self.health = health
        self.workers = workers
        self.cache = ChunkCache(cache_size, activity)
        #: Heals a damaged chunk from elsewhere (the remote tiers): given its
        #: digest and length, stores a verified copy again and returns its
        #: bytes, or None (the damage is then recorded as ever).
        self.healer: Callable[[bytes, int], bytes | None] | None = None
        #: Fetches chunks held only by the remote tiers and stores them here
        #: again, several at once (a :class:`Restorer`).
        self.restorer: Restorer | None = None
        #: When each segment was last read from (a rising count): the coldest
        #: are dropped first under --local-max-size (``_demote.py``).
        self.read_order: dict[int, int] = {}
        self._reads = itertools.count(1)

    def find_missing(self, digests: Sequence[bytes], *, pending: bool = True) -> set[bytes]:
        """Chunks neither indexed (in bytes that still exist here: not held
        remotely) nor, with ``pending``, appended and waiting to be published
        by this process (an ingest may count on those; ``read_chunk`` cannot
        read them yet)."""
        missing = set()
        segments = self.segments
        with self.index.read() as txn:
            for digest in digests:
                if pending and digest in segments.shard(digest).pending:
                    continue
                raw = self.index.chunks.get(txn, digest)
                if (
                    raw is None
                    or held_remotely(raw)
                    or (segments.damaged and not segments.usable(ChunkEntry.unpack(raw)))
                ):
                    missing.add(digest)
        return missing

    def read_chunks(self, digests: Sequence[bytes]) -> Iterator[bytes | memoryview]:
        with self.index.read() as txn:
            entries = [self.index.get_chunk(txn, digest) for digest in digests]
        remote = [
            (d, e.raw_len)
            for d, e in zip(digests, entries, strict=True)
            if e and e.remote and d not in self.cache  # (one that could not be stored here)
        ]
        if remote and self.restorer is not None:  # fetched together, not one by one
            try:
                self.restorer(remote)
            except HealElsewhere:
                raise
            except CachefsError as exc:  # not stored here (a full disk): read one by one
                log.warning("chunks held by the remote tiers not stored here: %s", exc)
            with self.index.read() as txn:
                entries = [self.index.get_chunk(txn, digest) for digest in digests]
        # Compressed chunks are verified and decompressed ahead, in the pool;
        # raw ones cost only their checksum and are read here.
        ahead: dict[int, Future[bytes | memoryview]] = {}
        if len(digests) > 2:
            pool = self.workers.pool()
            read = tracing.in_context(self.read_chunk)  # a heal from a tier is traced in place
            for i, (digest, entry) in enumerate(zip(digests, entries, strict=True)):
                if entry is not None and entry.flags & COMPRESSION_MASK != COMPRESSION_NONE:
                    ahead[i] = pool.submit(read, digest, entry)
        try:
            for i, (digest, entry) in enumerate(zip(digests, entries, strict=True)):
                fut = ahead.pop(i, None)
                yield self.read_chunk(digest, entry) if fut is None else fut.result()
        finally:
            for fut in ahead.values():
                fut.cancel()

    def read_into(self, wanted: Sequence[tuple[bytes, int, memoryview]]) -> list[bool]:
        """See ``ChunkBackend.read_into``: raw chunks stored here whose pages
        are in the page cache are read straight into the buffers
        (``SegmentMaps.read_into``).  A chunk that is compressed, held
        remotely, on the disk only, or not found as its entry says (damaged,
        compacted away meanwhile) is left to ``read_chunks``, which maps,
        decodes, fetches, heals and records each of those as ever."""
        with self.index.read() as txn:
            entries = [self.index.get_chunk(txn, digest) for digest, _, _ in wanted]
        return [
            entry is not None
            and not entry.remote
            and entry.flags & COMPRESSION_MASK == COMPRESSION_NONE
            and entry.stored_len == entry.raw_len
            and self._read_raw_into(digest, entry, start, buffer)
            for (digest, start, buffer), entry in zip(wanted, entries, strict=True)
        ]

    def _read_raw_into(
        self, digest: bytes, entry: ChunkEntry, start: int, buffer: memoryview
    ) -> bool:
        stop = start + len(buffer)
        if stop > entry.raw_len:
            return False
        # The bytes of the chunk around the wanted ones are read too (the
        # checksum covers them all), into a scratch buffer.
        around = memoryview(bytearray(entry.raw_len - len(buffer)))
        payload = [part for part in (around[:start], buffer, around[start:]) if len(part)]
        locate = functools.partial(self.segments.chunk_path, digest, entry.segment_id)
        try:
            head = self.segments.maps.read_into(entry.segment_id, locate, entry.offset, payload)
        except CachefsError:
            return False
        if (
            head is None
            or head.digest != digest
            or head.raw_len != entry.raw_len
            or head.tag != TAG_CHUNK
            or head.compression != COMPRESSION_NONE
            or head.digest_id != self.digest_function.ident
        ):
            return False
        self.read_order[entry.segment_id] = next(self._reads)
        return True

    def read_chunk(self, digest: bytes, entry: ChunkEntry | None = None) -> bytes | memoryview:
        """A chunk's bytes, verified.  A raw chunk is a view on the segment mapping.

        ``entry`` is the chunk's index entry when the caller has just looked it up.
        """
        for attempt in (0, 1):
            if entry is None or attempt:
                with self.index.read() as txn:
                    entry = self.index.get_chunk(txn, digest)
            if entry is None:
                raise self.health.damaged(
                    CorruptDataError(
                        f"chunk {digest.hex()} is referenced but missing from the index",
                        path=str(self.index.path),
                    )
                )
            if entry.remote:
                cached = self.cache.get(digest)
                return cached if cached is not None else self._fetch(digest, entry.raw_len)
            try:
                return self.read_entry(digest, entry)
            except CorruptDataError as exc:
                if attempt == 0 and not self.segments.chunk_path(digest, entry.segment_id).exists():
                    continue  # compacted away under us: look it up again
                healed = self._heal(digest, entry.raw_len, exc)
                if healed is not None:
                    return healed
                raise self.health.damaged(exc) from None
        raise AssertionError("unreachable")

    def _heal(self, digest: bytes, length: int, exc: CorruptDataError) -> bytes | None:
        if self.healer is None:
            return None
        try:
            healed = self.healer(digest, length)
        except HealElsewhere:
            raise  # healed by the caller, off its thread
        except CachefsError as failure:
            log.warning("%s; no copy in the remote tiers: %s", exc, failure)
            return None
        if healed is not None:
            log.warning("%s; healed from the remote tiers", exc)
        return healed

    def _fetch(self, digest: bytes, length: int) -> bytes:
        """A chunk held remotely, fetched from the tiers (verified) and stored
        here again by the healer; RemoteError if it cannot be had."""
        where = (
            f"chunk {digest.hex()} is held only by the store's remote tiers "
            "(dropped here under --local-max-size, or named by another machine's entry)"
        )
        if self.healer is None:
            raise RemoteError(
                f"{where}, and the store is open without them",
                hint="open the store with the same --remote or --config",
            )
        try:
            data = self.healer(digest, length)
        except HealElsewhere as elsewhere:
            elsewhere.remote = True
            elsewhere.message = where
            raise
        except CachefsError as exc:
            raise RemoteError(f"{where}, and it could not be fetched: {exc.message}") from None
        if data is None:
            raise RemoteError(f"{where}, and none of them has it now")
        return data

    def held_remotely(self, digest: bytes) -> bool:
        """Whether chunk ``digest`` is indexed as held remotely."""
        with self.index.read() as txn:
            raw = self.index.chunks.get(txn, digest)
        return held_remotely(raw)

    def read_entry(
        self, digest: bytes, entry: ChunkEntry, *, keep: bool = True
    ) -> bytes | memoryview:
        """The chunk that index entry ``entry`` points at, verified against the
        entry (no retry, nothing recorded: fsck uses this to check entries).
        Without ``keep`` the read leaves no trace: not in the read order,
        not in the cache of decompressed chunks."""
        if keep:
            self.read_order[entry.segment_id] = next(self._reads)
        locate = functools.partial(self.segments.chunk_path, digest, entry.segment_id)
        record = self.segments.read_record(entry.segment_id, locate, entry.offset, entry.stored_len)
        if (
            record.digest != digest
            or record.raw_len != entry.raw_len
            or record.tag != TAG_CHUNK
            or record.digest_id != self.digest_function.ident
        ):
            raise CorruptDataError(
                f"record does not hold chunk {digest.hex()}",
                path=str(locate()),
                offset=entry.offset,
            )
        if record.compression == COMPRESSION_NONE and len(record.payload) == entry.raw_len:
            return record.payload  # the common case of a raw chunk: a view, no copy
        cached = self.cache.get(digest) if keep else None
        if cached is not None:
            return cached
        try:
            data = self.codec.decode(record.compression, record.payload, entry.raw_len)
        except CorruptDataError as exc:
            raise CorruptDataError(
                f"chunk {digest.hex()}: {exc.message}", path=str(locate()), offset=entry.offset
            ) from None
        if keep:
            self.cache.put(digest, data)
        return data

    def read_new(self, digest: bytes, raw_len: int) -> bytes | memoryview | None:
        """A chunk this process appended, published or still pending: its
        bytes, checked against its record (digest, length, checksum); None
        if it is no longer here (an abandoned put's, collected) or reads
        damaged.  Nothing is recorded or healed: the early push
        (``cachefs.remote``) sends what it can, an object's push the rest."""
        location = self.segments.shard(digest).pending.get(digest)
        try:
            if location is None:
                with self.index.read() as txn:
                    entry = self.index.get_chunk(txn, digest)
                if entry is None or entry.remote or entry.raw_len != raw_len:
                    return None
            else:
                entry = ChunkEntry(
                    location.segment_id, location.offset, raw_len, location.stored_len,
                    location.flags, 0,
                )  # fmt: skip
            return self.read_entry(digest, entry, keep=False)
        except (CachefsError, OSError, ValueError):  # ValueError: a mapping closed
            return None


def zeros(length: int) -> Iterator[memoryview]:
    """``length`` zero bytes, in pieces (a hole; it may be larger than memory)."""
    view = memoryview(_ZEROS)
    for start in range(0, length, len(_ZEROS)):
        yield view[: min(len(_ZEROS), length - start)]


class ObjectReader:
    """Objects read through a chunk backend, with their layouts cached."""

    def __init__(self, index: Index, chunks: ChunkBackend, health: Health) -> None:
        self.index = index
        self.chunks = chunks
        self.health = health
        #: Layouts of whole recipes (page -1) and of the pages of paged ones.
        self._layouts: OrderedDict[tuple[Digest, int], Layout] = OrderedDict()
        self._layout_entries = 0
        #: The pages of recently read objects (None: the recipe is not paged).
        self._paging: OrderedDict[Digest, RecipePages | None] = OrderedDict()
        #: The holes of recently asked objects.
        self._holes: OrderedDict[Digest, list[tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def object_entry(
        self, txn: lmdb.Transaction, digest: Digest, *, head: bool = False
    ) -> ObjectEntry:
        """The index entry of an object; ObjectNotFoundError if it is not stored.
        With ``head``, a paged recipe's entries are not read (``get_object_head``)."""
        get = self.index.get_object_head if head else self.index.get_object
        entry = get(txn, digest.hash)
        if entry is None or entry.size != digest.size:
            raise ObjectNotFoundError(
                f"object {digest} is not in the store {self.index.path.parent}"
            )
        if not (head and entry.pages) and sum(n for _, n in entry.chunks) != entry.size:
            raise self.health.damaged(
                CorruptDataError(
                    f"the recipe of object {digest} does not add up to its size",
                    path=str(self.index.path),
                )
            )
        return entry

    def contains(self, digest: Digest) -> bool:
        with self.index.read() as txn:
            entry = self.index.get_object_head(txn, digest.hash)
        return entry is not None and entry.size == digest.size

    def recipe(self, digest: Digest) -> list[tuple[bytes, int]]:
        """The chunk digests and lengths that make up an object, in order."""
        with self.index.read() as txn:
            return self.object_entry(txn, digest).chunks

    def layout(self, digest: Digest) -> Layout:
        """An object's chunks and where each starts (cached: a file read in
        small pieces must not decode its whole recipe for every piece; a paged
        recipe is read whole, and not kept: reads go by page, ``_parts``)."""
        found = self._cached((digest, -1))
        if found is not None:
            return found
        paged = self._pages(digest) is not None
        found = self._cached((digest, -1))  # kept by _pages if it read an unpaged head
        if found is not None:
            return found
        chunks = self.recipe(digest)
        layout = chunks, list(itertools.accumulate((n for _, n in chunks), initial=0))[:-1]
        if not paged:  # (a long recipe of an older store is not paged: kept too)
            self._keep_layout((digest, -1), layout)
        return layout

    def _cached(self, key: tuple[Digest, int]) -> Layout | None:
        with self._lock:
            layout = self._layouts.get(key)
            if layout is not None:
                self._layouts.move_to_end(key)
            return layout

    def _keep(self, cache: OrderedDict[Any, Any], key: object, value: object) -> None:
        """Keep ``value`` in an LRU of at most ``_LAYOUTS`` items."""
        with self._lock:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > _LAYOUTS:
                cache.popitem(last=False)

    def _keep_layout(self, key: tuple[Digest, int], layout: Layout) -> None:
        """Keep a layout: at most ``_LAYOUTS`` of them, of ``_LAYOUT_ENTRIES``
        chunks in all (the most recent one is kept whatever its size)."""
        with self._lock:
            old = self._layouts.pop(key, None)
            if old is not None:
                self._layout_entries -= len(old[0])
            self._layouts[key] = layout
            self._layout_entries += len(layout[0])
            while len(self._layouts) > 1 and (
                len(self._layouts) > _LAYOUTS or self._layout_entries > _LAYOUT_ENTRIES
            ):
                _, dropped = self._layouts.popitem(last=False)
                self._layout_entries -= len(dropped[0])

    def _pages(self, digest: Digest) -> RecipePages | None:
        """The pages of an object's recipe (None: it is not paged)."""
        with self._lock:
            if digest in self._paging:
                self._paging.move_to_end(digest)
                return self._paging[digest]
        with self.index.read() as txn:
            head = self.object_entry(txn, digest, head=True)
        pages = head.pages
        if pages is None:  # the head of an unpaged recipe holds it whole: keep its layout
            chunks = head.chunks
            starts = list(itertools.accumulate((n for _, n in chunks), initial=0))[:-1]
            self._keep_layout((digest, -1), (chunks, starts))
        self._keep(self._paging, digest, pages)
        return pages

    def _page(self, digest: Digest, pages: RecipePages, page: int) -> Layout:
        """The layout of one page of a paged recipe (cached as whole ones are)."""
        found = self._cached((digest, page))
        if found is not None:
            return found
        with self.index.read() as txn:
            # The head and the page in one snapshot: an object deleted since its
            # pages were looked up is gone, not damaged.
            head = self.index.get_object_head(txn, digest.hash)
            if head is None or head.size != digest.size or head.pages != pages:
                self.forget(digest)
                raise ObjectNotFoundError(
                    f"object {digest} is not in the store {self.index.path.parent} (any more)"
                )
            chunks = self.index.recipe_page(txn, digest.hash, pages, page)
        first = pages.starts[page]
        starts = list(itertools.accumulate((n for _, n in chunks), initial=first))
        last = pages.starts[page + 1] if page + 1 < len(pages.starts) else digest.size
        if starts[-1] != last:
            raise self.health.damaged(
                CorruptDataError(
                    f"page {page} of the recipe of object {digest} does not add up",
                    path=str(self.index.path),
                )
            )
        layout = chunks, starts[:-1]
        self._keep_layout((digest, page), layout)
        return layout

    def _unpaged(self, digest: Digest) -> list[tuple[bytes, int]] | None:
        """The recipe of an object read whole, if it is not paged (None if
        it is, or was lately: read by pages).  Read from the index, never
        from a kept layout (an object deleted since is not found, not
        damaged), and not kept: a whole read needs no layout, and keeping
        one for every object read once each took 6-10% of the time of
        reading the artifact mix."""
        with self._lock:
            if self._paging.get(digest) is not None:
                return None
        with self.index.read() as txn:
            head = self.object_entry(txn, digest, head=True)
        if head.pages is not None:  # kept, as ``_pages`` keeps it: read by pages next
            self._keep(self._paging, digest, head.pages)
            return None
        return head.chunks

    def forget(self, digest: Digest) -> None:
        """Drop what is kept of an object (it went: a layout kept would send
        a read to chunks gc may have taken, and blame the index).  Pages of
        a recipe whose pages are no longer kept may stay: a read reaches
        them only through the pages, looked up again (``_parts``)."""
        with self._lock:
            pages = self._paging.pop(digest, None)
            self._holes.pop(digest, None)
            count = 0 if pages is None else len(pages.starts)
            for key in [(digest, -1), *((digest, page) for page in range(count))]:
                old = self._layouts.pop(key, None)
                if old is not None:
                    self._layout_entries -= len(old[0])

    def _parts(self, digest: Digest, offset: int) -> Iterator[Layout]:
        """The layout of an object's recipe from the part that holds ``offset``
        on: the whole recipe, or page after page of a paged one."""
        whole = self._cached((digest, -1))
        if whole is not None:
            yield whole
            return
        pages = self._pages(digest)
        if pages is None:
            yield self.layout(digest)
            return
        first = max(0, bisect.bisect_right(pages.starts, offset) - 1)
        for page in range(first, len(pages.starts)):
            yield self._page(digest, pages, page)

    def _overlapping(
        self, digest: Digest, offset: int, end: int
    ) -> Iterator[tuple[bytes, int, int, int]]:
        """(chunk digest, start, stop, size) of the chunks that overlap the range."""
        for chunks, starts in self._parts(digest, offset):
            i = max(0, bisect.bisect_right(starts, offset) - 1)
            while i < len(chunks):
                position = starts[i]
                if position >= end:
                    return
                chunk, size = chunks[i]
                if position + size > offset:
                    yield chunk, max(0, offset - position), min(size, end - position), size
                i += 1

    def holes(self, digest: Digest) -> list[tuple[int, int]]:
        """Where an object's holes are (kept: ``stat`` of a sparse file asks)."""
        with self._lock:
            found = self._holes.get(digest)
            if found is not None:
                self._holes.move_to_end(digest)
                return list(found)
        found = [
            (start, start + length)
            for chunks, starts in self._parts(digest, 0)
            for (chunk, length), start in zip(chunks, starts, strict=True)
            if chunk == HOLE_MARK
        ]
        self._keep(self._holes, digest, found)
        return list(found)

    def held_remotely(self, digest: Digest, offset: int, length: int) -> list[tuple[bytes, int]]:
        """The chunks of an object's range that are held only by the remote
        tiers (digest, length), in order."""
        end = min(digest.size, offset + length)
        chunks = [(c, n) for c, _, _, n in self._overlapping(digest, offset, end) if c != HOLE_MARK]
        with self.index.read() as txn:
            return [(c, n) for c, n in chunks if held_remotely(self.index.chunks.get(txn, c))]

    def content_digest(
        self,
        digest: Digest,
        function: DigestFunction,
        compute: bool,
        keep: Callable[[str], AbstractContextManager[lmdb.Transaction]] | None,
        stop: Callable[[], bool] | None = None,
    ) -> Digest | None:
        """See ``Store.content_digest``; ``keep`` opens the write transaction
        that records a digest found (None: read-only, not recorded); ``stop``
        is asked between pieces (None is returned if it says so)."""
        with self.index.read() as txn:
            entry = self.object_entry(txn, digest)
        if not entry.sparse:
            return digest
        if entry.content is not None:
            return Digest(entry.content, digest.size)
        if not compute:
            return None
        whole = function.new()
        for piece in self.iter_object(digest):
            if stop is not None and stop():
                return None
            whole.update(piece)
        content = whole.digest()
        if keep is not None:
            with keep("recording the content digest of a sparse object") as txn:
                current = self.index.get_object_head(txn, digest.hash)
                if current is not None and current.content is None:
                    current.content = content
                    self.index.put_object(txn, digest.hash, current)
        return Digest(content, digest.size)

    def forget_layouts(self) -> None:
        with self._lock:
            self._layouts.clear()
            self._layout_entries = 0
            self._paging.clear()
            self._holes.clear()

    def read_objects(self, digests: Sequence[Digest]) -> list[bytes | CachefsError]:
        """Whole objects of a batch (a server's BatchReadBlobs: many small
        ones, a few MiB in all): their recipes read in one snapshot, each
        object's chunks in one call, nothing kept in the layout caches (a
        batch would flush them).  For each, its verified bytes, or the error
        that it cannot be read (ObjectNotFoundError; damage, recorded)."""
        entries: list[ObjectEntry | CachefsError] = []
        with self.index.read() as txn:
            for digest in digests:
                try:
                    entries.append(self.object_entry(txn, digest))
                except CachefsError as exc:
                    entries.append(exc)
        out: list[bytes | CachefsError] = []
        for digest, entry in zip(digests, entries, strict=True):
            if isinstance(entry, CachefsError):
                out.append(entry)
                continue
            try:
                out.append(self._whole(digest, entry.chunks))
            except CachefsError as exc:
                out.append(exc)
        return out

    def _sized(
        self, digest: Digest, chunk: bytes, data: bytes | memoryview, size: int
    ) -> bytes | memoryview:
        """``data``, a chunk of an object, if it is as long as the recipe says;
        else damage, recorded."""
        if len(data) != size:
            raise self.health.damaged(
                CorruptDataError(
                    f"object {digest}: chunk {chunk.hex()} holds {len(data)} "
                    f"bytes, its recipe says {size}",
                    path=str(self.index.path),
                )
            )
        return data

    def _whole(self, digest: Digest, chunks: list[tuple[bytes, int]]) -> bytes:
        stored = [chunk for chunk, _ in chunks if chunk != HOLE_MARK]
        pieces = self.chunks.read_chunks(stored) if stored else iter(())
        try:
            parts: list[bytes | memoryview] = []
            for chunk, size in chunks:
                data = bytes(size) if chunk == HOLE_MARK else next(pieces)
                parts.append(self._sized(digest, chunk, data, size))
            return b"".join(parts)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def read_range(self, digest: Digest, offset: int, length: int) -> bytes | memoryview:
        """A range of an object (of at most ``READ_INTO_MAX`` bytes; larger ones
        are joined from ``iter_object``) as one buffer: a view when one
        chunk stored raw holds it all, else its chunks copied into a new
        buffer, raw ones read straight into it (``ChunkBackend.read_into``:
        one copy from the page cache instead of a mapping and a copy), the
        others decoded as ``iter_object`` does and copied in."""
        if offset < 0 or length < 0:
            raise ConfigError("offset and length must not be negative")
        end = min(digest.size, offset + length)
        if end - offset > READ_INTO_MAX:
            return b"".join(self.iter_object(digest, offset, length))
        window = list(self._wanted(digest, offset, end)) if end > offset else []
        if len(window) <= 1:
            single = list(self._pieces(digest, iter(window)))
            return single[0] if len(single) == 1 else b"".join(single)
        view = memoryview(bytearray(end - offset))  # holes stay zeros
        wanted: list[tuple[bytes, int, memoryview, int]] = []
        position = 0
        for chunk, start, stop, size in window:
            if chunk != HOLE_MARK:
                wanted.append((chunk, start, view[position : position + stop - start], size))
            position += stop - start
        done = self.chunks.read_into([(chunk, start, part) for chunk, start, part, _ in wanted])
        rest = [item for item, ok in zip(wanted, done, strict=True) if not ok]
        if rest:
            pieces = self.chunks.read_chunks([chunk for chunk, *_ in rest])
            try:
                for (chunk, start, part, size), data in zip(rest, pieces, strict=True):
                    data = self._sized(digest, chunk, data, size)
                    part[:] = memoryview(data)[start : start + len(part)]
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
        return view

    def iter_object(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> Iterator[memoryview | bytes]:
        """The bytes of an object (or of a range of it) as a sequence of pieces."""
        if offset < 0 or (length is not None and length < 0):
            raise ConfigError("offset and length must not be negative")
        end = digest.size if length is None else min(digest.size, offset + length)
        yield from self._pieces(digest, self._wanted(digest, offset, end))

    def _wanted(
        self, digest: Digest, offset: int, end: int
    ) -> Iterator[tuple[bytes, int, int, int]]:
        """(chunk digest, start, stop, size) of the chunks that overlap
        ``[offset, end)``; for the whole object, from its recipe read once
        and not kept (``_unpaged``)."""
        chunks = self._unpaged(digest) if offset == 0 and end == digest.size else None
        if chunks is not None:
            return ((chunk, 0, size, size) for chunk, size in chunks)
        return self._overlapping(digest, offset, end)

    def _pieces(
        self, digest: Digest, wanted: Iterator[tuple[bytes, int, int, int]]
    ) -> Iterator[memoryview | bytes]:
        """The bytes of the ``wanted`` chunks' ranges, a window of them at a time."""
        while window := list(itertools.islice(wanted, READ_WINDOW)):
            stored = [chunk for chunk, *_ in window if chunk != HOLE_MARK]
            pieces = self.chunks.read_chunks(stored) if stored else ()
            source = iter(pieces)
            try:
                for chunk, start, stop, size in window:
                    if chunk == HOLE_MARK:
                        yield from zeros(stop - start)
                        continue
                    data = self._sized(digest, chunk, next(source), size)
                    yield data if (start, stop) == (0, size) else memoryview(data)[start:stop]
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
