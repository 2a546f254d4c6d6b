"""Running the servers beside a filesystem (server layer).

:func:`serve` (``cachefs.server.run_servers``) runs on the filesystem's trio thread, next to
``Filesystem.run``, in the process that owns the store (``cachefs serve``, or
a mount's daemon with ``--grpc``/``--http``): it opens the cache directory,
starts the gRPC server (grpcio's own thread pool) and the HTTP server
(hypercorn, on this trio loop), reports where they listen, and serves until
cancelled.  Then the HTTP server stops and the gRPC server is stopped with a
grace period for the calls in flight, before the loop ends (their calls into
the filesystem need it).
"""

from __future__ import annotations

import functools
import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

import hypercorn.config
import hypercorn.trio
import trio

from cachefs import __version__, tracing
from cachefs.errors import ConfigError, leaves
from cachefs.fs import Filesystem
from cachefs.server._auth import Gate
from cachefs.server._cache import RemoteCache
from cachefs.server._grpc_server import serve_grpc
from cachefs.server._http import HttpCache
from cachefs.server._measure import MeasuredHttp
from cachefs.server._names import parse_address
from cachefs.server._options import GRPC_PORT, HTTP_PORT, Listening, ServeOptions
from cachefs.server._tenants import instance_bytes

if TYPE_CHECKING:
    from cachefs.metrics import Metrics

log = logging.getLogger(__name__)

#: Seconds the gRPC calls in flight get to finish when the servers stop.
GRACE = 5.0


async def serve(
    fs: Filesystem,
    options: ServeOptions,
    *,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the store's cache over gRPC and HTTP until cancelled (see the module
    doc); with ``metrics``, every request is measured, and with tracing on,
    traced (``_measure.py``)."""
    cache = RemoteCache.open(fs, max_size=options.max_size, policy=options.policy)
    tenants = options.tenants
    if tenants is not None:
        tenants.measure = functools.partial(instance_bytes, cache)
        fs.control.sources.append(lambda: {"tenants": tenants.figures()})
    gate = (
        Gate(fs.store.audit, options.tokens, options.htpasswd, tenants)
        if options.authenticates
        else None
    )
    listening = Listening()

    def status() -> dict[str, Any]:
        figures = fs.figures()
        mine = [c for c in figures.get("caches", []) if c.get("inode") == cache.root]
        return {
            "version": __version__,
            "digest_function": cache.digest_function.name,
            "servers": listening.as_dict(),
            "cache": mine[0] if mine else None,
            "store": {
                key: figures[key]
                for key in ("store", "files", "logical_bytes", "stored_bytes", "dedup_ratio")
                if key in figures
            },
            "max_store_size": figures.get("max_store_size"),
            **({} if tenants is None else {"tenants": tenants.figures()}),
        }

    grpc_server = None
    try:
        if options.grpc is not None:
            address = parse_address(options.grpc, GRPC_PORT)
            grpc_server, listening.grpc = await trio.to_thread.run_sync(
                lambda: serve_grpc(cache, address, metrics=metrics, gate=gate, tls=options)
            )
        async with trio.open_nursery() as nursery:
            if options.http is not None:
                app: Any = HttpCache(cache, status, gate)
                if metrics is not None or tracing.active():
                    app = MeasuredHttp(app, metrics)
                listening.http = await _start_http(
                    nursery, app, parse_address(options.http, HTTP_PORT), options
                )
            fs.store.audit.record(
                "servers.start",
                **listening.as_dict(),
                tokens=None if options.tokens is None else str(options.tokens),
                htpasswd=None if options.htpasswd is None else str(options.htpasswd),
                tls=options.tls_cert is not None,
                client_ca=None if options.tls_client_ca is None else str(options.tls_client_ca),
            )
            task_status.started(listening)
            await trio.sleep_forever()
    finally:
        if grpc_server is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: grpc_server.stop(GRACE).wait())
            log.info("stopped the gRPC server on %s", listening.grpc)


def _http_config(address: str, tls: ServeOptions) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [address]
    if tls.tls_cert is not None:
        config.certfile, config.keyfile = str(tls.tls_cert), str(tls.tls_key)
        if tls.tls_client_ca is not None:
            config.ca_certs = str(tls.tls_client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    config.accesslog = None
    config.errorlog = logging.getLogger("cachefs.server.hypercorn")
    config.graceful_timeout = GRACE
    config.keep_alive_timeout = 60.0
    return config


async def _start_http(nursery: trio.Nursery, app: Any, address: str, tls: ServeOptions) -> str:
    """Start the HTTP server in ``nursery`` (with TLS as ``tls`` says); the
    address it listens on."""
    try:
        config = _http_config(address, tls)
        config.create_ssl_context()  # a certificate or key that does not load fails here
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot use the TLS certificate {tls.tls_cert} and key {tls.tls_key}: {exc}",
            hint="give PEM files: the certificate chain and its private key",
        ) from None
    try:
        # The app's messages are plain dicts: hypercorn's TypedDicts are the same.
        serve = functools.partial(hypercorn.trio.serve, cast(Any, app), config)
        bound: list[str] = await nursery.start(serve)
    except* OSError as group:  # binding failed (hypercorn's own nursery groups it)
        reasons = {_reason(exc) for exc in leaves(group)}
        raise ConfigError(
            f"cannot serve HTTP on {address}: {', '.join(sorted(reasons))}",
            hint="the address is taken or not this machine's",
        ) from None
    where = bound[0].removeprefix("http://").removeprefix("https://")
    log.info("serving the Bazel HTTP cache protocol on %s", where)
    return where


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
