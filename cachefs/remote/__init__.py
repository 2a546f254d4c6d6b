"""Remote tiers: blobs kept on other machines (remote layer).

cachefs builds no cluster of its own: after the local store come existing
distributed stores and servers, each a :class:`Remote` of blobs by digest --

* an S3-compatible object store or a Bazel HTTP cache (``_objects.py``, on
  obstore),
* any REAPI v2 server's CAS (``_reapi.py``, gRPC with ``cachefs.protocol``),
* a shard group of endpoints of either kind, placed by rendezvous hashing with
  weights and replicas, each behind a circuit breaker (``_shards.py``).

Everything a remote answers is verified against its digest before it is used
(``_blobs.verified``).  Remotes are named by URL (``_urls.py``); this layer
knows nothing of the store's files: what to push and what to fetch is decided
above it.
"""

from __future__ import annotations

from cachefs.errors import ConfigError
from cachefs.format.digest import SHA256, DigestFunction
from cachefs.remote._blobs import Remote, verified
from cachefs.remote._objects import ObjectRemote
from cachefs.remote._reapi import ReapiRemote
from cachefs.remote._shards import Breaker, ShardGroup, placement
from cachefs.remote._urls import FORMS, RemoteUrl, parse_remote

#: Seconds a remote request may take unless the tier says otherwise.
DEFAULT_TIMEOUT = 30.0


def open_remote(text: str, function: DigestFunction, timeout: float = DEFAULT_TIMEOUT) -> Remote:
    """The remote a URL names (ConfigError if it names none), for blobs of
    ``function``, each request bounded by ``timeout`` seconds."""
    url = parse_remote(text)
    if url.kind == "http" and function != SHA256:
        raise ConfigError(
            f"remote {text}: the Bazel HTTP cache protocol names blobs by SHA-256 hashes",
            hint=f"a {function.name} store can use s3:// and grpc:// remotes",
        )
    if url.kind == "grpc":
        return ReapiRemote(url, function, timeout)
    return ObjectRemote(url, function, timeout)


__all__ = [
    "DEFAULT_TIMEOUT",
    "FORMS",
    "Breaker",
    "ObjectRemote",
    "ReapiRemote",
    "Remote",
    "RemoteUrl",
    "ShardGroup",
    "open_remote",
    "parse_remote",
    "placement",
    "verified",
]
