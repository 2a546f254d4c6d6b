"""The Bazel HTTP cache protocol (server layer): an ASGI app, served by hypercorn on trio.

The protocol of Bazel's ``--remote_cache=http://...`` and of ccache's
``remote_storage = http://...|layout=bazel``, as bazel-remote serves it::

    GET|HEAD|PUT  /[INSTANCE/]cas/<hex>   a blob, named by its hash
    GET|HEAD|PUT  /[INSTANCE/]ac/<hex>    an action cache entry (any bytes)
    GET           /status                 the cache's figures (JSON)

``INSTANCE`` is optional and may have several segments (``/team/linux/cas/...``);
it is the REAPI instance name, so that gRPC and HTTP clients of an instance
share their blobs and entries.  A PUT of a blob is checked against its hash and
refused with 400 when the body is something else (nothing is stored); a PUT of
an action cache entry stores the bytes as they come.  ``Content-Encoding: zstd``
on a PUT and ``Accept-Encoding: zstd`` on a GET carry blobs compressed.  A GET
of an entry that names blobs the CAS no longer has is a miss (404).

Bodies stream: a PUT of known length feeds the store's ingest as it arrives
(in a worker thread, which pulls the body from the trio loop); one of unknown
length (chunked, or compressed) is spooled to ``STORE/tmp`` first, so that its
size is known; a GET sends the blob as the store reads it, in pieces.  Every
store call runs in a worker thread, never on the loop.

Errors: 400 for a malformed path or body, 404 a miss, 405 a wrong method, 411
a PUT of unknown length where one is needed, 413 a blob larger than the cache,
415 an encoding other than zstd, 507 when the cache is full and nothing can be
evicted, 500 for anything else; one log line each, never a traceback to the
client.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from typing import IO, Any

import trio
import zstandard

from cachefs.engine import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    Digest,
    DigestFunction,
    DigestMismatchError,
    NotFoundError,
    StoreFullError,
)
from cachefs.server._actions import get_entry
from cachefs.server._auth import Gate, Refused, current, who
from cachefs.server._cache import RemoteCache, pieces, unzstd
from cachefs.server._names import BadRequest, instance_directory, parse_hash
from cachefs.server._tokens import Identity

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Bytes of one response body message at the most.
PIECE = 1 << 20
#: The largest action cache entry taken (they are small protobufs or ccache results).
MAX_ENTRY = 64 << 20


class HttpError(CachefsError):
    """A request answered with an HTTP status of its own."""

    def __init__(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message, hint="")
        self.status = status
        self.headers = headers or []


class ClientGone(CachefsError):
    """The client went away before its request body was whole."""


def status_of(exc: BaseException) -> int:
    """The HTTP status an error is answered with."""
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, BadRequest | DigestMismatchError | ConfigError | ClientGone):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, StoreFullError) or getattr(exc, "errno", None) == errno.ENOSPC:
        return 507
    return 500


def parse_path(raw_path: bytes) -> tuple[str, str, bytes]:
    """``(instance, kind, hash)`` of ``/[INSTANCE/](cas|ac)/<hex>``; BadRequest
    for any other path, and for segments that are empty, ``.``, ``..`` or hold
    a ``/`` or NUL once decoded (nothing names a place outside the cache)."""
    text = raw_path.decode("ascii", "replace")
    parts = text.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[-2] not in ("cas", "ac"):
        raise HttpError(404, f"no such resource {text!r}: use /[INSTANCE/]cas/<hex> or /ac/<hex>")
    segments = [urllib.parse.unquote(p, errors="strict") for p in parts[1:-2]]
    for segment in segments:
        if segment in ("", ".", "..") or "/" in segment or "\0" in segment:
            raise BadRequest(f"bad instance name in path {text!r}")
    instance = "/".join(segments)
    instance_directory(instance)  # not too long
    return instance, parts[-2], parse_hash(parts[-1])


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


def accepts_zstd(value: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts zstd (with a q above 0)."""
    for item in (value or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() != "zstd":
            continue
        quality = params.strip().lower()
        if quality.startswith("q="):
            try:
                return float(quality[2:]) > 0
            except ValueError:
                return False
        return True
    return False


class HttpCache:
    """The ASGI app: the HTTP cache protocol over a :class:`RemoteCache`."""

    def __init__(
        self, cache: RemoteCache, status: Callable[[], dict[str, Any]], gate: Gate | None = None
    ) -> None:
        """``status`` gives the figures of ``/status`` (called on the trio thread);
        with a ``gate``, every request must carry a token it knows (``_auth.py``)."""
        self.cache = cache
        self.status = status
        self.gate = gate
        self.spool_dir = cache.store.tmp_root

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        response = _Response(send)
        body_read = False

        async def receive_body() -> Any:
            nonlocal body_read
            message = await receive()
            body_read = body_read or not message.get("more_body", False)
            return message

        try:
            await self._handle(scope, receive_body, response)
        except Exception as exc:
            # A request refused before its body was read: the connection is closed
            # after the answer (the rest of the body would be taken for a request).
            unread = not body_read and _has_body(scope)
            await self._failed(scope, response, exc, close=unread)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _failed(
        self, scope: Scope, response: _Response, exc: Exception, *, close: bool
    ) -> None:
        what = f"HTTP {scope['method']} {scope.get('path', '?')}"
        code = status_of(exc)
        if isinstance(exc, CachefsError):
            # A miss is what a cache answers every day: not worth a line unless asked.
            level = logging.ERROR if code >= 500 else logging.DEBUG if code == 404 else logging.INFO
            log.log(level, "%s: %d: %s", what, code, exc)
            message = str(exc)
        else:
            log.exception("%s: unexpected error", what)
            message = "internal error; see the server's log"
        if response.started:
            raise exc  # too late for a status: the connection is dropped
        headers = list(exc.headers) if isinstance(exc, HttpError) else []
        if close:
            headers.append((b"connection", b"close"))
        if isinstance(exc, CorruptDataError):
            message = f"damaged data in the cache: {exc}"
        await response.send_whole(code, (message + "\n").encode(), headers, text=True)

    async def _handle(self, scope: Scope, receive: Receive, response: _Response) -> None:
        method = scope["method"]
        gate = self.gate
        # A bcrypt check or a tenant's usage walk takes a while: not on the loop.
        identity = None if gate is None else await self._admitted(gate, scope, None, 0)
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.split(b"?", 1)[0]
        if raw_path == b"/status":
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "/status is read with GET", [(b"allow", b"GET, HEAD")])
            status = self.status()
            if gate is not None and gate.tenants is not None and identity and identity.tenant:
                # A tenant learns nothing of what others store.
                status = {k: v for k, v in status.items() if k not in ("cache", "store", "tenants")}
            body = (json.dumps(status, indent=2) + "\n").encode()
            await response.send_whole(200, body, [], json_body=True, head=method == "HEAD")
            return
        instance, kind, hash_ = parse_path(raw_path)
        incoming = (_content_length(scope) or 0) if method == "PUT" else 0
        if gate is not None and gate.tenants is not None and identity is not None:
            await self._admitted(gate, scope, instance, incoming, identity)
        if method in ("GET", "HEAD"):
            head = method == "HEAD"
            if kind == "cas":
                await self._get_blob(scope, instance, hash_, response, head=head)
            else:
                await self._get_entry(instance, hash_, response, head=head)
        elif method == "PUT":
            if kind == "cas":
                await self._put_blob(scope, receive, instance, hash_)
            else:
                await self._put_entry(scope, receive, instance, hash_)
            if gate is not None and identity is not None:
                gate.stored(identity, incoming)
            await response.send_whole(200, b"", [])
        else:
            raise HttpError(
                405, f"method {method} is not one of this cache's", [(b"allow", b"GET, HEAD, PUT")]
            )

    async def _admitted(
        self,
        gate: Gate,
        scope: Scope,
        instance: str | None,
        incoming: int,
        identity: Identity | None = None,
    ) -> Identity:
        """The request's identity (known already, or from its credentials),
        once it may use ``instance`` with ``incoming`` bytes; else the answer
        that refuses it (``_auth.py``)."""

        def admit() -> Identity:
            known = gate.http(scope) if identity is None else identity
            gate.enter(known, instance, incoming, f"HTTP {scope['method']} {scope.get('path')}")
            return known

        try:
            admitted = await trio.to_thread.run_sync(admit)
        except Refused as exc:
            raise _refusal(exc, basic="htpasswd" in gate.files) from None
        current.set(admitted)
        return admitted

    # --- reads ---------------------------------------------------------------------------

    async def _get_blob(
        self, scope: Scope, instance: str, hash_: bytes, response: _Response, *, head: bool
    ) -> None:
        cache = self.cache
        digest = await trio.to_thread.run_sync(cache.blob_named, instance, hash_)
        if digest is None:
            raise HttpError(404, f"blob {hash_.hex()} is not in the cache")
        zstd = accepts_zstd(_header(scope, b"accept-encoding"))
        if head:
            length = None if zstd else digest.size
            await response.start(200, length, zstd=zstd)
            await response.end()
            return
        stream = await trio.to_thread.run_sync(
            lambda: pieces(cache.read_blob(instance, digest), PIECE)
        )
        await response.start(200, None if zstd else digest.size, zstd=zstd)
        while True:
            piece = await trio.to_thread.run_sync(next, stream, None)
            if piece is None:
                break
            await response.body(piece)
        await response.end()

    async def _get_entry(
        self, instance: str, hash_: bytes, response: _Response, *, head: bool
    ) -> None:
        key = Digest(hash_, 0)  # action cache entries are named by hash alone
        data = await trio.to_thread.run_sync(get_entry, self.cache, instance, key)
        if data is None:
            raise HttpError(404, f"no action cache entry {hash_.hex()}")
        await response.send_whole(200, data, [], head=head)

    # --- writes --------------------------------------------------------------------------

    async def _put_blob(self, scope: Scope, receive: Receive, instance: str, hash_: bytes) -> None:
        encoding = _content_encoding(scope)
        length = _content_length(scope)
        cache = self.cache
        zstd = encoding == "zstd"
        known = await trio.to_thread.run_sync(cache.blob_named, instance, hash_)
        if known is not None:  # nothing to store, but the body must be that blob still
            function = cache.digest_function
            got = await trio.to_thread.run_sync(
                _digest_of, _body(receive), zstd, function, known.size
            )
            if got.hash != hash_:
                raise DigestMismatchError(f"the body's digest is {got}, not {hash_.hex()}")
            return
        if encoding == "identity" and length is not None:
            digest = Digest(hash_, length)
            await trio.to_thread.run_sync(cache.write_blob, instance, digest, _body(receive))
            return
        limit = cache.max_blob()
        spool = await trio.to_thread.run_sync(_spool, _body(receive), zstd, self.spool_dir, limit)
        try:
            size = spool.seek(0, 2)
            spool.seek(0)
            await trio.to_thread.run_sync(cache.write_blob, instance, Digest(hash_, size), spool)
        finally:
            spool.close()

    async def _put_entry(self, scope: Scope, receive: Receive, instance: str, hash_: bytes) -> None:
        encoding = _content_encoding(scope)
        length = _content_length(scope)
        if length is not None and length > MAX_ENTRY:
            raise HttpError(413, f"an action cache entry of {length} bytes (at most {MAX_ENTRY})")
        pieces: list[bytes] = []
        held = 0
        async for piece in _receive_body(receive):
            held += len(piece)
            if held > MAX_ENTRY:
                raise HttpError(413, f"an action cache entry of more than {MAX_ENTRY} bytes")
            pieces.append(piece)
        data = b"".join(pieces)
        if encoding == "zstd":
            data = _decompress_entry(data)
        key = Digest(hash_, 0)
        by = who(_peer(scope))
        await trio.to_thread.run_sync(lambda: self.cache.put_action(instance, key, data, by=by))


