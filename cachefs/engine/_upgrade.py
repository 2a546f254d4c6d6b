"""Bringing a store of an older layout up to date (storage engine layer).

Run by a writer that opens a store whose header has an older
``format_version`` (``cachefs.format.header``), under the store's lock, before
anything else touches the store.  Each step is idempotent, and the header is
rewritten last, so a crash in the middle leaves a store that the next writer
upgrades again.  Read-only openers read older layouts as they are.

1 -> 2 (cachefs 0.1 to the one journal):

* ``wal/wal.log``, the log of the engine's staged objects (an API that is
  gone), must hold no record: a record there is a staged write that was never
  published, which this version cannot replay; the store is then refused,
  untouched (``check_upgradable``, before the index is opened for writing).
  An empty log is deleted.
* ``fswal/wal.log``, the mount's log, becomes the journal
  (``journal/journal.log``): same framing, same record kinds.
* the index loses ``wal_applied`` and records its schema version.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lmdb

from cachefs.engine._index import Index, lmdb_error
from cachefs.errors import CachefsError
from cachefs.format import journal
from cachefs.format.header import STORE_FORMAT_VERSION, set_format_version
from cachefs.fsutil import fsync_dir

log = logging.getLogger(__name__)


def check_upgradable(path: Path, version: int) -> None:
    """Refuse (before anything is opened for writing) a store of layout
    ``version`` that cannot be upgraded without losing what it holds."""
    staged = path / "wal" / "wal.log"
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
    """Upgrade the store at ``path`` from layout ``version`` to the current one
    (``check_upgradable`` said it can be)."""
    if version < 2:
        _journal_from_1(path)
        _index_from_1(index)
    set_format_version(path, STORE_FORMAT_VERSION)
    log.warning(
        "upgraded store %s from format version %d to %d", path, version, STORE_FORMAT_VERSION
    )


def _journal_from_1(path: Path) -> None:
    shutil.rmtree(path / "wal", ignore_errors=True)  # empty (check_upgradable)
    mount_log = path / "fswal" / "wal.log"
    if mount_log.exists():
        directory = path / journal.DIRECTORY
        directory.mkdir(exist_ok=True)
        os.replace(mount_log, directory / journal.FILE_NAME)
        fsync_dir(directory)
    shutil.rmtree(path / "fswal", ignore_errors=True)
    fsync_dir(path)


def _index_from_1(index: Index) -> None:
    applied = index.open_optional(b"wal_applied", create=False)
    try:
        with index.write() as txn:
            if applied is not None:
                txn.drop(applied, delete=True)
            index.set_schema_version(txn)
    except lmdb.Error as exc:
        raise lmdb_error(exc, "upgrading the index") from None
