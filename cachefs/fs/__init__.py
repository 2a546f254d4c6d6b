"""Filesystem semantics over the engine (the filesystem layer): POSIX files and
directories, the journal of writes, publication, cache directories, traces and
the memory limit.  It knows nothing of pyfuse3 (``cachefs.fuse`` adapts it to
the kernel); tests drive :class:`Filesystem` directly.

What it offers:

* :class:`Filesystem` and its defaults (``DEFAULT_PUBLISH_THRESHOLD``,
  ``DEFAULT_LOG_LIMIT``, ``DEFAULT_MEMORY_LIMIT``); :class:`OpenFile`;
* the xattrs it gives meaning to: ``DIGEST_XATTR`` (read-only, every regular
  file) and ``CACHE_XATTR`` (marks a cache directory); ``parse_setting``;
* the control directory: ``CONTROL_NAME``, ``is_virtual``, ``is_volatile``;
* eviction policies (:class:`Policy`, ``POLICIES``, ``make_policy``), for the
  trace-replay benchmark too;
* :class:`FsEvents`, what listeners of the filesystem receive;
* :class:`StoredFiles` (``Filesystem.stored``): whole files stored and read
  in one step, for the servers;
* ``check_outside`` (trace files outside the mount); the memory figures
  ``resident_bytes`` and ``memory_pressure``.
"""

from typing import TYPE_CHECKING

from cachefs.fs._policy import ARC, LFU, LRU, POLICIES, Policy, make_policy
from cachefs.fs._settings import CACHE_XATTR, SHARE_NAME, parse_setting
from cachefs.lazy import lazy_names

if TYPE_CHECKING:
    from cachefs.fs._caches import Reservation
    from cachefs.fs._control import CONTROL_NAME, is_virtual, is_volatile
    from cachefs.fs._events import FsEvents
    from cachefs.fs._files import OpenFile
    from cachefs.fs._filesystem import DEFAULT_PUBLISH_THRESHOLD, DIGEST_XATTR, Filesystem
    from cachefs.fs._journal import DEFAULT_LOG_LIMIT
    from cachefs.fs._memory import (
        DEFAULT_MEMORY_LIMIT,
        MemoryGovernor,
        memory_pressure,
        resident_bytes,
    )
    from cachefs.fs._stored_files import StoredFiles
    from cachefs.fs._trace import check_outside

#: Imported when first used: they bring the engine and trio, which the command
#: lines that only name a setting or a policy (``cachefs cache``) do without.
_LAZY = {
    "Reservation": "._caches",
    "CONTROL_NAME": "._control",
    "is_virtual": "._control",
    "is_volatile": "._control",
    "FsEvents": "._events",
    "OpenFile": "._files",
    "DEFAULT_PUBLISH_THRESHOLD": "._filesystem",
    "DIGEST_XATTR": "._filesystem",
    "Filesystem": "._filesystem",
    "DEFAULT_LOG_LIMIT": "._journal",
    "DEFAULT_MEMORY_LIMIT": "._memory",
    "MemoryGovernor": "._memory",
    "memory_pressure": "._memory",
    "resident_bytes": "._memory",
    "StoredFiles": "._stored_files",
    "check_outside": "._trace",
}


if not TYPE_CHECKING:  # mypy takes the names from the imports above
    __getattr__ = lazy_names(__name__, _LAZY)


__all__ = [
    "ARC",
    "CACHE_XATTR",
    "CONTROL_NAME",
    "DEFAULT_LOG_LIMIT",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_PUBLISH_THRESHOLD",
    "DIGEST_XATTR",
    "LFU",
    "LRU",
    "POLICIES",
    "SHARE_NAME",
    "Filesystem",
    "FsEvents",
    "MemoryGovernor",
    "OpenFile",
    "Policy",
    "Reservation",
    "StoredFiles",
    "check_outside",
    "is_virtual",
    "is_volatile",
    "make_policy",
    "memory_pressure",
    "parse_setting",
    "resident_bytes",
]