class _Response:
    """An HTTP response, sent in steps (whether it started matters to errors)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self._compressor: Any = None

    async def start(
        self,
        status: int,
        length: int | None,
        *,
        zstd: bool = False,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"application/octet-stream",
    ) -> None:
        out = [(b"content-type", content_type), *(headers or [])]
        if length is not None:
            out.append((b"content-length", str(length).encode()))
        if zstd:
            out.append((b"content-encoding", b"zstd"))
            out.append((b"vary", b"accept-encoding"))
            self._compressor = zstandard.ZstdCompressor().compressobj()
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": out})

    async def body(self, data: bytes | memoryview) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data)
            if not data:
                return
        await self._send({"type": "http.response.body", "body": bytes(data), "more_body": True})

    async def end(self) -> None:
        tail = b"" if self._compressor is None else self._compressor.flush()
        await self._send({"type": "http.response.body", "body": tail, "more_body": False})

    async def send_whole(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        text: bool = False,
        json_body: bool = False,
        head: bool = False,
    ) -> None:
        content_type = (
            b"text/plain; charset=utf-8"
            if text
            else b"application/json"
            if json_body
            else b"application/octet-stream"
        )
        await self.start(status, len(body), headers=headers, content_type=content_type)
        await self._send(
            {"type": "http.response.body", "body": b"" if head else body, "more_body": False}
        )


def _content_encoding(scope: Scope) -> str:
    """``identity`` or ``zstd`` (HttpError 415 for any other)."""
    encoding = (_header(scope, b"content-encoding") or "identity").strip().lower()
    if encoding not in ("identity", "zstd"):
        raise HttpError(415, f"content encoding {encoding!r}: this cache takes zstd or none")
    return encoding


def _has_body(scope: Scope) -> bool:
    """Whether the request says it has a body (a bad Content-Length counts)."""
    length = _header(scope, b"content-length")
    has_length = length is not None and length.strip() != "0"
    return has_length or _header(scope, b"transfer-encoding") is not None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None:
        return None
    if not value.strip().isascii() or not value.strip().isdigit():
        raise BadRequest(f"bad Content-Length {value!r}")
    return int(value)


async def _receive_body(receive: Receive) -> Any:
    """The request body's pieces, on the trio thread."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client went away before the whole body came")
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def _body(receive: Receive) -> Iterator[bytes]:
    """The request body's pieces, pulled from the trio thread by a worker thread."""
    while True:
        message = trio.from_thread.run(receive)
        if message["type"] == "http.disconnect":
            raise ClientGone("the client went away before the whole body came")
        body: bytes = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def _digest_of(
    source: Iterator[bytes], decompress: bool, function: DigestFunction, size: int
) -> Digest:
    """The digest of a body that should be the blob of ``size`` bytes (in a
    worker thread); DigestMismatchError once it is longer."""
    hasher = function.new()
    got = 0
    for piece in unzstd(source) if decompress else source:
        got += len(piece)
        if got > size:
            raise DigestMismatchError(f"the body is longer than the blob's {size} bytes")
        hasher.update(piece)
    return Digest(hasher.digest(), got)


