"""Who may use the servers: bearer tokens checked on every request (server layer).

With ``--tls-client-ca`` a client must present a certificate of that CA (the
TLS handshake refuses others before any request); its subject names the
client, which may read and write unless ``--tokens`` is given too.  With
``--tokens FILE`` (``_tokens.py``) every gRPC call and HTTP request must
carry ``authorization: Bearer <token>`` of a token in the file: without one, or
with one the file does not have, it is refused with UNAUTHENTICATED / 401; a
``read`` token asking to write (BatchUpdateBlobs, SpliceBlob, ByteStream Write
and QueryWriteStatus, UpdateActionResult; HTTP PUT) gets PERMISSION_DENIED /
403.  Neither answer says more than that.  A client (an address) with
:data:`MAX_FAILURES` failed attempts in :data:`WINDOW` seconds is refused
outright, RESOURCE_EXHAUSTED / 429, until the window has passed.  Failures,
denials and rate limits are written to the audit log; the file is read again
when it changes (a token added or removed needs no restart).

:class:`Gate` decides; :class:`Authenticating` is the gRPC server's interceptor
and :meth:`Gate.http` the HTTP app's check.  Without ``--tokens``, everyone is
served: ``_options.check_exposure`` refuses, before anything starts, to serve an
address other than loopback that way unless ``--allow-unauthenticated`` says so.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from cachefs.errors import CachefsError
from cachefs.server._grpc import Handler, Interceptor, rebuilt
from cachefs.server._tokens import Identity, read_tokens, token_hash

if TYPE_CHECKING:
    from cachefs.engine import AuditLog

log = logging.getLogger(__name__)

#: Failed attempts a client may make in WINDOW seconds before it is refused outright.
MAX_FAILURES = 64
WINDOW = 60.0
#: Seconds between looks at the token file for changes.
RELOAD_EVERY = 2.0
#: gRPC methods that write (the rest read).
WRITES = frozenset(
    {
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/SpliceBlob",
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
        "/google.bytestream.ByteStream/Write",
        "/google.bytestream.ByteStream/QueryWriteStatus",
    }
)

#: The identity of the request being served (None: no authentication configured).
current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "cachefs_identity", default=None
)


class Refused(CachefsError):
    """A request refused for its credentials; ``kind``: unauthenticated,
    denied or limited."""

    def __init__(self, kind: str, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class Gate:
    """The token file and the failures of each client (see the module doc)."""

    def __init__(self, tokens: Path | None, audit: AuditLog) -> None:
        """``tokens`` None: clients are known by their certificates alone (mutual
        TLS, checked before a request reaches the gate), and may write."""
        self.path = tokens
        self.audit = audit
        self._lock = threading.Lock()
        self._tokens = {} if tokens is None else read_tokens(tokens)
        self._stamp = None if tokens is None else _stamp(tokens)
        self._checked = time.monotonic()
        self._failures: dict[str, collections.deque[float]] = {}
        if tokens is not None:
            audit.record("tokens.loaded", file=str(tokens), tokens=len(self._tokens))
            log.info("%d tokens from %s", len(self._tokens), tokens)

    def identify(
        self,
        authorization: str | None,
        client: str,
        *,
        write: bool,
        what: str,
        subject: str | None = None,
    ) -> Identity:
        """The identity of a request, or Refused (counted against ``client``);
        ``subject``: its client certificate's, when TLS tells."""
        if self.path is None:
            return Identity(subject or "a client certificate", "-", "read-write")
        now = time.monotonic()
        with self._lock:
            self._reload(now)
            failures = self._failures.get(client)
            if failures is not None:
                while failures and failures[0] < now - WINDOW:
                    failures.popleft()
                if len(failures) >= MAX_FAILURES:
                    retry = int(failures[0] + WINDOW - now) + 1
                    raise Refused("limited", "too many failed attempts; try again later", retry)
            scheme, _, token = (authorization or "").partition(" ")
            identity = (
                self._tokens.get(token_hash(token.strip())) if scheme.lower() == "bearer" else None
            )
            if identity is None:
                self._failed(client, now)
        if identity is None:
            reason = "no credentials" if not authorization else "a token that is not known"
            self.audit.record("auth.failed", client=client, request=what, reason=reason)
            raise Refused("unauthenticated", "authentication required")
        if write and not identity.writes:
            self.audit.record("auth.denied", client=client, request=what, by=str(identity))
            raise Refused("denied", "permission denied")
        return identity

    def _failed(self, client: str, now: float) -> None:
        failures = self._failures.setdefault(client, collections.deque())
        failures.append(now)
        if len(failures) == MAX_FAILURES:
            log.warning(
                "%s: %d failed attempts in %.0f s: refused for a while",
                client,
                MAX_FAILURES,
                WINDOW,
            )
            self.audit.record("auth.limited", client=client, failures=MAX_FAILURES)
        if len(self._failures) > 10_000:  # forget the oldest clients, not the memory
            for stale in [c for c, f in self._failures.items() if not f or f[-1] < now - WINDOW]:
                del self._failures[stale]

    def _reload(self, now: float) -> None:
        if self.path is None or now - self._checked < RELOAD_EVERY:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            tokens = read_tokens(self.path)
        except CachefsError as exc:
            log.error("the token file changed and is not readable, the old tokens stay: %s", exc)
            return
        self._tokens, self._stamp = tokens, stamp
        self.audit.record("tokens.loaded", file=str(self.path), tokens=len(tokens))
        log.info("%d tokens from %s (changed)", len(tokens), self.path)

    # --- the HTTP app's check -----------------------------------------------------------

    def http(self, scope: dict[str, Any]) -> Identity:
        method = scope["method"]
        authorization = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
        client = scope.get("client")
        host = client[0] if client else "unknown"
        what = f"HTTP {method} {scope.get('path', '?')}"
        return self.identify(authorization, host, write=method not in ("GET", "HEAD"), what=what)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


_GRPC_CODES = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
    "limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def peer_host(peer: str) -> str:
    """The address of a gRPC peer (``ipv4:127.0.0.1:5000`` → ``127.0.0.1``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class Authenticating(Interceptor):
    """Check each call's token before its method runs (see the module doc)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        write = method in WRITES
        authorization = next(
            (str(v) for k, v in details.invocation_metadata or () if k == "authorization"), None
        )
        gate = self.gate

        def check(context: grpc.ServicerContext) -> None:
            try:
                identity = gate.identify(
                    authorization,
                    peer_host(context.peer()),
                    write=write,
                    what=method,
                    subject=_subject(context),
                )
            except Refused as exc:
                context.abort(_GRPC_CODES[exc.kind], str(exc))
            current.set(identity)

        def call(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                check(context)
                return behaviour(request, context)

            return checked

        def stream(behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Any:
            def checked(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                check(context)
                yield from behaviour(request, context)

            return checked

        return rebuilt(handler, call=call, stream=stream)


def _subject(context: grpc.ServicerContext) -> str | None:
    """The subject of the client's certificate (mutual TLS), if any."""
    properties = context.auth_context()
    for key in ("x509_subject", "x509_common_name"):
        values = properties.get(key)
        if values:
            return bytes(values[0]).decode("utf-8", "replace")
    return None


def who(peer: str) -> str:
    """The identity of the request being served, for the audit log: its token
    and the peer's address (``HOST:PORT``; gRPC's ``ipv4:`` dropped), or the
    address alone when nobody authenticates."""
    kind, _, rest = peer.partition(":")
    address = rest if kind in ("ipv4", "ipv6") else peer
    identity = current.get()
    return f"{identity} from {address}" if identity is not None else address
