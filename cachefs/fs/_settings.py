"""What marks a cache directory, and how its setting reads (filesystem layer):
light on purpose, for the command line (``cachefs cache``) as much as for the
file system."""

from __future__ import annotations

import errno
import re

from cachefs.errors import FsError
from cachefs.fs._policy import POLICIES

#: The xattr that marks a directory as a cache (value: ``max_size=N policy=P``).
CACHE_XATTR = b"user.cachefs.cache"

#: A share's name (``shared=NAME``).
SHARE_NAME = r"(?=.{1,200}$)[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*"


def parse_setting(value: bytes) -> tuple[int, str, str | None]:
    """``max_size=N [policy=P] [shared=NAME]`` (the xattr's value) -> (max_size,
    policy, the share's name or None)."""
    fields: dict[str, str] = {}
    for word in value.decode("ascii", "replace").replace(",", " ").split():
        key, sep, val = word.partition("=")
        if not sep:
            raise FsError(errno.EINVAL, f"cache setting {word!r} is not KEY=VALUE")
        fields[key.replace("-", "_")] = val
    unknown = set(fields) - {"max_size", "policy", "shared"}
    if unknown or "max_size" not in fields:
        raise FsError(
            errno.EINVAL, "a cache setting is max_size=BYTES [policy=lru|lfu|arc] [shared=NAME]"
        )
    shared = fields.get("shared")
    if shared is not None and not re.fullmatch(SHARE_NAME, shared):
        raise FsError(
            errno.EINVAL,
            f"share name {shared!r}: 1 to 200 of A-Z a-z 0-9 . _ - and / (not first or last)",
        )
    if not re.fullmatch(r"[0-9]+", fields["max_size"]) or int(fields["max_size"]) <= 0:
        raise FsError(errno.EINVAL, "max_size must be a positive number of bytes")
    policy = fields.get("policy", "lru")
    if policy not in POLICIES:
        raise FsError(errno.EINVAL, f"unknown policy {policy!r}")
    return int(fields["max_size"]), policy, shared


__all__ = ["CACHE_XATTR", "SHARE_NAME", "parse_setting"]
