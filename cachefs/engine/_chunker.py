"""Content-defined chunking of byte streams (storage engine layer).

FastCDC 2020 (pyfastcdc, whose cutting loop runs without the GIL) cuts a stream
into chunks whose boundaries depend only on the content, so an insertion early
in a file moves only the chunks around it.  The mean chunk size lands a little
above ``avg_size`` (about 1.14x with ``min_size = avg_size / 4`` and
normalization level 2, 1.23x with level 1); no chunk is larger than
``max_size`` and only the last chunk of an object is smaller than ``min_size``
(an object smaller than the minimum is one chunk).

The stream is read in buffers of ``buffer_size`` bytes.  The last chunk found in
a buffer may have been cut short by the buffer's end, so it is carried into the
next buffer and cut again; FastCDC restarts cleanly at a chunk boundary, so the
chunks are the same as if the whole stream had been cut at once.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple, Protocol

import pyfastcdc

from cachefs.format.header import ChunkingParams

DEFAULT_BUFFER_SIZE = 8 << 20


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class ReadableInto(Protocol):
    """Fills the buffer's start; 0 only at the end (it may wait for bytes)."""

    def readinto(self, buf: memoryview, /) -> int: ...


class KnownChunks:
    """A source already cut into chunks whose digests are known: ``(digest,
    bytes)`` pairs in order, each chunk's bytes verified against its digest by
    whoever made the pairs (a fetch from the tiers).  ``Store.put`` stores them
    as they are, without cutting or digesting them again; the whole object's
    digest is still computed (it checks the order and the chunk list).  A
    chunk of another store's chunking is stored as it is: any cut reads the
    same bytes."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: Iterable[tuple[bytes, bytes | memoryview]]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes | memoryview]:
        """The bytes alone: a plain source of them (for callers that cut again)."""
        return (data for _, data in self.chunks)


#: What ``Store.put`` accepts: bytes, a binary file object (or anything with
#: ``read`` or ``readinto``), or an iterable of byte strings (``KnownChunks``
#: among them).
Source = (
    bytes
    | bytearray
    | memoryview
    | BinaryIO
    | Readable
    | ReadableInto
    | Iterable[bytes | memoryview]
)

ReadInto = Callable[[memoryview], int]


def reader_for(source: Source) -> ReadInto:
    """A ``readinto``-style function over any accepted source."""
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        pos = 0

        def read_bytes(buf: memoryview) -> int:
            nonlocal pos
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos : pos + n]
            pos += n
            return n

        return read_bytes
    readinto = getattr(source, "readinto", None)
    if readinto is not None:
        return readinto  # type: ignore[no-any-return]
    read = getattr(source, "read", None)
    if read is not None:

        def read_via_read(buf: memoryview) -> int:
            data = read(len(buf))
            buf[: len(data)] = data
            return len(data)

        return read_via_read
    iterator = iter(source)  # type: ignore[arg-type]
    leftover = memoryview(b"")

    def read_iter(buf: memoryview) -> int:
        nonlocal leftover
        while not leftover:
            try:
                leftover = memoryview(next(iterator)).cast("B")
            except StopIteration:
                return 0
        n = min(len(buf), len(leftover))
        buf[:n] = leftover[:n]
        leftover = leftover[n:]
        return n

    return read_iter


class Batch(NamedTuple):
    """Consecutive chunks of a stream and the one view that spans them all."""

    span: memoryview
    chunks: list[memoryview]


class Chunker:
    """Cuts streams into content-defined chunks; safe to share between threads."""

    def __init__(self, params: ChunkingParams, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self.params = params
        self.buffer_size = max(buffer_size, 2 * params.max_size)
        self._local = threading.local()
        self._cdc = pyfastcdc.FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
        )

    def cut(self, data: memoryview) -> list[memoryview]:
        """Cut a complete buffer (the whole of an object) into chunks."""
        if len(data) <= self.params.min_size:
            return [data]
        return [data[c.offset : c.offset + c.length] for c in self._cdc.cut_buf(data)]

    def batches(self, readinto: ReadInto, size_hint: int | None = None) -> Iterator[Batch]:
        """Chunks of a stream, one batch per buffer read.

        Two buffers take turns, so the views of a batch stay valid while the
        next batch is read and cut -- but the caller must be done with batch
        *k* before it asks for batch *k + 2*.  ``size_hint`` (the expected
        length, e.g. a file's size) sizes the first buffer, so a small file
        does not cost a full buffer.  An empty stream yields one batch holding
        one empty chunk.
        """
        full = self.params.max_size + self.buffer_size
        if size_hint is not None and size_hint + 1 < full:
            # One read of size_hint + 1 bytes meets the end of the stream.
            buffers = [bytearray(size_hint + 1)]
        else:
            buffers = self._spare_buffers(full)
        try:
            yield from self._fill_and_cut(readinto, buffers, full)
        finally:
            if all(len(b) == full for b in buffers):
                self._local.spare = buffers  # reuse in this thread's next ingest

    def _spare_buffers(self, size: int) -> list[bytearray]:
        spare: list[bytearray] | None = getattr(self._local, "spare", None)
        self._local.spare = None
        if spare is not None and len(spare[0]) == size:
            return spare
        return [bytearray(size)]

    def _fill_and_cut(
        self, readinto: ReadInto, buffers: list[bytearray], full: int
    ) -> Iterator[Batch]:
        carry = memoryview(b"")
        for iteration in itertools.count():
            slot = iteration % 2
            if slot >= len(buffers):
                buffers.append(bytearray(full))
            elif iteration > 0 and len(buffers[slot]) < full:
                buffers[slot] = bytearray(full)  # the size hint was too small
            view = memoryview(buffers[slot])
            view[: len(carry)] = carry
            filled = len(carry)
            eof = False
            while filled < len(view):
                n = readinto(view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
            data = view[:filled]
            if eof:
                if filled or iteration == 0:
                    yield Batch(data, self.cut(data))
                return
            chunks = self.cut(data)
            carry = chunks.pop()
            if chunks:
                yield Batch(data[: len(data) - len(carry)], chunks)

    def view_batches(self, data: memoryview, batch: int = 64) -> Iterator[Batch]:
        """Chunks of bytes already in memory, cut in place (no copy), in batches."""
        chunks = self.cut(data)
        offset = 0
        for start in range(0, len(chunks), batch):
            group = chunks[start : start + batch]
            length = sum(len(c) for c in group)
            yield Batch(data[offset : offset + length], group)
            offset += length
