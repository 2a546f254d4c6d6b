"""Healing: a damaged chunk rewritten from a good copy (storage engine layer).

When a chunk's record fails its checks (a flipped bit in a segment) and a copy
can be had elsewhere -- a remote tier that holds it, verified against the
chunk's digest -- :func:`heal_chunk` writes the record again where it was:
chunks are encoded deterministically (the same bytes and codec settings give
the same record), so the record's exact bytes are known and the segment ends
as it was before the damage; fsck then finds nothing wrong.  When the record
cannot be rebuilt byte for byte (another compression outcome, a codec of
another version), a fresh record is appended and the index entry points at it
in one publication (the damaged bytes are then dead, dropped by gc compaction
or fsck --repair).  The remote tiers (``cachefs.remote``) set
``LocalChunks.healer`` to fetch such copies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cachefs.errors import CorruptDataError, from_oserror
from cachefs.format.schema import ChunkEntry
from cachefs.format.segment import (
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    TAG_CHUNK,
    encode_record_header,
)

if TYPE_CHECKING:
    from cachefs.engine._store import Store

log = logging.getLogger(__name__)


def heal_chunk(store: Store, digest: bytes, data: bytes) -> bool:
    """Store ``data`` again as chunk ``digest``: in place, or as a fresh copy
    that the index points at (always for a chunk held remotely, fetched back);
    False if the chunk is no longer indexed.
    ``data`` is checked against the digest first (CorruptDataError if it is
    not that chunk)."""
    if store.digest_function.hash(data) != digest:
        raise CorruptDataError(f"the copy offered to heal chunk {digest.hex()} is not that chunk")
    store.check_writable()
    publisher = store.publisher
    with publisher.commit_lock:  # no publication, no gc move meanwhile
        with store.index.read() as txn:
            entry = store.index.get_chunk(txn, digest)
        if entry is None:
            return False
        if entry.raw_len != len(data):
            raise CorruptDataError(f"chunk {digest.hex()} is indexed with another length")
        if not entry.remote:
            if _intact(store, digest, entry):
                return True  # healed meanwhile (another reader)
            if _rewrite(store, digest, entry, data):
                return True
        location = store.ingest.append(digest, memoryview(data))
        return publisher.replace_chunks({digest: location}) == 1


def restore_chunks(
    store: Store, fetched: Mapping[bytes, bytes | memoryview], *, verified: bool = False
) -> int:
    """Store chunks held remotely (``fetched``: digest -> bytes, from the
    tiers) here again, in one publication; how many were (one that is no
    longer indexed, or was stored meanwhile, is left alone).  Each is checked
    against its digest first (CorruptDataError if one is not that chunk),
    unless the caller has just done so (``verified``: the tiers' reads)."""
    for digest, data in fetched.items():
        if not verified and store.digest_function.hash(data) != digest:
            raise CorruptDataError(f"the copy offered for chunk {digest.hex()} is not that chunk")
    store.check_writable()
    publisher = store.publisher
    with publisher.commit_lock:
        with store.index.read() as txn:
            entries = {d: store.index.get_chunk(txn, d) for d in fetched}
        locations = {
            digest: store.ingest.append(digest, memoryview(fetched[digest]))
            for digest, entry in entries.items()
            if entry is not None and entry.remote and entry.raw_len == len(fetched[digest])
        }
        return publisher.replace_chunks(locations) if locations else 0


def _intact(store: Store, digest: bytes, entry: ChunkEntry) -> bool:
    try:
        store.chunks.read_entry(digest, entry)
    except CorruptDataError:
        return False
    return True


def _rewrite(store: Store, digest: bytes, entry: ChunkEntry, data: bytes) -> bool:
    """Write the chunk's record again at its place, if its bytes can be rebuilt."""
    compression = entry.flags & COMPRESSION_MASK
    payload: bytes | memoryview = data
    if compression != COMPRESSION_NONE:
        encoded, payload = store.chunks.codec.encode(memoryview(data), False)
        if encoded != compression:
            return False
    if len(payload) != entry.stored_len:
        return False
    record = encode_record_header(TAG_CHUNK, entry.flags, len(data), digest, payload) + payload
    path = store.segments.chunk_path(digest, entry.segment_id)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, record, entry.offset)
            if store.options.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # the segment is gone or will not be written: a fresh copy
        log.warning("chunk %s: %s", digest.hex(), from_oserror(exc, f"rewriting {path}"))
        return False
    if not _intact(store, digest, entry):
        log.warning("chunk %s: the rewritten record still fails its checks", digest.hex())
        return False
    log.warning("chunk %s: the damaged record in %s was written again", digest.hex(), path)
    return True


__all__ = ["heal_chunk", "restore_chunks"]
