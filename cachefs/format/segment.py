"""Segment files: where chunk bytes live (on-disk format layer).

Chunk data is appended to segment files.  A segment is never modified in place:
records are only appended, and a whole segment is deleted once ``gc`` has copied
its live records elsewhere.  Segments are grouped into *shards* by the leading
hex digits of the chunk digest, and within a shard into groups of
``SEGMENTS_PER_GROUP`` by segment id, so that no directory holds more than a few
thousand entries however large the store grows::

    segments/<shard path>/<group>/<segment id>.seg
    e.g. segments/a/000000/0000000042.seg      (shard_levels=1, shard_width=1)
         segments/a/b/000001/0000001234.seg    (shard_levels=2, shard_width=1)

At 100 million chunks of 64 KiB (6.1 TiB before compression) in 256 MiB
segments, a store has ~25,000 segments even uncompressed; over 16 shards that is
~1,600 per shard, in 2 groups of at most 1,024 files.  The group level keeps
directories small for any size of store; the shard level spreads concurrent
appends over files.

Segment layout (all integers little-endian)::

    segment header, 48 bytes (SEGMENT_HEADER):
      0  8s  magic  b"CFSSEG\\r\\n"
      8  H   format version (SEGMENT_FORMAT_VERSION)
     10  H   header size (48; readers skip to it, so it may grow)
     12  I   shard number
     16  Q   segment id
     24  Q   creation time, ns since the epoch
     32  Q   reserved, zero
     40  Q   xxh3_64 of bytes 0..40
    records, back to back:
      record header, 56 bytes (RECORD_HEADER):
        0  B    tag (TAG_CHUNK = 1)
        1  B    flags: bits 0-1 compression (0 raw, 1 zstd),
                       bits 4-6 digest function id (1 sha256, 2 blake3)
        2  H    record header size (56)
        4  I    raw length (bytes of the chunk before compression)
        8  I    stored length (bytes of payload that follow the header)
       12  I    reserved, zero
       16  32s  digest of the raw chunk
       48  Q    xxh3_64 over header bytes 0..48, then any header bytes past 56
               (none in version 1), then the payload
      payload: stored length bytes (a zstd frame, or the raw chunk)

Forward compatibility: every record says how long it is, so a reader can step
over a record whose tag it does not know after checking its checksum.  Tags
0x80-0xFF are *ancillary*: an older reader ignores them and ``gc`` may drop them
when compacting.  Unknown tags below 0x80 are *critical*: an older reader keeps
them and never compacts a segment holding one, and ``fsck`` reports them.  A
segment whose header carries a newer format version is refused.

Bump SEGMENT_FORMAT_VERSION (and the store format version) for any change to
these layouts.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cachefs.errors import CorruptDataError, FormatVersionError
from cachefs.format.header import SegmentParams

SEGMENT_MAGIC = b"CFSSEG\r\n"
SEGMENT_FORMAT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<8sHHIQQQQ")
assert SEGMENT_HEADER.size == 48
RECORD_HEADER = struct.Struct("<BBHIII32sQ")
assert RECORD_HEADER.size == 56
RECORD_CHECKED = 48  # the header bytes covered by the record checksum

TAG_CHUNK = 1
TAG_ANCILLARY_MIN = 0x80

COMPRESSION_MASK = 0x03
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
DIGEST_SHIFT = 4
DIGEST_MASK = 0x70

SEGMENTS_PER_GROUP = 1024
SEGMENT_SUFFIX = ".seg"

_xxh3 = xxhash.xxh3_64_intdigest


def record_flags(compression: int, digest_id: int) -> int:
    return (compression & COMPRESSION_MASK) | ((digest_id << DIGEST_SHIFT) & DIGEST_MASK)


def record_checksum(head: bytes | memoryview, payload: bytes | memoryview) -> int:
    hasher = xxhash.xxh3_64(head)
    hasher.update(payload)
    return hasher.intdigest()


def encode_record_header(
    tag: int, flags: int, raw_len: int, digest: bytes, payload: bytes | memoryview
) -> bytes:
    """The 56-byte header that precedes ``payload`` in a segment."""
    head = RECORD_HEADER.pack(tag, flags, RECORD_HEADER.size, raw_len, len(payload), 0, digest, 0)[
        :RECORD_CHECKED
    ]
    return head + struct.pack("<Q", record_checksum(head, payload))


def encode_segment_header(shard: int, segment_id: int) -> bytes:
    head = SEGMENT_HEADER.pack(
        SEGMENT_MAGIC,
        SEGMENT_FORMAT_VERSION,
        SEGMENT_HEADER.size,
        shard,
        segment_id,
        time.time_ns(),
        0,
        0,
    )[:40]
    return head + struct.pack("<Q", _xxh3(head))


@dataclass(frozen=True)
class SegmentHeader:
    version: int
    header_size: int
    shard: int
    segment_id: int


def parse_segment_header(buf: bytes | memoryview | mmap.mmap, path: str) -> SegmentHeader:
    if len(buf) < SEGMENT_HEADER.size:
        raise CorruptDataError("segment is shorter than its header", path=path, offset=0)
    magic, version, size, shard, seg_id, _created, _res, checksum = SEGMENT_HEADER.unpack_from(
        buf, 0
    )
    if magic != SEGMENT_MAGIC:
        raise CorruptDataError("not a segment file (bad magic)", path=path, offset=0)
    if _xxh3(bytes(buf[:40])) != checksum:
        raise CorruptDataError("segment header checksum mismatch", path=path, offset=0)
    if version > SEGMENT_FORMAT_VERSION:
        raise FormatVersionError(f"segment {path} has format version {version}")
    if size < SEGMENT_HEADER.size:
        raise CorruptDataError(f"segment header size {size} too small", path=path, offset=0)
    return SegmentHeader(version, size, shard, seg_id)


@dataclass(frozen=True)
class RecordHead:
    """The header fields of a checksum-verified record."""

    tag: int
    flags: int
    raw_len: int
    digest: bytes

    @property
    def compression(self) -> int:
        return self.flags & COMPRESSION_MASK

    @property
    def digest_id(self) -> int:
        return (self.flags & DIGEST_MASK) >> DIGEST_SHIFT


@dataclass(frozen=True)
class Record(RecordHead):
    """A parsed, checksum-verified record inside a mapping."""

    offset: int
    payload: memoryview
    #: The whole record as stored (header and payload), e.g. to copy it verbatim.
    raw: memoryview

    @property
    def size(self) -> int:
        """Bytes the whole record occupies in the segment."""
        return len(self.raw)


def parse_record(buf: mmap.mmap | memoryview, offset: int, limit: int, path: str) -> Record:
    """Parse and verify the record at ``offset``; never returns unverified bytes."""
    if offset + RECORD_HEADER.size > limit:
        raise CorruptDataError("record runs past the end of the segment", path=path, offset=offset)
    tag, flags, hsize, raw_len, stored_len, _res, digest, checksum = RECORD_HEADER.unpack_from(
        buf, offset
    )
    if hsize < RECORD_HEADER.size or offset + hsize + stored_len > limit:
        raise CorruptDataError("record runs past the end of the segment", path=path, offset=offset)
    view = memoryview(buf)
    start = offset + hsize
    payload = view[start : start + stored_len]
    hasher = xxhash.xxh3_64(view[offset : offset + RECORD_CHECKED])
    if hsize > RECORD_HEADER.size:  # a longer header from a later version: its extension
        hasher.update(view[offset + RECORD_HEADER.size : start])
    hasher.update(payload)
    if hasher.intdigest() != checksum:
        raise CorruptDataError("record checksum mismatch", path=path, offset=offset)
    raw = view[offset : start + stored_len]
    return Record(tag, flags, raw_len, digest, offset=offset, payload=payload, raw=raw)


def check_record(
    header: bytes | bytearray | memoryview,
    payload: Sequence[bytes | bytearray | memoryview],
    path: str,
    offset: int,
) -> RecordHead:
    """Verify a record read in pieces: its 56-byte ``header``, then its payload
    as consecutive ``payload`` buffers (read with one ``preadv``, the payload
    landing where its reader wants it).  A record with a longer header (a
    later version) is refused here too: ``parse_record`` reads those."""
    if len(header) != RECORD_HEADER.size:
        raise CorruptDataError("record header is truncated", path=path, offset=offset)
    tag, flags, hsize, raw_len, stored_len, _res, digest, checksum = RECORD_HEADER.unpack_from(
        header
    )
    if hsize != RECORD_HEADER.size or stored_len != sum(len(part) for part in payload):
        raise CorruptDataError("record is not the one expected here", path=path, offset=offset)
    hasher = xxhash.xxh3_64(memoryview(header)[:RECORD_CHECKED])
    for part in payload:
        hasher.update(part)
    if hasher.intdigest() != checksum:
        raise CorruptDataError("record checksum mismatch", path=path, offset=offset)
    return RecordHead(tag, flags, raw_len, digest)


def shard_of(digest: bytes, params: SegmentParams) -> int:
    """The shard number of a chunk: its leading ``levels * width`` hex digits."""
    digits = params.shard_levels * params.shard_width
    if digits == 0:
        return 0
    return int.from_bytes(digest[:8], "big") >> (64 - 4 * digits)


def shard_dir(root: Path, shard: int, params: SegmentParams) -> Path:
    digits = params.shard_levels * params.shard_width
    if digits == 0:
        return root
    text = f"{shard:0{digits}x}"
    parts = [text[i : i + params.shard_width] for i in range(0, digits, params.shard_width)]
    return root.joinpath(*parts)


def segment_path(root: Path, shard: int, segment_id: int, params: SegmentParams) -> Path:
    group = f"{segment_id // SEGMENTS_PER_GROUP:06d}"
    return shard_dir(root, shard, params) / group / f"{segment_id:010d}{SEGMENT_SUFFIX}"


def list_segment_files(root: Path) -> Iterator[tuple[int, Path]]:
    """Every ``(segment id, path)`` under ``root``."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            stem = name[: -len(SEGMENT_SUFFIX)]
            if name.endswith(SEGMENT_SUFFIX) and stem.isascii() and stem.isdigit():
                yield int(stem), Path(dirpath) / name


