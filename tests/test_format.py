"""On-disk format units: segment headers and records, the store header, the journal."""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from cachefs.engine import Journal, Store
from cachefs.engine._segments import SegmentWriter
from cachefs.errors import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    FormatVersionError,
    StoreNotFoundError,
)
from cachefs.format import journal as jfmt
from cachefs.format.header import (
    FORMAT_NAME,
    HEADER_NAME,
    STORE_FORMAT_VERSION,
    ChunkingParams,
    CompressionParams,
    SegmentParams,
    StoreConfig,
    read_header,
    set_format_version,
    write_header,
)
from cachefs.format.segment import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    RECORD_HEADER,
    SEGMENT_FORMAT_VERSION,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    TAG_CHUNK,
    Record,
    SegmentHeader,
    check_record,
    encode_record_header,
    encode_segment_header,
    parse_record,
    parse_segment_header,
    record_flags,
    scan_segment,
)

digests = st.binary(min_size=32, max_size=32)
payloads = st.binary(max_size=600)


def flip_bit(buf: bytearray, bit: int) -> None:
    buf[bit // 8] ^= 1 << (bit % 8)


def flip_file_bit(path: Path, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        byte = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([byte ^ (1 << (bit % 8))]))


def segment_record(tag: int, flags: int, raw_len: int, digest: bytes, payload: bytes) -> bytes:
    return encode_record_header(tag, flags, raw_len, digest, payload) + payload


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    tree: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            tree[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in files:
            full = os.path.join(dirpath, name)
            tree[os.path.relpath(full, root)] = Path(full).read_bytes()
    return tree


# --- segment header and records -------------------------------------------------------


def test_struct_sizes_match_the_documented_layout() -> None:
    assert SEGMENT_HEADER.size == 48
    assert RECORD_HEADER.size == 56
    assert len(encode_segment_header(0, 1)) == SEGMENT_HEADER.size
    assert len(encode_record_header(TAG_CHUNK, 0, 3, b"\0" * 32, b"abc")) == RECORD_HEADER.size


def test_segment_header_round_trip() -> None:
    head = encode_segment_header(7, 123456789)
    assert head[:8] == SEGMENT_MAGIC
    parsed = parse_segment_header(head, "seg")
    assert parsed == SegmentHeader(SEGMENT_FORMAT_VERSION, SEGMENT_HEADER.size, 7, 123456789)
    # A longer buffer (records follow) parses the same.
    assert parse_segment_header(head + b"\xff" * 100, "seg") == parsed


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda h: h[:47], "shorter than its header"),
        (lambda h: b"XFSSEG\r\n" + h[8:], "bad magic"),
        (lambda h: h[:20] + bytes([h[20] ^ 1]) + h[21:], "checksum mismatch"),
        (lambda h: h[:44] + bytes([h[44] ^ 0x80]) + h[45:], "checksum mismatch"),
    ],
    ids=["short", "magic", "body-bit", "checksum-bit"],
)
def test_damaged_segment_header_is_corrupt(damage: object, message: str) -> None:
    head = encode_segment_header(1, 2)
    assert callable(damage)
    with pytest.raises(CorruptDataError, match=message) as info:
        parse_segment_header(damage(head), "/x/seg")
    assert info.value.path == "/x/seg"
    assert info.value.offset == 0


def newer_segment_header(shard: int = 0, segment_id: int = 1) -> bytes:
    body = SEGMENT_HEADER.pack(
        SEGMENT_MAGIC, SEGMENT_FORMAT_VERSION + 1, SEGMENT_HEADER.size, shard, segment_id, 0, 0, 0
    )[:40]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_newer_segment_header_is_refused(tmp_path: Path) -> None:
    head = newer_segment_header()
    with pytest.raises(FormatVersionError, match="format version 2"):
        parse_segment_header(head, "seg")
    # A scan refuses the whole segment rather than guessing at its records.
    path = tmp_path / "0000000001.seg"
    payload = b"data" * 10
    path.write_bytes(head + segment_record(TAG_CHUNK, 0, len(payload), b"\1" * 32, payload))
    with pytest.raises(FormatVersionError):
        list(scan_segment(path))


