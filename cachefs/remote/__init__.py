"""Remote tiers: blobs kept on other machines (remote layer).

cachefs builds no cluster of its own: after the local store come existing
distributed stores and servers, each a :class:`Remote` of blobs by digest --

* an S3-compatible object store or a Bazel HTTP cache (``_objects.py``, on
  obstore),
* any REAPI v2 server's CAS (``_reapi.py``, gRPC with ``cachefs.protocol``),
* a shard group of endpoints of either kind, placed by rendezvous hashing with
  weights and replicas, each behind a circuit breaker (``_shards.py``).

A store's tiers (``_tiers.py``; named by ``--remote`` and the config file,
``_config.py``) push what it publishes, from its durable queue, and fetch
what it lacks; objects travel as the store's own chunks plus a chunk list
(``_lists.py``), many chunks at once (``_transfer.py``), and in a bucket in
pack files with an index (``_packs.py``), the chunks of a large file going up as
it is written (``_early.py``).  With metrics, every endpoint's requests are measured
(``_metered.py``).

Everything a remote answers is verified against its digest before it is used
(``_blobs.verified``).  Remotes are named by URL (``_urls.py``).
"""

from __future__ import annotations

from cachefs.remote._blobs import Remote, verified
from cachefs.remote._config import TierOptions, load_tiers, read_config
from cachefs.remote._lists import INLINE_MAX, SharedEntry
from cachefs.remote._metered import Metered, measure
from cachefs.remote._objects import ObjectRemote
from cachefs.remote._open import DEFAULT_TIMEOUT, open_remote
from cachefs.remote._reapi import ReapiRemote
from cachefs.remote._shards import Breaker, ShardGroup, placement
from cachefs.remote._tiers import DIRECTIONS, Pusher, Tier, Tiers
from cachefs.remote._urls import FORMS, RemoteUrl, parse_remote

__all__ = [
    "DEFAULT_TIMEOUT",
    "DIRECTIONS",
    "FORMS",
    "INLINE_MAX",
    "Breaker",
    "Metered",
    "ObjectRemote",
    "Pusher",
    "ReapiRemote",
    "Remote",
    "RemoteUrl",
    "ShardGroup",
    "SharedEntry",
    "Tier",
    "TierOptions",
    "Tiers",
    "load_tiers",
    "measure",
    "open_remote",
    "parse_remote",
    "placement",
    "read_config",
    "verified",
]
