"""The chunk codec: how a chunk's bytes become a record's payload (on-disk format layer).

A payload is either the chunk as it is (``COMPRESSION_NONE``) or one zstd frame
of it without a frame checksum (``COMPRESSION_ZSTD``; the record checksum covers
it); the record's flags say which (``segment.py``).  A chunk is stored raw
unless zstd saves at least ``min_saving`` of it (``CompressionParams``).  To skip
hopeless work on incompressible data, a chunk of at least ``PROBE_MIN`` bytes
may first be *probed*: three slices of ``PROBE_SLICE`` bytes are compressed at
level ``PROBE_LEVEL``, and if that saves under 2% the chunk is stored raw
without compressing it all.

Decoding checks what the record claims: a raw payload must be exactly the
chunk's length, a zstd frame must decompress to exactly that many bytes.
Compressors are kept per thread (zstandard's are not thread-safe).
"""

from __future__ import annotations

import threading

import zstandard

from cachefs.errors import CorruptDataError
from cachefs.format.header import CompressionParams
from cachefs.format.segment import COMPRESSION_NONE, COMPRESSION_ZSTD

#: Compression is tried on a sample first for chunks of at least this size.
PROBE_MIN = 16 * 1024
PROBE_SLICE = 2048
PROBE_LEVEL = 1
#: A probe that keeps more than this fraction of its sample means "incompressible".
PROBE_KEEP = 0.98


class ChunkCodec:
    """Encodes chunks into payloads and decodes them back; shared by threads."""

    def __init__(self, params: CompressionParams) -> None:
        self.params = params
        self._keep = 1.0 - params.min_saving
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "comp", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=self.params.level, write_checksum=False)
            self._local.comp = comp
        return comp

    def _probe_compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "probe", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=PROBE_LEVEL, write_checksum=False)
            self._local.probe = comp
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec: zstandard.ZstdDecompressor | None = getattr(self._local, "dec", None)
        if dec is None:
            dec = zstandard.ZstdDecompressor()
            self._local.dec = dec
        return dec

    def encode(self, view: memoryview, probe: bool) -> tuple[int, bytes | memoryview]:
        """Choose raw or zstd for a chunk: (compression, payload).

        With ``probe`` (the previous chunk of the object did not compress), a
        sample is tried first.
        """
        n = len(view)
        if probe and n >= PROBE_MIN:
            # A cheap look at three slices: incompressible data (already
            # compressed, random) is stored raw without compressing it all.
            step = (n - PROBE_SLICE) // 2
            sample = b"".join(view[i : i + PROBE_SLICE] for i in (0, step, n - PROBE_SLICE))
            if len(self._probe_compressor().compress(sample)) > len(sample) * PROBE_KEEP:
                return COMPRESSION_NONE, view
        packed = self._compressor().compress(view)
        if len(packed) <= n * self._keep:
            return COMPRESSION_ZSTD, packed
        return COMPRESSION_NONE, view

    def decode(self, compression: int, payload: memoryview, raw_len: int) -> bytes | memoryview:
        """The chunk a payload holds (a raw payload is returned as the same view);
        CorruptDataError if it does not hold ``raw_len`` bytes (the caller says
        where the record is)."""
        if compression == COMPRESSION_NONE:
            if len(payload) != raw_len:
                raise CorruptDataError("raw record has the wrong length")
            return payload
        if compression != COMPRESSION_ZSTD:
            raise CorruptDataError(f"record uses unknown compression {compression}")
        try:
            data = self._decompressor().decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise CorruptDataError(f"cannot decompress the chunk: {exc}") from None
        if len(data) != raw_len:
            raise CorruptDataError(f"chunk decompressed to {len(data)} bytes, not {raw_len}")
        return data


__all__ = ["ChunkCodec"]