def test_record_round_trip() -> None:
    payload = b"some chunk bytes" * 5
    digest = bytes(range(32))
    flags = record_flags(COMPRESSION_ZSTD, 2)
    rec = segment_record(TAG_CHUNK, flags, 4242, digest, payload)
    assert len(rec) == RECORD_HEADER.size + len(payload)
    tag, flags_, hsize, raw_len, stored_len, reserved, digest_, _ = RECORD_HEADER.unpack_from(rec)
    assert (tag, flags_, hsize, raw_len, stored_len, reserved, digest_) == (
        TAG_CHUNK,
        flags,
        56,
        4242,
        len(payload),
        0,
        digest,
    )
    # Embedded at an offset, with bytes after it inside the limit.
    buf = bytearray(b"\0" * 100 + rec + b"trailing")
    record = parse_record(memoryview(buf), 100, len(buf), "seg")
    assert record.offset == 100
    assert record.tag == TAG_CHUNK
    assert record.flags == flags
    assert record.compression == COMPRESSION_ZSTD
    assert record.digest_id == 2
    assert record.raw_len == 4242
    assert record.digest == digest
    assert bytes(record.payload) == payload
    assert bytes(record.raw) == rec
    assert record.size == len(rec)


def test_record_past_the_limit_is_corrupt() -> None:
    rec = segment_record(TAG_CHUNK, 0, 10, b"\0" * 32, b"0123456789")
    buf = memoryview(bytearray(rec))
    with pytest.raises(CorruptDataError, match="past the end"):
        parse_record(buf, 0, len(rec) - 1, "seg")
    with pytest.raises(CorruptDataError, match="past the end"):
        parse_record(buf, 0, RECORD_HEADER.size - 1, "seg")


@given(
    payload=payloads,
    tag=st.integers(0, 255),
    flags=st.integers(0, 255),
    raw_len=st.integers(0, 2**32 - 1),
    digest=digests,
    prefix=st.integers(0, 64),
    trailing=st.binary(max_size=80),
    data=st.data(),
)
def test_any_single_bit_flip_in_a_record_is_detected(
    payload: bytes,
    tag: int,
    flags: int,
    raw_len: int,
    digest: bytes,
    prefix: int,
    trailing: bytes,
    data: st.DataObject,
) -> None:
    rec = segment_record(tag, flags, raw_len, digest, payload)
    buf = bytearray(b"\xaa" * prefix + rec + trailing)
    intact = parse_record(memoryview(bytes(buf)), prefix, len(buf), "seg")
    assert (intact.tag, intact.flags, intact.raw_len, intact.digest) == (
        tag,
        flags,
        raw_len,
        digest,
    )
    assert bytes(intact.payload) == payload

    bit = data.draw(st.integers(0, len(rec) * 8 - 1), label="bit")
    flip_bit(buf, prefix * 8 + bit)
    with pytest.raises(CorruptDataError) as info:
        parse_record(memoryview(buf), prefix, len(buf), "/seg")
    assert info.value.offset == prefix


