"""Bringing a store of an older layout up to date (storage engine layer).

Run by a writer under the store's lock.  ``check_upgradable`` runs before
anything is opened for writing and refuses, untouched, a store that cannot be
upgraded without losing what it holds; ``upgrade`` then runs at every writable
open (it costs a few ``stat`` calls when there is nothing to do).  It rewrites
the header first, so that an older cachefs refuses the store from then on, and
every step after that is idempotent: an upgrade that a crash cut short is
finished by the next writer.  Read-only openers read older layouts as they are.

1 -> 2 (cachefs 0.1 to the one journal):

* ``wal/wal.log``, the log of the engine's staged objects (an API that is
  gone), must hold no record: a record there is a staged write that was never
  published, which this version cannot replay (``check_upgradable``).  The
  empty log is deleted.
* ``fswal/wal.log``, the mount's log, becomes the journal
  (``journal/journal.log``): same framing, same record kinds.
* the index loses ``wal_applied`` and records its schema version (synced
  before the writer goes on).

2 -> 3: the header names the chunking's normalization level, 1 for stores
before (``format/header.py``); nothing else changes.

3 -> 4: recipes may hold holes (index schema 3, ``format/schema.py``).  No
entry changes: the index only records its new schema version, so that an
older cachefs, which would read a hole as a chunk, refuses it.

4 -> 5: every value of the index is sealed (schema 4): one transaction seals
every entry of every database and records the schema version, so that the
index is all sealed or all as before, whatever a crash cuts short.

5 -> 6: chunks may be held remotely (index schema 6).  No entry changes: the
index records its new schema version, so that an older cachefs, which would
look for such a chunk in a segment, refuses it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lmdb

from cachefs.engine._index import Index, lmdb_error
from cachefs.errors import CachefsError, CorruptDataError
from cachefs.format import journal
from cachefs.format.header import STORE_FORMAT_VERSION, set_format_version
from cachefs.format.schema import ALL_DATABASES, SCHEMA_VERSION
from cachefs.fsutil import fsync_dir

log = logging.getLogger(__name__)

#: What cachefs 0.1 left in a store that this version does not use.
_STAGED_LOG = Path("wal") / "wal.log"
_MOUNT_LOG = Path("fswal") / "wal.log"


def check_upgradable(path: Path, version: int) -> None:
    """Refuse (before anything is opened for writing) a store of layout
    ``version`` that cannot be upgraded without losing what it holds."""
    staged = path / _STAGED_LOG
    if version < 2 and staged.exists():
        _, records, _ = journal.parse(staged.read_bytes(), str(staged))
        if records:
            raise CachefsError(
                f"store {path} holds {len(records)} records of staged writes (Store.stage) "
                "that cachefs 0.1 logged and never published",
                hint="open the store once with cachefs 0.1, which publishes them, then again "
                "with this version; nothing was modified",
            )


def upgrade(path: Path, index: Index, version: int) -> None:
    """Bring the store at ``path`` (header ``version``) up to the current layout,
    or finish an upgrade that was cut short (``check_upgradable`` said it can be)."""
    if version < STORE_FORMAT_VERSION:
        set_format_version(path, STORE_FORMAT_VERSION)
        log.warning(
            "upgraded store %s from format version %d to %d", path, version, STORE_FORMAT_VERSION
        )
    _journal_from_1(path)
    _index_schema(index)


def _journal_from_1(path: Path) -> None:
    if (path / _STAGED_LOG).parent.exists():
        shutil.rmtree(path / _STAGED_LOG.parent)  # empty: check_upgradable looked
        fsync_dir(path)
    mount_log = path / _MOUNT_LOG
    if mount_log.exists():
        directory = path / journal.DIRECTORY
        target = directory / journal.FILE_NAME
        if target.exists():
            raise CorruptDataError(
                f"store {path} has both {_MOUNT_LOG} (cachefs 0.1's) and "
                f"{journal.DIRECTORY}/{journal.FILE_NAME}",
                hint=f"keep the one whose writes are wanted and move the other out of {path}",
            )
        directory.mkdir(exist_ok=True)
        os.replace(mount_log, target)
        fsync_dir(directory)
    if mount_log.parent.exists():
        shutil.rmtree(mount_log.parent)
        fsync_dir(path)


def _index_schema(index: Index) -> None:
    applied = index.open_optional(b"wal_applied", create=False)
    if applied is None and index.schema_version == SCHEMA_VERSION:
        return
    tables = [
        table for table in index.open_databases(ALL_DATABASES, create=False) if table is not None
    ]
    try:
        with index.write() as txn:
            if applied is not None:
                txn.drop(applied.handle, delete=True)
                index.dropped(b"wal_applied")
            if not index.sealed:
                for table in tables:
                    table.seal_all(txn)
            index.set_schema_version(txn)
    except lmdb.Error as exc:
        raise lmdb_error(exc, "upgrading the index") from None
    index.sealed = True
    index.sync()
