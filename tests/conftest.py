"""Shared fixtures: a store per test in a temporary directory."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, settings

from cachefs.engine import Digest, Store, StoreOptions
from cachefs.format.header import ChunkingParams, SegmentParams, StoreConfig
from cachefs.format.schema import SEAL
from cachefs.format.segment import RECORD_HEADER

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

#: Small chunks and segments so that tests exercise many chunks, shards and
#: segment rotations with little data.
SMALL_CONFIG = StoreConfig(
    chunking=ChunkingParams(min_size=1024, avg_size=4096, max_size=16384),
    segments=SegmentParams(max_size=1 << 20),
)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    """A writable store with small chunks (see SMALL_CONFIG)."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as opened:
        yield opened


@pytest.fixture
def default_store(store_path: Path) -> Iterator[Store]:
    """A writable store with the default configuration."""
    with Store.open(store_path, create=True) as opened:
        yield opened


def compressible(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that zstd compresses well but that do not repeat exactly."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)
    ]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


@pytest.fixture
def options() -> StoreOptions:
    return StoreOptions()


def strip_seals(store_path: Path, schema: int = 3) -> None:
    """Make the index of a (closed) store as stores before schema 4 had it:
    no seal at the end of its values, and schema version ``schema``."""
    env = lmdb.open(str(store_path / "index.lmdb"), subdir=False, max_dbs=32, map_size=1 << 40)
    try:
        with env.begin() as txn:
            names = [bytes(name) for name, _ in txn.cursor()]
        for name in names:
            db = env.open_db(name)
            with env.begin(write=True) as txn:
                for key, value in list(txn.cursor(db=db)):
                    txn.put(key, value[: -SEAL.size], db=db)
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"schema_version", struct.pack("<Q", schema), db=meta)
    finally:
        env.close()


def flip_first_chunk(store: Store, digest: Digest) -> Path:
    """Damage the payload of an object's first chunk in its segment; the segment's path."""
    chunk, _ = store.recipe(digest)[0]
    with store.index.read() as txn:
        entry = store.index.get_chunk(txn, chunk)
    assert entry is not None
    path = store.segments.chunk_path(chunk, entry.segment_id)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER.size + 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path
