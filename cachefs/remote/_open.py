"""Opening a remote by URL (remote layer)."""

from __future__ import annotations

from cachefs.errors import ConfigError
from cachefs.format.digest import SHA256, DigestFunction
from cachefs.remote._blobs import Remote
from cachefs.remote._objects import ObjectRemote
from cachefs.remote._reapi import ReapiRemote
from cachefs.remote._urls import parse_remote

#: Seconds a remote request may take unless the tier says otherwise (short:
#: a lookup that needs a dead remote must not hang a build).
DEFAULT_TIMEOUT = 10.0


def open_remote(
    text: str, function: DigestFunction, timeout: float = DEFAULT_TIMEOUT, packs: bool = True
) -> Remote:
    """The remote a URL names (ConfigError if it names none), for blobs of
    ``function``, each request bounded by ``timeout`` seconds; with
    ``packs``, a bucket keeps chunks in packs (``_packs.py``; not for the
    members of a shard group)."""
    url = parse_remote(text)
    if url.kind == "http" and function != SHA256:
        raise ConfigError(
            f"remote {text}: the Bazel HTTP cache protocol names blobs by SHA-256 hashes",
            hint=f"a {function.name} store can use s3:// and grpc:// remotes",
        )
    if url.kind == "grpc":
        return ReapiRemote(url, function, timeout)
    return ObjectRemote(url, function, timeout, packs)


__all__ = ["DEFAULT_TIMEOUT", "open_remote"]