@given(
    payload=st.binary(min_size=1, max_size=600),
    digest=digests,
    data=st.data(),
)
def test_a_record_read_in_pieces_is_checked_as_a_whole(
    payload: bytes, digest: bytes, data: st.DataObject
) -> None:
    """``check_record``: the header and the payload in consecutive buffers
    (a reader's buffer between two scratch ones); any bit flipped is found."""
    rec = bytearray(segment_record(TAG_CHUNK, 0, len(payload), digest, payload))
    cut1 = data.draw(st.integers(0, len(payload)), label="cut1")
    cut2 = data.draw(st.integers(cut1, len(payload)), label="cut2")

    def pieces(buf: bytes | bytearray) -> tuple[bytes, list[bytes]]:
        head, body = bytes(buf[: RECORD_HEADER.size]), bytes(buf[RECORD_HEADER.size :])
        return head, [body[:cut1], body[cut1:cut2], body[cut2:]]

    head = check_record(*pieces(rec), "seg", 7)
    assert (head.tag, head.raw_len, head.digest, head.compression) == (
        TAG_CHUNK,
        len(payload),
        digest,
        COMPRESSION_NONE,
    )
    bit = data.draw(st.integers(0, len(rec) * 8 - 1), label="bit")
    flipped = bytearray(rec)
    flip_bit(flipped, bit)
    with pytest.raises(CorruptDataError) as info:
        check_record(*pieces(flipped), "seg", 7)
    assert info.value.offset == 7
    # Pieces that are not the record's length, a header cut short, a longer header.
    header, body = pieces(rec)
    with pytest.raises(CorruptDataError):
        check_record(header, [*body, b"x"], "seg", 7)
    with pytest.raises(CorruptDataError):
        check_record(header[:-1], body, "seg", 7)
    longer = bytearray(header)
    struct.pack_into("<H", longer, 2, RECORD_HEADER.size + 8)
    with pytest.raises(CorruptDataError):
        check_record(longer, body, "seg", 7)


def write_segment(
    path: Path, payloads_: list[bytes], *, tags: list[int] | None = None
) -> list[int]:
    """A segment holding one record per payload; returns the record offsets."""
    writer = SegmentWriter(path, 3, 9, create=True)
    offsets = []
    for i, payload in enumerate(payloads_):
        tag = TAG_CHUNK if tags is None else tags[i]
        digest = bytes([i]) * 32
        head = encode_record_header(
            tag, record_flags(COMPRESSION_NONE, 1), len(payload), digest, payload
        )
        offsets.append(writer.append(head, payload))
    writer.close()
    return offsets


