"""The options of the commands that run a daemon holding a store: ``mount`` and
``serve`` (CLI layer)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cachefs import daemon
from cachefs.errors import ConfigError
from cachefs.fs import DEFAULT_MEMORY_LIMIT
from cachefs.remote import TierOptions
from cachefs.server import GRPC_PORT, HTTP_PORT
from cachefs.signing import TrustOptions
from cachefs.tracing import DEFAULT_FUSE_RATIO

from .common import parse_size

grpc_option = click.option(
    "--grpc",
    "grpc_address",
    metavar="ADDR",
    help=f"Serve REAPI v2 over gRPC on ADDR (HOST:PORT, :PORT or HOST; port {GRPC_PORT} "
    "and 127.0.0.1 unless given).",
)
remote_option = click.option(
    "--remote",
    "remotes",
    multiple=True,
    metavar="URL",
    help="A remote tier, read and written, after those of --config (repeatable, in order): "
    "s3://BUCKET[/PREFIX]?endpoint=URL, grpc://HOST:PORT[/INSTANCE] (any REAPI server) or "
    "http://HOST:PORT[/PREFIX] (a Bazel HTTP cache).  What the store publishes is pushed "
    "there in the background; what it lacks is fetched from there.",
)
local_max_size_option = click.option(
    "--local-max-size",
    metavar="SIZE",
    help="Keep the local store's chunks under SIZE (e.g. 20G) by dropping, coldest first, "
    "those a read-write tier already holds; they are fetched back when read.  Nothing not "
    "yet pushed is ever dropped (default: no limit).",
)
config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="A TOML file of tiers (shard groups, directions, timeouts), [trust] (signing keys) "
    "and the servers' [tenants.NAME]; see the README.",
)
metrics_option = click.option(
    "--metrics",
    "metrics_address",
    metavar="ADDR",
    help="Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, :PORT or HOST; port "
    "9464 and 127.0.0.1 unless given).  `cachefs metrics rules` prints alerting rules.",
)
otlp_option = click.option(
    "--otlp-endpoint",
    metavar="URL",
    help="Send OpenTelemetry traces to this OTLP endpoint (http://HOST:4317 for OTLP/gRPC; "
    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf for OTLP/HTTP). Off by default; the standard "
    "OTEL_EXPORTER_OTLP_ENDPOINT and other OTEL_* variables work too.",
)
http_option = click.option(
    "--http",
    "http_address",
    metavar="ADDR",
    help=f"Serve the Bazel HTTP cache protocol on ADDR (port {HTTP_PORT} and 127.0.0.1 "
    "unless given).",
)
tokens_option = click.option(
    "--tokens",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Serve only requests with a bearer token of FILE (`cachefs token add`; the "
    "Authorization header, or gRPC metadata); read tokens may not write.",
)
unauthenticated_option = click.option(
    "--allow-unauthenticated",
    is_flag=True,
    help="Serve an address other than loopback with no --tokens or --tls-client-ca "
    "(refused otherwise).",
)
_PEM = click.Path(path_type=Path, dir_okay=False)


def tls_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tls-cert, --tls-key and --tls-client-ca (the servers' TLS)."""
    for option in reversed(
        [
            click.option(
                "--tls-cert",
                type=_PEM,
                metavar="PEM",
                help="TLS on both servers: the server's certificate chain (with --tls-key).",
            ),
            click.option("--tls-key", type=_PEM, metavar="PEM", help="The certificate's key."),
            click.option(
                "--tls-client-ca",
                type=_PEM,
                metavar="PEM",
                help="Mutual TLS: serve "
                "only clients with a certificate of this CA (its subject names them).",
            ),
        ]
    ):
        command = option(command)
    return command


