"""The error paths of ``cachefs.format`` that the round trips do not reach:
every parser and validator refuses what it must, with a clear error."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import xxhash
import zstandard

from cachefs.errors import BadDigestError, ConfigError, CorruptDataError, StoreNotFoundError
from cachefs.format import segment as seg
from cachefs.format.codec import ChunkCodec
from cachefs.format.digest import SHA256, Digest
from cachefs.format.header import (
    HEADER_NAME,
    ChunkingParams,
    CompressionParams,
    SegmentParams,
    StoreConfig,
    read_header,
    set_format_version,
    write_header,
)
from cachefs.format.schema import (
    HOLE_MARK,
    OBJECT,
    PAGE_SIZE,
    ObjectEntry,
    RecipePages,
    sparse_key,
    unpack_recipe,
)
from tests.test_format import write_segment


def test_a_chunk_payload_that_is_not_what_it_claims_is_corrupt() -> None:
    codec = ChunkCodec(CompressionParams())
    packed = zstandard.ZstdCompressor().compress(b"x" * 1000)
    assert bytes(codec.decode(seg.COMPRESSION_ZSTD, memoryview(packed), 1000)) == b"x" * 1000
    assert bytes(codec.decode(seg.COMPRESSION_NONE, memoryview(b"abc"), 3)) == b"abc"
    cases = [
        (seg.COMPRESSION_NONE, b"abc", 4, "wrong length"),
        (2, b"abc", 3, "unknown compression 2"),
        (seg.COMPRESSION_ZSTD, b"not zstd at all", 10, "cannot decompress"),
        (seg.COMPRESSION_ZSTD, packed, 999, "decompressed to"),
        (seg.COMPRESSION_ZSTD, zstandard.ZstdCompressor().compress(b"y" * 10), 11, "not 11"),
    ]
    for compression, payload, raw_len, message in cases:
        with pytest.raises(CorruptDataError, match=message):
            codec.decode(compression, memoryview(payload), raw_len)


@pytest.mark.parametrize("text", ["", "abc/1", "0" * 64, f"{'0' * 64}/-1", f"{'g' * 64}/1"])
def test_a_malformed_digest_is_refused(text: str) -> None:
    with pytest.raises(BadDigestError, match="not a digest"):
        Digest.parse(text)


@pytest.mark.parametrize(
    "params, message",
    [
        (ChunkingParams(algorithm="rabin"), "unknown chunking algorithm"),
        (ChunkingParams(normalization=4), "normalization"),
        (ChunkingParams(min_size=32), "bad chunk sizes"),
        (ChunkingParams(min_size=1000, avg_size=1100), "at least 256"),
        (CompressionParams(algorithm="lz4"), "unknown compression algorithm"),
        (CompressionParams(level=23), "bad zstd level"),
        (CompressionParams(min_saving=1.0), "bad min_saving"),
        (SegmentParams(max_size=1000), "bad segment max_size"),
        (SegmentParams(shard_levels=3), "shard"),
    ],
)
def test_bad_store_parameters_are_refused(params: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        params.validate()  # type: ignore[attr-defined]


def test_an_upgrade_keeps_a_header_whose_chunking_is_not_a_table(tmp_path: Path) -> None:
    write_header(tmp_path, StoreConfig())
    doc = json.loads((tmp_path / HEADER_NAME).read_text())
    doc["chunking"] = "default"
    (tmp_path / HEADER_NAME).write_text(json.dumps(doc))
    set_format_version(tmp_path, 5)
    assert json.loads((tmp_path / HEADER_NAME).read_text())["chunking"] == "default"


def test_a_store_path_that_is_a_file_or_unreadable_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(StoreNotFoundError, match="not a directory"):
        read_header(afile)
    store = tmp_path / "store"
    store.mkdir()
    (store / HEADER_NAME).mkdir()  # reading it fails with EISDIR
    with pytest.raises(Exception, match="reading the store header"):
        read_header(store)


def test_sparse_objects_know_they_are_sparse() -> None:
    dense = ObjectEntry(10, 1, [(b"\1" * 32, 10)])
    sparse = ObjectEntry(1 << 30, 1, [(b"\1" * 32, 10), (HOLE_MARK, (1 << 30) - 10)])
    assert not dense.sparse and sparse.sparse
    assert ObjectEntry.unpack(sparse.pack()) == sparse
    sparse.content = b"\2" * 32  # its content digest, once computed
    assert ObjectEntry.unpack(sparse.pack()) == sparse
    key = sparse_key(SHA256, sparse.chunks)
    assert key.endswith(b"\0SPR") and len(key) == 32
    assert key != sparse_key(SHA256, dense.chunks)


def test_a_segment_header_that_claims_to_be_shorter_than_itself_is_corrupt() -> None:
    head = bytearray(seg.encode_segment_header(1, 2))
    fields = list(seg.SEGMENT_HEADER.unpack(bytes(head)))
    fields[2] = 8  # header size
    raw = seg.SEGMENT_HEADER.pack(*fields[:-1], 0)

    raw = raw[:40] + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw[:40]))
    with pytest.raises(CorruptDataError, match="too small"):
        seg.parse_segment_header(raw, "seg")


def test_a_record_with_a_longer_header_from_a_later_version_is_read(tmp_path: Path) -> None:
    payload = b"payload"
    extension = b"EXTENSION"
    hsize = seg.RECORD_HEADER.size + len(extension)
    digest = b"\7" * 32
    head = bytearray(
        seg.RECORD_HEADER.pack(seg.TAG_CHUNK, 0, hsize, len(payload), len(payload), 0, digest, 0)
    )

    hasher = xxhash.xxh3_64(bytes(head[: seg.RECORD_CHECKED]))
    hasher.update(extension)
    hasher.update(payload)
    struct.pack_into("<Q", head, seg.RECORD_CHECKED, hasher.intdigest())
    buf = bytes(head) + extension + payload
    record = seg.parse_record(memoryview(buf), 0, len(buf), "seg")
    assert bytes(record.payload) == payload and record.size == len(buf)
    damaged = bytearray(buf)
    damaged[seg.RECORD_HEADER.size] ^= 1  # the extension is covered by the checksum
    with pytest.raises(CorruptDataError, match="checksum"):
        seg.parse_record(memoryview(bytes(damaged)), 0, len(buf), "seg")


def test_only_segment_files_are_listed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ["0000000001.seg", "notes.txt", "x1.seg", "0000000002.seg.tmp"]:
        (tmp_path / "a" / name).write_bytes(b"")
    assert list(seg.list_segment_files(tmp_path)) == [(1, tmp_path / "a" / "0000000001.seg")]


def test_a_segment_that_cannot_be_read_is_reported(tmp_path: Path) -> None:
    (items,) = [list(seg.scan_segment(tmp_path / "missing"))]
    assert len(items) == 1 and isinstance(items[0], CorruptDataError)
    assert "cannot read segment" in str(items[0])
    (tmp_path / "empty").write_bytes(b"")
    (items,) = [list(seg.scan_segment(tmp_path / "empty"))]
    assert len(items) == 1 and "segment is empty" in str(items[0])


def test_a_long_scan_drops_what_it_read_and_yields_every_record(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    contents = [os.urandom(4 << 20) for _ in range(10)]  # past the scan's 32 MiB window
    offsets = write_segment(path, contents)
    items = list(seg.scan_segment(path))
    assert [item.offset for item in items if isinstance(item, seg.Record)] == offsets
    last = items[-1]
    assert isinstance(last, seg.Record) and bytes(last.payload) == contents[-1]


def test_a_resync_skips_what_only_looks_like_a_record(tmp_path: Path) -> None:
    """Damage followed by bytes that look like a record header (the size field
    and a non-zero tag) but fail their checksum: the scan goes on to the next
    real record."""
    path = tmp_path / "seg"
    size = seg.RECORD_HEADER.size
    # a header-size field after a zero tag (no record), then one after a real tag
    decoy = struct.pack("<BBH", 0, 0, size) + b"\0" * 20
    decoy += struct.pack("<BBH", seg.TAG_CHUNK, 0, size) + b"\0" * 100
    offsets = write_segment(path, [b"a" * 50, decoy, b"c" * 50])
    with open(path, "r+b") as f:
        f.seek(offsets[1] + 20)  # damage the second record's header
        f.write(b"\xff\xff")
    items = list(seg.scan_segment(path))
    records = [item.offset for item in items if isinstance(item, seg.Record)]
    assert records == [offsets[0], offsets[2]]
    assert any(isinstance(item, CorruptDataError) for item in items)


def test_paged_object_entries_and_their_damage() -> None:
    pages = RecipePages.of([(b"\1" * 32, 10)] * 20, 8)
    assert pages.starts == [0, 80, 160] and pages.entries(2) == 4
    entry = ObjectEntry(200, 3, [], b"\5" * 32, pages)
    assert ObjectEntry.unpack(entry.pack()) == entry
    head = OBJECT.pack(200, 3, 20)
    for raw in [
        head + b"\0\0",  # neither inline entries nor a page size
        head + PAGE_SIZE.pack(1) + bytes(8 * 20),  # a page of one entry
        OBJECT.pack(200, 3, 8) + PAGE_SIZE.pack(8) + bytes(8),  # fits one page: never paged
        head + PAGE_SIZE.pack(8) + bytes(8 * 2),  # three pages, two starts
    ]:
        with pytest.raises(CorruptDataError, match="wrong length"):
            ObjectEntry.unpack(raw)
    with pytest.raises(CorruptDataError, match="recipe page has the wrong length"):
        unpack_recipe(b"x" * 41)
