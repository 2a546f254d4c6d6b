"""The one error hierarchy of cachefs (every layer).

Every error a user can meet is a :class:`CachefsError`.  Each class carries

* ``errno`` -- what the mount will answer (``FUSEError(err.errno)``),
* ``exit_code`` -- what the CLI exits with,
* a message that says what went wrong and where, and a ``hint`` that says what
  to do about it.

Anything that is not a ``CachefsError`` escaping the engine is a bug.

Exit codes (stable, documented in the README):

== =====================================================================
0  success
1  ``fsck`` found damage (or another command failed in an unclassified way)
2  bad usage or bad configuration
3  not found (object, store)
4  corrupt data
5  store locked by another process
6  store format version not supported
7  store full (no space left on the device)
8  cannot mount (mount point, FUSE missing) or unmount (busy)
9  a remote tier could not serve (unreachable, refused, wrong bytes)
== =====================================================================

128+N: ``fsck``'s check was ended by signal N (stopped, or a crash other
than the index damage that SIGBUS, SIGSEGV and SIGABRT mean: 4).
"""

from __future__ import annotations

import errno as _errno
import os as _os
from typing import Any


class CachefsError(Exception):
    """Base class: a user-facing error with a remedy."""

    errno: int = _errno.EIO
    exit_code: int = 1
    default_hint: str = ""
    #: Set on an error met once a publication had committed (the index's
    #: sync after it): what it published is in the index, not durable.
    committed: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(CachefsError):
    """A bad parameter, option or configuration value."""

    errno = _errno.EINVAL
    exit_code = 2


class BadDigestError(ConfigError):
    """A digest string that is not of the form ``<hex>/<size>``."""

    default_hint = "a digest looks like '<64 hex digits>/<size in bytes>', as `cachefs put` prints"


class DigestMismatchError(CachefsError):
    """Content that was said to have one digest has another: nothing was stored."""

    errno = _errno.EINVAL
    exit_code = 4
    default_hint = "send the content again, or the digest of what was sent"


class NotFoundError(CachefsError):
    """Something asked for is not there."""

    errno = _errno.ENOENT
    exit_code = 3


class ObjectNotFoundError(NotFoundError):
    """No object with that digest in the store."""

    default_hint = "check the digest, or store the object with `cachefs put`"


class StoreNotFoundError(NotFoundError):
    """The path is not a cachefs store."""

    default_hint = "check the path; `cachefs put STORE FILE` creates a new store"


class CorruptDataError(CachefsError):
    """Stored bytes fail their checksum or do not parse.

    Wrong bytes are never returned: the read fails instead.
    """

    errno = _errno.EIO
    exit_code = 4
    default_hint = "run `cachefs fsck STORE` to find all damage, `--repair` to drop it"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f" in {path}" + (f" at offset {offset}" if offset is not None else "")
        super().__init__(message + where, hint=hint)
        self.path = path
        self.offset = offset
        #: Set once the store has counted this damage (it is counted once, by
        #: whichever layer meets it first).
        self.recorded = False


class HealElsewhere(CorruptDataError):
    """A damaged chunk that a remote tier may hold, met on a thread that must
    not wait for the network (the filesystem's event loop): the caller heals
    it in a worker thread (``LocalChunks.healer``) and reads again.  Nothing
    is recorded as damage yet.  ``remote``: the chunk is not damaged but held
    only by the tiers (if they cannot give it, the read fails with a
    RemoteError, not as damage)."""

    def __init__(
        self,
        message: str,
        *,
        digest: bytes = b"",
        length: int = 0,
        remote: bool = False,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.digest = digest
        self.length = length
        self.remote = remote


class IndexCorruptError(CorruptDataError):
    """The metadata index itself is damaged (not just one chunk's bytes)."""

    default_hint = "unmount, keep a copy of the store, and run `cachefs fsck STORE`"


class StoreLockedError(CachefsError):
    """Another process has the store open for writing."""

    errno = _errno.EBUSY
    exit_code = 5
    default_hint = (
        "only one process may write to a store at a time; stop the other writer "
        "(a mount or another cachefs command), or use a read-only command"
    )


class FormatVersionError(CachefsError):
    """The store (or a file in it) was written by a newer or unknown version."""

    errno = _errno.EPROTONOSUPPORT
    exit_code = 6
    default_hint = "upgrade cachefs to open this store; nothing was modified"


class StoreFullError(CachefsError):
    """The device holding the store has no space left."""

    errno = _errno.ENOSPC
    exit_code = 7
    default_hint = "free space on the device or run `cachefs gc STORE`; nothing stored was lost"


class ReadOnlyError(CachefsError):
    """A write was attempted on a store opened read-only."""

    errno = _errno.EROFS
    exit_code = 2
    default_hint = "open the store for writing (no other writer may be running)"


class FsError(CachefsError):
    """A filesystem operation refused with a POSIX errno (ENOENT, EEXIST, ...)."""

    exit_code = 1

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or _os.strerror(err), hint="")
        self.errno = err


class MountError(CachefsError):
    """The mount point or the machine cannot host a mount, or it cannot be unmounted."""

    exit_code = 8


class RemoteError(CachefsError):
    """A remote tier could not serve a request: unreachable, timed out,
    refused, or it answered with bytes that are not what was asked for.  The
    local store is not at fault (nothing is recorded as local damage)."""

    errno = _errno.EIO
    exit_code = 9
    default_hint = "check the remote's URL, that it is up, and its credentials"
    #: The remote refused this request for what it is (it would refuse it
    #: again): trying later does not help.
    permanent = False


class RemoteRecordError(RemoteError):
    """A record a remote keeps (an action cache entry, a shared directory's
    entry, a chunk list) is not what its key says: damaged, too large to be
    one, or written there by another tool.  That record is a miss; the remote
    itself answered, so it does not count against it (its circuit breaker):
    whoever can write one bad record must not make a whole tier be skipped."""

    default_hint = "the remote's copy is damaged, or another tool wrote that key"


def from_oserror(exc: OSError, what: str) -> CachefsError:
    """Translate an ``OSError`` met while doing ``what`` into a ``CachefsError``."""
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return StoreFullError(f"no space left on device while {what}")
    if exc.errno == _errno.ENOENT:
        return NotFoundError(f"{what}: {exc.strerror} ({exc.filename})")
    if exc.errno in (_errno.EACCES, _errno.EPERM):
        return CachefsError(
            f"{what}: permission denied ({exc.filename})",
            hint="run as a user that may read and write the store directory",
        )
    err = CachefsError(f"{what}: {exc.strerror or exc}")
    err.errno = exc.errno or _errno.EIO
    return err


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The errors a group holds, through its nested groups (trio's nurseries
    group what their tasks raise)."""
    out: list[BaseException] = []
    for inner in group.exceptions:
        out.extend(leaves(inner) if isinstance(inner, BaseExceptionGroup) else [inner])
    return out
