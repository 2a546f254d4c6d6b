"""Prometheus metrics (a leaf beside ``errors`` and ``fsutil``: every layer may use it).

Two kinds of figures, both on one :class:`Metrics` registry:

* **Counted as they happen** -- what has no figure of its own elsewhere: the
  latency of FUSE requests, server calls, remote requests and publications
  (histograms), errors by errno and status, bytes in and out.  The layers
  that do the work are handed the instruments (:class:`Metrics`'s attributes,
  or a :class:`RemoteMeter`); with metrics off they are handed nothing and
  count nothing.
* **Read when scraped** -- everything the daemon already keeps for
  ``stats.json`` (the store, cache directories, memory, health, remote tiers)
  and the engine's activity counters, turned into metric families by
  :class:`~cachefs.metrics._figures.FiguresCollector` at each scrape: nothing
  on the hot path.

Names follow Prometheus conventions: ``cachefs_`` first, base units
(``_seconds``, ``_bytes``), ``_total`` for counters, ``_info`` for build and
store facts.  The list of names and labels is part of the interface: it is
:data:`NAMES` (and the README's table), and ``tests/test_metrics.py`` holds
a live ``/metrics`` to it.  Only this package imports ``prometheus_client``.
"""

from __future__ import annotations

from cachefs.metrics._figures import FiguresCollector
from cachefs.metrics._fuse import FuseMeter
from cachefs.metrics._instruments import (
    METRICS_PORT,
    NAMES,
    Metrics,
    RemoteMeter,
    serve_metrics,
)
from cachefs.metrics._parse import Labels, parse_samples
from cachefs.metrics._rules import RULES_FILE, rules_text

__all__ = [
    "METRICS_PORT",
    "NAMES",
    "RULES_FILE",
    "FiguresCollector",
    "FuseMeter",
    "Labels",
    "Metrics",
    "RemoteMeter",
    "parse_samples",
    "rules_text",
    "serve_metrics",
]
