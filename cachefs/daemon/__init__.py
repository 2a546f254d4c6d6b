"""The daemon layer: mounting, serving and unmounting stores, detaching, systemd, the
mount table (the only place besides ``cachefs.fuse`` that imports pyfuse3).

What it offers: ``mount`` and ``umount``; ``serve`` (a store served over gRPC
and HTTP with no mount); ``DaemonOptions``, what the two share; ``mount_info``, ``resolve_store``,
``control`` and ``cachefs_mounts`` to find mounted stores and talk to their
daemons; ``mounted_fstype``; ``sd_notify``; ``LOG_NAME``, ``FSNAME``.
"""

from typing import TYPE_CHECKING

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
from cachefs.lazy import lazy_names

if TYPE_CHECKING:
    from cachefs.daemon._mount import mount
    from cachefs.daemon._options import DaemonOptions
    from cachefs.daemon._serve import serve


#: Imported when first used: they bring the file system, FUSE and the servers,
#: which the commands that only find a daemon or talk to it (``stats``,
#: ``umount``, ``gc`` ...) do without.
_LAZY = {"DaemonOptions": "._options", "mount": "._mount", "serve": "._serve"}

if not TYPE_CHECKING:  # mypy takes the names from the imports above
    __getattr__ = lazy_names(__name__, _LAZY)


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
