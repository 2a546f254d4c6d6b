"""Healing a damaged chunk from a good copy (``cachefs.engine._heal``), at the
engine: a compressed record rebuilt byte for byte in place, the copies it
refuses, and the fresh copy it falls back to when the record cannot be
written again.  Healing through tiers and mounts: ``test_tiers.py``."""

from __future__ import annotations

import errno
import logging
import os
import types
from pathlib import Path

import pytest

from cachefs.engine import (
    CorruptDataError,
    Digest,
    Store,
    StoreOptions,
    check_store,
    heal_chunk,
    restore_chunks,
)
from cachefs.engine import _heal as heal
from cachefs.format.schema import ChunkEntry
from cachefs.format.segment import COMPRESSION_MASK, COMPRESSION_NONE
from tests.conftest import flip_first_chunk

NO_SYNC = StoreOptions(fsync=False)


def first_chunk(store: Store, digest: Digest) -> tuple[bytes, ChunkEntry, Path]:
    """An object's first chunk: its digest, index entry and segment file."""
    chunk, _ = store.recipe(digest)[0]
    with store.index.read() as txn:
        entry = store.index.get_chunk(txn, chunk)
    assert entry is not None
    return chunk, entry, store.segments.chunk_path(chunk, entry.segment_id)


def compressible(size: int) -> bytes:
    """Bytes that compress to about half and share no chunk with each other."""
    return os.urandom(size // 2).hex().encode()


def test_a_compressed_chunk_is_rebuilt_in_place(tmp_path: Path) -> None:
    """The same bytes and codec settings give the same record: healing a
    compressed chunk writes it again where it was, and the segment is then
    byte for byte what it was before the damage."""
    data = compressible(1 << 20)
    with Store.open(tmp_path / "s", create=True, options=NO_SYNC) as store:
        digest = store.put(data)
        chunk, entry, path = first_chunk(store, digest)
        assert entry.flags & COMPRESSION_MASK != COMPRESSION_NONE
        assert entry.stored_len < entry.raw_len
        good = path.read_bytes()
        bytes_of_chunk = bytes(store.read_chunk(chunk))
        flip_first_chunk(store, digest)
        store.chunks.cache.clear()
        with pytest.raises(CorruptDataError):
            store.read_chunk(chunk)
        assert heal_chunk(store, chunk, bytes_of_chunk)
        assert path.read_bytes() == good
        assert first_chunk(store, digest)[1] == entry  # the index did not move
        store.chunks.cache.clear()
        assert store.read(digest) == data
        assert check_store(store).clean


def test_a_copy_of_other_bytes_is_refused(tmp_path: Path) -> None:
    """Bytes that are not the chunk are refused before anything is written,
    by a heal and by a restore; a chunk the index no longer has is left alone."""
    with Store.open(tmp_path / "s", create=True, options=NO_SYNC) as store:
        digest = store.put(os.urandom(1 << 20))
        chunk, entry, path = first_chunk(store, digest)
        before = path.read_bytes()
        wrong = os.urandom(entry.raw_len)
        with pytest.raises(CorruptDataError, match="is not that chunk"):
            heal_chunk(store, chunk, wrong)
        with pytest.raises(CorruptDataError, match="is not that chunk"):
            restore_chunks(store, {chunk: wrong})
        assert path.read_bytes() == before
        stranger = os.urandom(50_000)
        assert not heal_chunk(store, store.digest_function.hash(stranger), stranger)
        assert restore_chunks(store, {store.digest_function.hash(stranger): stranger}) == 0
        # An intact chunk (healed meanwhile by another reader) is left as it is.
        assert heal_chunk(store, chunk, bytes(store.read_chunk(chunk)))
        assert path.read_bytes() == before
        assert check_store(store).clean


def refuse_writes(path: str, flags: int, *args: int) -> int:
    raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), path)


@pytest.mark.parametrize(
    ("failure", "logged"),
    [("the segment refuses the write", "Read-only file system"),
     ("the write is lost", "still fails its checks")],
)  # fmt: skip
def test_a_record_that_cannot_be_written_again_is_stored_afresh(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
    logged: str,
) -> None:
    """When the damaged record cannot be written again in place (the segment
    refuses the write, or the record written still fails its checks), the
    chunk is appended anew and the index points at the copy; the damaged
    record is dead, and fsck --repair drops it."""
    data = compressible(1 << 20)
    with Store.open(tmp_path / "s", create=True, options=NO_SYNC) as store:
        digest = store.put(data)
        chunk, entry, _ = first_chunk(store, digest)
        copy = bytes(store.read_chunk(chunk))
        flip_first_chunk(store, digest)
        store.chunks.cache.clear()
        if failure == "the segment refuses the write":
            fake_os = types.SimpleNamespace(open=refuse_writes, O_WRONLY=os.O_WRONLY)
            monkeypatch.setattr(heal, "os", fake_os)
        else:
            monkeypatch.setattr(heal, "_intact", lambda *args: False)
        with caplog.at_level(logging.WARNING, logger="cachefs.engine._heal"):
            assert heal_chunk(store, chunk, copy)
        assert logged in caplog.text
        moved = first_chunk(store, digest)[1]
        assert (moved.segment_id, moved.offset) != (entry.segment_id, entry.offset)
        store.chunks.cache.clear()
        assert store.read(digest) == data
        monkeypatch.undo()
        assert not check_store(store, repair=True).lost_objects
        assert check_store(store).clean
        assert store.read(digest) == data
