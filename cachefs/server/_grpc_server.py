"""The gRPC server put together (server layer): REAPI v2 and ByteStream on one port."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

# grpcio's core would log its own errors (a port it cannot bind, ...) to stderr,
# beside ours; set before grpcio is first imported (a variable set by hand wins).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc

from cachefs import tracing
from cachefs.engine import ConfigError
from cachefs.server._auth import Authenticating, Gate
from cachefs.server._cache import RemoteCache
from cachefs.server._grpc import MAX_MESSAGE, MalformedRequests
from cachefs.server._grpc_ac import ActionCacheService
from cachefs.server._grpc_bytestream import WRITE, ByteStreamService, parse_write
from cachefs.server._grpc_capabilities import CapabilitiesService
from cachefs.server._grpc_cas import CasService
from cachefs.server._measure import MeasuredRpcs
from cachefs.server._names import parse_address
from cachefs.server._options import GRPC_PORT, ServeOptions

if TYPE_CHECKING:
    from cachefs.metrics import Metrics

log = logging.getLogger(__name__)


def serve_grpc(
    cache: RemoteCache,
    address: str,
    *,
    workers: int = 16,
    metrics: Metrics | None = None,
    gate: Gate | None = None,
    tls: ServeOptions | None = None,
) -> tuple[grpc.Server, str]:
    """Start the REAPI services (CAS, action cache, ByteStream, capabilities)
    on ``address``; the server and the address it got (``HOST:PORT``).  With
    ``metrics``, every call is measured; with tracing on, traced; with a
    ``gate``, every call must carry a token it knows (``_auth.py``)."""
    parsers = {WRITE: parse_write}  # an upload's bytes are not copied out of its messages
    interceptors: list[grpc.ServerInterceptor] = [MalformedRequests(parsers)]  # type: ignore[type-arg]
    if gate is not None:
        interceptors.insert(0, Authenticating(gate, cache.digest_function))
    if metrics is not None or tracing.active():
        interceptors.insert(0, MeasuredRpcs(metrics))  # outermost: sees what goes on the wire
    server = grpc.server(
        ThreadPoolExecutor(workers, thread_name_prefix="cachefs-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    for service in (CasService(cache), ActionCacheService(cache), ByteStreamService(cache)):
        service.add_to(server)
    CapabilitiesService(cache).add_to(server)
    bound = parse_address(address, GRPC_PORT)
    credentials = None if tls is None or tls.tls_cert is None else _credentials(tls)
    try:
        if credentials is None:
            port = server.add_insecure_port(bound)
        else:
            port = server.add_secure_port(bound, credentials)
    except RuntimeError:  # grpcio says only "Failed to bind", whatever the reason
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot serve gRPC on {bound}", hint="the address is taken or not this machine's"
        )
    server.start()
    where = bound.rsplit(":", 1)[0] + f":{port}"
    log.info("serving REAPI v2 over gRPC on %s", where)
    return server, where


def _credentials(tls: ServeOptions) -> grpc.ServerCredentials:
    """The server's TLS (mutual, with a client CA) from PEM files."""
    assert tls.tls_cert is not None and tls.tls_key is not None
    try:
        chain, key = tls.tls_cert.read_bytes(), tls.tls_key.read_bytes()
        ca = None if tls.tls_client_ca is None else tls.tls_client_ca.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS files: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )
