"""The records of cache directories in the index (storage engine layer).

The filesystem layer marks directories as caches with a budget and a policy
(``cachefs.fs``); their settings, counters and saved policy order live in the
namespace's ``caches`` and ``cache_state`` databases (``cachefs.format.schema``),
read and written here.
"""

from __future__ import annotations

import json
from typing import Any

from cachefs.engine._namespace import Namespace
from cachefs.errors import CorruptDataError
from cachefs.format.schema import CACHE_ENTRY, INO_KEY, STORE_SETTINGS, Inode


class CacheRecords:
    """The ``caches`` and ``cache_state`` records of a store's namespace."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.store = namespace.store

    def records(self) -> dict[int, dict[str, Any]]:
        """Every ``caches`` record: directory inode (0: store settings) -> settings."""
        caches = self.namespace.caches
        if caches is None:
            return {}
        out = {}
        with self.store.index.read() as txn:
            for key, value in caches.items(txn):
                ino = INO_KEY.unpack(key)[0]
                try:
                    out[ino] = json.loads(bytes(value))
                except ValueError:
                    raise CorruptDataError(
                        f"cache settings of inode {ino} are not valid JSON",
                        hint=f"run `cachefs fsck --repair {self.store.path}`",
                    ) from None
        return out

    def put(
        self,
        records: dict[int, dict[str, Any] | None],
        states: dict[int, list[tuple[int, int]]] | None = None,
    ) -> None:
        """Write (or with None delete) ``caches`` records and their saved policy
        states ((file inode, count), coldest first), in one transaction.  A
        directory that is gone is skipped."""
        caches, cache_state = self.namespace.caches, self.namespace.cache_state
        assert caches is not None and cache_state is not None
        with self.store.transaction("saving cache settings") as txn:
            for ino, record in records.items():
                key = INO_KEY.pack(ino)
                if record is None:
                    caches.delete(txn, key)
                    cache_state.delete(txn, key)
                    continue
                if ino != STORE_SETTINGS:
                    raw = self.namespace.inodes.get(txn, key)
                    if raw is None or not Inode.unpack(ino, raw).is_dir:
                        continue
                caches.put(txn, key, json.dumps(record, sort_keys=True).encode())
            for ino, state in (states or {}).items():
                key = INO_KEY.pack(ino)
                if caches.get(txn, key) is not None:
                    packed = b"".join(CACHE_ENTRY.pack(member, n) for member, n in state)
                    cache_state.put(txn, key, packed)

    def state_of(self, ino: int) -> list[tuple[int, int]]:
        """The saved (inode, count) entries of a cache's policy, coldest first."""
        cache_state = self.namespace.cache_state
        if cache_state is None:
            return []
        with self.store.index.read() as txn:
            raw = cache_state.get(txn, INO_KEY.pack(ino))
            if raw is None:
                return []
            raw = bytes(raw)
        usable = len(raw) - len(raw) % CACHE_ENTRY.size
        return [(int(i), int(n)) for i, n in CACHE_ENTRY.iter_unpack(raw[:usable])]
