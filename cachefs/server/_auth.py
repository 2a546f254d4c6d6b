"""Who may use the servers: credentials checked on every request (server layer).

With ``--tls-client-ca`` a client must present a certificate of that CA (the
TLS handshake refuses others before any request); its subject names the
client, which may read and write unless credential files are given too.  With
``--tokens FILE`` (``_tokens.py``) a gRPC call or HTTP request may carry
``authorization: Bearer <token>`` of a token in the file, and with
``--htpasswd FILE`` ``authorization: Basic ...`` of a user of that file
(bcrypt, checked once and then remembered for VERIFIED_TTL seconds); with
either file, one that carries neither, or ones the files do not have, is
refused with UNAUTHENTICATED / 401; a ``read`` token asking to write
(BatchUpdateBlobs, SpliceBlob, ByteStream Write and QueryWriteStatus,
UpdateActionResult; HTTP PUT) gets PERMISSION_DENIED / 403.  Neither answer
says more than that.  A client (an address) with :data:`MAX_FAILURES` failed
attempts in :data:`WINDOW` seconds is refused outright, RESOURCE_EXHAUSTED /
429, until the window has passed.  Failures, denials and rate limits are
written to the audit log; the files are read again when they change (a token
or user added or removed needs no restart).

:class:`Gate` decides; :class:`Authenticating` is the gRPC server's interceptor
and :meth:`Gate.http` the HTTP app's check.  With no authentication, everyone is
served: ``_options.check_exposure`` refuses, before anything starts, to serve an
address other than loopback that way unless ``--allow-unauthenticated`` says so.
"""

from __future__ import annotations

import base64
import collections
import contextvars
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bcrypt
import grpc

from cachefs.errors import CachefsError
from cachefs.format.digest import DigestFunction
from cachefs.protocol import re_pb2
from cachefs.server._grpc import Handler, Interceptor, rebuilt
from cachefs.server._names import parse_resource
from cachefs.server._tenants import Tenants
from cachefs.server._tokens import Identity, read_htpasswd, read_tokens, token_hash

if TYPE_CHECKING:
    from cachefs.engine import AuditLog

log = logging.getLogger(__name__)

