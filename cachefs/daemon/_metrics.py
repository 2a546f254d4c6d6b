"""``--metrics ADDR``: a daemon's Prometheus endpoint (daemon layer).

The daemon (a mount's, or ``cachefs serve``'s) makes one
:class:`~cachefs.metrics.Metrics` and hands its instruments to the parts that
count as things happen: the FUSE adapter, the servers, each remote endpoint
(:func:`cachefs.remote.measure`) and the store's publications
(``Store.on_publish``).  The figures it already keeps (``stats.json``) are
read at each scrape, on the event loop (``trio.from_thread``), by a
:class:`~cachefs.metrics.FiguresCollector`.  ``/metrics`` is served by
prometheus_client from a thread of its own, so that a scrape never waits
behind FUSE requests for more than that one hop onto the loop.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from cachefs.errors import ConfigError
from cachefs.fs import Filesystem
from cachefs.metrics import METRICS_PORT, FiguresCollector, Metrics, serve_metrics
from cachefs.server import parse_address

log = logging.getLogger(__name__)


def check_metrics_address(address: str | None) -> str | None:
    """``--metrics ADDR`` as ``HOST:PORT`` (ConfigError if it is not one)."""
    return None if address is None else parse_address(address, METRICS_PORT)


class DaemonMetrics:
    """The metrics of one daemon: made before the store's parts, served once it runs."""

    def __init__(self, address: str) -> None:
        self.address = parse_address(address, METRICS_PORT)
        self.metrics = Metrics()

    async def run(
        self,
        fs: Filesystem,
        role: str,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``/metrics`` until cancelled; started with where it listens."""
        fs.store.on_publish = self.metrics.published
        token = trio.lowlevel.current_trio_token()

        def snapshot() -> dict[str, Any]:
            return trio.from_thread.run_sync(lambda: _figures(fs), trio_token=token)

        info = {
            "store": str(fs.store.path),
            "digest_function": fs.store.digest_function.name,
            "role": role,
        }
        self.metrics.registry.register(FiguresCollector(snapshot, info))
        host, _, port = self.address.rpartition(":")
        try:
            server, where = await trio.to_thread.run_sync(
                serve_metrics, self.metrics, host, int(port)
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.address}: {exc.strerror or exc}",
                hint="the address is taken or not this machine's",
            ) from None
        log.info("serving Prometheus metrics on http://%s/metrics", where)
        task_status.started(where)
        try:
            await trio.sleep_forever()
        finally:
            fs.store.on_publish = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(server.shutdown)
            server.server_close()


def _figures(fs: Filesystem) -> dict[str, Any]:
    doc = fs.figures()
    doc["activity"] = fs.store.activity()
    doc["disk_free"] = fs.store.disk_free()
    return doc


__all__ = ["DaemonMetrics", "check_metrics_address"]
