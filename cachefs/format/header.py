"""The store directory and its header file (on-disk format layer).

A store is a directory::

    STORE/
      cachefs-store.json   the header (this module), written once at creation
      lock                 flock()ed exclusively by the one writing process
      index.lmdb           metadata: chunk index, objects, namespace (see schema.py)
      index.lmdb-lock      LMDB's reader table
      segments/            chunk data in append-only segment files (see segment.py)
      journal/journal.log  the journal: writes not yet published (see journal.py)
      tmp/                 spool files (scratch space); emptied when a writer opens
      reserve              disk space kept for deleting on a full disk (mounted stores)
      cachefs.log          the mount daemon's log

The header is a small JSON document, so that a person can read it with ``cat``::

    {
      "format": "cachefs-store",
      "format_version": 3,
      "digest_function": "sha256",            # or "blake3"
      "chunking": {"algorithm": "fastcdc2020", "min_size": 16384,
                   "avg_size": 65536, "max_size": 262144, "normalization": 2},
      "compression": {"algorithm": "zstd", "level": 3, "min_saving": 0.05},
      "segments": {"max_size": 268435456, "shard_levels": 1, "shard_width": 1},
      "created": "2026-11-24T08:00:00+00:00",
      "created_by": "cachefs 0.1.0"
    }

``format_version`` is the version of the whole store layout (header, LMDB
schema, segment and journal formats).  Bump it whenever a change would make an
older cachefs misread the store, and teach ``engine/_upgrade.py`` to bring the
previous layout up to it.  A store with a newer or unknown ``format_version`` is
refused before anything is modified.  Chunking and digest parameters are fixed
at creation: changing them would break deduplication against what is already
stored.  With ``normalization`` 2, ``min_size = avg_size / 4`` and
``max_size = avg_size * 4`` (the defaults) the chunks are the REAPI's FastCDC
2020 chunks, which ``cachefs serve`` announces (SplitBlob answers with the
chunks already stored).  Compression parameters are also fixed here so that every writer
produces the same records, but readers honour the per-record flags and do not
depend on them.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cachefs import __version__
from cachefs.errors import (
    ConfigError,
    CorruptDataError,
    FormatVersionError,
    StoreNotFoundError,
    from_oserror,
)
from cachefs.format.digest import DigestFunction, digest_function
from cachefs.fsutil import atomic_write

#: Version of the store layout.
#:
#: 1. cachefs 0.1: two write-ahead logs (``wal/`` for the engine's staged
#:    objects, ``fswal/`` for the mount), no schema version in the index.
#: 2. One journal (``journal/journal.log``, kinds of every writer in
#:    ``journal.py``); the index records its schema version (``schema.py``).
#:    Version 1 stores are upgraded when opened for writing.
#: 3. The chunking parameters name FastCDC's normalization level
#:    (``normalization``, 2 for new stores, as the REAPI's FastCDC 2020).
#:    Stores before cut with level 1 and their headers leave it out; upgrading
#:    one writes ``"normalization": 1`` into its header (its chunks stay as
#:    they are, so deduplication against them goes on).
#: 4. Files' holes are stored as holes (index schema 3: sparse objects, see
#:    ``schema.py``).  Upgrading a version 3 store records the new schema
#:    version; nothing else changes.
#: 5. Every value of the index is sealed (a checksum over key and value, index
#:    schema 4, see ``schema.py``).  Upgrading seals every entry in one
#:    transaction.
STORE_FORMAT_VERSION = 5
#: The oldest layout this cachefs can open (read-only) or upgrade.
OLDEST_FORMAT_VERSION = 1
#: The normalization level of stores whose headers do not name one (format < 3).
LEVEL_BEFORE_3 = 1
HEADER_NAME = "cachefs-store.json"
FORMAT_NAME = "cachefs-store"

MiB = 1 << 20
MAX_SHARD_DIGITS = 2


@dataclass(frozen=True)
class ChunkingParams:
    min_size: int = 16 * 1024
    avg_size: int = 64 * 1024
    max_size: int = 256 * 1024
    algorithm: str = "fastcdc2020"
    #: FastCDC's normalized chunking level (NC): the higher, the closer chunk
    #: sizes keep to ``avg_size``.  Stores of format 2 and before used 1.
    normalization: int = 2

    def validate(self) -> None:
        if self.algorithm != "fastcdc2020":
            raise ConfigError(f"unknown chunking algorithm {self.algorithm!r}")
        if not 0 <= self.normalization <= 3:
            raise ConfigError(
                f"bad chunking normalization level {self.normalization}", hint="choose 0 to 3"
            )
        if not 64 <= self.min_size < self.avg_size < self.max_size <= 16 * MiB:
            raise ConfigError(
                f"bad chunk sizes min={self.min_size} avg={self.avg_size} max={self.max_size}",
                hint="need 64 <= min < avg < max <= 16 MiB",
            )
        if self.avg_size - self.min_size < 256:
            raise ConfigError("avg_size must exceed min_size by at least 256 bytes")


@dataclass(frozen=True)
class CompressionParams:
    level: int = 3
    #: A chunk is stored raw unless compression saves at least this fraction.
    min_saving: float = 0.05
    algorithm: str = "zstd"

    def validate(self) -> None:
        if self.algorithm != "zstd":
            raise ConfigError(f"unknown compression algorithm {self.algorithm!r}")
        if not -7 <= self.level <= 22:
            raise ConfigError(f"bad zstd level {self.level}", hint="choose a level from -7 to 22")
        if not 0.0 <= self.min_saving < 1.0:
            raise ConfigError(f"bad min_saving {self.min_saving}", hint="a fraction in [0, 1)")


@dataclass(frozen=True)
class SegmentParams:
    max_size: int = 256 * MiB
    #: Shard directories: ``shard_levels`` nested levels, each named by the next
    #: ``shard_width`` hex digits of the chunk digest (16**width entries a level).
    #: Every shard appends to a segment of its own (one open file each), so the
    #: shard count is capped at 16**MAX_SHARD_DIGITS.
    shard_levels: int = 1
    shard_width: int = 1

    def validate(self) -> None:
        if not 1 * MiB <= self.max_size <= 4096 * MiB:
            raise ConfigError(f"bad segment max_size {self.max_size}", hint="choose 1 MiB to 4 GiB")
        if not (0 <= self.shard_levels <= 2 and 1 <= self.shard_width <= 2) or (
            self.shard_levels * self.shard_width > MAX_SHARD_DIGITS
        ):
            raise ConfigError(
                f"bad sharding levels={self.shard_levels} width={self.shard_width}",
                hint=f"levels 0..2 of 1..2 hex digits, at most {MAX_SHARD_DIGITS} digits "
                f"({16**MAX_SHARD_DIGITS} shards) in all",
            )

    @property
    def shard_count(self) -> int:
        return int(16 ** (self.shard_width * self.shard_levels))


@dataclass(frozen=True)
class StoreConfig:
    """Everything fixed when a store is created."""

    digest_function: str = "sha256"
    chunking: ChunkingParams = field(default_factory=ChunkingParams)
    compression: CompressionParams = field(default_factory=CompressionParams)
    segments: SegmentParams = field(default_factory=SegmentParams)

    def __post_init__(self) -> None:
        # digest_function() accepts any case; keep the canonical lower-case name so
        # that ``digest``, the header and comparisons agree ("BLAKE3" == "blake3").
        if isinstance(self.digest_function, str):
            object.__setattr__(self, "digest_function", self.digest_function.lower())

    def validate(self) -> None:
        digest_function(self.digest_function)
        self.chunking.validate()
        self.compression.validate()
        self.segments.validate()
        if self.chunking.max_size + 4096 > self.segments.max_size:
            raise ConfigError(
                f"segments of {self.segments.max_size} bytes cannot hold chunks of "
                f"{self.chunking.max_size} bytes",
                hint="make the segment size larger than the largest chunk",
            )

    @property
    def digest(self) -> DigestFunction:
        return digest_function(self.digest_function)


@dataclass(frozen=True)
class Header:
    """What a store's header says."""

    config: StoreConfig
    format_version: int


