"""Ingest: cutting, hashing and storing the chunks of new content (storage engine layer).

Ingest of one object::

    source --read 4 MiB buffers--> FastCDC cut --> per group of chunks (worker threads):
        digest, which are missing (one index lookup), [compress], append to the
        shard's segment
    --> recipe (chunk digests in order) --> a PendingObject, for the publisher

Chunks that come with their digests (``KnownChunks``: fetched and verified) skip
the cut and the digest per chunk.  The chunks a large ingest appends are told,
as they are stored, to ``Ingest.on_appended`` (the early push of the remote
tiers: chunks of a file being written go up before it is published).

Nothing here makes anything visible: publication does (``_publish.py``).  The
caller holds the store's maintenance lock shared, so that a chunk found in the
index cannot be collected before the object that found it is published.
"""

from __future__ import annotations

import bisect
import itertools
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from cachefs.engine._activity import Activity
from cachefs.engine._chunker import Batch, Chunker, KnownChunks, Source, reader_for
from cachefs.engine._publish import PendingObject
from cachefs.engine._reads import LocalChunks, ObjectReader
from cachefs.engine._segments import Location, SegmentStore, Shard
from cachefs.engine._workers import Workers
from cachefs.errors import CachefsError
from cachefs.format.codec import ChunkCodec
from cachefs.format.digest import Digest, DigestFunction
from cachefs.format.schema import HOLE_MARK, sparse_key
from cachefs.format.segment import COMPRESSION_NONE, TAG_CHUNK, encode_record_header, record_flags

#: Objects of up to this size are processed in the calling thread (no pool hop).
_INLINE_LIMIT = 1 << 20
#: Chunks stored by one worker task (fewer, longer tasks: less GIL traffic).
_TASK_CHUNKS = 8
#: Tasks of ``Ingest.ingest_known`` in flight at most.
_KNOWN_TASKS = 8

#: A stored chunk: (digest, raw length, location if appended by this process).
Stored = tuple[bytes, int, Location | None]
#: A chunk cut, digested and encoded, not stored: (digest, raw length,
#: compression, payload); no payload: the store had the chunk, it was not encoded.
PreparedChunk = tuple[bytes, int, int, bytes | None]


