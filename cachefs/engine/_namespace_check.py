"""Checking and repairing the namespace (storage engine layer).

``check_namespace`` compares the namespace with its invariants
(``cachefs.format.schema``) and with the objects it references, in one
snapshot; ``repair_namespace`` fixes what it found (``cachefs fsck --repair``,
under the store's maintenance lock).
"""

from __future__ import annotations

import json
import stat
import time
from collections import Counter
from dataclasses import dataclass, field

import lmdb

from cachefs.engine._namespace import Namespace
from cachefs.format.schema import (
    INO_KEY,
    INO_VALUE,
    NO_CONTENT,
    ROOT_INODE,
    STORE_SETTINGS,
    Inode,
    dirent_key,
)

#: Where fsck --repair puts the files and directories whose entries were lost.
LOST_AND_FOUND = b"lost+found"


@dataclass
class NamespaceCheck:
    problems: list[tuple[str, str]] = field(default_factory=list)
    dangling: list[tuple[int, bytes]] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    nlinks: dict[int, int] = field(default_factory=dict)
    leaked: list[int] = field(default_factory=list)
    #: The link count a leaked directory has once it is linked again.
    subdirs: dict[int, int] = field(default_factory=dict)
    bad_caches: list[int] = field(default_factory=list)
    #: Objects with fewer references than files hold them: the count they need.
    refcounts: dict[bytes, int] = field(default_factory=dict)
    inodes: int = 0

    def add(self, kind: str, message: str) -> None:
        self.problems.append((kind, message))


def check_namespace(namespace: Namespace, txn: lmdb.Transaction) -> NamespaceCheck:
    """Compare the namespace with its invariants and with the objects it
    references, in one snapshot (``txn``); nothing is changed."""
    result = NamespaceCheck()
    inodes = {inode.ino: inode for inode in namespace.iter_inodes(txn)}
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    dir_entries: dict[int, list[tuple[int, bytes]]] = {}
    for parent, name, child in namespace.iter_dirents(txn):
        parent_inode = inodes.get(parent)
        inode = inodes.get(child)
        if parent_inode is None or not parent_inode.is_dir:
            result.add("namespace", f"entry {name!r} lies in inode {parent}, not a directory")
            result.dangling.append((parent, name))
        elif inode is None:
            result.add("namespace", f"entry {name!r} in directory {parent}: no inode {child}")
            result.dangling.append((parent, name))
        elif inode.is_dir:
            dir_entries.setdefault(child, []).append((parent, name))
        else:
            names[child] += 1
    for child, entries in dir_entries.items():
        if len(entries) > 1:
            # A directory has one entry: keep the one in its recorded parent.
            result.add("namespace", f"directory inode {child} has {len(entries)} entries")
            recorded = namespace.parents.get(txn, INO_KEY.pack(child))
            keep = next((e for e in entries if recorded == INO_VALUE.pack(e[0])), entries[0])
            result.dangling.extend(e for e in entries if e is not keep)
            entries = [keep]
        names[child] = 1
        subdirs[entries[0][0]] += 1
    orphans = {INO_KEY.unpack(k)[0] for k in namespace.orphans.keys(txn)}
    refs: Counter[bytes] = Counter()
    for ino, inode in inodes.items():
        if inode.is_dir:
            expected = 2 + subdirs[ino] if (names[ino] == 1 or ino == ROOT_INODE) else 0
        else:
            expected = names[ino]
        if inode.nlink != expected and not (expected == 0 and ino in orphans):
            result.add("namespace", f"inode {ino}: link count {inode.nlink}, found {expected}")
            result.nlinks[ino] = expected
        if expected == 0 and ino != ROOT_INODE and ino not in orphans:
            result.add("namespace", f"inode {ino} is in no directory and not an orphan")
            result.leaked.append(ino)
            result.subdirs[ino] = subdirs[ino]
        digest = inode.digest
        if digest is not None:
            entry = namespace.store.index.get_object_head(txn, digest.hash)
            if entry is None or entry.size != inode.size:
                result.add("namespace", f"inode {ino}: its content {digest} is not stored")
                result.lost.append(ino)
            else:
                refs[digest.hash] += 1
    for digest_hash, count in refs.items():
        entry = namespace.store.index.get_object_head(txn, digest_hash)
        if entry is not None and entry.refcount < count:
            result.add(
                "namespace",
                f"object {digest_hash.hex()}: {entry.refcount} references, "
                f"but {count} files hold it",
            )
            result.refcounts[digest_hash] = count
    if namespace.caches is not None:
        for key, value in namespace.caches.items(txn):
            ino = INO_KEY.unpack(key)[0]
            try:
                record = json.loads(bytes(value))
                valid = isinstance(record, dict)
            except ValueError:
                valid = False
            if ino == STORE_SETTINGS:
                if not valid:
                    result.add("namespace", "the store-wide cache settings are damaged")
                    result.bad_caches.append(ino)
                continue
            inode = inodes.get(ino)
            if inode is None or not inode.is_dir:
                result.add("namespace", f"cache settings for inode {ino}, not a directory")
                result.bad_caches.append(ino)
            elif not valid or not isinstance(record.get("max_size"), int):
                result.add("namespace", f"the cache settings of directory {ino} are damaged")
                result.bad_caches.append(ino)
    counted = namespace.store.index.counter(txn, "inodes")
    if counted != len(inodes):
        result.add("namespace", f"inode counter says {counted}, found {len(inodes)}")
    result.inodes = len(inodes)
    return result


