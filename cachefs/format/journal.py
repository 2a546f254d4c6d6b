"""The journal: writes logged before they are published (on-disk format layer).

A store has one journal, ``STORE/journal/journal.log``, opened by the engine
for the one writing process (``engine.Journal``).  Whoever must make a change
survive the death of the process before it is published appends records to it;
after a crash the next writer replays them.  Every record kind that any writer
logs is listed here, with its payload, so that the journal is read the same way
by everyone.

File layout, integers little-endian::

    file header, 32 bytes (HEADER):
      0  8s  magic b"CFSWAL\\r\\n"
      8  H   format version (FORMAT_VERSION)
     10  H   header size (32)
     12  I   reserved, zero
     16  Q   base sequence number: the first record's sequence number
     24  Q   xxh3_64 of bytes 0..24
    records, back to back:
      record header, 24 bytes (RECORD):
        0  Q  xxh3_64 over bytes 8..24 of this header followed by the payload
        8  Q  sequence number (base, base+1, ... with no gaps)
       16  I  payload length (at most MAX_PAYLOAD)
       20  B  kind (below)
       21  3x reserved, zero
      payload

Reading stops at the first record that is incomplete, fails its checksum, or
breaks the sequence: that is the torn tail of a crash (or damage), which the
writer cuts off when it opens the journal.  A checkpoint replaces the file
(atomically) by an empty one whose base sequence number continues the old
sequence, so sequence numbers never repeat for the life of a store.

Record kinds.  Each writer owns a range of kinds, and a writer's records are
replayed by that writer; a kind nobody owns is skipped with a warning.  Only
the mount logs here today.  A checkpoint replaces the whole file, so a second
writer (server uploads, say) must have its records replayed before any
checkpoint, and re-log what it still needs after one, as the mount does with
the writes it has not published (``FileJournal.carry_over``).

``1-15``: the mount's files (``cachefs.fs``), per inode:

* ``FILE_BASE`` (1): inode Q, size Q, content digest 32s (zeros: empty) --
  the published content that the records after it apply to; logged when a
  file with nothing unpublished is first changed.
* ``FILE_WRITE`` (2): inode Q, offset Q, mtime ns q, then the bytes written.
* ``FILE_TRUNCATE`` (3): inode Q, size Q, mtime ns q.
* ``FILE_WRITE_SPOOLED`` (4): inode Q, offset Q, length Q, mtime ns q, spool Q --
  a write whose bytes are not in the journal but in the file's spool, named
  ``journal/spools/<inode>-<spool>`` (``spool_name``), at the same offset: a
  large file written in order logs its writes so (no second copy of every
  byte).  The spool is written before the record, and its name stays until the
  file's content is published (or the file is closed with nothing unpublished);
  replay takes what a spool cut shorter since still holds (a later record
  truncates the file, or it ends where its bytes do, as after a torn journal).
  The spools are scratch space again once the journal holds no record of them.

``16-31``: the mount's namespace (``cachefs.fs``):

* ``NS_UNLINK`` (16): parent directory Q, inode Q, time ns q, then the name -- an entry
  removed (unlink, not rmdir) whose removal is not yet in the index: the
  mount commits removals together, a moment later (``_lookups.py`` in
  ``cachefs.fs``), and records in the same transaction the sequence number
  up to which they are committed (the index's ``unlinks_logged`` counter).
  Replay skips the records up to it (the name may have been made again
  since), and removes the entry of each later one if it still names that
  inode; an older cachefs skips the record, and the entry comes back as after
  a crash of the machine.

Replay removes the entries of ``NS_UNLINK`` records first; then it applies,
for every inode, the records after its last ``FILE_BASE`` to that base, unless
the inode's content is no longer that base (it was published since) or the
inode is gone.

Bump FORMAT_VERSION (and the store format version) for any change to the
layout or to the payload of a kind.  A new kind only needs a new number when
an older cachefs may skip its records; one whose records it must not skip
(``FILE_WRITE_SPOOLED``: the writes would be lost) bumps FORMAT_VERSION alone,
so that an older cachefs refuses the journal before it replays anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from cachefs.errors import CorruptDataError, FormatVersionError

#: Where the journal lives in a store, and its file.
DIRECTORY = "journal"
FILE_NAME = "journal.log"

MAGIC = b"CFSWAL\r\n"
#: 1: FILE_BASE, FILE_WRITE, FILE_TRUNCATE.  2: FILE_WRITE_SPOOLED, whose
#: records a cachefs of version 1 would skip (losing the writes): it refuses
#: the journal instead.  Both are read.  An empty journal left by a clean close
#: is written as version 1 (EMPTY_VERSION), which any cachefs reads, and made
#: version 2 again when a writer opens it.
FORMAT_VERSION = 2
EMPTY_VERSION = 1
HEADER = struct.Struct("<8sHHIQQ")
assert HEADER.size == 32
RECORD = struct.Struct("<QQIB3x")
assert RECORD.size == 24
MAX_PAYLOAD = 64 << 20

FILE_BASE = 1
FILE_WRITE = 2
FILE_TRUNCATE = 3
FILE_WRITE_SPOOLED = 4
#: The kinds the mount's files log (their payloads start with the inode, Q).
FILE_KINDS = frozenset((FILE_BASE, FILE_WRITE, FILE_TRUNCATE, FILE_WRITE_SPOOLED))
FILE_BASE_PAYLOAD = struct.Struct("<QQ32s")
FILE_WRITE_HEAD = struct.Struct("<QQq")
FILE_TRUNCATE_PAYLOAD = struct.Struct("<QQq")
FILE_WRITE_SPOOLED_PAYLOAD = struct.Struct("<QQQqQ")
NS_UNLINK = 16
NS_UNLINK_HEAD = struct.Struct("<QQq")
#: Where the spools that FILE_WRITE_SPOOLED records name live, in the journal's directory.
SPOOLS = "spools"

_DAMAGED_HINT = "move the file away to start a new journal (unpublished writes in it are lost)"


@dataclass(frozen=True)
class JournalRecord:
    seq: int
    kind: int
    payload: bytes


def encode_header(base_seq: int, version: int = FORMAT_VERSION) -> bytes:
    head = HEADER.pack(MAGIC, version, HEADER.size, 0, base_seq, 0)[:24]
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


def encode_record(seq: int, kind: int, *parts: bytes | memoryview) -> bytes:
    """The header of a record whose payload is ``parts`` joined."""
    body = RECORD.pack(0, seq, sum(len(p) for p in parts), kind)[8:]
    hasher = xxhash.xxh3_64(body)
    for part in parts:
        hasher.update(part)
    return struct.pack("<Q", hasher.intdigest()) + body


def parse(data: bytes, path: str) -> tuple[int, list[JournalRecord], int]:
    """A journal file's (base sequence number, records, end of the last whole
    record).  Bytes past that end are a torn or damaged tail."""
    if len(data) < HEADER.size:
        raise CorruptDataError("journal is shorter than its header", path=path, hint=_DAMAGED_HINT)
    magic, version, hsize, _res, base_seq, checksum = HEADER.unpack_from(data)
    if magic != MAGIC or xxhash.xxh3_64_intdigest(data[:24]) != checksum:
        raise CorruptDataError("journal header is damaged", path=path, hint=_DAMAGED_HINT)
    if version > FORMAT_VERSION:
        raise FormatVersionError(f"journal {path} has format version {version}")
    records: list[JournalRecord] = []
    offset = hsize
    expected = base_seq
    while offset + RECORD.size <= len(data):
        checksum, seq, length, kind = RECORD.unpack_from(data, offset)
        end = offset + RECORD.size + length
        if seq != expected or length > MAX_PAYLOAD or end > len(data):
            break
        hasher = xxhash.xxh3_64(data[offset + 8 : offset + RECORD.size])
        payload = data[offset + RECORD.size : end]
        hasher.update(payload)
        if hasher.intdigest() != checksum:
            break
        records.append(JournalRecord(seq, kind, bytes(payload)))
        expected += 1
        offset = end
    return base_seq, records, offset


def spool_name(ino: int, spool: int) -> str:
    """The file name of spool ``spool`` of inode ``ino`` (FILE_WRITE_SPOOLED)."""
    return f"{ino}-{spool}"


def file_inode(record: JournalRecord) -> int:
    """The inode a record of one of FILE_KINDS is about."""
    return int(struct.unpack_from("<Q", record.payload)[0])


__all__ = [
    "FILE_BASE",
    "FILE_KINDS",
    "FILE_TRUNCATE",
    "FILE_WRITE",
    "NS_UNLINK",
    "JournalRecord",
    "encode_header",
    "encode_record",
    "parse",
]