def test_scan_segment_yields_every_record(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    contents = [os.urandom(n) for n in (0, 1, 100, 5000)]
    offsets = write_segment(path, contents)
    items = list(scan_segment(path))
    assert all(isinstance(item, Record) for item in items)
    assert [item.offset for item in items if isinstance(item, Record)] == offsets
    assert [bytes(item.payload) for item in items if isinstance(item, Record)] == contents


@given(
    sizes=st.lists(st.integers(0, 400), min_size=3, max_size=5),
    victim=st.integers(0, 4),
    data=st.data(),
)
def test_scan_resyncs_after_a_damaged_record(
    sizes: list[int], victim: int, data: st.DataObject
) -> None:
    victim %= len(sizes) - 1  # never the last: records must follow the damage
    contents = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seg"
        offsets = write_segment(path, contents)
        record_size = RECORD_HEADER.size + sizes[victim]
        bit = data.draw(st.integers(0, record_size * 8 - 1), label="bit")
        flip_file_bit(path, offsets[victim] * 8 + bit)
        items = list(scan_segment(path))
    errors = [item for item in items if isinstance(item, CorruptDataError)]
    records = [item for item in items if isinstance(item, Record)]
    assert len(errors) == 1
    assert errors[0].offset == offsets[victim]
    assert errors[0].path == str(path)
    expected = [i for i in range(len(sizes)) if i != victim]
    assert [r.offset for r in records] == [offsets[i] for i in expected]
    assert [bytes(r.payload) for r in records] == [contents[i] for i in expected]
    # The error comes where the damaged record was.
    assert items.index(errors[0]) == victim


def test_scan_yields_records_of_unknown_tags(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    contents = [b"ancillary note", b"critical future record", b"a chunk"]
    offsets = write_segment(path, contents, tags=[0x80, 0x05, TAG_CHUNK])
    items = list(scan_segment(path))
    assert [(r.tag, r.offset, bytes(r.payload)) for r in items if isinstance(r, Record)] == [
        (0x80, offsets[0], contents[0]),
        (0x05, offsets[1], contents[1]),
        (TAG_CHUNK, offsets[2], contents[2]),
    ]
    assert len(items) == 3

    # Their checksums are verified like any other record's.
    for damaged in (0, 1):
        bit = (offsets[damaged] + RECORD_HEADER.size + 3) * 8 + 5
        flip_file_bit(path, bit)
        items = list(scan_segment(path))
        flip_file_bit(path, bit)
        assert isinstance(items[damaged], CorruptDataError)
        assert items[damaged].offset == offsets[damaged]
        assert [r.tag for r in items if isinstance(r, Record)] == [
            t for i, t in enumerate([0x80, 0x05, TAG_CHUNK]) if i != damaged
        ]


def test_scan_reports_a_segment_shorter_than_published(tmp_path: Path) -> None:
    path = tmp_path / "seg"
    write_segment(path, [b"x" * 100])
    size = path.stat().st_size
    items = list(scan_segment(path, limit=size + 10))
    assert isinstance(items[0], CorruptDataError)
    assert "shorter" in items[0].message
    assert isinstance(items[1], Record)


# --- the store header -----------------------------------------------------------------


def test_header_round_trip(tmp_path: Path) -> None:
    config = StoreConfig(
        digest_function="blake3",
        chunking=ChunkingParams(min_size=2048, avg_size=8192, max_size=65536),
        compression=CompressionParams(level=9, min_saving=0.1),
        segments=SegmentParams(max_size=8 << 20, shard_levels=2, shard_width=1),
    )
    write_header(tmp_path, config)
    assert read_header(tmp_path).config == config
    doc = json.loads((tmp_path / HEADER_NAME).read_text())
    assert doc["format"] == FORMAT_NAME
    assert doc["format_version"] == STORE_FORMAT_VERSION == 5
    assert doc["chunking"]["normalization"] == 2
    assert doc["digest_function"] == "blake3"
    assert doc["chunking"]["avg_size"] == 8192
    assert not [p for p in tmp_path.iterdir() if p.name != HEADER_NAME]  # no temp file left


def rewrite_header(store: Path, **changes: object) -> None:
    path = store / HEADER_NAME
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_a_header_of_format_2_cut_chunks_with_normalization_1(tmp_path: Path) -> None:
    write_header(tmp_path, StoreConfig())
    doc = json.loads((tmp_path / HEADER_NAME).read_text())
    del doc["chunking"]["normalization"]
    rewrite_header(tmp_path, format_version=2, chunking=doc["chunking"])
    header = read_header(tmp_path)
    assert header.format_version == 2
    assert header.config.chunking.normalization == 1
    set_format_version(tmp_path, STORE_FORMAT_VERSION)  # what the upgrade does
    doc = json.loads((tmp_path / HEADER_NAME).read_text())
    assert doc["chunking"]["normalization"] == 1
    assert read_header(tmp_path).config.chunking == header.config.chunking


@pytest.mark.parametrize("level", [-1, 4])
def test_a_normalization_level_out_of_range_is_refused(level: int) -> None:
    with pytest.raises(ConfigError, match="normalization level"):
        ChunkingParams(normalization=level).validate()


@pytest.mark.parametrize("version", [6, 99, 0, -1, "1", 1.5, True, None])
def test_header_with_unsupported_version_is_refused(tmp_path: Path, version: object) -> None:
    write_header(tmp_path, StoreConfig())
    rewrite_header(tmp_path, format_version=version)
    with pytest.raises(FormatVersionError, match="format version") as info:
        read_header(tmp_path)
    assert info.value.exit_code == 6
    assert "nothing was modified" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b"\xff\xfe\x00", b'"cachefs-store"'],
    ids=["syntax", "empty", "list", "binary", "string"],
)
def test_garbage_header_is_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / HEADER_NAME).write_bytes(content)
    with pytest.raises(CorruptDataError, match="unreadable store header"):
        read_header(tmp_path)


