"""``cachefs serve``: the store over REAPI v2 (gRPC) and the Bazel HTTP cache protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cachefs import daemon
from cachefs.errors import ConfigError
from cachefs.fs import POLICIES
from cachefs.remote import TierOptions
from cachefs.server import DEFAULT_MAX_SIZE, GRPC_PORT, HTTP_PORT, ServeOptions, parse_tenants
from cachefs.signing import TrustOptions

from .common import human_bytes, parse_size, store_argument
from .daemon_options import (
    audit_log_option,
    cache_size_option,
    config_option,
    daemon_options,
    grpc_option,
    http_option,
    local_max_size_option,
    max_store_size_option,
    memory_limit_option,
    metrics_option,
    otlp_option,
    remote_option,
    security_options,
)


@click.command("serve")
@store_argument
@grpc_option
@http_option
@security_options
@audit_log_option
@metrics_option
@otlp_option
@click.option(
    "--max-size",
    metavar="SIZE",
    help=f"Budget of what clients store (the cache directory /remote-cache); "
    f"{human_bytes(DEFAULT_MAX_SIZE)} when it is made, else it is kept.",
)
@click.option(
    "--policy",
    type=click.Choice(sorted(POLICIES)),
    default="lru",
    show_default=True,
    help="What to evict first when the budget is reached.",
)
@click.option(
    "--daemon", "detach", is_flag=True, help="Detach once serving (log to STORE/cachefs.log)."
)
@max_store_size_option
@cache_size_option
@memory_limit_option
@remote_option
@config_option
@local_max_size_option
@click.pass_context
def command(
    ctx: click.Context,
    store: Path,
    grpc_address: str | None,
    http_address: str | None,
    secured: dict[str, Any],
    trust: TrustOptions,
    audit_dir: Path | None,
    max_size: str | None,
    policy: str,
    detach: bool,
    max_store_size: str | None,
    cache_size: str,
    memory_limit: str,
    remotes: tuple[str, ...],
    config: Path | None,
    local_max_size: str | None,
    metrics_address: str | None,
    otlp_endpoint: str | None,
) -> None:
    """Serve STORE to build tools over REAPI v2 (gRPC) and the Bazel HTTP cache
    protocol, with no mount (STORE is created if missing).

    With neither --grpc nor --http both are served, on 127.0.0.1:9092 and
    127.0.0.1:8080 (as bazel-remote); with one of them, only that one.  Runs in
    the foreground until SIGTERM or Ctrl-C (under systemd: Type=notify, see
    systemd/cachefs-serve@.service), or detaches with --daemon.

    What clients store lives in the store's namespace, in the cache directory
    /remote-cache (<instance>/cas/ and <instance>/ac/; "_" is the empty
    instance name): its budget, eviction and hit figures are those of any
    cache directory (`cachefs cache ls STORE`), and a mount of the store shows
    it.  `cachefs stats STORE` and `cachefs gc STORE` talk to the running
    daemon.

    With --remote (or tiers in --config) what clients upload is pushed to the
    remote tiers in the background, from a queue kept in the store.

    With --tokens FILE every request must carry a token of FILE
    (Authorization: Bearer ...; `cachefs token add`).  Without it only
    loopback addresses are served, unless --allow-unauthenticated.

    With --metrics ADDR it serves Prometheus metrics on http://ADDR/metrics;
    with --otlp-endpoint URL it sends OpenTelemetry traces there.

    \b
    Point a build at it:
      bazel build --remote_cache=grpc://127.0.0.1:9092 //...
      bazel build --remote_cache=http://127.0.0.1:8080 //...
      ccache: remote_storage = http://127.0.0.1:8080|layout=bazel
    """
    if grpc_address is None and http_address is None:
        grpc_address, http_address = f"127.0.0.1:{GRPC_PORT}", f"127.0.0.1:{HTTP_PORT}"
    budget = None if max_size is None else parse_size(max_size)
    if budget is not None and budget <= 0:
        raise ConfigError("--max-size must be more than 0 bytes")
    tiers = TierOptions.parse(
        remotes,
        config,
        local_max_size=None if local_max_size is None else parse_size(local_max_size),
        trust=trust,
    )
    daemon.serve(
        store,
        ServeOptions(
            grpc=grpc_address,
            http=http_address,
            max_size=budget,
            policy=policy,
            tenants=parse_tenants(tiers.config, parse_size),
            **secured,
        ),
        daemon_options(
            ctx,
            tiers,
            cache_size=cache_size,
            max_store_size=max_store_size,
            memory_limit=memory_limit,
            metrics_address=metrics_address,
            otlp_endpoint=otlp_endpoint,
            audit_dir=audit_dir,
        ),
        daemon=detach,
    )
