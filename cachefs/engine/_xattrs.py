"""Extended attributes of the namespace's inodes (storage engine layer).

Kept in the namespace's ``xattrs`` database (``cachefs.format.schema``): one
entry per attribute, keyed by inode and name, so that an inode's attributes
are adjacent and go with it when it is deleted.  ``user.``, ``trusted.`` and
``security.`` attributes are stored as they are; ``system.`` ones (POSIX
ACLs) are not supported (EOPNOTSUPP), so that tools such as ``cp -a`` fall
back to the mode bits.
"""

from __future__ import annotations

import errno
import os
import time

from cachefs.engine._namespace import Namespace
from cachefs.errors import FsError
from cachefs.format.schema import INO_KEY

XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


class ExtendedAttributes:
    """The extended attributes of a namespace's inodes.  Thread-safe (LMDB)."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace

    def get(self, ino: int, name: bytes) -> bytes | None:
        with self.namespace.read() as txn:
            value = self.namespace.xattrs.get(txn, INO_KEY.pack(ino) + name)
        return None if value is None else bytes(value)

    def names(self, ino: int) -> list[bytes]:
        prefix = INO_KEY.pack(ino)
        with self.namespace.read() as txn:
            return [key[8:] for key in self.namespace.xattrs.keys(txn, prefix)]

    def set(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set an attribute; ``flags`` XATTR_CREATE / XATTR_REPLACE as setxattr(2).

        ``user.``, ``trusted.`` and ``security.`` attributes are stored as they
        are; ``system.`` ones (POSIX ACLs) are not supported (EOPNOTSUPP), so
        that tools such as ``cp -a`` fall back to chmod."""
        if not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP, f"extended attribute {name!r} is not supported")
        if not name or len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE if name else errno.EINVAL)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        key = INO_KEY.pack(ino) + name
        with self.namespace.store.transaction("setting an extended attribute") as txn:
            inode = self.namespace.get(ino, txn)
            exists = self.namespace.xattrs.get(txn, key) is not None
            if flags & os.XATTR_CREATE and exists:
                raise FsError(errno.EEXIST)
            if flags & os.XATTR_REPLACE and not exists:
                raise FsError(errno.ENODATA)
            self.namespace.xattrs.put(txn, key, value)
            inode.ctime_ns = time.time_ns()
            self.namespace.put_inode(txn, inode)

    def remove(self, ino: int, name: bytes) -> None:
        key = INO_KEY.pack(ino) + name
        with self.namespace.store.transaction("removing an extended attribute") as txn:
            inode = self.namespace.get(ino, txn)
            if not self.namespace.xattrs.delete(txn, key):
                raise FsError(errno.ENODATA)
            inode.ctime_ns = time.time_ns()
            self.namespace.put_inode(txn, inode)
