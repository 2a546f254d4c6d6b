"""The servers measured and traced (server layer).

Only when the process has metrics (``--metrics``) or traces (``cachefs.tracing``):
:class:`MeasuredRpcs` is the gRPC server's outermost interceptor,
:class:`MeasuredHttp` wraps the ASGI app.

Metrics: each request is counted once, when it ends, under ``protocol`` (grpc,
http), ``method`` (the RPC's name, e.g. ``GetActionResult``; for HTTP the
method and the kind of resource, e.g. ``GET /ac``) and ``status`` (the gRPC
status code's name, or the HTTP status).  Bytes are those of the messages
(gRPC: serialized protobufs, framing not counted) and bodies (HTTP).

Traces: each request is a server span (``grpc <Service>/<Method>``, ``HTTP
GET /cas``) that continues the client's trace when its metadata or headers
carry a W3C ``traceparent``; what the request does (a fetch from a remote
tier, a publication) is traced beneath it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from cachefs import tracing
from cachefs.server._grpc import Handler, Interceptor, rebuilt
from cachefs.server._http import Receive, Scope, Send

if TYPE_CHECKING:
    from cachefs.metrics import Metrics


class MeasuredRpcs(Interceptor):
    """Time and trace every RPC, and count its status and bytes (the outermost
    interceptor); ``metrics`` None: traces only."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        name = f"grpc {service.rsplit('.', 1)[-1]}/{method}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        metrics = self.metrics
        parse, out = handler.request_deserializer, handler.response_serializer
        if metrics is not None:
            received = metrics.server_received.labels("grpc")
            sent = metrics.server_sent.labels("grpc")
            parse, out = _counting_in(parse, received.inc), _counting_out(out, sent.inc)

        def finish(
            context: grpc.ServicerContext, start: float, span: Any, failure: str | None
        ) -> None:
            """The call ended: with the status it set, else ``failure`` (None: OK)."""
            code = context.code()  # type: ignore[attr-defined]
            status = code.name if code is not None else failure or "OK"
            tracing.set_attribute(span, "rpc.grpc.status_code", status)
            if metrics is not None:
                latency = time.perf_counter() - start
                metrics.server_requests.labels("grpc", method, status).observe(latency)

        def call(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
            def observed(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                metadata = context.invocation_metadata() if tracing.active() else ()
                with tracing.server_span(name, metadata, attributes) as span:
                    failure: str | None = "UNKNOWN"
                    try:
                        result = behaviour(request, context)
                        failure = None
                        return result
                    except Exception:
                        if not context.is_active():
                            failure = "CANCELLED"  # the client went away
                        raise
                    finally:
                        finish(context, start, span, failure)

            return observed

        def stream(behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Any:
            def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                metadata = context.invocation_metadata() if tracing.active() else ()
                with tracing.server_span(name, metadata, attributes) as span:
                    failure: str | None = "UNKNOWN"
                    try:
                        yield from behaviour(request, context)
                        failure = None
                    except GeneratorExit:  # grpcio closes the stream: the client went away
                        failure = "CANCELLED"
                        raise
                    finally:
                        finish(context, start, span, failure)

            return observed

        return rebuilt(handler, call=call, stream=stream, parse=parse, out=out)


def _counting_in(
    parse: Callable[[bytes], Any] | None, count: Callable[[int], None]
) -> Callable[[bytes], Any]:
    """A deserializer that counts the bytes it is given."""

    def counted(data: bytes) -> Any:
        count(len(data))
        return parse(data) if parse is not None else data

    return counted


def _counting_out(
    serialize: Callable[[Any], bytes] | None, count: Callable[[int], None]
) -> Callable[[Any], bytes]:
    """A serializer that counts the bytes it makes."""

    def counted(message: Any) -> bytes:
        data: bytes = serialize(message) if serialize is not None else message
        count(len(data))
        return data

    return counted


class MeasuredHttp:
    """The HTTP app, each request timed, traced and counted by status and
    bytes; ``metrics`` None: traces only."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any], metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = "500"  # unless the app answers
        metrics = self.metrics
        received = None if metrics is None else metrics.server_received.labels("http")
        sent = None if metrics is None else metrics.server_sent.labels("http")

        async def counted_receive() -> Any:
            message = await receive()
            if received is not None:
                received.inc(len(message.get("body", b"")))
            return message

        async def counted_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and sent is not None:
                sent.inc(len(message.get("body", b"")))
            await send(message)

        resource = _resource(scope)
        headers = [(k.decode("latin-1"), v) for k, v in scope["headers"]]
        attributes = {"http.request.method": scope.get("method", ""), "url.path": scope["path"]}
        with tracing.server_span(f"HTTP {resource}", headers, attributes) as span:
            try:
                await self.app(scope, counted_receive, counted_send)
            finally:
                tracing.set_attribute(span, "http.response.status_code", int(status))
                if metrics is not None:
                    metrics.server_requests.labels("http", resource, status).observe(
                        time.perf_counter() - start
                    )


def _resource(scope: Scope) -> str:
    """``METHOD /KIND``: the method and the kind of resource (``/cas``, ``/ac``,
    ``/status``; ``/other`` for anything else, so that labels stay few)."""
    method = scope.get("method", "")
    if method not in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        method = "OTHER"
    path: str = scope.get("path", "")
    if path == "/status":
        return f"{method} /status"
    parts = path.rsplit("/", 2)
    kind = parts[-2] if len(parts) == 3 and parts[-2] in ("cas", "ac") else "other"
    return f"{method} /{kind}"


__all__ = ["MeasuredHttp", "MeasuredRpcs"]
