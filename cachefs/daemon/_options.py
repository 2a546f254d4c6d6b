"""What a daemon that owns a store takes, mounting or serving (daemon layer).

``cachefs mount`` and ``cachefs serve`` run the same daemon around a store:
the store opened with its push queue and audit log, the log file, the
filesystem with its memory limit and quota, the remote tiers, metrics and
traces.  :class:`DaemonOptions` holds what they share;
:func:`running_filesystem` opens and closes all of it, for either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachefs import tracing
from cachefs.daemon._metrics import DaemonMetrics, check_metrics_address, observed_tiers
from cachefs.daemon._process import setup_logging, store_options
from cachefs.engine import Store
from cachefs.fs import DEFAULT_MEMORY_LIMIT, Filesystem
from cachefs.remote import TierOptions


@dataclass(frozen=True)
class DaemonOptions:
    """The options of ``mount`` and ``serve`` that are the same for both."""

    #: ``-v`` given this many times (the log's level).
    verbose: int = 0
    #: Memory for decompressed chunks (None: the store's default).
    cache_size: int | None = None
    #: Quota on the store's stored bytes.
    max_store_size: int | None = None
    #: Memory the daemon's caches may use.
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    tiers: TierOptions = field(default_factory=TierOptions)
    #: Where Prometheus metrics are served (HOST:PORT), if anywhere.
    metrics: str | None = None
    #: Where OpenTelemetry traces go, if anywhere; the share of FUSE requests traced.
    otlp_endpoint: str | None = None
    otlp_fuse_ratio: float = tracing.DEFAULT_FUSE_RATIO
    #: The audit log's directory (None: in the store).
    audit_dir: Path | None = None

    def check(self) -> None:
        """What can be checked before the daemon starts (ConfigError)."""
        check_metrics_address(self.metrics)
        tracing.check_options(self.otlp_endpoint, self.otlp_fuse_ratio)


@contextlib.contextmanager
def running_filesystem(
    store_path: Path,
    options: DaemonOptions,
    *,
    role: str,
    foreground: bool,
    **filesystem: Any,
) -> Iterator[tuple[Filesystem, DaemonMetrics | None]]:
    """The store opened (created if missing), the log set up, and the
    filesystem over it with its tiers (``filesystem``: more arguments of
    ``Filesystem``); with the metrics, if ``options`` asks for them.  On the
    way out the filesystem and the store are closed and the last traces sent.
    ``role`` ("mount" or "serve") names the daemon in its metrics and traces."""
    tiers = options.tiers
    observed = None if options.metrics is None else DaemonMetrics(options.metrics)
    store = Store.open(
        store_path, create=True, options=store_options(options.cache_size, tiers, options.audit_dir)
    )
    try:
        setup_logging(store.path, foreground=foreground, verbose=options.verbose)
        remotes = observed_tiers(
            store,
            tiers,
            observed,
            role=role,
            otlp_endpoint=options.otlp_endpoint,
            fuse_ratio=options.otlp_fuse_ratio,
        )
        fs = Filesystem(
            store,
            max_store_size=options.max_store_size,
            memory_limit=options.memory_limit,
            tiers=remotes,
            **filesystem,
        )
        fs.remote.remote_durability = tiers.durability == "remote"
        fs.remote.local_max_size = tiers.local_max_size
        fs.io.ahead.bound(tiers.local_max_size)
        fs.remote.trust(tiers.trust)
        try:
            yield fs, observed
        finally:
            fs.close()
    finally:
        store.close()
        tracing.shutdown()  # what is left goes out