def write_header(store: Path, config: StoreConfig) -> None:
    config.validate()
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": STORE_FORMAT_VERSION,
        "digest_function": config.digest_function,
        "chunking": asdict(config.chunking),
        "compression": asdict(config.compression),
        "segments": asdict(config.segments),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "created_by": f"cachefs {__version__}",
    }
    _write(store, doc)


def _write(store: Path, doc: dict[str, Any]) -> None:
    atomic_write(store / HEADER_NAME, (json.dumps(doc, indent=2) + "\n").encode())


def read_header(store: Path) -> Header:
    """Read and check the header of ``store``; refuse newer or unknown formats."""
    path = store / HEADER_NAME
    doc = _read(store)
    version = doc.get("format_version")
    # bool is an int to Python, but `true` is no version number.
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not OLDEST_FORMAT_VERSION <= version <= STORE_FORMAT_VERSION
    ):
        raise FormatVersionError(
            f"store {store} has format version {version!r}; this cachefs "
            f"({__version__}) reads versions {OLDEST_FORMAT_VERSION} to {STORE_FORMAT_VERSION}"
        )
    try:
        config = StoreConfig(
            digest_function=doc["digest_function"],
            chunking=ChunkingParams(**{"normalization": LEVEL_BEFORE_3, **doc["chunking"]}),
            compression=CompressionParams(**doc["compression"]),
            segments=SegmentParams(**doc["segments"]),
        )
        config.validate()
    except (KeyError, TypeError, ConfigError) as exc:
        raise CorruptDataError(
            f"store header has bad or missing fields ({exc})",
            path=str(path),
            hint="restore the header from a backup; the data itself is intact",
        ) from None
    return Header(config, version)


def set_format_version(store: Path, version: int) -> None:
    """Record that the store's layout is now ``version`` (after an upgrade); the
    rest of the header stays as it was written, but for the normalization
    level that headers before format 3 leave out, which is written in."""
    doc = _read(store)
    doc["format_version"] = version
    if isinstance(doc.get("chunking"), dict):
        doc["chunking"].setdefault("normalization", LEVEL_BEFORE_3)
    doc["upgraded_by"] = f"cachefs {__version__}"
    _write(store, doc)


def _read(store: Path) -> dict[str, Any]:
    path = store / HEADER_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not store.exists():
            raise StoreNotFoundError(f"no store at {store}") from None
        raise StoreNotFoundError(
            f"{store} is not a cachefs store (it has no {HEADER_NAME})"
        ) from None
    except NotADirectoryError:
        raise StoreNotFoundError(f"{store} is not a directory") from None
    except OSError as exc:
        raise from_oserror(exc, f"reading the store header {path}") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("header is not a JSON object")
    except (ValueError, TypeError) as exc:
        raise CorruptDataError(
            f"unreadable store header ({exc})",
            path=str(path),
            hint="restore the header from a backup; the data itself is intact",
        ) from None
    if doc.get("format") != FORMAT_NAME:
        raise StoreNotFoundError(f"{path} is not a cachefs store header")
    return doc