def trust_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--sign-key, --trust, --revoked-key and --max-signature-age (``cachefs.signing``)."""
    for option in reversed(
        [
            click.option(
                "--sign-key",
                type=_PEM,
                metavar="FILE",
                help="Sign the entries published to the tiers (shared directories, and "
                "action results the servers store) with this key (`cachefs key generate`).",
            ),
            click.option(
                "--trust",
                "trusted",
                type=_PEM,
                multiple=True,
                metavar="FILE.pub",
                help="Take entries from the tiers, and serve action results, only if a "
                "key of these signed them (repeatable); others are misses.",
            ),
            click.option(
                "--revoked-key",
                "revoked",
                multiple=True,
                metavar="ID",
                help="A key id (16 hex digits) whose signatures are refused (repeatable).",
            ),
            click.option(
                "--max-signature-age",
                type=click.FloatRange(min=0, min_open=True),
                metavar="SECONDS",
                help="Refuse entries signed longer ago than this.",
            ),
        ]
    ):
        command = option(command)
    return command


def trust_of(
    sign_key: Path | None,
    trusted: tuple[Path, ...],
    revoked: tuple[str, ...],
    max_age: float | None,
) -> TrustOptions:
    return TrustOptions(
        None if sign_key is None else sign_key.absolute(),
        tuple(p.absolute() for p in trusted),
        revoked,
        max_age,
    )


audit_log_option = click.option(
    "--audit-log",
    "audit_dir",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Keep the audit log in DIR (default: STORE/audit).",
)
htpasswd_option = click.option(
    "--htpasswd",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Also take HTTP basic auth of the users of FILE (bcrypt: `htpasswd -B`); they "
    "may read and write.",
)


def security(
    tokens: Path | None,
    htpasswd: Path | None,
    allow_unauthenticated: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
) -> dict[str, Any]:
    """What the servers are told of authentication (ServeOptions' fields)."""

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else path.absolute()

    return {
        "tokens": absolute(tokens),
        "htpasswd": absolute(htpasswd),
        "allow_unauthenticated": allow_unauthenticated,
        "tls_cert": absolute(tls_cert),
        "tls_key": absolute(tls_key),
        "tls_client_ca": absolute(tls_client_ca),
    }


# What a daemon that holds a store takes, whether it mounts it or serves it.
cache_size_option = click.option(
    "--cache-size",
    default="64M",
    show_default=True,
    metavar="SIZE",
    help="Memory for decompressed chunks.",
)
max_store_size_option = click.option(
    "--max-store-size",
    metavar="SIZE",
    help="Quota on the store's stored bytes, kept in the store (0: none).  Past it, "
    "cache directories are evicted; writers get ENOSPC when nothing is left to evict.",
)
memory_limit_option = click.option(
    "--memory-limit",
    default=f"{DEFAULT_MEMORY_LIMIT >> 20}M",
    show_default=True,
    metavar="SIZE",
    help="Memory the daemon's caches may use; they shrink when the system is short.",
)


def security_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The servers' authentication (--tokens, --allow-unauthenticated, --tls-*)
    and signing (--sign-key, --trust, ...), handed to ``command`` as
    ``secured`` (ServeOptions' fields) and ``trust`` (TrustOptions)."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        tokens: Path | None,
        htpasswd: Path | None,
        allow_unauthenticated: bool,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_client_ca: Path | None,
        sign_key: Path | None,
        trusted: tuple[Path, ...],
        revoked: tuple[str, ...],
        max_signature_age: float | None,
        **kwargs: Any,
    ) -> Any:
        kwargs["secured"] = security(
            tokens, htpasswd, allow_unauthenticated, tls_cert, tls_key, tls_client_ca
        )
        kwargs["trust"] = trust_of(sign_key, trusted, revoked, max_signature_age)
        return command(*args, **kwargs)

    return tokens_option(
        htpasswd_option(unauthenticated_option(tls_options(trust_options(wrapper))))
    )


def daemon_options(
    ctx: click.Context,
    tiers: TierOptions,
    *,
    cache_size: str,
    max_store_size: str | None,
    memory_limit: str,
    metrics_address: str | None,
    otlp_endpoint: str | None,
    audit_dir: Path | None,
    otlp_fuse_ratio: float = DEFAULT_FUSE_RATIO,
) -> daemon.DaemonOptions:
    """What ``mount`` and ``serve`` share, from their options as given."""
    return daemon.DaemonOptions(
        verbose=ctx.find_root().params.get("verbose", 0),
        cache_size=parse_size(cache_size),
        max_store_size=None if max_store_size is None else parse_size(max_store_size),
        memory_limit=memory_limit_of(memory_limit),
        tiers=tiers,
        metrics=metrics_address,
        otlp_endpoint=otlp_endpoint,
        otlp_fuse_ratio=otlp_fuse_ratio,
        audit_dir=None if audit_dir is None else audit_dir.absolute(),
    )


def memory_limit_of(text: str) -> int:
    limit = parse_size(text)
    if limit < 64 << 20:
        raise ConfigError(
            f"--memory-limit {text} is too small", hint="give the daemon at least 64M"
        )
    return limit
