"""The daemon layer: mounting, serving and unmounting stores, detaching, systemd, the
mount table (the only place besides ``cachefs.fuse`` that imports pyfuse3).

What it offers: ``mount`` and ``umount``; ``serve`` (a store served over gRPC
and HTTP with no mount); ``mount_info``, ``resolve_store``,
``control`` and ``cachefs_mounts`` to find mounted stores and talk to their
daemons; ``mounted_fstype``; ``sd_notify``; ``LOG_NAME``, ``FSNAME``.
"""

from cachefs.daemon._mount import mount, umount
from cachefs.daemon._mounts import (
    FSNAME,
    FSTYPE,
    cachefs_mounts,
    control,
    mount_info,
    mounted_fstype,
    resolve_store,
)
from cachefs.daemon._process import LOG_NAME
from cachefs.daemon._serve import serve
from cachefs.daemon._systemd import sd_notify

__all__ = [
    "FSNAME",
    "FSTYPE",
    "LOG_NAME",
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
