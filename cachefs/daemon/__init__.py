"""The daemon layer: mounting, serving and unmounting stores, detaching, systemd, the
mount table (the only place besides ``cachefs.fuse`` that imports pyfuse3).

What it offers: ``mount`` and ``umount``; ``serve`` (a store served over gRPC
and HTTP with no mount); ``DaemonOptions``, what the two share; ``mount_info``, ``resolve_store``,
``control`` and ``cachefs_mounts`` to find mounted stores and talk to their
daemons; ``mounted_fstype``; ``sd_notify``; ``LOG_NAME``, ``FSNAME``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from cachefs.daemon._mounts import (
    FSNAME,
    FSTYPE,
    LOG_NAME,
    cachefs_mounts,
    control,
    mount_info,
    mounted_fstype,
    resolve_store,
    umount,
)
from cachefs.daemon._systemd import sd_notify

if TYPE_CHECKING:
    from cachefs.daemon._mount import mount
    from cachefs.daemon._options import DaemonOptions
    from cachefs.daemon._serve import serve


#: Imported when first used: they bring the file system, FUSE and the servers,
#: which the commands that only find a daemon or talk to it (``stats``,
#: ``umount``, ``gc`` ...) do without.
_LAZY = {
    "DaemonOptions": "cachefs.daemon._options",
    "mount": "cachefs.daemon._mount",
    "serve": "cachefs.daemon._serve",
}


# Not seen by mypy: it takes the names from the imports under TYPE_CHECKING,
# and so still reports a name this package does not have.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name in _LAZY:
            return getattr(importlib.import_module(_LAZY[name]), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FSNAME",
    "FSTYPE",
    "LOG_NAME",
    "DaemonOptions",
    "cachefs_mounts",
    "control",
    "mount",
    "mount_info",
    "mounted_fstype",
    "resolve_store",
    "sd_notify",
    "serve",
    "umount",
]
