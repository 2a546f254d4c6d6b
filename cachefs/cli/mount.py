"""``cachefs mount``: mount a store as a filesystem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cachefs import daemon
from cachefs.errors import ConfigError
from cachefs.fs import DEFAULT_PUBLISH_THRESHOLD
from cachefs.remote import TierOptions
from cachefs.server import ServeOptions, parse_tenants
from cachefs.signing import TrustOptions
from cachefs.tracing import DEFAULT_FUSE_RATIO

from .common import parse_size, positive_size, store_argument
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


@click.command("mount")
@store_argument
@click.argument("mountpoint", type=click.Path(path_type=Path), metavar="MOUNTPOINT")
@click.option(
    "-f", "--foreground", is_flag=True, help="Stay in the foreground and log to stderr too."
)
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="FUSE mount options (allow_other, ro, ...); noallow_other / nodefault_permissions "
    "drop a default.",
)
@click.option(
    "--publish-threshold",
    default=f"{DEFAULT_PUBLISH_THRESHOLD >> 20}M",
    show_default=True,
    metavar="SIZE",
    help="Publish a file in the background once this many bytes are unpublished (1G, 256M).",
)
@cache_size_option
@max_store_size_option
@memory_limit_option
@click.option(
    "--trace",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Record a file-access trace (JSON lines) for scripts/bench_cache.py.",
)
@click.option(
    "--scrub-rate",
    metavar="SIZE",
    default=None,
    help="Scrub the store in the background at most SIZE bytes a second (e.g. 20M): a "
    "pass 10 s after mounting, then daily; damage found is recorded (default: off; "
    "`cachefs scrub MOUNTPOINT` scrubs at once).",
)
@grpc_option
@http_option
@security_options
@audit_log_option
@metrics_option
@otlp_option
@click.option(
    "--otlp-fuse-ratio",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_FUSE_RATIO,
    show_default=True,
    metavar="SHARE",
    help="With traces on, the share of FUSE requests traced (0 to 1).",
)
@remote_option
@config_option
@local_max_size_option
@click.option(
    "--remote-durability",
    type=click.Choice(["local", "remote"]),
    default="local",
    show_default=True,
    help="What fsync waits for: the local store, or also the write tiers (at most 60 s, "
    "then EIO; the data stays safe locally and queued).",
)
@click.pass_context
def command(
    ctx: click.Context,
    store: Path,
    mountpoint: Path,
    foreground: bool,
    options: tuple[str, ...],
    publish_threshold: str,
    cache_size: str,
    max_store_size: str | None,
    memory_limit: str,
    trace: Path | None,
    scrub_rate: str | None,
    grpc_address: str | None,
    http_address: str | None,
    secured: dict[str, Any],
    trust: TrustOptions,
    audit_dir: Path | None,
    remotes: tuple[str, ...],
    config: Path | None,
    local_max_size: str | None,
    remote_durability: str,
    metrics_address: str | None,
    otlp_endpoint: str | None,
    otlp_fuse_ratio: float,
) -> None:
    """Mount STORE on MOUNTPOINT (STORE is created if missing).

    Returns once the mount is ready; the daemon keeps running in the background
    (unless --foreground) until `cachefs umount MOUNTPOINT`.  As root the mount
    is open to every user, with the kernel checking permissions
    (allow_other,default_permissions).  The daemon logs to STORE/cachefs.log.

    \b
    Inside the mount:
      getfattr -n user.cachefs.digest FILE   the file's digest (<hex>/<size>)
      MOUNTPOINT/.cachefs/stats.json         live figures
      MOUNTPOINT/.cachefs/cas/<fn>/<hex>     any stored object, by digest
      cachefs cache set DIR --max-size 10G   make DIR a cache with a budget

    With --grpc and/or --http the daemon also serves the store to build tools,
    as `cachefs serve` does; what they store is in MOUNTPOINT/remote-cache
    (`cachefs cache set MOUNTPOINT/remote-cache --max-size N` sets its budget).

    With --remote (or tiers in --config) what the store publishes is pushed to
    the remote tiers in the background, from a queue kept in the store (it
    survives a crash; `cachefs stats` shows its depth), and objects it lacks
    are fetched from them.

    With --metrics ADDR the daemon serves Prometheus metrics on
    http://ADDR/metrics (the README lists them); with --otlp-endpoint URL it
    sends OpenTelemetry traces there.
    """
    wanted = [secured[k] for k in ("tokens", "htpasswd", "tls_cert", "tls_key", "tls_client_ca")]
    if any(wanted) and grpc_address is None and http_address is None:
        raise ConfigError(
            "--tokens, --htpasswd and --tls-* are for the servers",
            hint="give --grpc ADDR or --http ADDR",
        )
    serving = grpc_address or http_address
    tiers = TierOptions.parse(
        remotes,
        config,
        remote_durability,
        None if local_max_size is None else parse_size(local_max_size),
        trust,
    )
    daemon.mount(
        store,
        mountpoint,
        list(options),
        daemon_options(
            ctx,
            tiers,
            cache_size=cache_size,
            max_store_size=max_store_size,
            memory_limit=memory_limit,
            metrics_address=metrics_address,
            otlp_endpoint=otlp_endpoint,
            audit_dir=audit_dir,
            otlp_fuse_ratio=otlp_fuse_ratio,
        ),
        foreground=foreground,
        publish_threshold=parse_size(publish_threshold),
        trace=trace,
        servers=ServeOptions(
            grpc=grpc_address,
            http=http_address,
            tenants=None if serving is None else parse_tenants(tiers.config, parse_size),
            **secured,
        ),
        scrub_rate=None if scrub_rate is None else positive_size(scrub_rate, "--scrub-rate"),
    )