@pytest.mark.parametrize(
    "changes",
    [
        {"chunking": {"min_size": 10, "avg_size": 5, "max_size": 1}},
        {"digest_function": "md5"},
        {"segments": {"max_size": 1 << 20, "bogus": 1}},
        {"compression": None},
        {"digest_function": 5},
        {"chunking": "fastcdc"},
    ],
    ids=["bad-chunking", "bad-digest", "unknown-field", "null-section", "digest-type", "str"],
)
def test_header_with_bad_fields_is_corrupt(tmp_path: Path, changes: dict[str, object]) -> None:
    write_header(tmp_path, StoreConfig())
    rewrite_header(tmp_path, **changes)
    with pytest.raises(CorruptDataError, match="bad or missing fields"):
        read_header(tmp_path)


def test_digest_function_names_are_case_insensitive(tmp_path: Path) -> None:
    config = StoreConfig(digest_function="BLAKE3")
    assert config == StoreConfig(digest_function="blake3")
    assert config.digest.name == "blake3"
    with Store.open(tmp_path / "store", create=True, config=config) as store:
        digest = store.put(b"named by blake3")
    assert json.loads((tmp_path / "store" / HEADER_NAME).read_text())["digest_function"] == "blake3"
    with Store.open(tmp_path / "store") as store:
        assert store.digest_function.name == "blake3"
        assert store.read(digest) == b"named by blake3"
    # A header edited by hand to another spelling still opens.
    rewrite_header(tmp_path / "store", digest_function="Blake3")
    assert read_header(tmp_path / "store").config.digest.name == "blake3"
    with pytest.raises(ConfigError, match="unknown digest function"):
        StoreConfig(digest_function="md5").validate()


def test_header_of_another_format_is_not_a_store(tmp_path: Path) -> None:
    write_header(tmp_path, StoreConfig())
    rewrite_header(tmp_path, format="something-else")
    with pytest.raises(StoreNotFoundError):
        read_header(tmp_path)


def test_missing_store_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no store"):
        read_header(tmp_path / "nope")
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "nope")
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "nope", readonly=True)
    assert not (tmp_path / "nope").exists()
    # An existing directory without a header is not a store either, and stays empty.
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="not a cachefs store"):
        Store.open(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_create_in_a_non_store_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and not a cachefs store") as info:
        Store.open(tmp_path, create=True)
    assert info.value.exit_code == 2
    assert not (tmp_path / HEADER_NAME).exists()


def test_refused_create_leaves_the_directory_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError):
        Store.open(tmp_path, create=True)
    assert snapshot(tmp_path) == before


@pytest.fixture
def newer_store(tmp_path: Path) -> Path:
    """A store made by this version, then marked as written by a newer one."""
    path = tmp_path / "store"
    with Store.open(path, create=True) as store:
        store.put(b"payload that must survive" * 100)
    rewrite_header(path, format_version=STORE_FORMAT_VERSION + 1)
    return path


@pytest.mark.parametrize(
    "kwargs", [{}, {"readonly": True}, {"create": True}], ids=["write", "readonly", "create"]
)
def test_newer_store_is_refused_and_not_modified(newer_store: Path, kwargs: dict[str, Any]) -> None:
    before = snapshot(newer_store)
    with pytest.raises(FormatVersionError):
        Store.open(newer_store, **kwargs)
    assert snapshot(newer_store) == before


