"""The metric names, the instruments counted as things happen, and ``/metrics``."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import start_http_server

from cachefs import __version__
from cachefs.metrics._fuse import FuseMeter

#: Default port of ``--metrics`` (the one OpenTelemetry's Prometheus exporter uses).
METRICS_PORT = 9464

#: Latency buckets, seconds: local requests (FUSE, servers, publications) ...
LOCAL_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: ... and requests that cross the network.
REMOTE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass(frozen=True)
class Name:
    """One metric family: its kind (as ``/metrics`` types it), labels and help."""

    kind: str
    labels: tuple[str, ...]
    help: str


def _n(kind: str, help: str, *labels: str) -> Name:
    return Name(kind, labels, help)


#: Every metric family, by name (without the ``_total``/``_bucket`` suffixes
#: the exposition adds to counters and histograms).  Stable: a change here is
#: a change of the interface (README, rules, dashboards).
NAMES: dict[str, Name] = {
    # --- the process ----------------------------------------------------------------------
    "cachefs_build": _n("info", "The cachefs version and Python", "version", "python"),
    "cachefs_store": _n("info", "The store this process owns", "store", "digest_function", "role"),
    # --- counted as they happen -------------------------------------------------------------
    "cachefs_fuse_request_duration_seconds": _n(
        "histogram", "FUSE requests by operation, and how long they took", "operation"
    ),
    "cachefs_fuse_errors": _n(
        "counter", "FUSE requests answered with an error, by errno", "operation", "errno"
    ),
    "cachefs_fuse_read_bytes": _n(
        "counter", "Bytes read through the mount that the kernel's page cache did not have"
    ),
    "cachefs_fuse_written_bytes": _n("counter", "Bytes written through the mount"),
    "cachefs_publish_duration_seconds": _n(
        "histogram", "Publications (group commits of new content), and how long they took"
    ),
    "cachefs_server_request_duration_seconds": _n(
        "histogram",
        "Server requests by protocol, method and status, and how long they took",
        "protocol",
        "method",
        "status",
    ),
    "cachefs_server_received_bytes": _n(
        "counter", "Bytes of requests the servers received", "protocol"
    ),
    "cachefs_server_sent_bytes": _n("counter", "Bytes of responses the servers sent", "protocol"),
    "cachefs_remote_request_duration_seconds": _n(
        "histogram",
        "Requests to remote tiers by tier, endpoint and operation, and how long they took",
        "tier",
        "endpoint",
        "operation",
    ),
    "cachefs_remote_errors": _n(
        "counter", "Remote requests that failed", "tier", "endpoint", "operation"
    ),
    "cachefs_remote_received_bytes": _n(
        "counter", "Bytes received from remote tiers", "tier", "endpoint"
    ),
    "cachefs_remote_sent_bytes": _n("counter", "Bytes sent to remote tiers", "tier", "endpoint"),
    # --- read when scraped: the store ----------------------------------------------------------
    "cachefs_store_objects": _n("gauge", "Distinct objects (file contents) stored"),
    "cachefs_store_files": _n("gauge", "References to objects (files and cache entries)"),
    "cachefs_store_logical_bytes": _n("gauge", "Bytes of all references, before dedup"),
    "cachefs_store_chunks": _n("gauge", "Distinct chunks stored"),
    "cachefs_store_chunk_bytes": _n("gauge", "Bytes of the distinct chunks, uncompressed"),
    "cachefs_store_stored_bytes": _n("gauge", "Bytes of live records in segments"),
    "cachefs_store_segments": _n("gauge", "Segment files"),
    "cachefs_store_segment_bytes": _n("gauge", "Bytes of segment files, dead records included"),
    "cachefs_store_segments_below_gc_threshold": _n(
        "gauge", "Segments gc would compact (live share under the threshold)"
    ),
    "cachefs_store_quota_bytes": _n("gauge", "The store quota (--max-store-size), when set"),
    "cachefs_store_quota_stuck": _n(
        "gauge", "1 while over the quota with nothing left to evict or collect"
    ),
    "cachefs_store_disk_free_bytes": _n("gauge", "Bytes free on the store's filesystem"),
    "cachefs_store_inodes": _n("gauge", "Inodes in the namespace"),
    "cachefs_store_corruptions": _n("gauge", "Damaged reads since the last fsck"),
    "cachefs_store_needs_fsck": _n("gauge", "1 when damage was found and fsck has not run since"),
    "cachefs_failsafe": _n("gauge", "1 when the mount went read-only after damage"),
    "cachefs_internal_errors": _n("counter", "Requests that failed on a bug (answered EIO)"),
    "cachefs_open_files": _n("gauge", "Files open through the mount or the servers"),
    # --- the engine's activity -------------------------------------------------------------
    "cachefs_published_objects": _n("counter", "Objects published"),
    "cachefs_published_bytes": _n("counter", "Logical bytes of the objects published"),
    "cachefs_ingest_logical_bytes": _n("counter", "Bytes that went through ingest"),
    "cachefs_ingest_unique_bytes": _n("counter", "Bytes of new chunks (not deduplicated)"),
    "cachefs_ingest_stored_bytes": _n("counter", "Bytes of new chunks as stored (compressed)"),
    "cachefs_chunk_cache_hits": _n("counter", "Chunk reads served from the chunk cache"),
    "cachefs_chunk_cache_misses": _n("counter", "Chunk reads that missed the chunk cache"),
    "cachefs_journal_bytes": _n("gauge", "Bytes in the journal since its last checkpoint"),
    "cachefs_journal_checkpoints": _n("counter", "Journal checkpoints"),
    "cachefs_gc_runs": _n("counter", "Garbage collections run"),
    "cachefs_gc_reclaimed_bytes": _n("counter", "Segment bytes garbage collection freed"),
    "cachefs_gc_duration_seconds": _n("counter", "Time spent collecting garbage"),
    # --- memory ------------------------------------------------------------------------------
    "cachefs_memory_rss_bytes": _n("gauge", "Resident memory of the daemon"),
    "cachefs_memory_peak_rss_bytes": _n("gauge", "Peak resident memory of the daemon"),
    "cachefs_memory_limit_bytes": _n("gauge", "The daemon's memory limit (--memory-limit)"),
    "cachefs_memory_shrinks": _n("counter", "Times the caches were dropped under the limit"),
    # --- cache directories -------------------------------------------------------------------
    "cachefs_cache_bytes": _n("gauge", "Bytes held by a cache directory", "cache"),
    "cachefs_cache_budget_bytes": _n("gauge", "A cache directory's budget (--max-size)", "cache"),
    "cachefs_cache_files": _n("gauge", "Files in a cache directory", "cache"),
    "cachefs_cache_hits": _n("counter", "Reads of files already in a cache directory", "cache"),
    "cachefs_cache_misses": _n("counter", "Lookups a cache directory could not answer", "cache"),
    "cachefs_cache_evictions": _n("counter", "Files evicted from a cache directory", "cache"),
    "cachefs_cache_evicted_bytes": _n("counter", "Bytes evicted from a cache directory", "cache"),
    "cachefs_cache_throttled_writes": _n(
        "counter", "Writes that waited for eviction to make room", "cache"
    ),
    "cachefs_cache_throttled_seconds": _n(
        "counter", "Time writers waited for eviction to make room", "cache"
    ),
    # --- trust ------------------------------------------------------------------------------
    "cachefs_tenant_bytes": _n("gauge", "Logical bytes of a tenant's instances", "tenant"),
    "cachefs_tenant_quota_bytes": _n("gauge", "A tenant's quota (0: none)", "tenant"),
    "cachefs_tenant_quota_refusals": _n(
        "counter", "Writes refused for passing a tenant's quota", "tenant"
    ),
    "cachefs_signed_entries": _n(
        "counter",
        "Entries checked for a trusted signature: accepted, or why refused",
        "outcome",
    ),
    # --- remote tiers ------------------------------------------------------------------------
    "cachefs_remote_breaker_open": _n(
        "gauge", "1 while a tier or endpoint is skipped by its circuit breaker", "tier", "endpoint"
    ),
    "cachefs_remote_failing": _n(
        "gauge",
        "1 from when a tier or endpoint's breaker opens until a request to it succeeds",
        "tier",
        "endpoint",
    ),
    "cachefs_remote_push_queue_items": _n("gauge", "Items waiting to be pushed"),
    "cachefs_remote_push_queue_oldest_seconds": _n(
        "gauge", "Age of the oldest item waiting to be pushed"
    ),
    "cachefs_remote_pushed_objects": _n("counter", "Objects pushed to the write tiers"),
    "cachefs_remote_pushed_chunks": _n("counter", "Chunks pushed to the write tiers"),
    "cachefs_remote_pushed_bytes": _n("counter", "Bytes pushed to the write tiers"),
    "cachefs_remote_pushed_entries": _n("counter", "Shared-directory entries pushed"),
    "cachefs_remote_spliced_objects": _n("counter", "Objects made on a tier by SpliceBlob"),
    "cachefs_remote_early_chunks": _n(
        "counter", "Chunks pushed while their file was written, before it was published"
    ),
    "cachefs_remote_push_failures": _n("counter", "Push attempts that failed (and are retried)"),
    "cachefs_remote_push_dropped": _n("counter", "Queue items dropped: refused for good"),
    "cachefs_remote_fetched_objects": _n("counter", "Objects fetched from a tier", "tier"),
    "cachefs_remote_fetched_chunks": _n("counter", "Chunks fetched from a tier", "tier"),
    "cachefs_remote_fetched_bytes": _n("counter", "Bytes fetched from a tier", "tier"),
    "cachefs_remote_fetch_misses": _n("counter", "Fetches no tier could answer"),
    "cachefs_remote_fetch_errors": _n("counter", "Fetches that failed on a tier error"),
    "cachefs_remote_healed_chunks": _n(
        "counter", "Damaged local chunks healed from a tier", "tier"
    ),
    "cachefs_remote_shared_entries_queued": _n(
        "counter", "Shared-directory entries queued for the tiers"
    ),
    "cachefs_remote_shared_fetches": _n(
        "counter", "Lookups in shared directories answered from a tier"
    ),
    "cachefs_remote_shared_misses": _n(
        "counter", "Lookups in shared directories no tier could answer"
    ),
    "cachefs_remote_dropped_chunks": _n(
        "counter", "Local chunks dropped under --local-max-size (held by a tier)"
    ),
}


def _help(name: str) -> str:
    return NAMES[name].help


class Metrics:
    """The registry of one process, and the instruments counted as things happen."""

    def __init__(self) -> None:
        # No ``_created`` series beside each counter and histogram: a restart
        # shows as a counter reset, as Prometheus expects.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        #: FUSE requests, counted on the event loop (``_fuse.py``), read at scrapes.
        self.fuse = FuseMeter(LOCAL_BUCKETS)
        self.publications = self._histogram("cachefs_publish_duration_seconds")
        self.server_requests = self._histogram("cachefs_server_request_duration_seconds")
        self.server_received = self._counter("cachefs_server_received_bytes")
        self.server_sent = self._counter("cachefs_server_sent_bytes")
        self.remote_requests = self._histogram(
            "cachefs_remote_request_duration_seconds", REMOTE_BUCKETS
        )
        self.remote_errors = self._counter("cachefs_remote_errors")
        self.remote_received = self._counter("cachefs_remote_received_bytes")
        self.remote_sent = self._counter("cachefs_remote_sent_bytes")
        build = Info("cachefs_build", _help("cachefs_build"), registry=self.registry)
        build.info({"version": __version__, "python": platform.python_version()})

    def _histogram(self, name: str, buckets: tuple[float, ...] = LOCAL_BUCKETS) -> Histogram:
        return Histogram(
            name, _help(name), NAMES[name].labels, registry=self.registry, buckets=buckets
        )

    def _counter(self, name: str) -> Counter:
        return Counter(name, _help(name), NAMES[name].labels, registry=self.registry)

    def published(self, seconds: float, objects: int, size: int) -> None:
        """A publication took ``seconds`` (``Store.on_publish``)."""
        self.publications.observe(seconds)

    def remote_meter(self, tier: str, endpoint: str) -> RemoteMeter:
        """The instruments of one remote endpoint (of tier ``tier``)."""
        return RemoteMeter(self, tier, endpoint)


class RemoteMeter:
    """Requests to one remote endpoint, counted (``remote``'s ``Metered`` calls it)."""

    def __init__(self, metrics: Metrics, tier: str, endpoint: str) -> None:
        self._metrics = metrics
        self._labels = (tier, endpoint)
        self._received = metrics.remote_received.labels(tier, endpoint)
        self._sent = metrics.remote_sent.labels(tier, endpoint)
        self._requests: dict[str, Any] = {}

    def request(
        self, operation: str, seconds: float, *, failed: bool, received: int = 0, sent: int = 0
    ) -> None:
        child = self._requests.get(operation)
        if child is None:
            child = self._requests[operation] = self._metrics.remote_requests.labels(
                *self._labels, operation
            )
        child.observe(seconds)
        if failed:
            self._metrics.remote_errors.labels(*self._labels, operation).inc()
        if received:
            self._received.inc(received)
        if sent:
            self._sent.inc(sent)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[Any, str]:
    """Serve ``/metrics`` on ``host:port`` (port 0: a free one) from a thread
    of its own; the server (``shutdown()`` stops it) and where it listens."""
    server, thread = start_http_server(port, host.strip("[]"), registry=metrics.registry)
    thread.name = "cachefs-metrics"
    bound = server.server_address[1]
    return server, f"{host}:{bound}"


__all__ = ["METRICS_PORT", "NAMES", "Metrics", "Name", "RemoteMeter", "serve_metrics"]