def _spool(source: Iterator[bytes], decompress: bool, directory: Any, limit: int) -> IO[bytes]:
    """The whole body in a temporary file of ``directory`` (decompressed when
    it came zstd-compressed); HttpError 413 past ``limit`` bytes."""
    spool = tempfile.TemporaryFile(dir=directory, prefix="http-put-")  # noqa: SIM115 - returned
    try:
        size = 0
        for piece in unzstd(source) if decompress else source:
            size += len(piece)
            if size > limit:
                raise HttpError(413, f"a blob of more than {limit} bytes: larger than the cache")
            spool.write(piece)
    except BaseException:
        spool.close()
        raise
    return spool


def _decompress_entry(data: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    try:
        out = reader.read(MAX_ENTRY + 1)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"the body is not a zstd stream: {exc}") from None
    if len(out) > MAX_ENTRY:
        raise HttpError(413, f"an action cache entry of more than {MAX_ENTRY} bytes")
    return out


def _peer(scope: Scope) -> str:
    """Who sent a request, as far as the connection tells (``HOST:PORT``)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


def _refusal(exc: Refused, *, basic: bool) -> HttpError:
    """The answer to a request refused for its credentials (``_auth.py``);
    ``basic``: basic auth is taken too (a browser or curl asks for a password)."""
    if exc.kind == "unauthenticated":
        challenges = [(b"www-authenticate", b'Bearer realm="cachefs"')]
        if basic:
            challenges.append((b"www-authenticate", b'Basic realm="cachefs"'))
        return HttpError(401, str(exc), challenges)
    if exc.kind == "denied":
        return HttpError(403, str(exc))
    if exc.kind == "quota":
        return HttpError(507, str(exc))
    return HttpError(429, str(exc), [(b"retry-after", str(exc.retry_after).encode())])