class Ingest:
    """The write pipeline up to publication."""

    def __init__(
        self,
        digest_function: DigestFunction,
        chunker: Chunker,
        codec: ChunkCodec,
        segments: SegmentStore,
        chunks: LocalChunks,
        reader: ObjectReader,
        workers: Workers,
        activity: Activity,
    ) -> None:
        self.digest_function = digest_function
        self.chunker = chunker
        self.codec = codec
        self.segments = segments
        self.chunks = chunks
        self.reader = reader
        self.workers = workers
        self.activity = activity
        #: Told of the chunks a large ingest appends, (digest, length) in order,
        #: as they are (the early push, ``cachefs.remote``); called in the
        #: ingest's thread, so it must be quick and must not fail.
        self.on_appended: Callable[[list[tuple[bytes, int]]], None] | None = None

    def store_chunks(self, views: list[memoryview]) -> list[Stored]:
        """Digest consecutive chunks of one object and store those that are missing.

        The first chunk, and any after one that did not compress, is probed on
        a sample first; a chunk after one that compressed is compressed straight
        away (no probe on compressible data)."""
        return self._store_digested(views, [self.digest_function.hash(view) for view in views])

    def _store_known(self, chunks: list[tuple[bytes, memoryview]]) -> list[Stored]:
        """``store_chunks`` of chunks whose digests are known (``KnownChunks``)."""
        return self._store_digested([view for _, view in chunks], [d for d, _ in chunks])

    def _store_digested(self, views: list[memoryview], digests: list[bytes]) -> list[Stored]:
        missing = self.chunks.find_missing(digests)
        stored: list[Stored] = []
        probe = True
        counts = [0, 0]  # bytes new to the store, and the records' bytes appended
        for view, digest in zip(views, digests, strict=True):
            shard = self.segments.shard(digest)
            location = shard.pending.get(digest)
            if digest in missing and location is None:
                compression, payload = self.codec.encode(view, probe)
                probe = compression == COMPRESSION_NONE
                location = self._append(shard, digest, len(view), compression, payload, counts)
            stored.append((digest, len(view), location))
        if counts[0]:
            self.activity.appended(*counts)
        return stored

    def _append(
        self,
        shard: Shard,
        digest: bytes,
        raw_len: int,
        compression: int,
        payload: bytes | memoryview,
        counts: list[int],
    ) -> Location:
        """Append the record of an encoded chunk to its shard's segment; what
        was new to the store is added to ``counts`` (raw bytes, record bytes)."""
        flags = record_flags(compression, self.digest_function.ident)
        head = encode_record_header(TAG_CHUNK, flags, raw_len, digest, payload)
        location, new = self.segments.append_chunk(shard, digest, flags, head, payload)
        if new:
            counts[0] += raw_len
            counts[1] += len(head) + len(payload)
        return location

    def store_prepared(self, digest: Digest, chunks: list[PreparedChunk]) -> PendingObject | None:
        """The object ``digest`` whose chunks were cut, digested and encoded
        elsewhere (:func:`prepare`, in a worker process): the chunks the store
        lacks are appended; nothing is published yet.  None, and nothing
        appended, when the store lacks a chunk that came without its payload
        (it went since it was looked up there): the caller ingests it again.
        The chunks appended are told (``on_appended``) as an ingest of the same
        object in this process would tell them."""
        missing = self.chunks.find_missing([chunk[0] for chunk in chunks])
        if any(chunk[3] is None for chunk in chunks if chunk[0] in missing):
            return None
        stored: list[Stored] = []
        counts = [0, 0]
        for chunk, raw_len, compression, payload in chunks:
            shard = self.segments.shard(chunk)
            location = shard.pending.get(chunk)
            if chunk in missing and location is None:
                assert payload is not None
                location = self._append(shard, chunk, raw_len, compression, payload, counts)
            stored.append((chunk, raw_len, location))
        if counts[0]:
            self.activity.appended(*counts)
        tell = self.on_appended
        if tell is not None and len(stored) > 1 and digest.size > _INLINE_LIMIT:
            tell([(chunk, raw_len) for chunk, raw_len, where in stored if where is not None])
        return self._pending(digest, stored)

    def append(self, digest: bytes, view: memoryview) -> Location:
        """Append a record of chunk ``digest`` whether or not the index has one
        (a fresh copy of a damaged chunk; it stays pending until published)."""
        compression, payload = self.codec.encode(view, True)
        shard = self.segments.shard(digest)
        return self._append(shard, digest, len(view), compression, payload, [0, 0])

    def _batches(self, source: Source) -> Iterator[Batch]:
        """The chunks of any source, in batches (see ``Chunker.batches``)."""
        if isinstance(source, bytes | bytearray | memoryview):
            return self.chunker.view_batches(memoryview(source).cast("B"))
        size_hint = None
        fileno = getattr(source, "fileno", None)
        if fileno is not None:
            with suppress(OSError, ValueError, AttributeError):
                st = os.fstat(fileno())
                if stat.S_ISREG(st.st_mode):
                    size_hint = max(0, st.st_size - source.tell())  # type: ignore[union-attr]
        return self.chunker.batches(reader_for(source), size_hint)

    def ingest(self, source: Source) -> PendingObject:
        """Chunk, digest and store every chunk of a source; nothing is published yet.

        See ``_store_batches`` for who does what; ``KnownChunks`` are not cut
        or digested again (``ingest_known``).
        """
        if isinstance(source, KnownChunks):
            return self.ingest_known(source)
        batches = self._batches(source)
        first = next(batches)
        second = next(batches, None)
        if second is None and len(first.chunks) == 1:
            # One chunk: its digest is the object's digest; no second hash.
            stored = self.store_chunks(first.chunks)
            ((digest, raw_len, _),) = stored
            return self._pending(Digest(digest, raw_len), stored)
        inline = second is None and len(first.span) <= _INLINE_LIMIT
        whole = self.digest_function.new()
        batches = itertools.chain([first], [] if second is None else [second], batches)
        size, results = self._store_batches(batches, whole, inline=inline)
        return self._pending(Digest(whole.digest(), size), results)

    def ingest_known(self, source: KnownChunks) -> PendingObject:
        """Store chunks whose digests are known, as they come: no cutting and
        no digest per chunk, only the whole object's (in this thread, between
        chunks: hashing runs without the GIL).  Worker threads store the
        chunks, ``_TASK_CHUNKS`` per task, at most ``_KNOWN_TASKS`` tasks in
        flight (at most ``_KNOWN_TASKS * _TASK_CHUNKS`` chunks of the store's
        size held: ``Tiers.fetch`` gives larger ones as plain bytes); an
        object of one task is stored here, with no pool hop."""
        whole = self.digest_function.new()
        size = 0
        results: list[Stored] = []
        in_flight: deque[Future[list[Stored]]] = deque()
        group: list[tuple[bytes, memoryview]] = []
        try:
            for digest, data in source.chunks:
                view = memoryview(data).cast("B")
                whole.update(view)
                size += len(view)
                group.append((digest, view))
                if len(group) == _TASK_CHUNKS:
                    in_flight.append(self.workers.pool().submit(self._store_known, group))
                    group = []
                    while len(in_flight) > _KNOWN_TASKS:
                        results.extend(in_flight.popleft().result())
            while in_flight:
                results.extend(in_flight.popleft().result())
        except BaseException:
            _abandon(in_flight)
            close = getattr(source.chunks, "close", None)
            if close is not None:
                close()  # a generator of fetches: stop them
            raise
        if not results and not group:
            return self.ingest(b"")  # no chunk at all: the empty object
        results.extend(self._store_known(group))
        return self._pending(Digest(whole.digest(), size), results)

    def _store_batches(
        self, batches: Iterable[Batch], whole: Any | None, *, inline: bool = False
    ) -> tuple[int, list[Stored]]:
        """Store the chunks of ``batches``; (bytes, stored chunks in order).

        The calling thread reads and cuts; a lane of its own computes the
        whole-object digest into ``whole`` if given (one hash call per buffer,
        in order); worker threads store the chunks, several per task.  Few,
        long GIL-free calls keep every core busy: many short ones would queue
        for the GIL.  ``inline``: all of it here, in the calling thread.
        """
        size = 0
        results: list[Stored] = []
        in_flight: deque[Future[list[Stored]]] = deque()
        hashed: deque[Future[object]] = deque()
        tell = None if inline else self.on_appended
        # The whole-object hash is sequential: its own lane, a thread that takes
        # the buffers in order, so that the reading thread only reads and cuts.
        lane = (
            None
            if inline or whole is None
            else ThreadPoolExecutor(1, thread_name_prefix="cachefs-hash")
        )

        def drain(keep: int, keep_hashed: int) -> None:
            while len(in_flight) > keep:
                stored = in_flight.popleft().result()
                results.extend(stored)
                if tell is not None:  # appended (pending) ones: new to the store
                    tell([(digest, size) for digest, size, where in stored if where is not None])
            while len(hashed) > keep_hashed:
                hashed.popleft().result()

        try:
            for batch in batches:
                size += len(batch.span)
                if inline:
                    results.extend(self.store_chunks(batch.chunks))
                    if whole is not None:
                        whole.update(batch.span)
                    continue
                pool = self.workers.pool()
                if lane is not None and whole is not None:
                    hashed.append(lane.submit(whole.update, batch.span))
                tasks = 0
                for i in range(0, len(batch.chunks), _TASK_CHUNKS):
                    group = batch.chunks[i : i + _TASK_CHUNKS]
                    in_flight.append(pool.submit(self.store_chunks, group))
                    tasks += 1
                # Finish the previous batch: its buffer is reused for the next but one.
                drain(tasks, 1)
            drain(0, 0)
        except BaseException:
            _abandon([*in_flight, *hashed])
            raise
        finally:
            if lane is not None:
                lane.shutdown(wait=True)
        return size, results

    def ingest_sparse(
        self,
        size: int,
        regions: list[tuple[int, int]],
        read_range: Callable[[int, int], Iterable[bytes | memoryview]],
    ) -> PendingObject:
        """A sparse object of ``size`` bytes: data in the sorted, disjoint
        ``regions`` (read with ``read_range(start, stop)``), holes around them.

        Each region is cut on its own; the holes are recipe entries that cost
        nothing, so the work is the data's, whatever the size.  The object is
        keyed by its recipe (``format/schema.py``: ``sparse_key``): its content
        digest is not computed here (``Store.content_digest``)."""
        out: list[Stored] = []
        position = 0
        for start, stop in regions:
            if not position <= start < stop <= size:
                raise CachefsError(
                    f"data region [{start}, {stop}) out of order or past {size}",
                    hint="this is a bug in cachefs; please report it",
                )
            if start > position:
                out.append((HOLE_MARK, start - position, None))
            batches = self.chunker.batches(reader_for(read_range(start, stop)), stop - start)
            length, stored = self._store_batches(batches, None)
            if length != stop - start:
                raise CachefsError(
                    f"data region [{start}, {stop}) came out {length} bytes long",
                    hint="the content changed while it was being stored; this is a bug",
                )
            out.extend(stored)
            position = stop
        if position < size:
            out.append((HOLE_MARK, size - position, None))
        chunks = [(chunk, raw_len) for chunk, raw_len, _ in out]
        if HOLE_MARK not in (chunk for chunk, _ in chunks):
            raise CachefsError(
                "a sparse object without a hole", hint="this is a bug in cachefs; please report it"
            )
        return self._pending(Digest(sparse_key(self.digest_function, chunks), size), out)

    def ingest_file(self, path: os.PathLike[str] | str) -> PendingObject:
        with open(path, "rb", buffering=0) as f:
            return self.ingest(f)

    def splice(
        self,
        base: Digest,
        size: int,
        changed: list[tuple[int, int]],
        read_range: Callable[[int, int], Iterable[bytes | memoryview]],
    ) -> PendingObject:
        """A new revision of ``base`` (see ``Store.put_revision``)."""
        chunks, starts = self.reader.layout(base)
        if HOLE_MARK in (chunk for chunk, _ in chunks):
            raise CachefsError(
                f"object {base} is sparse: a revision of it is stored whole (ingest_sparse)",
                hint="this is a bug in cachefs; please report it",
            )
        resume = {
            start + length: i + 1
            for i, (start, (_, length)) in enumerate(zip(starts, chunks, strict=True))
        }
        ranges = [(s, min(e, size)) for s, e in changed if s < min(e, size)]
        range_ends = [e for _, e in ranges]
        whole = self.digest_function.new()
        out: list[Stored] = []
        position = 0
        base_index = 0  # chunks[base_index] starts at position while reusing
        while position < size:
            # The next change at or after position (ranges end past it).
            r = bisect.bisect_right(range_ends, position)
            next_change = ranges[r][0] if r < len(ranges) else size
            while (
                base_index < len(chunks)
                and starts[base_index] == position
                and position + chunks[base_index][1] <= min(next_change, size)
            ):
                digest, length = chunks[base_index]
                whole.update(self.chunks.read_chunk(digest))
                out.append((digest, length, None))
                position += length
                base_index += 1
            if position >= size:
                break
            # Cut again from here until a cut lands on a base boundary past the
            # change and outside every changed range.
            reader = reader_for(read_range(position, size))
            resynced = False
            for batch in self.chunker.batches(reader, size - position):
                views = []
                end = position
                for view in batch.chunks:
                    views.append(view)
                    end += len(view)
                    if end > next_change and end in resume and end < size:
                        r = bisect.bisect_right(range_ends, end)
                        if r >= len(ranges) or ranges[r][0] >= end:
                            resynced = True
                            break
                out.extend(self.store_chunks(views))
                for view in views:
                    whole.update(view)
                    position += len(view)
                if resynced:
                    base_index = resume[position]
                    break
            if not resynced:
                break
        if position != size:
            raise CachefsError(
                f"a revision of {base} came out {position} bytes long, not {size}",
                hint="the content changed while it was being stored; this is a bug",
            )
        return self._pending(Digest(whole.digest(), size), out)

    def _pending(self, digest: Digest, stored: list[Stored]) -> PendingObject:
        """The ingested object ``digest`` (every ingest ends here: counted once)."""
        self.activity.ingested(digest.size)
        chunks = [(chunk, raw_len) for chunk, raw_len, _ in stored]
        locations = {chunk: loc for chunk, _, loc in stored if loc is not None}
        return PendingObject(digest, chunks, locations)


