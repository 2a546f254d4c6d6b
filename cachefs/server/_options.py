"""What the servers are told, and defaults (server layer).

Kept apart from the servers themselves: every command line reads these (the
options of ``cachefs serve`` and ``cachefs mount``), and importing grpcio and
hypercorn for that would slow every command down.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachefs.errors import ConfigError

#: Default ports, as bazel-remote's.
GRPC_PORT = 9092
HTTP_PORT = 8080
#: Default budget of the cache directory, when it is made.
DEFAULT_MAX_SIZE = 10 << 30


@dataclass(frozen=True)
class ServeOptions:
    """What to serve: the addresses (None: that server is off) and the cache's budget."""

    grpc: str | None = None
    http: str | None = None
    #: Budget of the cache directory (None: 10 GiB when it is made, else as it is).
    max_size: int | None = None
    policy: str = "lru"
    #: The token file (``_tokens.py``): None, nobody authenticates.
    tokens: Path | None = None
    #: Users and bcrypt hashes for HTTP basic auth (``_tokens.py``).
    htpasswd: Path | None = None
    #: Serve addresses beyond loopback with no authentication.
    allow_unauthenticated: bool = False
    #: TLS on both servers: the certificate chain and its key (PEM files).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Client certificates required, issued by this CA (PEM): mutual TLS.
    tls_client_ca: Path | None = None
    #: The tenants of the config file (``_tenants.Tenants``; None: none).
    tenants: Any = None

    @property
    def authenticates(self) -> bool:
        """Whether clients must show who they are (a token, a password, a certificate)."""
        return any(p is not None for p in (self.tokens, self.htpasswd, self.tls_client_ca))

    def check_tls(self) -> None:
        """ConfigError for TLS options that do not go together."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together", hint="give both")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca needs TLS", hint="give --tls-cert and --tls-key too")
        if self.tenants is not None and self.tokens is None:
            raise ConfigError(
                "tenants need --tokens: a token says which tenant a request acts for",
                hint="give --tokens FILE (`cachefs token add FILE NAME --tenant T ...`)",
            )
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not path.is_file():
                raise ConfigError(f"no such file {path}", hint="name a PEM file")

    @property
    def any(self) -> bool:
        return self.grpc is not None or self.http is not None


@dataclass
class Listening:
    """Where the servers listen (``HOST:PORT``), once they do."""

    grpc: str | None = None
    http: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"grpc": self.grpc, "http": self.http}


def check_exposure(addresses: list[str], *, authenticated: bool, allow: bool) -> None:
    """ConfigError for an address beyond this machine served to anyone."""
    if authenticated or allow:
        return
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        if not _loopback(host):
            raise ConfigError(
                f"refusing to serve {address} without authentication: anyone who can "
                "reach it could read and write the cache",
                hint="give --tokens FILE (`cachefs token add FILE NAME ...`), --htpasswd "
                "or --tls-client-ca, bind 127.0.0.1, or say --allow-unauthenticated",
            )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may be any address
