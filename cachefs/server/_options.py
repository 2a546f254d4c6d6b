"""What the servers are told, and defaults (server layer).

Kept apart from the servers themselves: every command line reads these (the
options of ``cachefs serve`` and ``cachefs mount``), and importing grpcio and
hypercorn for that would slow every command down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