@pytest.mark.parametrize("kwargs", [{}, {"readonly": True}], ids=["write", "readonly"])
def test_newer_store_of_unknown_layout_is_not_modified(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    # A future layout need not have the files this version expects (a lock file).
    write_header(tmp_path, StoreConfig())
    rewrite_header(tmp_path, format_version=STORE_FORMAT_VERSION + 1)
    (tmp_path / "future-data").write_bytes(b"\0" * 64)
    before = snapshot(tmp_path)
    with pytest.raises(FormatVersionError):
        Store.open(tmp_path, **kwargs)
    assert snapshot(tmp_path) == before


# --- the write-ahead log ----------------------------------------------------------------


def make_wal(directory: Path, payloads_: list[bytes]) -> list[int]:
    """A WAL holding one record per payload; returns each record's file offset."""
    wal = Journal(directory, fsync=False)
    offsets = []
    for i, payload in enumerate(payloads_):
        offsets.append(wal.size)
        wal.append(i % 7, payload)
    wal.close()
    return offsets


def test_wal_record_encoding() -> None:
    payload = b"hello wal"
    head = jfmt.encode_record(5, 3, payload)
    assert len(head) == jfmt.RECORD.size == 24
    checksum, seq, length, kind = jfmt.RECORD.unpack(head)
    assert (seq, length, kind) == (5, len(payload), 3)
    assert checksum == xxhash.xxh3_64_intdigest(head[8:] + payload)


def test_wal_round_trip(tmp_path: Path) -> None:
    contents = [b"", b"a", os.urandom(1000), b"z" * 70000]
    make_wal(tmp_path, contents)
    assert (tmp_path / "journal.log").read_bytes()[:8] == jfmt.MAGIC
    wal = Journal(tmp_path, fsync=False)
    try:
        records = wal.replay()
        assert [r.seq for r in records] == [1, 2, 3, 4]
        assert [r.kind for r in records] == [0, 1, 2, 3]
        assert [r.payload for r in records] == contents
        assert wal.replay() == records
        assert wal.truncated_bytes == 0
        assert wal.next_seq == 5
    finally:
        wal.close()


@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), data=st.data())
def test_wal_bit_flip_cuts_the_log_at_the_damaged_record(
    sizes: list[int], data: st.DataObject
) -> None:
    contents = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        offsets = make_wal(directory, contents)
        path = directory / "journal.log"
        size = path.stat().st_size
        bit = data.draw(st.integers(jfmt.HEADER.size * 8, size * 8 - 1), label="bit")
        flip_file_bit(path, bit)
        damaged = max(i for i, off in enumerate(offsets) if off * 8 <= bit)

        wal = Journal(directory, fsync=False)
        try:
            records = wal.replay()
            assert [r.payload for r in records] == contents[:damaged]
            assert [r.seq for r in records] == list(range(1, damaged + 1))
            assert wal.truncated_bytes == size - offsets[damaged]
            assert path.stat().st_size == offsets[damaged]
            assert wal.next_seq == damaged + 1  # the next append reuses the cut number
        finally:
            wal.close()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-5],  # last record cut mid-payload
        lambda b: b[: -(jfmt.RECORD.size + 50) + 3],  # last record cut mid-header
        lambda b: b + os.urandom(100),  # garbage after the last record
        lambda b: b + b"\0" * 10,  # a few zero bytes (less than a header)
        lambda b: b + b"\0" * 4096,  # a preallocated zero tail
    ],
    ids=["mid-payload", "mid-header", "garbage", "short-zeros", "zeros"],
)
def test_wal_torn_tail_is_cut_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object
) -> None:
    contents = [b"first" * 10, b"second" * 10, b"x" * 50]
    offsets = make_wal(tmp_path, contents)
    path = tmp_path / "journal.log"
    intact = path.read_bytes()
    assert callable(damage)
    torn = damage(intact)
    path.write_bytes(torn)
    keep = len(intact) if len(torn) > len(intact) else offsets[-1]
    with caplog.at_level(logging.WARNING, logger="cachefs.engine._journal"):
        wal = Journal(tmp_path, fsync=False)
    try:
        kept = contents if keep == len(intact) else contents[:-1]
        assert [r.payload for r in wal.replay()] == kept
        assert wal.truncated_bytes == len(torn) - keep
        assert path.stat().st_size == keep
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"{len(torn) - keep} bytes" in warnings[0].getMessage()
        # The log continues cleanly after the cut.
        seq = wal.append(1, b"after")
        assert seq == len(kept) + 1
    finally:
        wal.close()
    wal = Journal(tmp_path, fsync=False)
    try:
        assert [r.payload for r in wal.replay()] == [*kept, b"after"]
        assert wal.truncated_bytes == 0
    finally:
        wal.close()