#: Bytes a segment scan reads before it drops their pages from the process.
_SCAN_WINDOW = 32 << 20


def scan_segment(path: Path, limit: int | None = None) -> Iterator[Record | CorruptDataError]:
    """Yield every record of a segment in order, or an error where one is damaged.

    After damage the scan resumes at the next offset where a record with a valid
    checksum starts, so one bad record does not hide the ones behind it.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                yield CorruptDataError("segment is empty", path=str(path), offset=0)
                return
            mapping = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    except OSError as exc:
        yield CorruptDataError(f"cannot read segment: {exc.strerror}", path=str(path))
        return
    end = size if limit is None else min(limit, size)
    if limit is not None and size < limit:
        yield CorruptDataError(
            f"segment is shorter ({size}) than its published length ({limit})",
            path=str(path),
            offset=size,
        )
    try:
        header = parse_segment_header(mapping, str(path))
    except CorruptDataError as exc:
        yield exc
        return
    offset = header.header_size
    dropped = 0  # pages before this offset were dropped from the process
    while offset < end:
        try:
            record = parse_record(mapping, offset, end, str(path))
        except CorruptDataError as exc:
            yield exc
            offset = _resync(mapping, offset + 1, end, str(path))
            continue
        yield record
        offset += record.size
        if offset - dropped >= _SCAN_WINDOW:
            # A scan (gc, fsck) reads whole segments: keep what it touched out
            # of the resident set (records already yielded stay valid: the
            # pages come back from the page cache when read again).
            upto = offset - offset % mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(mmap.MADV_DONTNEED, dropped, upto - dropped)
            dropped = upto


def _resync(mapping: mmap.mmap, start: int, end: int, path: str) -> int:
    """The next offset at or after ``start`` where a valid record begins, else ``end``.

    Candidates are found with ``mmap.find`` on the header-size field (bytes 2-3 of
    every record header), so a damaged segment is skipped through at C speed.
    """
    marker = struct.pack("<H", RECORD_HEADER.size)
    search = start + 2
    while True:
        found = mapping.find(marker, search, end)
        if found < 0 or found - 2 + RECORD_HEADER.size > end:
            break
        offset = found - 2
        if offset >= start and mapping[offset] != 0:
            try:
                parse_record(mapping, offset, end, path)
                return offset
            except CorruptDataError:
                pass
        search = found + 1
    return end


__all__ = [
    "RECORD_HEADER",
    "SEGMENT_HEADER",
    "Record",
    "list_segment_files",
    "parse_record",
    "scan_segment",
    "segment_path",
    "shard_of",
]
