"""The daemon's figures as metric families, made at each scrape.

The snapshot is the document ``stats.json`` shows (``Filesystem.figures``),
plus ``activity`` (``Store.activity()``: the engine's counters),
``disk_free`` and, for a mount, ``fuse`` (``FuseMeter.snapshot()``); the
daemon takes it on its event loop, where those figures live, so that a
scrape never reads them half-changed.  Nothing here runs on
the hot path: a mount without scrapes pays nothing for these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cachefs.metrics._instruments import NAMES

log = logging.getLogger(__name__)

#: Figures of the store (``stats.json`` key -> metric).
STORE = {
    "objects": "cachefs_store_objects",
    "files": "cachefs_store_files",
    "logical_bytes": "cachefs_store_logical_bytes",
    "chunks": "cachefs_store_chunks",
    "chunk_bytes": "cachefs_store_chunk_bytes",
    "stored_bytes": "cachefs_store_stored_bytes",
    "segments": "cachefs_store_segments",
    "segment_bytes": "cachefs_store_segment_bytes",
    "segments_below_gc_threshold": "cachefs_store_segments_below_gc_threshold",
    "max_store_size": "cachefs_store_quota_bytes",
    "quota_stuck": "cachefs_store_quota_stuck",
    "disk_free": "cachefs_store_disk_free_bytes",
    "inodes": "cachefs_store_inodes",
    "corruptions": "cachefs_store_corruptions",
    "open_files": "cachefs_open_files",
    "errors": "cachefs_internal_errors",
    "rss_bytes": "cachefs_memory_rss_bytes",
    "peak_rss_bytes": "cachefs_memory_peak_rss_bytes",
    "memory_limit": "cachefs_memory_limit_bytes",
    "memory_shrinks": "cachefs_memory_shrinks",
}
#: The engine's activity (``Store.activity()`` key -> metric).
ACTIVITY = {
    "published_objects": "cachefs_published_objects",
    "published_bytes": "cachefs_published_bytes",
    "ingested_bytes": "cachefs_ingest_logical_bytes",
    "ingested_unique_bytes": "cachefs_ingest_unique_bytes",
    "ingested_stored_bytes": "cachefs_ingest_stored_bytes",
    "chunk_cache_hits": "cachefs_chunk_cache_hits",
    "chunk_cache_misses": "cachefs_chunk_cache_misses",
    "journal_bytes": "cachefs_journal_bytes",
    "journal_checkpoints": "cachefs_journal_checkpoints",
    "gc_runs": "cachefs_gc_runs",
    "gc_bytes_reclaimed": "cachefs_gc_reclaimed_bytes",
    "gc_seconds": "cachefs_gc_duration_seconds",
}
#: A cache directory's figures (key of its object in ``caches`` -> metric).
CACHE = {
    "bytes": "cachefs_cache_bytes",
    "max_size": "cachefs_cache_budget_bytes",
    "files": "cachefs_cache_files",
    "hits": "cachefs_cache_hits",
    "misses": "cachefs_cache_misses",
    "evictions": "cachefs_cache_evictions",
    "bytes_evicted": "cachefs_cache_evicted_bytes",
    "throttled": "cachefs_cache_throttled_writes",
    "throttled_seconds": "cachefs_cache_throttled_seconds",
}
#: What came from each tier (key of a tier's figures -> metric, by ``tier``).
REMOTE_BY_TIER = {
    "fetched_objects": "cachefs_remote_fetched_objects",
    "fetched_chunks": "cachefs_remote_fetched_chunks",
    "fetched_bytes": "cachefs_remote_fetched_bytes",
    "healed_chunks": "cachefs_remote_healed_chunks",
}
#: The remote tiers' figures (key of ``remote`` -> metric).
REMOTE = {
    "queue": "cachefs_remote_push_queue_items",
    "oldest_seconds": "cachefs_remote_push_queue_oldest_seconds",
    "pushed_objects": "cachefs_remote_pushed_objects",
    "pushed_chunks": "cachefs_remote_pushed_chunks",
    "pushed_bytes": "cachefs_remote_pushed_bytes",
    "pushed_entries": "cachefs_remote_pushed_entries",
    "spliced_objects": "cachefs_remote_spliced_objects",
    "early_chunks": "cachefs_remote_early_chunks",
    "push_failures": "cachefs_remote_push_failures",
    "push_dropped": "cachefs_remote_push_dropped",
    "fetch_misses": "cachefs_remote_fetch_misses",
    "fetch_errors": "cachefs_remote_fetch_errors",
    "shared_entries_queued": "cachefs_remote_shared_entries_queued",
    "shared_fetches": "cachefs_remote_shared_fetches",
    "shared_misses": "cachefs_remote_shared_misses",
    "dropped_chunks": "cachefs_remote_dropped_chunks",
}


def _family(name: str) -> CounterMetricFamily | GaugeMetricFamily:
    spec = NAMES[name]
    kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    return kind(name, spec.help, labels=spec.labels)


class FiguresCollector(Collector):
    """Metric families from a snapshot of the daemon's figures, at each scrape.

    ``snapshot()`` returns the figures (see the module doc), or None when
    the daemon is going away (that scrape then has none of these); when it
    raises, the scrape fails (HTTP 500: Prometheus's ``up`` is 0), so that
    figures that cannot be read are never taken for figures that are fine.
    ``info`` names the store (``store``, ``digest_function``, ``role``).
    """

    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any] | None], info: dict[str, str]
    ) -> None:
        self._snapshot = snapshot
        self._info = info

    def describe(self) -> Iterator[Metric]:
        return iter(())  # made afresh at each scrape: nothing to check up front

    def collect(self) -> Iterator[Metric]:
        try:
            doc = self._snapshot()
        except Exception as exc:
            log.warning("metrics: the daemon's figures cannot be read: %s", exc)
            raise
        if doc is None:
            return
        store = InfoMetricFamily("cachefs_store", NAMES["cachefs_store"].help)
        store.add_metric([], self._info)
        yield store
        for key, name in STORE.items():
            value = doc.get(key)
            if value is not None:
                family = _family(name)
                family.add_metric([], float(value))
                yield family
        for flag, name in (
            ("needs_fsck", "cachefs_store_needs_fsck"),
            ("failsafe", "cachefs_failsafe"),
        ):
            family = _family(name)
            family.add_metric([], 1.0 if doc.get(flag) else 0.0)
            yield family
        activity = doc.get("activity", {})
        for key, name in ACTIVITY.items():
            if key in activity:
                family = _family(name)
                family.add_metric([], float(activity[key]))
                yield family
        yield from _caches(doc.get("caches", []))
        yield from _trust(doc.get("tenants"), doc.get("signatures"))
        yield from _remote(doc.get("remote"))
        if "fuse" in doc:
            yield from _fuse(doc["fuse"])


def _fuse(fuse: dict[str, Any]) -> Iterator[Metric]:
    """The FUSE adapter's counts (``FuseMeter.snapshot``) as families."""
    name = "cachefs_fuse_request_duration_seconds"
    spec = NAMES[name]
    requests = HistogramMetricFamily(name, spec.help, labels=spec.labels)
    bounds = [*(repr(float(b)) for b in fuse["bounds"]), "+Inf"]
    for operation, (counts, seconds) in sorted(fuse["operations"].items()):
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        requests.add_metric([operation], buckets, seconds)
    yield requests
    errors = _family("cachefs_fuse_errors")
    for (operation, errno_name), count in sorted(fuse["errors"].items()):
        errors.add_metric([operation, errno_name], float(count))
    yield errors
    for key, metric in (
        ("read_bytes", "cachefs_fuse_read_bytes"),
        ("written_bytes", "cachefs_fuse_written_bytes"),
    ):
        family = _family(metric)
        family.add_metric([], float(fuse[key]))
        yield family


def _caches(caches: list[dict[str, Any]]) -> Iterator[Metric]:
    """Levels as they are; counters since the daemon started (``since_start``):
    the totals a cache keeps restart from its last save after a crash, and a
    counter must not go down but through a restart."""
    families = {key: _family(name) for key, name in CACHE.items()}
    for cache in caches:
        since = cache.get("since_start", {})
        for key, family in families.items():
            value = since[key] if isinstance(family, CounterMetricFamily) else cache[key]
            family.add_metric([str(cache["path"])], float(value))
    yield from families.values()


def _trust(
    tenants: dict[str, dict[str, Any]] | None, signatures: dict[str, int] | None
) -> Iterator[Metric]:
    """Each tenant's usage, quota and refusals; signed entries by outcome."""
    if tenants:
        families = [
            (_family("cachefs_tenant_bytes"), "bytes"),
            (_family("cachefs_tenant_quota_bytes"), "quota"),
            (_family("cachefs_tenant_quota_refusals"), "quota_refusals"),
        ]
        for family, key in families:
            for name, figures in sorted(tenants.items()):
                family.add_metric([name], float(figures.get(key) or 0))
            yield family
    if signatures is not None:
        family = _family("cachefs_signed_entries")
        for outcome, count in sorted(signatures.items()):
            family.add_metric([outcome], float(count))
        yield family


def _remote(remote: dict[str, Any] | None) -> Iterator[Metric]:
    if remote is None:
        return
    for key, name in REMOTE.items():
        if key in remote:
            family = _family(name)
            family.add_metric([], float(remote[key]))
            yield family
    by_tier = {key: _family(name) for key, name in REMOTE_BY_TIER.items()}
    breakers = _family("cachefs_remote_breaker_open")
    failing = _family("cachefs_remote_failing")
    for tier in remote.get("tiers", []):
        for key, family in by_tier.items():
            family.add_metric([tier["remote"]], float(tier.get(key, 0)))
        # A tier's own breaker: the endpoint's, or the shard group's as a whole
        # (endpoint ""); then each endpoint of a group.
        endpoints = tier.get("endpoints", [])
        whole = "" if endpoints else tier["remote"]
        breakers.add_metric([tier["remote"], whole], 1.0 if tier.get("skipped") else 0.0)
        failing.add_metric([tier["remote"], whole], 1.0 if tier.get("failing") else 0.0)
        for endpoint in endpoints:
            labels = [tier["remote"], endpoint["remote"]]
            breakers.add_metric(labels, 1.0 if endpoint["open"] else 0.0)
            failing.add_metric(labels, 1.0 if endpoint.get("failing") else 0.0)
    yield from by_tier.values()
    yield breakers
    yield failing


__all__ = ["ACTIVITY", "CACHE", "REMOTE", "REMOTE_BY_TIER", "STORE", "FiguresCollector"]