def repair_namespace(namespace: Namespace, found: NamespaceCheck) -> None:
    """Fix what :meth:`check` found (under the store's maintenance lock).

    Files whose content is lost become empty and get an xattr
    ``user.cachefs.lost`` naming the lost digest; dangling entries are
    removed (of a directory with several, all but the one in its recorded
    parent); link counts are set to what was counted; objects held by more
    files than they have references get that many; inodes in no
    directory (their entry was lost) get one in ``/lost+found``, named by
    their inode number, with their content and, for a directory, its
    subtree; damaged cache
    settings are dropped (the directory becomes an ordinary one)."""
    with namespace.store.transaction("repairing the namespace") as txn:
        for parent, name in found.dangling:
            namespace.dirents.delete(txn, dirent_key(parent, name))
        for ino in found.lost:
            inode = namespace.get(ino, txn)
            namespace.xattrs.put(
                txn, INO_KEY.pack(ino) + b"user.cachefs.lost", str(inode.digest).encode()
            )
            inode.content, inode.size = NO_CONTENT, 0
            namespace.put_inode(txn, inode)
        for ino, nlink in found.nlinks.items():
            inode = namespace.get(ino, txn)
            inode.nlink = nlink
            namespace.put_inode(txn, inode)
        if found.leaked:
            _to_lost_and_found(namespace, txn, found)
        for digest_hash, count in found.refcounts.items():
            entry = namespace.store.index.get_object_head(txn, digest_hash)
            if entry is not None and entry.refcount < count:
                added, entry.refcount = count - entry.refcount, count
                namespace.store.index.put_object(txn, digest_hash, entry)
                namespace.store.index.add(txn, "files", added)
                namespace.store.index.add(txn, "logical_bytes", added * entry.size)
        if namespace.caches is not None and namespace.cache_state is not None:
            for ino in found.bad_caches:  # the directory stays, unmarked
                namespace.caches.delete(txn, INO_KEY.pack(ino))
                namespace.cache_state.delete(txn, INO_KEY.pack(ino))
        namespace.store.index.set_counter(txn, "inodes", namespace.inodes.count(txn))


def _to_lost_and_found(namespace: Namespace, txn: lmdb.Transaction, found: NamespaceCheck) -> None:
    """Give every leaked inode an entry ``/lost+found/<inode number>`` (the
    directory is made, mode 0700, if the root has none)."""
    index = namespace.store.index
    now = time.time_ns()
    root = namespace.get(ROOT_INODE, txn)
    name = LOST_AND_FOUND
    raw = namespace.dirents.get(txn, dirent_key(ROOT_INODE, name))
    if raw is not None and not namespace.get(INO_VALUE.unpack(raw)[0], txn).is_dir:
        name, raw = LOST_AND_FOUND + b".cachefs", None  # a file took the name
        raw = namespace.dirents.get(txn, dirent_key(ROOT_INODE, name))
    if raw is None:
        ino = index.counter(txn, "next_inode")
        index.set_counter(txn, "next_inode", ino + 1)
        folder = Inode(ino, stat.S_IFDIR | 0o700, 0, 0, 2, 0, 0, now, now, now)
        namespace.dirents.put(txn, dirent_key(ROOT_INODE, name), INO_VALUE.pack(ino))
        namespace.parents.put(txn, INO_KEY.pack(ino), INO_VALUE.pack(ROOT_INODE))
        root.nlink += 1
        root.mtime_ns = root.ctime_ns = now
        namespace.put_inode(txn, root)
    else:
        folder = namespace.get(INO_VALUE.unpack(raw)[0], txn)
    for ino in found.leaked:
        inode = namespace.get(ino, txn)
        namespace.dirents.put(txn, dirent_key(folder.ino, str(ino).encode()), INO_VALUE.pack(ino))
        if inode.is_dir:
            namespace.parents.put(txn, INO_KEY.pack(ino), INO_VALUE.pack(folder.ino))
            inode.nlink = 2 + found.subdirs.get(ino, 0)
            folder.nlink += 1
        else:
            inode.nlink = 1
        inode.ctime_ns = now
        namespace.put_inode(txn, inode)
    folder.mtime_ns = folder.ctime_ns = now
    namespace.put_inode(txn, folder)
