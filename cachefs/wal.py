"""The write-ahead log (on-disk format and storage engine layer).

Writes that must be durable before they are deduplicated and published are
appended here first (the mount's ``write()`` path: logged writes now, ingest
later).  After a crash, everything past the last checkpoint is replayed.

File ``STORE/wal/wal.log``; integers little-endian::

    file header, 32 bytes (WAL_HEADER):
      0  8s  magic b"CFSWAL\\r\\n"
      8  H   format version (WAL_FORMAT_VERSION)
     10  H   header size (32)
     12  I   reserved, zero
     16  Q   base sequence number: the first record's sequence number
     24  Q   xxh3_64 of bytes 0..24
    records, back to back:
      record header, 24 bytes (WAL_RECORD):
        0  Q  xxh3_64 over bytes 8..24 of this header followed by the payload
        8  Q  sequence number (base, base+1, ... with no gaps)
       16  I  payload length
       20  B  kind (meaning is the caller's; see store.py for the kinds it logs)
       21  3x reserved, zero
      payload

Replay reads records until the first one that is incomplete, fails its
checksum, or breaks the sequence; that is the torn tail of a crash (or damage),
and it is cut off (truncated) with a warning saying how many bytes went.  A
record is *acknowledged* only once :meth:`WriteAheadLog.commit` has returned for
it, so a torn tail holds nothing that was acknowledged -- unless the machine or
disk lost synced data, which the warning then points at.

Group commit: ``append`` only writes; ``commit(seq)`` makes every record up to
``seq`` durable with one ``fdatasync`` shared by all threads waiting at the same
time.  With ``fsync=False`` commit only orders (survives the process, not the
machine).

Checkpoint: once everything logged has been published elsewhere, the log is
replaced (atomically) by an empty one whose base sequence number continues the
old sequence.  Sequence numbers therefore never repeat for the life of a store.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import xxhash

from cachefs.errors import CorruptDataError, FormatVersionError, from_oserror
from cachefs.fsutil import atomic_write

log = logging.getLogger(__name__)

WAL_MAGIC = b"CFSWAL\r\n"
WAL_FORMAT_VERSION = 1
WAL_HEADER = struct.Struct("<8sHHIQQ")
assert WAL_HEADER.size == 32
WAL_RECORD = struct.Struct("<QQIB3x")
assert WAL_RECORD.size == 24
MAX_PAYLOAD = 64 << 20


@dataclass(frozen=True)
class WalRecord:
    seq: int
    kind: int
    payload: bytes


def _encode_header(base_seq: int) -> bytes:
    head = WAL_HEADER.pack(WAL_MAGIC, WAL_FORMAT_VERSION, WAL_HEADER.size, 0, base_seq, 0)[:24]
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


def encode_record(seq: int, kind: int, *parts: bytes | memoryview) -> bytes:
    """The header of a record whose payload is ``parts`` joined."""
    body = WAL_RECORD.pack(0, seq, sum(len(p) for p in parts), kind)[8:]
    hasher = xxhash.xxh3_64(body)
    for part in parts:
        hasher.update(part)
    return struct.pack("<Q", hasher.intdigest()) + body


class WriteAheadLog:
    """An append-only log with group commit; thread-safe."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.path = directory / "wal.log"
        self.fsync = fsync
        self._lock = threading.Lock()  # appends
        self._sync_lock = threading.Lock()  # one fdatasync at a time
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                atomic_write(self.path, _encode_header(1))
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise from_oserror(exc, f"opening the write-ahead log {self.path}") from None
        try:
            self.base_seq, self._records, end = self._scan()
            size = os.fstat(self._fd).st_size
            if end < size:
                log.warning(
                    "write-ahead log %s: cut off a torn or damaged tail of %d bytes at offset %d",
                    self.path,
                    size - end,
                    end,
                )
                os.ftruncate(self._fd, end)
                os.fsync(self._fd)
        except BaseException as exc:
            os.close(self._fd)  # a refused log must not leak its descriptor
            if isinstance(exc, OSError):
                raise from_oserror(exc, f"reading the write-ahead log {self.path}") from None
            raise
        self.truncated_bytes = size - end
        self._end = end
        self.next_seq = self.base_seq + len(self._records)
        self.synced_seq = self.next_seq - 1

    def _scan(self) -> tuple[int, list[WalRecord], int]:
        data = _read_all(self._fd)
        if len(data) < WAL_HEADER.size:
            raise CorruptDataError(
                "write-ahead log is shorter than its header",
                path=str(self.path),
                hint="move the file away to start a new log (unpublished writes in it are lost)",
            )
        magic, version, hsize, _res, base_seq, checksum = WAL_HEADER.unpack_from(data)
        if magic != WAL_MAGIC or xxhash.xxh3_64_intdigest(data[:24]) != checksum:
            raise CorruptDataError(
                "write-ahead log header is damaged",
                path=str(self.path),
                hint="move the file away to start a new log (unpublished writes in it are lost)",
            )
        if version > WAL_FORMAT_VERSION:
            raise FormatVersionError(f"write-ahead log {self.path} has format version {version}")
        records: list[WalRecord] = []
        offset = hsize
        expected = base_seq
        while offset + WAL_RECORD.size <= len(data):
            checksum, seq, length, kind = WAL_RECORD.unpack_from(data, offset)
            end = offset + WAL_RECORD.size + length
            if seq != expected or length > MAX_PAYLOAD or end > len(data):
                break
            hasher = xxhash.xxh3_64(data[offset + 8 : offset + WAL_RECORD.size])
            payload = data[offset + WAL_RECORD.size : end]
            hasher.update(payload)
            if hasher.intdigest() != checksum:
                break
            records.append(WalRecord(seq, kind, bytes(payload)))
            expected += 1
            offset = end
        return base_seq, records, offset

    def replay(self) -> list[WalRecord]:
        """The records past the last checkpoint, found when the log was opened."""
        return list(self._records)

    def append(self, kind: int, *parts: bytes | memoryview) -> int:
        """Write one record (not yet durable) whose payload is ``parts`` joined
        (given apart, so that a caller's header and data need not be copied
        together); return its sequence number."""
        length = sum(len(p) for p in parts)
        if length > MAX_PAYLOAD:
            raise ValueError(f"WAL payload of {length} bytes is too large")
        with self._lock:
            seq = self.next_seq
            head = encode_record(seq, kind, *parts)
            try:
                written = os.pwritev(self._fd, [head, *parts], self._end)
                if written != len(head) + length:
                    raise OSError(28, "short write to the write-ahead log")
            except OSError as exc:
                os.ftruncate(self._fd, self._end)
                raise from_oserror(exc, "appending to the write-ahead log") from None
            self._end += written
            self.next_seq = seq + 1
            return seq

    def commit(self, seq: int | None = None) -> None:
        """Make every record up to ``seq`` (default: all) durable (group commit)."""
        target = self.next_seq - 1 if seq is None else seq
        if not self.fsync or self.synced_seq >= target:
            return
        with self._sync_lock:
            if self.synced_seq >= target:  # another thread's fdatasync covered us
                return
            upto = self.next_seq - 1
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise from_oserror(exc, "syncing the write-ahead log") from None
            self.synced_seq = max(self.synced_seq, upto)

    @property
    def size(self) -> int:
        return self._end

    def checkpoint(self) -> None:
        """Start an empty log: every record so far has been applied elsewhere.

        Raises StoreFullError (or another CachefsError) when the new log cannot
        be written; the old log then stays in place, whole.
        """
        with self._lock, self._sync_lock:
            try:
                atomic_write(self.path, _encode_header(self.next_seq))
                fd = os.open(self.path, os.O_RDWR)
            except OSError as exc:
                raise from_oserror(exc, f"checkpointing the write-ahead log {self.path}") from None
            os.close(self._fd)
            self._fd = fd
            self.base_seq = self.next_seq
            self._end = WAL_HEADER.size
            self._records = []
            self.synced_seq = self.next_seq - 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 16 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
