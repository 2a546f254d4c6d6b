"""The storage engine: ingest, dedup, compression, reads, references, damage, locking,
concurrency and a full disk."""

from __future__ import annotations

import errno
import hashlib
import io
import mmap
import os
import platform
import random
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefs import errors
from cachefs.engine import Journal, KnownChunks, Source, Store, StoreOptions, collect_garbage
from cachefs.engine import _segments as segments_module
from cachefs.engine._chunker import Chunker, reader_for
from cachefs.errors import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    DigestMismatchError,
    NotFoundError,
    ObjectNotFoundError,
    ReadOnlyError,
    StoreFullError,
    StoreLockedError,
    from_oserror,
)
from cachefs.format.digest import Digest
from cachefs.format.header import ChunkingParams, SegmentParams, StoreConfig
from cachefs.format.schema import ChunkEntry
from cachefs.format.segment import (
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    RECORD_HEADER,
    segment_path,
    shard_of,
)
from cachefs.fsutil import cached_pages
from tests.conftest import SMALL_CONFIG, compressible, flip_first_chunk

MIN_CHUNK = SMALL_CONFIG.chunking.min_size
MAX_CHUNK = SMALL_CONFIG.chunking.max_size


def rand(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256_digest(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()}/{len(data)}"


def chunk_entries(store: Store, digest: Digest) -> list[tuple[bytes, ChunkEntry]]:
    """The chunk index entries of an object's chunks, in recipe order."""
    recipe = store.recipe(digest)
    with store.index.read() as txn:
        found = [(d, store.index.get_chunk(txn, d)) for d, _ in recipe]
    assert all(entry is not None for _, entry in found)
    return [(d, e) for d, e in found if e is not None]


def chunk_file(store: Store, chunk: bytes, entry: ChunkEntry) -> Path:
    shard = shard_of(chunk, store.config.segments)
    return segment_path(store.segments_root, shard, entry.segment_id, store.config.segments)


def check_invariants(store: Store) -> None:
    """What fsck checks of the index, recounted from scratch (the store must be idle)."""
    index = store.index
    with index.read() as txn:
        chunks = dict(index.iter_chunks(txn))
        objects = dict(index.iter_objects(txn))
        segments = dict(index.iter_segments(txn))
        counters = index.counters_dict(txn)
    refs: Counter[bytes] = Counter()
    for obj in objects.values():
        assert obj.refcount >= 1
        assert sum(n for _, n in obj.chunks) == obj.size
        for chunk, raw_len in obj.chunks:
            assert chunk in chunks, "recipe names a chunk missing from the index"
            assert chunks[chunk].raw_len == raw_len
        refs.update(d for d, _ in obj.chunks)
    live: dict[int, list[int]] = {}
    for chunk, entry in chunks.items():
        assert entry.refcount == refs[chunk], f"refcount of {chunk.hex()}"
        seg = live.setdefault(entry.segment_id, [0, 0])
        seg[0] += RECORD_HEADER.size + entry.stored_len
        seg[1] += 1
        assert entry.segment_id in segments
        assert entry.offset + RECORD_HEADER.size + entry.stored_len <= (
            segments[entry.segment_id].length
        )
    for segment_id, seg_entry in segments.items():
        assert [seg_entry.live_bytes, seg_entry.live_records] == live.get(segment_id, [0, 0])
        path = segment_path(store.segments_root, seg_entry.shard, segment_id, store.config.segments)
        assert path.stat().st_size == seg_entry.length
    assert counters["objects"] == len(objects)
    assert counters["files"] == sum(o.refcount for o in objects.values())
    assert counters["logical_bytes"] == sum(o.size * o.refcount for o in objects.values())
    assert counters["chunks"] == len(chunks)
    assert counters["chunk_bytes"] == sum(e.raw_len for e in chunks.values())
    assert counters["stored_bytes"] == sum(
        RECORD_HEADER.size + e.stored_len for e in chunks.values()
    )


# --- round trips ------------------------------------------------------------------------


class ReadOnlyStream:
    """A source with only ``read`` (no ``readinto``), returning short reads."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, size: int = -1, /) -> bytes:
        size = min(size, 777) if size >= 0 else len(self._data)
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out


def pieces(data: bytes) -> Iterator[bytes]:
    """Irregular pieces, with empty ones among them."""
    rng = random.Random(len(data))
    pos = 0
    while pos < len(data):
        n = rng.choice([0, 1, 100, 5000, 70000])
        yield data[pos : pos + n]
        pos += n
    yield b""


def as_source(kind: str, data: bytes, tmp_path: Path) -> object:
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "bytesio":
        return io.BytesIO(data)
    if kind == "file":
        path = tmp_path / "source"
        path.write_bytes(data)
        return open(path, "rb")
    if kind == "read-only":
        return ReadOnlyStream(data)
    assert kind == "iterator"
    return pieces(data)


SIZES = {
    "empty": 0,
    "one-byte": 1,
    "min-chunk": MIN_CHUNK,
    "min-chunk+1": MIN_CHUNK + 1,
    "max-chunk": MAX_CHUNK,
    "many-chunks": 300_000,
}


@pytest.mark.parametrize(
    "kind", ["bytes", "bytearray", "memoryview", "bytesio", "file", "read-only", "iterator"]
)
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_put_read_round_trip(store: Store, tmp_path: Path, kind: str, size: int) -> None:
    data = rand(size // 2, seed=size) + compressible(size - size // 2, seed=size)
    source = as_source(kind, data, tmp_path)
    try:
        digest = store.put(source)  # type: ignore[arg-type]
    finally:
        if isinstance(source, io.IOBase):
            source.close()
    assert str(digest) == sha256_digest(data)
    assert digest.hex == hashlib.sha256(data).hexdigest()
    assert digest.size == size
    assert Digest.parse(str(digest)) == digest
    assert store.read(digest) == data
    assert b"".join(store.iter_object(digest)) == data
    assert store.contains(digest)
    recipe = store.recipe(digest)
    assert sum(n for _, n in recipe) == size
    assert all(n <= MAX_CHUNK for _, n in recipe)
    if size <= MIN_CHUNK:
        assert len(recipe) == 1  # an object below the minimum is one chunk
    if size > 200_000:
        assert len(recipe) > 10
    check_invariants(store)


def test_empty_object(store: Store) -> None:
    digest = store.put(b"")
    assert str(digest) == sha256_digest(b"")
    assert store.read(digest) == b""
    assert list(store.iter_object(digest)) in ([], [b""], [memoryview(b"")])
    assert store.stats().files == 1
    assert store.put(iter([])) == digest  # an empty iterator is the same object
    assert store.stats().objects == 1


def test_object_larger_than_the_ingest_buffer(tmp_path: Path) -> None:
    data = rand(600_000, seed=1) + compressible(600_000, seed=2)
    recipes = []
    for name, buffer_size in [("small", 1), ("large", 64 << 20)]:
        options = StoreOptions(buffer_size=buffer_size)
        with Store.open(tmp_path / name, create=True, config=SMALL_CONFIG, options=options) as s:
            assert s.chunker.buffer_size == (2 * MAX_CHUNK if name == "small" else 64 << 20)
            digest = s.put(io.BytesIO(data))
            assert str(digest) == sha256_digest(data)
            assert s.read(digest) == data
            recipes.append(s.recipe(digest))
            check_invariants(s)
    # Cutting in buffers gives the same chunks as cutting the whole object at once.
    assert recipes[0] == recipes[1]
    assert all(MIN_CHUNK <= n <= MAX_CHUNK for _, n in recipes[0][:-1])


@given(
    parts=st.lists(
        st.tuples(st.sampled_from(["random", "zeros", "pattern"]), st.integers(0, 50_000)),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**32),
    buffer_size=st.sampled_from([1, 40_000, 100_000]),
)
def test_chunks_do_not_depend_on_the_buffer_size(
    parts: list[tuple[str, int]], seed: int, buffer_size: int
) -> None:
    rng = random.Random(seed)
    data = b"".join(
        rng.randbytes(n) if kind == "random" else bytes(n) if kind == "zeros" else b"ab3" * (n // 3)
        for kind, n in parts
    )
    whole = Chunker(SMALL_CONFIG.chunking, 1 << 30).cut(memoryview(data))
    chunker = Chunker(SMALL_CONFIG.chunking, buffer_size)
    # Buffers take turns: a batch's bytes must be taken before the batch after next.
    batches = [[bytes(c) for c in b.chunks] for b in chunker.batches(reader_for(io.BytesIO(data)))]
    assert all(batches)
    assert [c for batch in batches for c in batch] == [bytes(c) for c in whole]


def test_twenty_mib_object_with_the_default_buffer(default_store: Store) -> None:
    data = rand(20 << 20, seed=3)
    digest = default_store.put(pieces(data))
    assert str(digest) == sha256_digest(data)
    assert default_store.read(digest) == data
    assert default_store.read(digest, (4 << 20) - 10, 20) == data[(4 << 20) - 10 : (4 << 20) + 10]
    check_invariants(default_store)


@pytest.mark.parametrize("size", [0, 100, 300_000])
def test_blake3_store(tmp_path: Path, size: int) -> None:
    config = StoreConfig(
        digest_function="blake3", chunking=SMALL_CONFIG.chunking, segments=SMALL_CONFIG.segments
    )
    data = compressible(size, seed=size)
    with Store.open(tmp_path / "b3", create=True, config=config) as store:
        digest = store.put(data)
        assert str(digest) == f"{blake3.blake3(data).hexdigest()}/{size}"
        assert store.read(digest) == data
        for chunk, entry in chunk_entries(store, digest):
            raw = store.read_chunk(chunk)
            assert blake3.blake3(raw).digest() == chunk
            assert (entry.flags >> 4) & 7 == 2  # the blake3 id in the record flags
    with Store.open(tmp_path / "b3") as store:  # the header keeps the choice
        assert store.config.digest_function == "blake3"
        assert store.read(digest) == data


@pytest.mark.parametrize(("levels", "width"), [(2, 2), (1, 3), (3, 1)])
def test_too_many_shards_are_refused(tmp_path: Path, levels: int, width: int) -> None:
    """Every shard keeps a segment open: more than 256 would run out of descriptors."""
    config = StoreConfig(segments=SegmentParams(shard_levels=levels, shard_width=width))
    with pytest.raises(ConfigError):
        Store.open(tmp_path / "store", create=True, config=config)
    assert not (tmp_path / "store" / "cachefs-store.json").exists()


def test_segments_must_hold_the_largest_chunk(tmp_path: Path) -> None:
    config = StoreConfig(
        chunking=ChunkingParams(min_size=1 << 20, avg_size=2 << 20, max_size=4 << 20),
        segments=SegmentParams(max_size=2 << 20),
    )
    with pytest.raises(ConfigError, match="cannot hold chunks"):
        config.validate()


@pytest.mark.parametrize(("levels", "width"), [(0, 1), (1, 1), (1, 2), (2, 1)])
def test_segment_rotation_sharding_and_reopen(tmp_path: Path, levels: int, width: int) -> None:
    max_size = 1 << 20
    config = StoreConfig(
        chunking=SMALL_CONFIG.chunking,
        segments=SegmentParams(max_size=max_size, shard_levels=levels, shard_width=width),
    )
    path = tmp_path / "store"
    objects: list[tuple[Digest, bytes]] = []
    for round_ in range(3):
        with Store.open(path, create=True, config=config) as store:
            for i in range(2):
                data = rand(700_000, seed=900 + 10 * round_ + i)
                objects.append((store.put(data), data))
            for digest, data in objects:
                assert store.read(digest) == data
            check_invariants(store)
            stats = store.stats()
    files = list((path / "segments").rglob("*.seg"))
    assert len(files) == stats.segments
    assert all(f.stat().st_size <= max_size for f in files)  # rotated before overflowing
    for f in files:  # <shard dirs>/<group>/<id>.seg
        parts = f.relative_to(path / "segments").parts
        assert len(parts) == levels + 2
        assert all(len(part) == width for part in parts[:levels])
        assert parts[levels] == "000000"
    with Store.open(path, readonly=True) as store, store.index.read() as txn:
        for chunk, entry in store.index.iter_chunks(txn):
            assert chunk_file(store, chunk, entry).exists()
    if levels == 0:
        assert stats.segments >= 4  # 4.2 MB in segments of 1 MiB
    else:
        # A reopened writer continues each shard's last segment instead of starting anew.
        assert stats.segments <= config.segments.shard_count


# --- dedup and compression --------------------------------------------------------------


def test_dedup_across_objects(store: Store) -> None:
    middle = rand(1 << 20, seed=10)
    first = rand(65536, seed=11) + middle + rand(65536, seed=12)
    second = rand(65536, seed=13) + middle + rand(65536, seed=14)
    d1 = store.put(first)
    before = store.stats()
    d2 = store.put(second)
    after = store.stats()
    assert after.chunk_bytes - before.chunk_bytes < 0.3 * len(second)
    assert after.chunks - before.chunks < 0.3 * len(store.recipe(d2))
    shared = {c for c, _ in store.recipe(d1)} & {c for c, _ in store.recipe(d2)}
    assert sum(n for c, n in store.recipe(d2) if c in shared) > 0.7 * len(middle)
    assert store.read(d1) == first
    assert store.read(d2) == second
    assert after.logical_bytes == len(first) + len(second)
    check_invariants(store)


def test_dedup_within_an_object(store: Store) -> None:
    block = rand(256 << 10, seed=20)
    data = block * 4
    digest = store.put(data)
    stats = store.stats()
    assert stats.logical_bytes == len(data)
    assert stats.chunk_bytes < 0.3 * len(data)
    assert stats.dedup_ratio > 3
    recipe = store.recipe(digest)
    assert len(set(recipe)) < 0.35 * len(recipe)
    assert store.read(digest) == data
    check_invariants(store)  # refcounts count repeats within one recipe


def test_same_object_twice(store: Store) -> None:
    data = compressible(100_000) + rand(100_000)
    first = store.put(data)
    before = store.stats()
    sizes = {p: p.stat().st_size for p in store.segments_root.rglob("*.seg")}
    second = store.put(io.BytesIO(data))
    after = store.stats()
    assert first == second
    assert (after.files, after.objects) == (2, 1)
    assert after.logical_bytes == 2 * len(data)
    assert (after.chunks, after.chunk_bytes, after.stored_bytes) == (
        before.chunks,
        before.chunk_bytes,
        before.stored_bytes,
    )
    assert {p: p.stat().st_size for p in store.segments_root.rglob("*.seg")} == sizes
    assert after.dedup_ratio == pytest.approx(2 * before.dedup_ratio)
    check_invariants(store)


def compressions(store: Store, digest: Digest) -> set[int]:
    return {entry.flags & COMPRESSION_MASK for _, entry in chunk_entries(store, digest)}


@pytest.mark.parametrize("size", [1000, 300_000], ids=["below-probe", "many-chunks"])
def test_random_data_is_stored_raw(store: Store, size: int) -> None:
    data = os.urandom(size)
    digest = store.put(data)
    assert compressions(store, digest) == {COMPRESSION_NONE}
    stats = store.stats()
    assert stats.stored_bytes == stats.chunk_bytes + RECORD_HEADER.size * stats.chunks
    assert store.read(digest) == data


def test_compressible_data_is_stored_zstd(default_store: Store) -> None:
    data = compressible(2 << 20)
    digest = default_store.put(data)
    assert compressions(default_store, digest) == {COMPRESSION_ZSTD}
    stats = default_store.stats()
    assert stats.compression_ratio > 2
    assert default_store.read(digest) == data
    for chunk, _ in chunk_entries(default_store, digest):
        assert isinstance(default_store.read_chunk(chunk), bytes)


# --- zero-copy reads --------------------------------------------------------------------


def test_raw_chunks_are_views_on_the_segment_mapping(store: Store) -> None:
    data = os.urandom(100_000)
    digest = store.put(data)
    entries = chunk_entries(store, digest)
    assert len(entries) > 1
    chunk, entry = entries[0]
    view = store.read_chunk(chunk)
    assert isinstance(view, memoryview)
    assert isinstance(view.obj, mmap.mmap)
    assert view.readonly
    assert len(view) == entry.raw_len
    assert bytes(view) == data[: entry.raw_len]

    whole = list(store.iter_object(digest))
    assert len(whole) == len(entries)
    assert all(isinstance(p, memoryview) and isinstance(p.obj, mmap.mmap) for p in whole)
    part = list(store.iter_object(digest, 10, entry.raw_len))  # spans two chunks, partly
    assert len(part) == 2
    assert all(isinstance(p, memoryview) and isinstance(p.obj, mmap.mmap) for p in part)
    assert b"".join(part) == data[10 : 10 + entry.raw_len]


# --- ranged reads -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, bytes, Digest]]:
    data = compressible(60_000, seed=5) + rand(60_000, seed=6) + compressible(30_000, seed=7)
    path = tmp_path_factory.mktemp("ranged") / "store"
    with Store.open(path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(data)
        assert compressions(store, digest) == {COMPRESSION_NONE, COMPRESSION_ZSTD}
        yield store, data, digest


@given(
    offset=st.integers(0, 160_000),
    length=st.none() | st.integers(0, 170_000),
)
def test_ranged_read_matches_slicing(
    ranged: tuple[Store, bytes, Digest], offset: int, length: int | None
) -> None:
    store, data, digest = ranged
    expected = data[offset:] if length is None else data[offset : offset + length]
    assert store.read(digest, offset, length) == expected
    assert b"".join(store.iter_object(digest, offset, length)) == expected


def test_ranged_read_edges(ranged: tuple[Store, bytes, Digest]) -> None:
    store, data, digest = ranged
    size = len(data)
    assert store.read(digest, size) == b""
    assert store.read(digest, size + 1, 10) == b""
    assert store.read(digest, size - 1) == data[-1:]
    assert store.read(digest, 0, 0) == b""
    assert store.read(digest, 0, size * 2) == data
    boundary = store.recipe(digest)[0][1]
    assert store.read(digest, boundary - 1, 2) == data[boundary - 1 : boundary + 1]
    with pytest.raises(ConfigError):
        store.read(digest, -1)
    with pytest.raises(ConfigError):
        store.read(digest, 0, -1)


def test_streaming_pieces_are_bounded_by_the_chunk_size(store: Store) -> None:
    data = rand(2 << 20, seed=8)
    digest = store.put(data)
    total = 0
    for piece in store.iter_object(digest):
        assert 0 < len(piece) <= MAX_CHUNK
        assert piece == data[total : total + len(piece)]
        total += len(piece)
    assert total == len(data)


def test_reading_a_missing_object(store: Store) -> None:
    digest = store.put(b"present")
    with pytest.raises(ObjectNotFoundError, match="not in the store") as info:
        store.read(Digest(b"\1" * 32, 7))
    assert info.value.exit_code == 3
    with pytest.raises(ObjectNotFoundError):
        store.read(Digest(digest.hash, digest.size + 1))  # right hash, wrong size
    assert not store.contains(Digest(digest.hash, digest.size + 1))


def test_read_objects_of_a_batch(store: Store) -> None:
    """``read_objects`` (a server's BatchReadBlobs): each object whole, or its
    own error -- a missing one, a damaged one -- and the others still read."""
    small, large = b"small object", os.urandom(300_000)  # one chunk; many
    many = compressible(200_000, seed=3)
    digests = [store.put(small), store.put(large), store.put(many), store.put(b"")]
    pieces = {5: b"data", 70_000: b"more data"}
    sparse = store.put_sparse(
        80_000,
        [(o, o + len(p)) for o, p in pieces.items()],
        lambda start, stop: [pieces[start][: stop - start]],
    )
    holes = bytearray(80_000)
    for offset, piece in pieces.items():
        holes[offset : offset + len(piece)] = piece
    missing = Digest(b"\1" * 32, 7)
    got = store.read_objects([*digests, sparse, missing, digests[0]])
    assert got[:4] == [small, large, many, b""]
    assert got[4] == bytes(holes)
    assert isinstance(got[5], ObjectNotFoundError)
    assert got[6] == small
    flip_first_chunk(store, digests[1])
    got = store.read_objects(digests[:3])
    assert got[0] == small and got[2] == many
    assert isinstance(got[1], CorruptDataError)


# --- references and counters ------------------------------------------------------------


def test_ref_and_unref(store: Store) -> None:
    shared = rand(100_000, seed=30)
    a = store.put(shared + rand(50_000, seed=31))
    b = store.put(shared + rand(50_000, seed=32))
    a_chunks = {c for c, _ in store.recipe(a)}
    b_chunks = {c for c, _ in store.recipe(b)}
    assert a_chunks & b_chunks

    store.ref(a)
    stats = store.stats()
    assert (stats.files, stats.objects) == (3, 2)
    assert stats.logical_bytes == 2 * a.size + b.size
    check_invariants(store)

    assert store.unref(a) is False  # one reference left
    assert store.contains(a)
    assert store.unref(a) is True
    assert not store.contains(a)
    with pytest.raises(ObjectNotFoundError):
        store.read(a)
    with pytest.raises(ObjectNotFoundError):
        store.unref(a)
    with pytest.raises(ObjectNotFoundError):
        store.ref(a)
    stats = store.stats()
    assert (stats.files, stats.objects, stats.logical_bytes) == (1, 1, b.size)
    with store.index.read() as txn:
        for chunk in a_chunks:
            entry = store.index.get_chunk(txn, chunk)
            assert entry is not None  # garbage until gc
            assert entry.refcount == (1 if chunk in b_chunks else 0)
    assert store.read(b) == shared + rand(50_000, seed=32)
    check_invariants(store)

    # Putting the object again revives its chunks.
    assert store.put(shared + rand(50_000, seed=31)) == a
    assert store.read(a) == shared + rand(50_000, seed=31)
    check_invariants(store)


def test_counters_stay_consistent(store: Store) -> None:
    rng = random.Random(40)
    blocks = [rand(20_000, seed=100 + i) for i in range(6)]
    live: Counter[Digest] = Counter()
    contents: dict[Digest, bytes] = {}
    for _ in range(40):
        action = rng.choice(["put", "put", "ref", "unref"])
        if action == "put" or not live:
            data = b"".join(rng.choices(blocks, k=rng.randint(0, 4)))
            digest = store.put(data)
            contents[digest] = data
            live[digest] += 1
        elif action == "ref":
            digest = rng.choice(sorted(live))
            store.ref(digest)
            live[digest] += 1
        else:
            digest = rng.choice(sorted(live))
            assert store.unref(digest) is (live[digest] == 1)
            live[digest] -= 1
            if not live[digest]:
                del live[digest]
    stats = store.stats()
    assert stats.files == sum(live.values())
    assert stats.objects == len(live)
    assert stats.logical_bytes == sum(d.size * n for d, n in live.items())
    for digest in live:
        assert store.read(digest) == contents[digest]
    check_invariants(store)


# --- damage -----------------------------------------------------------------------------


def corrupt_payload(store: Store, chunk: bytes, entry: ChunkEntry, at: int = 0) -> Path:
    path = chunk_file(store, chunk, entry)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER.size + at)
        byte = f.read(1)[0]
        f.seek(entry.offset + RECORD_HEADER.size + at)
        f.write(bytes([byte ^ 0x01]))
    return path


@pytest.mark.parametrize("kind", ["raw", "zstd"])
def test_corrupt_chunk_fails_the_read_loudly(store_path: Path, kind: str) -> None:
    data = os.urandom(60_000) if kind == "raw" else compressible(60_000)
    other = rand(40_000, seed=50)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(data)
        safe = store.put(other)
        chunk, entry = chunk_entries(store, digest)[1]
        expected = COMPRESSION_NONE if kind == "raw" else COMPRESSION_ZSTD
        assert entry.flags & COMPRESSION_MASK == expected
    path = corrupt_payload(store, chunk, entry, at=entry.stored_len // 2)

    with Store.open(store_path) as store:
        assert not store.needs_fsck
        with pytest.raises(CorruptDataError) as info:
            store.read(digest)
        message = str(info.value)
        assert str(path) in message
        assert f"offset {entry.offset}" in message
        assert info.value.path == str(path)
        assert info.value.offset == entry.offset
        assert info.value.exit_code == 4
        assert "fsck" in info.value.hint
        assert store.needs_fsck
        assert store.corruptions == 1
        with pytest.raises(CorruptDataError):
            store.read_chunk(chunk)
        with pytest.raises(CorruptDataError):
            b"".join(store.iter_object(digest))
        # The ranges that do not touch the damaged chunk still read.
        first_len = store.recipe(digest)[0][1]
        assert store.read(digest, 0, first_len) == data[:first_len]
        assert store.read(safe) == other


def test_damage_is_seen_through_a_warm_store(store: Store) -> None:
    raw = os.urandom(30_000)
    packed = compressible(30_000, seed=9)
    d_raw, d_packed = store.put(raw), store.put(packed)
    assert store.read(d_raw) == raw  # maps the segment, fills the chunk cache
    assert store.read(d_packed) == packed
    for digest in (d_raw, d_packed):
        chunk, entry = chunk_entries(store, digest)[0]
        corrupt_payload(store, chunk, entry)
        with pytest.raises(CorruptDataError):
            store.read(digest)
    assert store.needs_fsck
    assert store.corruptions == 2


def test_damaged_record_header_is_corrupt(store: Store) -> None:
    data = os.urandom(10_000)
    digest = store.put(data)
    chunk, entry = chunk_entries(store, digest)[0]
    path = chunk_file(store, chunk, entry)
    with open(path, "r+b") as f:  # a bit of the digest in the record header
        f.seek(entry.offset + 20)
        byte = f.read(1)[0]
        f.seek(entry.offset + 20)
        f.write(bytes([byte ^ 0x40]))
    with pytest.raises(CorruptDataError, match="checksum mismatch"):
        store.read(digest)
    assert store.needs_fsck


def mixed(size: int, seed: int) -> bytes:
    """Pieces of random and of compressible bytes: chunks stored raw and zstd."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = rng.randrange(2_000, 40_000)
        out += (
            rng.randbytes(n) if rng.random() < 0.6 else compressible(n, seed=rng.randrange(1 << 30))
        )
    return bytes(out[:size])


@pytest.mark.parametrize("cached", ["all", "none", "unknown"])
def test_read_range_copies_raw_chunks_straight_into_one_buffer(
    store: Store, monkeypatch: pytest.MonkeyPatch, cached: str
) -> None:
    """Raw chunks in the page cache are copied into the buffer (``preadv``);
    the others (``cachestat`` says they are not there, or cannot say) are
    read through the mapping, as are compressed ones: the same bytes."""
    data = mixed(600_000, seed=3)
    digest = store.put(data)
    kinds = {entry.flags & COMPRESSION_MASK for _, entry in chunk_entries(store, digest)}
    assert kinds == {COMPRESSION_NONE, COMPRESSION_ZSTD}
    asked = []

    def cached_pages(*args: int) -> int | None:
        asked.append(args)
        return 0 if cached == "none" else None

    if cached != "all":
        monkeypatch.setattr(segments_module, "cached_pages", cached_pages)
    maps = store.segments.maps
    calls = Counter[tuple[str, bool]]()
    for name in ("read_into", "read"):
        method = getattr(maps, name)

        def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
            answer = _method(*args)
            calls[_name, answer is not None] += 1
            return answer

        monkeypatch.setattr(maps, name, counted)
    rng = random.Random(4)
    ranges = [(0, len(data)), (len(data) - 10, 100), (len(data), 5), (7, 0)]
    ranges += [(rng.randrange(len(data)), rng.randrange(1, 200_000)) for _ in range(200)]
    for offset, length in ranges:
        got = store.read_range(digest, offset, length)
        assert bytes(got) == data[offset : offset + length], (offset, length)
    # Raw chunks of a range of several: copied in when cached, else mapped.
    assert (calls["read_into", True] > 0) is (cached == "all")
    assert calls["read", True] > 0  # the compressed ones, at least
    if cached == "unknown":  # asked once, then not again
        assert len(asked) == 1
    elif cached == "none":
        assert len(asked) == calls["read_into", False] > 0
    # Inside one raw chunk: a view on the mapping, no copy.
    recipe = store.recipe(digest)
    i = next(i for i, (_, e) in enumerate(chunk_entries(store, digest)) if not e.flags & 3)
    start, size = sum(n for _, n in recipe[:i]), recipe[i][1]
    piece = store.read_range(digest, start + 1, size - 2)
    assert isinstance(piece, memoryview) and piece == data[start + 1 : start + size - 1]
    with pytest.raises(ConfigError):
        store.read_range(digest, -1, 10)


def test_cached_pages_says_what_the_page_cache_holds(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 << 10))
    fd = os.open(path, os.O_RDONLY)
    try:
        major, minor = (int(n) for n in platform.release().split(".")[:2])
        if (major, minor) < (6, 5):  # no cachestat(2): the caller maps the pages
            assert cached_pages(fd, 0, 64 << 10) is None
            return
        assert cached_pages(fd, 0, 64 << 10) == 16
        assert cached_pages(fd, 4095, 2) == 2  # the pages a range touches
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
        assert cached_pages(fd, 0, 64 << 10) == 0
        assert os.pread(fd, 10, 5000)
        assert (cached_pages(fd, 0, 64 << 10) or 0) > 0
    finally:
        os.close(fd)


def test_a_record_is_copied_only_well_behind_what_the_kernel_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_SegmentFile.in_cache``: cached, and cached ``READ_AHEAD`` past it
    (else the mapping, whose faults start the next read-ahead); asked once
    for the records up to twice that far."""
    path = tmp_path / "seg"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    page = mmap.PAGESIZE
    cached_upto = [20 << 20]  # the pages before it are in the page cache
    asked = []

    def cached_pages(fd: int, offset: int, length: int) -> int:
        asked.append((offset, length))
        first, last = offset // page, (offset + length - 1) // page
        return max(0, min(last, cached_upto[0] // page - 1) - first + 1)

    monkeypatch.setattr(segments_module, "cached_pages", cached_pages)
    file = segments_module._SegmentFile(path)
    ahead = segments_module.READ_AHEAD
    record = 64 << 10
    assert file.in_cache(0, record) is True
    assert len(asked) == 2  # the record, then a page 2 * READ_AHEAD past it
    for start in range(record, 2 * ahead - record, record):
        assert file.in_cache(start, start + record) is True
    assert len(asked) == 2 * 2  # asked again once, READ_AHEAD before the page
    near = cached_upto[0] - ahead  # the page READ_AHEAD past it is not cached
    assert file.in_cache(near, near + record) is False
    assert file.in_cache(cached_upto[0], cached_upto[0] + record) is False  # not cached
    cached_upto[0] = 64 << 20  # the whole file: near its end, the end is the limit
    end = (64 << 20) - record
    assert file.in_cache(end, end + record) is True
    asked.clear()
    assert file.in_cache(0, record) is True  # before what was found last: asked
    assert asked


@pytest.mark.parametrize("kind", ["raw", "zstd"])
def test_read_range_meets_damage_as_every_read_does(store_path: Path, kind: str) -> None:
    data = mixed(300_000, seed=5)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(data)
        recipe = store.recipe(digest)
        entries = chunk_entries(store, digest)
        want = COMPRESSION_NONE if kind == "raw" else COMPRESSION_ZSTD
        i = next(i for i, (_, e) in enumerate(entries) if i > 0 and e.flags & 3 == want)
        chunk, entry = entries[i]
    path = corrupt_payload(store, chunk, entry, at=entry.stored_len - 1)
    start = sum(n for _, n in recipe[:i])
    with Store.open(store_path) as store:
        # A range that takes only the first byte of the damaged chunk: its
        # checksum covers the whole record, so the damage is found.
        with pytest.raises(CorruptDataError) as info:
            store.read_range(digest, max(0, start - 5000), min(start, 5000) + 1)
        assert info.value.path == str(path) and info.value.offset == entry.offset
        assert store.needs_fsck and store.corruptions == 1
        # Ranges around it still read, from the chunks before and after.
        assert bytes(store.read_range(digest, 0, start)) == data[:start]
        after = start + entry.raw_len
        assert bytes(store.read_range(digest, after, 50_000)) == data[after : after + 50_000]


def test_read_range_reads_a_chunk_whose_segment_went_meanwhile(store: Store) -> None:
    """A segment file open for reads that gc deletes: the next read looks the
    chunks up again (their new place) and reads them there."""
    data = rand(200_000, seed=8)
    keep = store.put(data)
    gone = store.put(rand(200_000, seed=9))
    assert bytes(store.read_range(keep, 1000, 100_000)) == data[1000:101_000]
    before = {entry.segment_id for _, entry in chunk_entries(store, keep)}
    store.unref(gone)
    collect_garbage(store, threshold=0.99)
    assert not before & {entry.segment_id for _, entry in chunk_entries(store, keep)}
    assert bytes(store.read_range(keep, 1000, 100_000)) == data[1000:101_000]
    check_invariants(store)


# --- locking and read-only stores -------------------------------------------------------


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_second_writer_is_refused(store: Store, store_path: Path) -> None:
    # flock() locks belong to an open file description, so a second open in the
    # same process conflicts just like one in another process.
    with pytest.raises(StoreLockedError, match="open for writing by another process") as info:
        Store.open(store_path)
    assert info.value.exit_code == 5
    assert info.value.errno == errno.EBUSY

    result = run_python(
        """
        import sys
        from cachefs.errors import StoreLockedError
        from cachefs.engine import Store
        try:
            Store.open(sys.argv[1])
        except StoreLockedError as exc:
            print("locked", exc.exit_code)
        else:
            print("opened")
        """,
        str(store_path),
    )
    assert result.stdout.split() == ["locked", "5"], result.stderr
    # The refused openers did not disturb the writer.
    digest = store.put(b"still writable")
    assert store.read(digest) == b"still writable"


def test_lock_is_released_on_close(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(b"abc")
    with Store.open(store_path) as store:
        assert store.read(digest) == b"abc"


READER = """
import hashlib, sys
from cachefs.format.digest import Digest
from cachefs.errors import ReadOnlyError
from cachefs.engine import Store
with Store.open(sys.argv[1], readonly=True) as store:
    try:
        store.put(b"x")
    except ReadOnlyError as exc:
        print("readonly", exc.exit_code, flush=True)
    # Answer each digest line with: contained? sha256 of the bytes, files.
    for line in sys.stdin:
        digest = Digest.parse(line)
        found = store.contains(digest)
        data = store.read(digest) if found else b""
        print(found, hashlib.sha256(data).hexdigest(), store.stats().files, flush=True)
"""


def test_reader_process_beside_the_writer(store: Store, store_path: Path) -> None:
    data = compressible(50_000) + os.urandom(50_000)
    digest = store.put(data)
    later_data = os.urandom(60_000) + compressible(60_000, seed=3)
    later = Digest(hashlib.sha256(later_data).digest(), len(later_data))
    with subprocess.Popen(
        [sys.executable, "-c", READER, str(store_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as reader:
        assert reader.stdin is not None
        assert reader.stdout is not None

        def ask(digest: Digest) -> list[str]:
            assert reader.stdin is not None
            assert reader.stdout is not None
            reader.stdin.write(f"{digest}\n")
            reader.stdin.flush()
            return reader.stdout.readline().split()

        try:
            assert reader.stdout.readline().split() == ["readonly", "2"]
            assert ask(digest) == ["True", digest.hex, "1"]
            assert ask(later) == ["False", hashlib.sha256(b"").hexdigest(), "1"]
            # Published while the reader has the store (and its segments) open.
            assert store.put(later_data) == later
            assert ask(later) == ["True", later.hex, "2"]
            assert ask(digest) == ["True", digest.hex, "2"]
        finally:
            reader.stdin.close()
            stderr = reader.stderr.read() if reader.stderr else ""
            assert reader.wait(timeout=60) == 0, stderr
    # The writer carries on.
    assert store.read(store.put(b"after the reader")) == b"after the reader"


def test_read_only_store_refuses_writes(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(b"kept")
    before = {p: p.read_bytes() for p in store_path.rglob("*") if p.is_file()}
    with Store.open(store_path, readonly=True) as store:
        assert store.read(digest) == b"kept"
        for attempt in (
            lambda: store.put(b"new"),
            lambda: store.ref(digest),
            lambda: store.unref(digest),
            lambda: list(store.put_files([store_path / "lock"])),
        ):
            with pytest.raises(ReadOnlyError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert store.stats().files == 1
    after = {p: p.read_bytes() for p in store_path.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert {p: b for p, b in after.items() if "index.lmdb" not in p.name} == {
        p: b for p, b in before.items() if "index.lmdb" not in p.name
    }
    with pytest.raises(ConfigError):
        Store.open(store_path, readonly=True, create=True)


# --- concurrency ------------------------------------------------------------------------


def test_readers_while_a_writer_ingests(store: Store) -> None:
    base = [rand(30_000, seed=200 + i) + compressible(20_000, seed=i) for i in range(8)]
    published: list[tuple[Digest, bytes]] = [(store.put(d), d) for d in base]
    lock = threading.Lock()
    done = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not done.is_set() or reads[0] < 50:
                with lock:
                    digest, data = rng.choice(published)
                offset = rng.randrange(len(data))
                assert store.read(digest) == data
                assert store.read(digest, offset, 5000) == data[offset : offset + 5000]
                with lock:
                    reads[0] += 1
        except BaseException as exc:
            failures.append(exc)
            done.set()

    def writer() -> None:
        try:
            for i in range(25):
                # New objects share blocks with the published ones.
                data = base[i % 8][:25_000] + rand(15_000, seed=300 + i) + base[(i + 3) % 8]
                digest = store.put(data)
                with lock:
                    published.append((digest, data))
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert len(published) == 33
    for digest, data in published:
        assert store.read(digest) == data
    check_invariants(store)


def test_parallel_puts_of_overlapping_data(store: Store) -> None:
    blocks = [rand(12_000, seed=400 + i) for i in range(10)]
    start = threading.Barrier(4)
    results: list[list[tuple[Digest, bytes]]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def putter(n: int) -> None:
        rng = random.Random(n)
        try:
            start.wait()
            for i in range(12):
                data = b"".join(rng.choices(blocks, k=4)) + bytes([n, i]) * 500
                results[n].append((store.put(data), data))
            # Every thread also puts the very same new object.
            common = b"".join(blocks[::-1]) + b"common tail"
            results[n].append((store.put(common), common))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=putter, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    everything = [r for rs in results for r in rs]
    for digest, data in everything:
        assert str(digest) == sha256_digest(data)
        assert store.read(digest) == data
    stats = store.stats()
    assert stats.files == len(everything) == 52
    assert stats.objects == len({d for d, _ in everything})
    assert stats.chunk_bytes < 0.5 * stats.logical_bytes
    common = results[0][-1][0]
    with store.index.read() as txn:
        entry = store.index.get_object(txn, common.hash)
    assert entry is not None
    assert entry.refcount == 4
    check_invariants(store)


def test_put_with_an_expected_digest(store_path: Path) -> None:
    data = compressible(200_000, seed=31)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(data, expect=Digest(hashlib.sha256(data).digest(), len(data)))
        assert store.read(digest) == data
        before = store.stats()
        other = compressible(200_000, seed=32)
        said = Digest(hashlib.sha256(other).digest(), len(other))
        with pytest.raises(DigestMismatchError, match="digest") as info:
            store.put(data + b"!", expect=said)
        assert info.value.exit_code == 4
        # Nothing was published: no object, no reference.
        assert not store.contains(said)
        after = store.stats()
        assert (after.objects, after.files) == (before.objects, before.files)
        # A stream is checked too, with the size: the same bytes said to be shorter.
        with pytest.raises(DigestMismatchError):
            store.put(io.BytesIO(data), expect=Digest(digest.hash, len(data) - 1))
    # The records the refused puts appended are unpublished: the next writer cuts them.
    with Store.open(store_path) as store:
        check_invariants(store)
        assert store.read(digest) == data


def known(data: bytes, size: int) -> list[tuple[bytes, bytes]]:
    """``data`` cut every ``size`` bytes, each piece with its digest."""
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return [(hashlib.sha256(p).digest(), p) for p in pieces]


def test_put_of_known_chunks(store: Store) -> None:
    """Chunks that come with their digests are stored as they are: not cut
    again (a cut the store's own chunker would not make stays), deduplicated
    against what is stored, and the whole object's digest is still checked."""
    block = rand(5000, seed=50)
    data = rand(300_000, seed=51) + block * 4 + compressible(300_000, seed=52)
    pairs = known(data, 5000)  # fixed-size pieces: no FastCDC cut looks like this
    assert len(pairs) > 64  # more than one round of worker tasks
    digest = Digest(hashlib.sha256(data).digest(), len(data))
    assert store.put(KnownChunks(pairs), expect=digest) == digest
    assert store.recipe(digest) == [(d, len(p)) for d, p in pairs]
    assert store.read(digest) == data
    stats = store.stats()
    assert stats.chunks == len({d for d, _ in pairs})  # the repeated piece once
    # Known chunks of stored content store nothing new.
    other = data[:100_000]
    assert store.put(KnownChunks(known(other, 5000))) == Digest(
        hashlib.sha256(other).digest(), len(other)
    )
    assert store.stats().chunk_bytes == stats.chunk_bytes
    # One chunk, and none at all.
    assert store.put(KnownChunks(known(b"one", 5000))) == Digest(hashlib.sha256(b"one").digest(), 3)
    assert store.put(KnownChunks([])) == Digest(hashlib.sha256(b"").digest(), 0)
    # Pairs out of order are not the object: refused, nothing published.
    shuffled = [*pairs[1:], pairs[0]]
    before = store.stats()
    with pytest.raises(DigestMismatchError, match="digest"):
        store.put(KnownChunks(shuffled), expect=Digest(digest.hash, len(data)))
    after = store.stats()
    assert (after.objects, after.files) == (before.objects, before.files)
    # A plain iteration of them gives the bytes, to be cut like any source.
    assert b"".join(KnownChunks(pairs)) == data
    check_invariants(store)


def test_put_many_publishes_together(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects put together are published in one commit; one whose content is
    not its expected digest is refused alone, the others are stored."""
    blobs = [compressible(20_000, seed=40 + i) for i in range(5)]
    digests = [Digest(hashlib.sha256(b).digest(), len(b)) for b in blobs]
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        commits: list[int] = []
        commit = store.publisher._commit

        def counted(objects: list[Any], *, durable: bool) -> None:
            commits.append(len(objects))
            commit(objects, durable=durable)

        monkeypatch.setattr(store.publisher, "_commit", counted)
        seen: list[Digest] = []
        items: list[tuple[Source, Digest | None, Any]] = [
            (b, d, lambda txn, digest: seen.append(digest))
            for b, d in zip(blobs, digests, strict=True)
        ]
        items[2] = (blobs[2] + b"!", digests[2], None)  # not what it is said to be
        results = store.put_many(items)
        assert commits == [4]
        assert isinstance(results[2], DigestMismatchError)
        assert [r for i, r in enumerate(results) if i != 2] == [
            d for i, d in enumerate(digests) if i != 2
        ]
        assert seen == [d for i, d in enumerate(digests) if i != 2]
        assert not store.contains(digests[2])
        for i in (0, 1, 3, 4):
            assert store.read(digests[i]) == blobs[i]
        # Nothing to publish: no commit at all.
        assert store.put_many([(blobs[0] + b"?", digests[0], None)])[0] != digests[0]
        assert commits == [4]
    with Store.open(store_path) as store:
        check_invariants(store)


def test_put_files(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    contents = [rand(i * 7000, seed=i) + compressible(i * 3000, seed=i) for i in range(12)]
    contents[5] = contents[2]  # a duplicate file
    paths = []
    for i, data in enumerate(contents):
        path = tree / f"f{i:02d}"
        path.write_bytes(data)
        paths.append(path)
    missing = tree / "does-not-exist"
    paths.insert(4, missing)
    paths.insert(8, tree)  # a directory cannot be read as a file

    results = list(store.put_files(paths))
    assert [p for p, _ in results] == paths
    by_path = dict(results)
    error = by_path[missing]
    assert isinstance(error, NotFoundError)
    assert error.exit_code == 3
    assert "does-not-exist" in str(error)
    assert isinstance(by_path[tree], CachefsError)
    for i, data in enumerate(contents):
        digest = by_path[tree / f"f{i:02d}"]
        assert isinstance(digest, Digest)
        assert str(digest) == sha256_digest(data)
        assert store.read(digest) == data
    stats = store.stats()
    assert stats.files == 12
    assert stats.objects == 11
    check_invariants(store)


def test_put_files_publishes_in_several_groups(store: Store, tmp_path: Path) -> None:
    paths = []
    for i in range(20):
        path = tmp_path / f"g{i}"
        path.write_bytes(rand(5000, seed=600 + i))
        paths.append(path)
    results = list(store.put_files(paths, batch_bytes=12_000))
    assert [p for p, _ in results] == paths
    assert all(isinstance(d, Digest) and store.read(d) == p.read_bytes() for p, d in results)
    check_invariants(store)


# --- a full disk ------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_full_disk_fails_the_writer_and_loses_nothing(tiny_fs: Path) -> None:
    path = tiny_fs / "store"
    ballast = tiny_fs / "ballast"  # another user's file, deleted once the disk is full
    ballast.write_bytes(b"\1" * (256 << 10))
    acknowledged: list[tuple[Digest, bytes]] = []
    with Store.open(path, create=True, config=SMALL_CONFIG) as store:
        with pytest.raises(StoreFullError) as info:
            for i in range(1000):
                data = rand(150_000 + i, seed=700 + i)
                acknowledged.append((store.put(data), data))
        assert 5 < len(acknowledged) < 1000
        assert info.value.errno == errno.ENOSPC
        assert info.value.exit_code == 7
        assert "no space left" in str(info.value)
        # Nothing else broke: what was stored still reads, and a retry fails cleanly.
        for digest, data in acknowledged:
            assert store.read(digest) == data
        with pytest.raises(StoreFullError):
            store.put(rand(300_000, seed=1))
        assert store.stats().files == len(acknowledged)
    with Store.open(path) as store:
        assert store.stats().files == len(acknowledged)
        for digest, data in acknowledged:
            assert store.read(digest) == data
        check_invariants(store)
        # Space freed on the device makes the store writable again.
        ballast.unlink()
        store.unref(acknowledged[-1][0])
        collect_garbage(store)
        digest = store.put(b"small after gc")
        assert store.read(digest) == b"small after gc"
        check_invariants(store)


def fill_up(directory: Path) -> Path:
    """Take every byte left on the device of ``directory``."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_journal_checkpoint_on_a_full_disk(tiny_fs: Path) -> None:
    wal = Journal(tiny_fs / "journal", fsync=True)
    try:
        assert wal.append(1, b"logged") == 1
        filler = fill_up(tiny_fs)
        with pytest.raises(StoreFullError):
            wal.checkpoint()
        # The old log is still in place and in use.
        assert wal.append(1, b"after") == 2
        wal.commit()
        filler.unlink()
    finally:
        wal.close()
    wal = Journal(tiny_fs / "journal", fsync=True)
    try:
        assert [r.payload for r in wal.replay()] == [b"logged", b"after"]
        assert not [p for p in (tiny_fs / "journal").iterdir() if p.name != "journal.log"]
    finally:
        wal.close()


def test_close_on_a_full_disk(tiny_fs: Path) -> None:
    path = tiny_fs / "store"
    store = Store.open(path, create=True, config=SMALL_CONFIG)
    try:
        first = store.put(b"stored before the disk filled up")
        acknowledged = [first]
        with pytest.raises(StoreFullError):
            for i in range(1000):
                acknowledged.append(store.put(rand(100_000, seed=800 + i)))
        filler = fill_up(tiny_fs)
    except BaseException:
        store.close()
        raise
    # Closing publishes nothing new; a full disk must not make it fail.
    store.close()
    filler.unlink()
    with Store.open(path) as store:
        assert store.stats().files == len(acknowledged)
        assert store.read(first) == b"stored before the disk filled up"
        assert all(store.contains(d) for d in acknowledged)
        check_invariants(store)


# --- errors -----------------------------------------------------------------------------

#: class: (errno, exit code, has a default hint)
ERROR_TABLE: dict[type[CachefsError], tuple[int, int, bool]] = {
    errors.CachefsError: (errno.EIO, 1, False),
    errors.ConfigError: (errno.EINVAL, 2, False),
    errors.BadDigestError: (errno.EINVAL, 2, True),
    errors.NotFoundError: (errno.ENOENT, 3, False),
    errors.ObjectNotFoundError: (errno.ENOENT, 3, True),
    errors.StoreNotFoundError: (errno.ENOENT, 3, True),
    errors.CorruptDataError: (errno.EIO, 4, True),
    errors.StoreLockedError: (errno.EBUSY, 5, True),
    errors.FormatVersionError: (errno.EPROTONOSUPPORT, 6, True),
    errors.StoreFullError: (errno.ENOSPC, 7, True),
    errors.ReadOnlyError: (errno.EROFS, 2, True),
    errors.IndexCorruptError: (errno.EIO, 4, True),
    errors.MountError: (errno.EIO, 8, False),
    errors.FsError: (errno.ENOENT, 1, False),
    errors.DigestMismatchError: (errno.EINVAL, 4, True),
    errors.RemoteError: (errno.EIO, 9, True),
    errors.RemoteRecordError: (errno.EIO, 9, True),
    errors.HealElsewhere: (errno.EIO, 4, True),
}


def test_error_table_covers_every_class() -> None:
    classes = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, CachefsError)
    }
    assert classes == set(ERROR_TABLE)


@pytest.mark.parametrize(
    "cls", [c for c in ERROR_TABLE if c is not errors.FsError], ids=lambda c: c.__name__
)
def test_errors_carry_errno_exit_code_and_hint(cls: type[CachefsError]) -> None:
    code, exit_code, has_hint = ERROR_TABLE[cls]
    err = cls("something went wrong")
    assert isinstance(err, CachefsError)
    assert err.errno == code
    assert err.exit_code == exit_code
    assert err.message == "something went wrong"
    if has_hint:
        assert err.hint
        assert str(err) == f"something went wrong ({err.hint})"
    else:
        assert str(err) == "something went wrong"
    custom = cls("oops", hint="do this")
    assert custom.hint == "do this"
    assert str(custom) == "oops (do this)"
    assert cls("quiet", hint="").hint == ""
    assert str(cls("quiet", hint="")) == "quiet"


def test_fs_error_carries_its_errno() -> None:
    """The filesystem's refusals: a POSIX errno, its text unless one is given, no hint."""
    err = errors.FsError(errno.ENOENT)
    assert (err.errno, err.exit_code, err.hint) == (errno.ENOENT, 1, "")
    assert str(err) == os.strerror(errno.ENOENT)
    assert str(errors.FsError(errno.EPERM, "not yours")) == "not yours"


def test_corrupt_data_error_says_where() -> None:
    err = CorruptDataError("bad record", path="/s/seg", offset=96)
    assert err.message == "bad record in /s/seg at offset 96"
    assert (err.path, err.offset) == ("/s/seg", 96)
    assert CorruptDataError("bad", path="/s/seg").message == "bad in /s/seg"
    assert CorruptDataError("bad").message == "bad"


@pytest.mark.parametrize(
    ("code", "cls", "errno_", "exit_code"),
    [
        (errno.ENOSPC, StoreFullError, errno.ENOSPC, 7),
        (errno.EDQUOT, StoreFullError, errno.ENOSPC, 7),
        (errno.ENOENT, NotFoundError, errno.ENOENT, 3),
        (errno.EACCES, CachefsError, None, 1),
        (errno.EIO, CachefsError, errno.EIO, 1),
        (errno.EISDIR, CachefsError, errno.EISDIR, 1),
    ],
)
def test_from_oserror(
    code: int, cls: type[CachefsError], errno_: int | None, exit_code: int
) -> None:
    err = from_oserror(OSError(code, os.strerror(code), "/some/file"), "doing a thing")
    assert type(err) is cls
    if errno_ is not None:
        assert err.errno == errno_
    assert err.exit_code == exit_code
    assert "doing a thing" in str(err)
    if code in (errno.EACCES, errno.ENOENT):
        assert "/some/file" in str(err)
    if code == errno.EACCES:
        assert "permission denied" in str(err)
        assert err.hint


def test_a_large_ingest_tells_of_the_chunks_it_appends_readable_before_publication(
    tmp_path: Path,
) -> None:
    data = random.Random(5).randbytes(3 << 20)
    options = StoreOptions(fsync=False)
    with Store.open(tmp_path / "s", create=True, config=SMALL_CONFIG, options=options) as store:
        told: list[tuple[bytes, int]] = []
        read: list[bytes] = []

        def tell(chunks: list[tuple[bytes, int]]) -> None:
            told.extend(chunks)
            for digest, size in chunks:  # pending, not published yet: readable all the same
                got = store.chunks.read_new(digest, size)
                assert got is not None
                read.append(bytes(got))

        store.ingest.on_appended = tell
        digest = store.put(data)
        assert told == store.recipe(digest) and b"".join(read) == data
        first, size = told[0]
        assert store.chunks.read_new(first, size) == read[0]  # published: from the index
        assert store.chunks.read_new(first, size + 1) is None  # not that chunk
        assert store.chunks.read_new(b"\x01" * 32, size) is None  # not here at all
        told.clear()
        store.put(data)  # nothing new to tell
        store.put(b"small" * 100)  # small objects are stored in one go, untold
        assert told == []
