"""The servers (server layer): the store over REAPI v2 (gRPC) and the Bazel
HTTP cache protocol, so that build tools on other machines use it as their
remote cache.

What clients store is kept as files of the store's namespace under the cache
directory ``/remote-cache`` (``_cache.py``): eviction, budgets, hit and miss
figures, the quota, fsck and ``ls`` are the filesystem's own.  The protocols
are thin translations onto that cache: gRPC in ``_grpc*.py`` (grpcio, the messages of
``cachefs.protocol``), HTTP in ``_http.py`` (an ASGI app on hypercorn).
:func:`run_servers` runs them beside a :class:`~cachefs.fs.Filesystem` in the
process that owns the store (``cachefs serve``, ``cachefs mount --grpc``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachefs.server._names import parse_address
from cachefs.server._options import (
    DEFAULT_MAX_SIZE,
    GRPC_PORT,
    HTTP_PORT,
    Listening,
    ServeOptions,
    check_exposure,
)
from cachefs.server._tenants import parse_tenants
from cachefs.server._tokens import PERMISSIONS, add_token, read_tokens, remove_token

if TYPE_CHECKING:
    import trio

    from cachefs.fs import Filesystem
    from cachefs.metrics import Metrics


def check_addresses(options: ServeOptions) -> None:
    """Refuse (ConfigError) addresses that cannot be bound, before anything starts."""
    addresses = []
    if options.grpc is not None:
        addresses.append(parse_address(options.grpc, GRPC_PORT))
    if options.http is not None:
        addresses.append(parse_address(options.http, HTTP_PORT))
    options.check_tls()
    check_exposure(
        addresses,
        authenticated=options.authenticates,
        allow=options.allow_unauthenticated,
    )


async def run_servers(
    fs: Filesystem,
    options: ServeOptions,
    *,
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[Listening],
) -> None:
    """Serve the store's cache over gRPC and HTTP until cancelled (``_serve.py``);
    with ``metrics``, every request is measured.  Started with ``nursery.start``,
    which gives ``task_status``: it is told where the servers listen."""
    # Imported here: grpcio, hypercorn and trio take a while to load, and every
    # command line imports this package for its options.
    from cachefs.server._serve import serve  # noqa: PLC0415

    await serve(fs, options, metrics=metrics, task_status=task_status)


__all__ = [
    "DEFAULT_MAX_SIZE",
    "GRPC_PORT",
    "HTTP_PORT",
    "PERMISSIONS",
    "Listening",
    "ServeOptions",
    "add_token",
    "check_addresses",
    "parse_address",
    "parse_tenants",
    "read_tokens",
    "remove_token",
    "run_servers",
]
