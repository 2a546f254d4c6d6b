"""Holes cost nothing: sparse objects in the engine, sparse files in a mount.

A file's holes (truncated up, skipped by a seek) are stored as holes: the
work and memory of a publication follow the bytes written, not the size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.engine import Store, check_store, collect_garbage
from cachefs.format.digest import SHA256, Digest
from cachefs.format.header import HEADER_NAME, read_header, set_format_version
from cachefs.format.schema import (
    HOLE_MARK,
    MAX_FILE_SIZE,
    SCHEMA_VERSION,
    ObjectEntry,
    may_be_sparse,
    sparse_key,
)
from tests.conftest import SMALL_CONFIG, strip_seals
from tests.mounting import Mount, content_digest, kill, mounted, start, stop

GiB = 1 << 30


def put_sparse(store: Store, size: int, pieces: dict[int, bytes]) -> Digest:
    """A sparse object of ``size`` bytes with ``pieces`` (offset: bytes) in it."""
    regions = sorted((start, start + len(data)) for start, data in pieces.items())

    def read_range(start: int, stop: int) -> Iterator[bytes]:
        for offset, data in pieces.items():
            if offset <= start < offset + len(data):
                yield data[start - offset : stop - offset]

    return store.put_sparse(size, regions, read_range)


def dense(size: int, pieces: dict[int, bytes]) -> bytes:
    out = bytearray(size)
    for offset, data in pieces.items():
        out[offset : offset + len(data)] = data
    return bytes(out)


# --- the engine ---------------------------------------------------------------------


def test_a_sparse_object_stores_its_data_and_reads_its_holes_as_zeros(store: Store) -> None:
    rng = random.Random(1)
    pieces = {0: rng.randbytes(3000), 5 << 20: rng.randbytes(100_000)}
    size = 1 << 40  # a TiB: nothing may be proportional to it
    digest = put_sparse(store, size, pieces)
    assert digest.size == size and may_be_sparse(digest.hash)
    assert store.holes(digest) == [(3000, 5 << 20), ((5 << 20) + 100_000, size)]
    assert store.read(digest, 0, 3000) == pieces[0]
    assert store.read(digest, 2990, 20) == pieces[0][-10:] + bytes(10)
    assert store.read(digest, (5 << 20) - 5, 10) == bytes(5) + pieces[5 << 20][:5]
    assert store.read(digest, size - 7) == bytes(7)
    assert store.read(digest, 1 << 39, 1 << 20) == bytes(1 << 20)
    stats = store.stats()
    assert stats.logical_bytes == size and stats.chunk_bytes == 103_000
    # The same content the same way is the same object.
    assert put_sparse(store, size, pieces) == digest
    assert store.stats().objects == 1 and store.stats().chunk_bytes == 103_000
    report = check_store(store)
    assert report.clean, report.problems


def test_a_range_read_into_one_buffer_has_zeros_for_the_holes(store: Store) -> None:
    rng = random.Random(2)
    pieces = {0: rng.randbytes(50_000), 3 << 20: rng.randbytes(70_000)}
    size = 4 << 20
    digest = put_sparse(store, size, pieces)
    data = dense(size, pieces)
    for offset, length in [(40_000, 1 << 20), ((3 << 20) - 5, 100_000), (0, size), (10, 60_000)]:
        assert bytes(store.read_range(digest, offset, length)) == data[offset : offset + length]


def test_the_content_digest_of_a_sparse_object_is_found_on_request_and_kept(
    store_path: Path,
) -> None:
    pieces = {1 << 20: b"middle", (8 << 20) - 3: b"end"}
    size = 8 << 20
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = put_sparse(store, size, pieces)
        assert store.content_digest(digest) is None  # not computed at publication
        expected = Digest(hashlib.sha256(dense(size, pieces)).digest(), size)
        assert store.content_digest(digest, compute=True) == expected
    with Store.open(store_path, readonly=True) as store:
        assert store.content_digest(digest) == expected  # kept in the index
        # A dense object's digest is its content's.
    with Store.open(store_path) as store:
        plain = store.put(b"plain")
        assert store.content_digest(plain) == plain
        assert check_store(store).clean


def test_dropping_a_sparse_object_frees_its_chunks_and_nothing_else(store: Store) -> None:
    keep = store.put(b"x" * 50_000)
    digest = put_sparse(store, 64 << 20, {10 << 20: os.urandom(40_000)})
    store.unref(digest)
    assert not store.contains(digest)
    report = collect_garbage(store, threshold=1.0)
    assert report.chunks_removed > 0
    assert store.read(keep) == b"x" * 50_000
    fsck = check_store(store)
    assert fsck.clean, fsck.problems


def test_fsck_finds_a_sparse_recipe_that_is_not_the_one_its_key_names(store: Store) -> None:
    digest = put_sparse(store, 16 << 20, {4 << 20: os.urandom(10_000)})
    with store.publisher.write_txn("test") as txn:
        entry = store.index.get_object(txn, digest.hash)
        assert entry is not None and entry.sparse
        first, second, third = entry.chunks[0], entry.chunks[1], entry.chunks[-1]
        assert first[0] == HOLE_MARK and third[0] == HOLE_MARK
        # The data moved by a MiB: the same size, another content.
        damaged = [(HOLE_MARK, first[1] + (1 << 20)), *entry.chunks[1:-1]]
        damaged.append((HOLE_MARK, third[1] - (1 << 20)))
        store.index.put_object(txn, digest.hash, ObjectEntry(entry.size, 1, damaged))
    assert second[0] != HOLE_MARK
    report = check_store(store)
    assert any(p.kind == "bad-recipe" for p in report.problems), report.problems


def test_a_store_of_format_3_is_upgraded_when_opened_for_writing(store_path: Path) -> None:
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        digest = store.put(b"before the upgrade" * 1000)
    strip_seals(store_path, schema=2)
    set_format_version(store_path, 3)
    with Store.open(store_path, readonly=True) as store:  # read as it is
        assert store.read(digest) == b"before the upgrade" * 1000
    assert read_header(store_path).format_version == 3
    with Store.open(store_path) as store:
        assert read_header(store_path).format_version == 5
        assert store.index.schema_version == SCHEMA_VERSION == 6
        assert store.read(digest) == b"before the upgrade" * 1000
        sparse = put_sparse(store, 32 << 20, {0: b"after"})
        assert store.read(sparse, 0, 5) == b"after"
        assert check_store(store).clean
    assert '"format_version": 5' in (store_path / HEADER_NAME).read_text()


def test_a_sparse_key_is_never_a_content_digest_of_the_same_bytes() -> None:
    chunks = [(HOLE_MARK, 1 << 20)]
    key = sparse_key(SHA256, chunks)
    assert may_be_sparse(key)
    assert key != hashlib.sha256(bytes(1 << 20)).digest()


# --- a mount ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("sparse")
    with mounted(base / "store", base / "mnt") as m:
        yield m


def rss(mount: Mount) -> int:
    """The daemon's resident memory in bytes."""
    for line in Path(f"/proc/{mount.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_truncating_past_the_largest_file_is_efbig_at_once(mount: Mount) -> None:
    f = mount.path / "huge"
    f.touch()
    with pytest.raises(OSError) as info:
        os.truncate(f, 999_999_999_999_999)  # pjdfstest truncate/12
    assert info.value.errno == errno.EFBIG
    assert f.stat().st_size == 0
    os.truncate(f, MAX_FILE_SIZE)  # the largest is a hole: it costs nothing
    assert f.stat().st_size == MAX_FILE_SIZE
    assert f.stat().st_blocks == 0
    with open(f, "rb") as inp:
        inp.seek(MAX_FILE_SIZE - 10)
        assert inp.read() == bytes(10)
    fd = os.open(f, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", MAX_FILE_SIZE)
        assert info.value.errno == errno.EFBIG
        assert os.pwrite(fd, b"abcdef", MAX_FILE_SIZE - 2) == 2  # what fits
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(f, "rb") as inp:
        inp.seek(MAX_FILE_SIZE - 4)
        assert inp.read() == b"\0\0ab"
    f.unlink()


def test_a_64_gib_sparse_file_costs_its_data(mount: Mount) -> None:
    rng = random.Random(64)
    size = 64 * GiB
    pieces = {rng.randrange(0, size - 65536) & ~4095: rng.randbytes(65536) for _ in range(15)}
    pieces[size - 65536] = rng.randbytes(65536)  # 1 MiB of data in all
    f = mount.path / "sparse64"
    before = rss(mount)
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for offset, data in pieces.items():
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    after = rss(mount)
    print(f"daemon RSS {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after")
    assert after - before < 64 << 20
    st = f.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 <= 2 << 20  # du counts the data, not the size
    with open(f, "rb") as inp:
        for offset, data in pieces.items():
            inp.seek(offset)
            assert inp.read(len(data)) == data
        # Somewhere no piece is: a hole reads as zeros.
        hole = next(
            at
            for at in range(size // 3, size, 1 << 20)
            if all(o + len(d) <= at or o >= at + (1 << 20) for o, d in pieces.items())
        )
        inp.seek(hole)
        assert inp.read(1 << 20) == bytes(1 << 20)


def test_a_sparse_file_is_copied_sparse_and_its_digest_found(mount: Mount) -> None:
    rng = random.Random(2)
    size = 2 * GiB
    pieces = {0: b"head", (1 * GiB) + 12345: rng.randbytes(300_000), size - 3: b"end"}
    f = mount.path / "sparse2"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for offset, data in pieces.items():
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    # Listed once known: tools that copy every xattr never meet EAGAIN.
    assert "user.cachefs.digest" not in os.listxattr(f)
    copy = mount.path.parent / "copy"
    subprocess.run(["cp", "--sparse=always", "--preserve=xattr", str(f), str(copy)], check=True)
    try:
        assert copy.stat().st_size == size
        assert copy.stat().st_blocks * 512 < 8 << 20
        expected = hashlib.sha256()
        with open(copy, "rb") as inp:
            while block := inp.read(4 << 20):
                expected.update(block)
        assert content_digest(f) == f"{expected.hexdigest()}/{size}"
        assert "user.cachefs.digest" in os.listxattr(f)
    finally:
        copy.unlink()


def test_writing_into_the_hole_of_a_published_sparse_file(mount: Mount) -> None:
    f = mount.path / "filled"
    size = 256 << 20
    f.touch()
    os.truncate(f, size)
    assert f.stat().st_blocks == 0
    with open(f, "r+b") as out:
        out.seek(100 << 20)
        out.write(b"in the hole" * 1000)
    assert 0 < f.stat().st_blocks * 512 < 1 << 20
    with open(f, "r+b") as out:
        out.seek((100 << 20) + 5)
        out.write(b"HOLE")
        out.seek(200 << 20)
        out.write(b"later")
    expected = dense(size, {100 << 20: b"in the hole" * 1000, 200 << 20: b"later"})
    expected = expected[: (100 << 20) + 5] + b"HOLE" + expected[(100 << 20) + 9 :]
    assert f.read_bytes() == expected
    assert content_digest(f) == f"{hashlib.sha256(expected).hexdigest()}/{size}"
    # Written full: dense again, named by its content.
    full = b"\1" * size
    with open(f, "r+b") as out:
        out.write(full)
    assert f.stat().st_blocks * 512 >= size
    digest = os.getxattr(f, "user.cachefs.digest").decode()
    assert digest == f"{hashlib.sha256(full).hexdigest()}/{size}"
    f.unlink()


def test_a_sparse_file_survives_a_kill_before_its_publication(tmp_path: Path) -> None:
    size = 40 * GiB
    m = start(tmp_path / "store", tmp_path / "mnt")
    try:
        f = m.path / "journaled"
        fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
        os.pwrite(fd, b"logged", 7 * GiB)
        os.ftruncate(fd, size)
        os.fsync(fd)  # the mount's journal has it, published or not
        os.pwrite(fd, b"second", 9 * GiB)
        os.fsync(fd)
    finally:
        kill(m)
    m = start(tmp_path / "store", tmp_path / "mnt")
    try:
        f = m.path / "journaled"
        assert f.stat().st_size == size
        with open(f, "rb") as inp:
            inp.seek(7 * GiB - 2)
            assert inp.read(10) == b"\0\0logged\0\0"
            inp.seek(9 * GiB)
            assert inp.read(6) == b"second"
        assert f.stat().st_blocks * 512 < 1 << 20
    finally:
        assert stop(m) == 0
    shutil.rmtree(tmp_path / "mnt", ignore_errors=True)


def test_a_short_hole_is_stored_as_zeros(mount: Mount) -> None:
    f = mount.path / "short"
    with open(f, "wb") as out:
        out.write(b"data" * 250)
        out.truncate(300_000)  # a hole shorter than HOLE_MIN: data, named by its content
    expected = b"data" * 250 + bytes(300_000 - 1000)
    assert f.read_bytes() == expected
    digest = os.getxattr(f, "user.cachefs.digest").decode()
    assert digest == f"{hashlib.sha256(expected).hexdigest()}/{len(expected)}"
    f.unlink()


@pytest.mark.slow
def test_a_64_gib_sparse_file_is_copied_sparse(mount: Mount, tmp_path: Path) -> None:
    """Every byte read through the mount (holes as zeros): about two minutes."""
    rng = random.Random(65)
    size = 64 * GiB
    pieces = {rng.randrange(0, size - 65536): rng.randbytes(65536) for _ in range(16)}
    f = mount.path / "copied64"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for offset, data in pieces.items():
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    before = rss(mount)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "--sparse=always", str(f), str(copy)], check=True)
    after = rss(mount)
    print(f"daemon RSS {before / 2**20:.1f} MiB before the copy, {after / 2**20:.1f} MiB after")
    assert copy.stat().st_size == size
    assert copy.stat().st_blocks * 512 < 16 << 20
    with open(copy, "rb") as inp:
        for offset, data in pieces.items():
            inp.seek(offset)
            assert inp.read(len(data)) == data
    f.unlink()
