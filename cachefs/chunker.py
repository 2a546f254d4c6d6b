"""Content-defined chunking of byte streams (storage engine layer).

FastCDC 2020 (pyfastcdc, whose cutting loop runs without the GIL) cuts a stream
into chunks whose boundaries depend only on the content, so an insertion early
in a file moves only the chunks around it.  The mean chunk size lands a little
above ``avg_size`` (about 1.2x with ``min_size = avg_size / 4``); no chunk is
larger than ``max_size`` and only the last chunk of an object is smaller than
``min_size`` (an object smaller than the minimum is one chunk).

The stream is read in buffers of ``buffer_size`` bytes.  The last chunk found in
a buffer may have been cut short by the buffer's end, so it is carried into the
next buffer and cut again; FastCDC restarts cleanly at a chunk boundary, so the
chunks are the same as if the whole stream had been cut at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol

import pyfastcdc

from cachefs.header import ChunkingParams

DEFAULT_BUFFER_SIZE = 8 << 20


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


#: What ``Store.put`` accepts: bytes, a binary file object, or an iterable of byte strings.
Source = bytes | bytearray | memoryview | BinaryIO | Readable | Iterable[bytes]

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


class Chunker:
    """Cuts streams into content-defined chunks; safe to share between threads."""

    def __init__(self, params: ChunkingParams, buffer_size: int = DEFAULT_BUFFER_SIZE) -> None:
        self.params = params
        self.buffer_size = max(buffer_size, 2 * params.max_size)
        self._cdc = pyfastcdc.FastCDC(
            params.avg_size, min_size=params.min_size, max_size=params.max_size
        )

    def cut(self, data: memoryview) -> list[memoryview]:
        """Cut a complete buffer (the whole of an object) into chunks."""
        if len(data) <= self.params.min_size:
            return [data]
        return [data[c.offset : c.offset + c.length] for c in self._cdc.cut_buf(data)]

    def batches(self, readinto: ReadInto) -> Iterator[list[memoryview]]:
        """Chunks of a stream, one list per buffer read.

        Every yielded view points into a buffer of its own batch that is never
        reused, so batches may be processed while the next is read.  An empty
        stream yields one batch holding one empty chunk.
        """
        carry = memoryview(b"")
        first = True
        while True:
            buf = bytearray(len(carry) + self.buffer_size)
            view = memoryview(buf)
            view[: len(carry)] = carry
            filled = len(carry)
            eof = False
            while filled < len(buf):
                n = readinto(view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
            data = view[:filled]
            if eof:
                if filled or first:
                    yield self.cut(data)
                return
            chunks = self.cut(data)
            carry = chunks.pop()
            first = False
            if chunks:
                yield chunks