def prepare(
    chunker: Chunker,
    function: DigestFunction,
    codec: ChunkCodec,
    data: memoryview,
    have: Callable[[list[bytes]], set[bytes]] | None = None,
) -> tuple[Digest, list[PreparedChunk]]:
    """Cut, digest and encode an object held whole in memory, storing nothing
    (in a worker process: ``_put.py``): the chunks and the digest that
    :meth:`Ingest.ingest` finds for the same bytes, for
    :meth:`Ingest.store_prepared`.  ``have``: which of these chunks the store
    has (they are not encoded)."""
    views = chunker.cut(data)
    digests = [function.hash(view) for view in views]
    there = have(digests) if have is not None else set()
    chunks: list[PreparedChunk] = []
    probe = True
    for view, digest in zip(views, digests, strict=True):
        if digest in there:
            chunks.append((digest, len(view), COMPRESSION_NONE, None))
            continue
        compression, payload = codec.encode(view, probe)
        probe = compression == COMPRESSION_NONE
        chunks.append((digest, len(view), compression, bytes(payload)))
    # One chunk: its digest is the object's (as in ``Ingest.ingest``).
    whole = digests[0] if len(digests) == 1 else function.hash(data)
    return Digest(whole, len(data)), chunks


def _abandon(futures: Iterable[Future[Any]]) -> None:
    """Cancel what has not started and wait for what has (an ingest that failed)."""
    futures = list(futures)
    for fut in futures:
        fut.cancel()
    for fut in futures:
        with suppress(BaseException):
            fut.result()
