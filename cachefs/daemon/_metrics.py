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
import socket
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import trio

from cachefs import tracing
from cachefs.engine import Store
from cachefs.errors import ConfigError
from cachefs.fs import Filesystem
from cachefs.metrics import METRICS_PORT, FiguresCollector, FuseMeter, Metrics, serve_metrics
from cachefs.remote import Tier, TierOptions, measure
from cachefs.server import parse_address

log = logging.getLogger(__name__)

#: Seconds a scrape waits for the daemon's figures before it fails.
SNAPSHOT_TIMEOUT = 10.0


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
        fuse = self.metrics.fuse if role == "mount" else None
        snapshot = _Snapshots(fs, fuse, trio.lowlevel.current_trio_token())

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


class _Snapshots:
    """The daemon's figures for a scrape, taken on its event loop.

    A scrape waits at most ``SNAPSHOT_TIMEOUT`` for the loop: a loop that does
    not answer makes the scrape fail (HTTP 500, ``up`` 0), not hang.  One
    snapshot is in flight at a time: scrapes that come meanwhile wait for the
    same one, so a stuck loop holds one thread, not one per scrape.  A daemon
    that is stopping (its loop gone) answers without these figures.
    """

    def __init__(
        self, fs: Filesystem, fuse: FuseMeter | None, token: trio.lowlevel.TrioToken
    ) -> None:
        self.fs = fs
        self.fuse = fuse
        self.token = token
        self._lock = threading.Lock()
        self._pending: Future[dict[str, Any]] | None = None

    def __call__(self) -> dict[str, Any] | None:
        with self._lock:
            pending = self._pending
            if pending is None or pending.done():
                pending = self._pending = Future()
                threading.Thread(
                    target=self._take, args=(pending,), name="cachefs-metrics-snapshot", daemon=True
                ).start()
        try:
            return pending.result(timeout=SNAPSHOT_TIMEOUT)
        except trio.RunFinishedError:
            return None  # stopping: no figures this time
        except FutureTimeout:
            raise TimeoutError(
                f"the daemon's event loop did not answer within {SNAPSHOT_TIMEOUT:.0f} s"
            ) from None

    def _take(self, pending: Future[dict[str, Any]]) -> None:
        try:
            pending.set_result(
                trio.from_thread.run_sync(
                    lambda: _figures(self.fs, self.fuse), trio_token=self.token
                )
            )
        except BaseException as exc:
            pending.set_exception(exc)


def observed_tiers(
    store: Store,
    tiers: TierOptions,
    observed: DaemonMetrics | None,
    *,
    role: str,
    otlp_endpoint: str | None,
    fuse_ratio: float,
) -> list[Tier]:
    """Turn tracing on if asked (in the daemon's own process: the SDK starts a
    thread), then open the store's tiers, every endpoint measured and traced."""
    tracing.configure(
        otlp_endpoint,
        service=f"cachefs-{role}",
        instance=f"{socket.gethostname()}:{store.path}",
        fuse_ratio=fuse_ratio,
    )
    remotes = tiers.open(store.digest_function)
    measure(remotes, None if observed is None else observed.metrics.remote_meter)
    return remotes


def _figures(fs: Filesystem, fuse: FuseMeter | None) -> dict[str, Any]:
    doc = fs.figures() | fs.control.live()  # the servers' tenants among them
    doc["activity"] = fs.store.activity()
    doc["disk_free"] = fs.store.disk_free()
    if fuse is not None:
        doc["fuse"] = fuse.snapshot()
    return doc


__all__ = ["DaemonMetrics", "check_metrics_address", "observed_tiers"]
