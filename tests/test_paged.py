"""Paged recipes: an object of more than ``RECIPE_PAGE`` chunks keeps its
recipe in pages (``recipes``), reads a range from the pages that hold it,
and is referenced, revised, checked, repaired and deleted like any other.
The page size is made small here (8 entries) so that small objects page."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.engine import ObjectNotFoundError, Store, _index, _reads, check_store, collect_garbage
from cachefs.format.digest import Digest
from cachefs.format.schema import PAGE_KEY
from tests.conftest import SMALL_CONFIG

PAGE = 8


@pytest.fixture
def paged(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setattr(_index, "RECIPE_PAGE", PAGE)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as opened:
        yield opened


def _pages(store: Store) -> list[bytes]:
    assert store.index.recipes is not None
    with store.index.read() as txn:
        return list(store.index.recipes.keys(txn))


def test_a_long_recipe_is_paged_and_read_by_range(paged: Store) -> None:
    data = random.Random(1).randbytes(300_000)
    digest = paged.put(data)
    with paged.index.read() as txn:
        head = paged.index.get_object_head(txn, digest.hash)
        whole = paged.index.get_object(txn, digest.hash)
    assert head is not None and head.pages is not None and head.chunks == []
    assert whole is not None and whole.pages == head.pages
    count = len(whole.chunks)
    assert count > 4 * PAGE and head.pages.count == count
    assert len(_pages(paged)) == -(-count // PAGE)
    assert paged.read(digest) == data
    reader = paged.reader
    reader.forget_layouts()
    rng = random.Random(2)
    for _ in range(50):
        offset = rng.randrange(len(data))
        length = rng.randrange(1, 40_000)
        assert paged.read(digest, offset, length) == data[offset : offset + length]
    # Only pages were decoded and kept, never the whole recipe.
    assert reader._layouts and all(page >= 0 for _, page in reader._layouts)
    assert paged.recipe(digest) == whole.chunks
    assert paged.read(digest, len(data) - 1, 10) == data[-1:]
    assert paged.read(digest, len(data), 10) == b""


def test_references_to_a_paged_object_and_its_end(paged: Store) -> None:
    data = random.Random(3).randbytes(200_000)
    digest = paged.put(data)
    pages = _pages(paged)
    assert paged.put(data) == digest  # a second reference: the pages stay as they are
    assert _pages(paged) == pages
    with paged.index.read() as txn:
        head = paged.index.get_object_head(txn, digest.hash)
    assert head is not None and head.refcount == 2
    assert not paged.unref(digest)
    assert paged.read(digest) == data
    assert paged.unref(digest)
    assert _pages(paged) == []
    assert not paged.contains(digest)
    report = collect_garbage(paged)
    assert report.chunks_removed > 4 * PAGE
    assert check_store(paged).clean


def test_a_revision_of_a_paged_object(paged: Store) -> None:
    base = bytearray(random.Random(4).randbytes(250_000))
    old = paged.put(bytes(base))
    base[100_000:100_010] = b"x" * 10
    new = paged.put_revision(
        old, len(base), [(100_000, 100_010)], lambda start, stop: [bytes(base[start:stop])]
    )
    assert new == Digest(hashlib.sha256(base).digest(), len(base))
    assert paged.read(new) == bytes(base) and paged.read(old) != bytes(base)
    assert check_store(paged).clean


def test_a_sparse_paged_object(paged: Store) -> None:
    rng = random.Random(5)
    pieces = {0: rng.randbytes(60_000), 5 << 20: rng.randbytes(60_000)}
    size = (5 << 20) + 60_000
    regions = [(start, start + len(p)) for start, p in pieces.items()]

    def read_range(start: int, stop: int) -> list[bytes]:
        for at, piece in pieces.items():
            if at <= start < at + len(piece):
                return [piece[start - at : stop - at]]
        raise AssertionError((start, stop))

    digest = paged.put_sparse(size, regions, read_range)
    assert paged.holes(digest) == [(60_000, 5 << 20)]
    whole = bytes(pieces[0]) + bytes((5 << 20) - 60_000) + pieces[5 << 20]
    assert paged.read(digest, (5 << 20) - 10, 20) == whole[(5 << 20) - 10 : (5 << 20) + 10]
    found = paged.content_digest(digest, compute=True)
    assert found == Digest(hashlib.sha256(whole).digest(), size)
    assert check_store(paged).clean


def test_fsck_finds_a_missing_page_and_a_stray_one(paged: Store) -> None:
    keep = random.Random(6).randbytes(200_000)
    lose = random.Random(7).randbytes(200_000)
    kept, lost = paged.put(keep), paged.put(lose)
    recipes = paged.index.recipes
    assert recipes is not None
    with paged.index.write() as txn:
        recipes.delete(txn, lost.hash + PAGE_KEY.pack(2))
        recipes.put(txn, b"\7" * 32 + PAGE_KEY.pack(0), b"")
    paged.reader.forget_layouts()
    with pytest.raises(Exception, match="page 2 of the recipe"):
        paged.read(lost)
    report = check_store(paged)
    messages = " ".join(p.message for p in report.problems)
    assert "do not add up" in messages and "no object has it" in messages
    check_store(paged, repair=True)
    assert check_store(paged).clean, check_store(paged).problems
    assert not paged.contains(lost) and paged.read(kept) == keep
    assert all(key.startswith(kept.hash) for key in _pages(paged))


def test_the_layouts_kept_are_bounded_in_chunks(
    paged: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reads, "_LAYOUT_ENTRIES", 3 * PAGE)
    data = random.Random(8).randbytes(300_000)
    digest = paged.put(data)
    small = paged.put(b"small object" * 10)
    reader = paged.reader
    reader.forget_layouts()
    for offset in range(0, len(data), 10_000):
        assert paged.read(digest, offset, 5_000) == data[offset : offset + 5_000]
        assert paged.read(small) == b"small object" * 10
        kept = sum(len(chunks) for chunks, _ in reader._layouts.values())
        assert kept <= 3 * PAGE and kept == reader._layout_entries


def test_a_read_that_outlives_its_object_ends_without_blaming_the_index(paged: Store) -> None:
    data = random.Random(9).randbytes(300_000)
    digest = paged.put(data)
    paged.reader.forget_layouts()
    pieces = paged.iter_object(digest)
    got = b"".join(bytes(next(pieces)) for _ in range(3))
    assert data.startswith(got)
    assert paged.unref(digest)  # gone while it was being read
    with pytest.raises(ObjectNotFoundError):
        for _ in pieces:
            pass
    assert not paged.needs_fsck
    assert not paged.reader._paging and not paged.reader._layouts


def test_a_long_recipe_of_an_older_store_is_kept_whole(
    paged: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_index, "RECIPE_PAGE", 1 << 20)  # stored as schema 4 did: inline
    data = random.Random(10).randbytes(300_000)
    digest = paged.put(data)
    monkeypatch.setattr(_index, "RECIPE_PAGE", PAGE)
    paged.reader.forget_layouts()
    assert paged.read(digest, 1000, 10) == data[1000:1010]
    assert list(paged.reader._layouts) == [(digest, -1)]  # decoded once, then kept
    assert paged.read(digest) == data


def test_fsck_finds_pages_that_do_not_start_where_the_head_says(paged: Store) -> None:
    digest = paged.put(random.Random(11).randbytes(200_000))
    with paged.index.write() as txn:
        head = paged.index.get_object_head(txn, digest.hash)
        assert head is not None and head.pages is not None
        head.pages.starts[1] += 1
        paged.index.put_object(txn, digest.hash, head)
    report = check_store(paged)
    assert any("do not start where it says" in p.message for p in report.problems)
    check_store(paged, repair=True)
    assert check_store(paged).clean and not paged.contains(digest)


def test_whole_reads_keep_no_layouts_and_drop_none(paged: Store) -> None:
    """A layout is kept for a file read in pieces; objects read whole (a
    server's or ``cat``'s reads, many objects once each) keep none, so they
    neither churn that cache nor pay for it."""
    data = random.Random(12).randbytes(300_000)
    digest = paged.put(data)
    others = [(b"object %d " % i) * 5000 for i in range(20)]
    digests = [paged.put(other) for other in others]
    reader = paged.reader
    reader.forget_layouts()
    assert paged.read(digest, 1000, 10) == data[1000:1010]
    kept = dict(reader._layouts)
    assert kept
    for other, d in zip(others, digests, strict=True):
        assert b"".join(map(bytes, paged.iter_object(d))) == other
    assert dict(reader._layouts) == kept
    # Whole, paged: page by page, as a range read would.
    assert b"".join(map(bytes, paged.iter_object(digest))) == data
    assert all(page >= 0 for _, page in reader._layouts)


@pytest.mark.parametrize("size", [3_000, 300_000], ids=["whole recipe", "paged"])
def test_a_read_of_an_object_gone_is_not_found_not_damage(paged: Store, size: int) -> None:
    """What a range read kept of an object does not outlive it: a read after
    it went and gc took its chunks is a miss, not damage to the index."""
    data = random.Random(13).randbytes(size)
    digest = paged.put(data)
    assert paged.read(digest, 10, 10) == data[10:20]  # keeps its layout
    assert paged.unref(digest)
    collect_garbage(paged)
    with pytest.raises(ObjectNotFoundError):
        b"".join(map(bytes, paged.iter_object(digest)))
    with pytest.raises(ObjectNotFoundError):
        paged.read(digest, 10, 10)
    assert not paged.needs_fsck


def test_a_whole_read_of_a_paged_object_reads_its_head_once(
    paged: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(14).randbytes(300_000)
    digest = paged.put(data)
    paged.reader.forget_layouts()
    heads = 0
    get_head = paged.index.get_object_head

    def counted(txn: object, key: bytes) -> object:
        nonlocal heads
        heads += key == digest.hash
        return get_head(txn, key)  # type: ignore[arg-type]

    monkeypatch.setattr(paged.index, "get_object_head", counted)
    assert b"".join(map(bytes, paged.iter_object(digest))) == data
    pages = len(_pages(paged))
    assert heads == 1 + pages  # the pages' own checks: one head read each