#: Failed attempts a client may make in WINDOW seconds before it is refused outright.
MAX_FAILURES = 64
WINDOW = 60.0
#: Seconds between looks at the credential files for changes.
RELOAD_EVERY = 2.0
#: Seconds basic credentials bcrypt accepted are taken without checking again.
VERIFIED_TTL = 300.0
#: What a user no file names is checked against (so that it takes as long).
_DUMMY = bcrypt.hashpw(b"no such user", bcrypt.gensalt(rounds=10))
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
    """The credential files and the failures of each client (see the module doc)."""

    def __init__(
        self,
        audit: AuditLog,
        tokens: Path | None = None,
        htpasswd: Path | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        """Neither file: clients are known by their certificates alone (mutual
        TLS, checked before a request reaches the gate), and may write.  With
        ``tenants``, what instance names each may use, and how much
        (``_tenants.py``)."""
        self.audit = audit
        self.tenants = tenants
        self.files = {k: p for k, p in (("tokens", tokens), ("htpasswd", htpasswd)) if p}
        self._lock = threading.Lock()
        self._tokens: dict[str, Identity] = {}
        self._users: dict[str, bytes] = {}
        self._stamps: dict[str, object] = {}
        self._checked = time.monotonic()
        self._failures: dict[str, collections.deque[float]] = {}
        #: Basic credentials bcrypt accepted lately (it costs ~0.1 s a check):
        #: SHA-256 of the header's value -> (identity, when); and how many times
        #: the files were read (a check that began before a reload is not kept).
        self._verified: dict[bytes, tuple[Identity, float]] = {}
        self._generation = 0
        for kind in self.files:
            self._load(kind)

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
        if not self.files:
            return Identity(subject or "(subject not known)", None, "read-write", "certificate")
        now = time.monotonic()
        with self._lock:
            self._reload(now)
            retry = self._limited(client, now)
        # Credentials that are right let anyone in; an address that keeps failing
        # gets no bcrypt check (its cost) until its window has passed.
        identity = self._check(authorization or "", now, costly=not retry)
        if identity is None:
            with self._lock:
                if not retry:
                    self._failed(client, now)
            if retry:  # an address that keeps failing is not even answered why
                raise Refused("limited", "too many failed attempts; try again later", retry)
            reason = "no credentials" if not authorization else "credentials that are not known"
            self.audit.record("auth.failed", client=client, request=what, reason=reason)
            raise Refused("unauthenticated", "authentication required")
        if write and not identity.writes:
            self.audit.record("auth.denied", client=client, request=what, by=str(identity))
            raise Refused("denied", "permission denied")
        return identity

    def enter(self, identity: Identity, instance: str | None, incoming: int, what: str) -> None:
        """Refused unless ``identity``'s tenant owns ``instance`` (None: the
        request names none that parses; the method refuses it) and
        ``incoming`` bytes fit its quota."""
        tenants = self.tenants
        if tenants is None or instance is None:
            return
        if not tenants.allows(identity.tenant, instance):
            self.audit.record("auth.denied", request=what, instance=instance, by=str(identity))
            raise Refused("denied", "permission denied")
        if incoming:
            reason = tenants.admit(identity.tenant, incoming)
            if reason is not None:
                self.audit.record("tenant.quota", tenant=identity.tenant, request=what,
                                  incoming=incoming)  # fmt: skip
                raise Refused("quota", reason)

    def stored(self, identity: Identity, incoming: int) -> None:
        if self.tenants is not None and incoming:
            self.tenants.added(identity.tenant, incoming)

    def _check(self, authorization: str, now: float, *, costly: bool) -> Identity | None:
        """Whom a bearer token or basic credentials name, if anyone."""
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            with self._lock:
                return self._tokens.get(token_hash(value))
        if scheme.lower() != "basic" or not self._users:
            return None
        seen = hashlib.sha256(value.encode()).digest()
        with self._lock:
            known = self._verified.get(seen)
            if known is not None and now - known[1] < VERIFIED_TTL:
                return known[0]
            users, generation = self._users, self._generation
        if not costly:
            return None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        hashed = users.get(user)
        try:  # an unknown user costs a check too: the time tells no names
            good = bcrypt.checkpw(password.encode(), hashed or _DUMMY) and hashed is not None
        except ValueError:  # a password bcrypt does not take (over 72 bytes)
            good = False
        if not good:
            return None
        identity = Identity(user, None, "read-write", "user")
        with self._lock:
            if self._generation != generation:
                return None  # the file changed meanwhile: ask again
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[seen] = (identity, now)
        return identity

    def _load(self, kind: str) -> None:
        path = self.files[kind]
        stamp = _stamp(path)
        if kind == "tokens":
            self._tokens = read_tokens(path)
            count = len(self._tokens)
        else:
            self._users = read_htpasswd(path)
            count = len(self._users)
        self._stamps[kind] = stamp
        self._verified.clear()
        self._generation += 1
        self.audit.record(f"{kind}.loaded", file=str(path), entries=count)
        log.info("%d %s from %s", count, "tokens" if kind == "tokens" else "users", path)

    def _limited(self, client: str, now: float) -> int:
        """Seconds until ``client`` may fail again (0: now), by its failures in WINDOW."""
        failures = self._failures.get(client)
        if failures is None:
            return 0
        while failures and failures[0] < now - WINDOW:
            failures.popleft()
        return int(failures[0] + WINDOW - now) + 1 if len(failures) >= MAX_FAILURES else 0

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
        """Read a credential file again if it changed (looked at every
        RELOAD_EVERY seconds); one that no longer reads leaves the old ones."""
        if now - self._checked < RELOAD_EVERY:
            return
        self._checked = now
        for kind, path in self.files.items():
            if _stamp(path) == self._stamps.get(kind):
                continue
            try:
                self._load(kind)
            except CachefsError as exc:
                # Fail closed: a file removed or broken takes its entries with it.
                log.error("%s changed and is not readable; nobody it named is let in: %s",
                          path, exc)  # fmt: skip
                self.audit.record(f"{kind}.unreadable", file=str(path), error=str(exc))
                self._stamps[kind] = _stamp(path)
                self._tokens = {} if kind == "tokens" else self._tokens
                self._users = {} if kind == "htpasswd" else self._users
                self._verified.clear()
                self._generation += 1

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
    "quota": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def peer_address(peer: str) -> str:
    """A gRPC peer as ``HOST:PORT`` (``ipv4:127.0.0.1:5000`` → ``127.0.0.1:5000``)."""
    kind, _, rest = peer.partition(":")
    return rest if kind in ("ipv4", "ipv6") else peer


def peer_host(peer: str) -> str:
    """The host of a gRPC peer (``ipv4:127.0.0.1:5000`` → ``127.0.0.1``)."""
    address = peer_address(peer)
    return address.rsplit(":", 1)[0].strip("[]") if address != peer else peer


class Authenticating(Interceptor):
    """Check each call's token before its method runs (see the module doc)."""

    def __init__(self, gate: Gate, function: DigestFunction) -> None:
        self.gate = gate
        self.function = function

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None or handler.stream_stream is not None:
            return None  # none of ours streams both ways: UNIMPLEMENTED, never unchecked
        method = details.method
        write = method in WRITES
        authorization = next(
            (str(v) for k, v in details.invocation_metadata or () if k == "authorization"), None
        )
        gate = self.gate

        def enter(request: Any, context: grpc.ServicerContext) -> tuple[Identity, int]:
            """The caller's identity, once it may make this call, and the bytes
            the call brings (``_tenants.py``); the call is aborted otherwise."""
            try:
                identity = gate.identify(
                    authorization,
                    peer_host(context.peer()),
                    write=write,
                    what=method,
                    subject=_subject(context),
                )
                instance, incoming = self.instance_of(method, request)
                gate.enter(identity, instance, incoming, method)
            except Refused as exc:
                context.abort(_GRPC_CODES[exc.kind], str(exc))
            current.set(identity)
            return identity, incoming

        def call(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                identity, incoming = enter(request, context)
                result = behaviour(request, context)
                gate.stored(identity, incoming)
                return result

            return checked

        def stream(behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Any:
            def checked(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                enter(request, context)
                yield from behaviour(request, context)

            return checked

        def upload(behaviour: Callable[[Iterator[Any], grpc.ServicerContext], Any]) -> Any:
            def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                first = next(requests, None)  # it names the resource and its size
                identity, incoming = enter(first, context)
                head = [] if first is None else [first]
                result = behaviour(itertools.chain(head, requests), context)
                gate.stored(identity, incoming)
                return result

            return checked

        return rebuilt(handler, call=call, stream=stream, upload=upload)

    def instance_of(self, method: str, request: Any) -> tuple[str | None, int]:
        """The instance name a request names (None: none that parses) and
        the bytes it brings, as far as its first message tells."""
        if self.gate.tenants is None or request is None:
            return None, 0
        name = getattr(request, "instance_name", None)
        if isinstance(name, str):
            if isinstance(request, re_pb2.BatchUpdateBlobsRequest):
                return name, sum(len(r.data) for r in request.requests)
            if isinstance(request, re_pb2.SpliceBlobRequest):
                return name, request.blob_digest.size_bytes
            if isinstance(request, re_pb2.UpdateActionResultRequest):
                return name, request.action_result.ByteSize()
            return name, 0
        resource = getattr(request, "resource_name", None)
        if not isinstance(resource, str):
            return None, 0
        writing = method.endswith(("/Write", "/QueryWriteStatus"))
        try:
            parsed = parse_resource(resource, self.function, write=writing)
        except CachefsError:
            return None, 0
        return parsed.instance, parsed.digest.size if method.endswith("/Write") else 0


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
    address = peer_address(peer)
    identity = current.get()
    return f"{identity} from {address}" if identity is not None else address