def test_wal_intact_log_logs_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_wal(tmp_path, [b"a", b"b"])
    with caplog.at_level(logging.WARNING, logger="cachefs.engine._journal"):
        Journal(tmp_path, fsync=False).close()
    assert not caplog.records


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_wal_damaged_header_is_corrupt(tmp_path: Path) -> None:
    make_wal(tmp_path, [b"a"])
    flip_file_bit(tmp_path / "journal.log", 17 * 8)
    fds = open_fds()
    with pytest.raises(CorruptDataError, match="header is damaged"):
        Journal(tmp_path)
    (tmp_path / "journal.log").write_bytes(b"CFSWAL")
    with pytest.raises(CorruptDataError, match="shorter than its header"):
        Journal(tmp_path)
    assert open_fds() == fds  # a refused log leaves no descriptor open


def test_wal_newer_version_is_refused(tmp_path: Path) -> None:
    body = jfmt.HEADER.pack(jfmt.MAGIC, jfmt.FORMAT_VERSION + 1, jfmt.HEADER.size, 0, 1, 0)[:24]
    (tmp_path / "journal.log").write_bytes(body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
    before = (tmp_path / "journal.log").read_bytes()
    with pytest.raises(FormatVersionError):
        Journal(tmp_path)
    assert (tmp_path / "journal.log").read_bytes() == before


def test_a_journal_of_version_1_is_read_and_the_next_is_version_2(tmp_path: Path) -> None:
    """Version 2 added FILE_WRITE_SPOOLED (which version 1 would skip): a
    version 1 journal is replayed as it is; a checkpoint writes version 2."""
    body = jfmt.HEADER.pack(jfmt.MAGIC, 1, jfmt.HEADER.size, 0, 7, 0)[:24]
    record = jfmt.encode_record(7, jfmt.FILE_TRUNCATE, b"x" * 24)
    (tmp_path / "journal.log").write_bytes(
        body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + record + b"x" * 24
    )

    def version() -> int:
        return int(jfmt.HEADER.unpack_from((tmp_path / "journal.log").read_bytes())[1])

    wal = Journal(tmp_path, fsync=False)
    assert [(r.seq, r.kind) for r in wal.replay()] == [(7, jfmt.FILE_TRUNCATE)]
    assert version() == 1  # not rewritten: it has records
    wal.checkpoint()
    assert version() == jfmt.FORMAT_VERSION == 2
    # A clean close leaves an empty journal that any cachefs reads; the next
    # writer makes it version 2 again before it appends anything.
    wal.checkpoint(last=True)
    wal.close()
    assert version() == 1
    wal = Journal(tmp_path, fsync=False)
    assert version() == 2
    assert wal.append(jfmt.FILE_TRUNCATE, b"y" * 24) == 8  # the sequence goes on
    assert wal.checkpoints == 0
    wal.close()


def test_wal_sequence_continues_after_checkpoint_and_reopen(tmp_path: Path) -> None:
    wal = Journal(tmp_path, fsync=False)
    assert [wal.append(1, b"a"), wal.append(1, b"b"), wal.append(1, b"c")] == [1, 2, 3]
    wal.checkpoint()
    assert wal.replay() == []
    assert wal.size == jfmt.HEADER.size
    assert wal.append(2, b"d") == 4
    wal.close()

    wal = Journal(tmp_path, fsync=False)
    assert wal.base_seq == 4
    assert [(r.seq, r.payload) for r in wal.replay()] == [(4, b"d")]
    assert wal.append(2, b"e") == 5
    wal.checkpoint()
    wal.close()

    wal = Journal(tmp_path, fsync=False)
    try:
        assert wal.replay() == []
        assert wal.base_seq == wal.next_seq == 6
        assert wal.append(3, b"f") == 6
    finally:
        wal.close()


def test_wal_commit_syncs_only_what_is_not_durable_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit of records an earlier sync covered costs no sync; one sync
    covers every record appended before it; a failed sync is an error that
    names the journal's sync, acknowledges nothing, and is tried again by
    the next commit."""
    wal = Journal(tmp_path, fsync=True)
    real_sync = os.fdatasync
    syncs: list[int] = []
    failing: list[OSError] = []
    watched = {wal._fd}  # the journals' descriptors (not the test runner's files)

    def counted(fd: int) -> None:
        if fd in watched:
            syncs.append(fd)
            if failing:
                raise failing.pop()
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    try:
        first, second, third = (wal.append(1, bytes([n]) * 10) for n in range(3))
        wal.commit(second)
        assert len(syncs) == 1 and wal.synced_seq == third  # the sync covered all three
        wal.commit(first)
        wal.commit(third)
        wal.commit()
        assert len(syncs) == 1
        fourth = wal.append(1, b"four")
        failing.append(OSError(errno.EIO, os.strerror(errno.EIO)))
        with pytest.raises(CachefsError, match="syncing the journal: Input/output error"):
            wal.commit(fourth)
        assert wal.synced_seq == third and len(syncs) == 2
        wal.commit(fourth)  # tried again
        assert wal.synced_seq == fourth and len(syncs) == 3
    finally:
        wal.close()
    unsynced = Journal(tmp_path, fsync=False)
    watched.add(unsynced._fd)
    try:
        unsynced.commit(unsynced.append(1, b"five"))
        assert len(syncs) == 3  # survives the process, not the machine: no sync
    finally:
        unsynced.close()


def test_wal_refuses_a_record_larger_than_a_payload_may_be(tmp_path: Path) -> None:
    wal = Journal(tmp_path, fsync=False)
    try:
        wal.append(1, b"before")
        size = wal.size
        piece = bytes(jfmt.MAX_PAYLOAD // 4)
        with pytest.raises(ValueError, match="too large"):
            wal.append(1, piece, piece, piece, piece, b"!")
        assert wal.size == size and (tmp_path / "journal.log").stat().st_size == size
        assert wal.append(1, b"after") == 2
    finally:
        wal.close()


def test_wal_where_no_journal_can_be_says_where(tmp_path: Path) -> None:
    """A journal directory that is a file (or cannot be made) is an error
    naming the journal, not a traceback."""
    blocked = tmp_path / "journal"
    blocked.write_bytes(b"not a directory")
    with pytest.raises(CachefsError, match=f"opening the journal {blocked}/journal.log"):
        Journal(blocked)


def test_wal_group_commit_from_many_threads(tmp_path: Path) -> None:
    wal = Journal(tmp_path, fsync=True)
    threads_n, per_thread = 8, 40
    acknowledged: list[list[int]] = [[] for _ in range(threads_n)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def writer(n: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                seq = wal.append(n, struct.pack("<II", n, i) + bytes([n]) * (i * 13 % 200))
                wal.commit(seq)
                assert wal.synced_seq >= seq
                acknowledged[n].append(seq)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    wal.close()

    wal = Journal(tmp_path, fsync=False)
    try:
        records = wal.replay()
        assert wal.truncated_bytes == 0
        assert [r.seq for r in records] == list(range(1, threads_n * per_thread + 1))
        seen: dict[int, list[int]] = {n: [] for n in range(threads_n)}
        for record in records:
            n, i = struct.unpack_from("<II", record.payload)
            assert record.kind == n
            assert record.payload[8:] == bytes([n]) * (i * 13 % 200)
            seen[n].append(i)
        # Each thread's records are all there, in the order it wrote them.
        assert all(seen[n] == list(range(per_thread)) for n in range(threads_n))
        for n in range(threads_n):
            assert [r.seq for r in records if r.kind == n] == acknowledged[n]
    finally:
        wal.close()
