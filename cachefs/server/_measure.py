"""The servers measured (server layer): every request's latency, status and bytes.

Only when the process has metrics (``--metrics``): :class:`MeasuredRpcs` is
the gRPC server's outermost interceptor, :class:`MeasuredHttp` wraps the ASGI
app.  Each request is counted once, when it ends, under ``protocol`` (grpc,
http), ``method`` (the RPC's name, e.g. ``GetActionResult``; for HTTP the
method and the kind of resource, e.g. ``GET /ac``) and ``status`` (the gRPC
status code's name, or the HTTP status).  Bytes are those of the messages
(gRPC: serialized protobufs, framing not counted) and bodies (HTTP).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from cachefs.server._grpc import Handler, Interceptor
from cachefs.server._http import Receive, Scope, Send

if TYPE_CHECKING:
    from cachefs.metrics import Metrics


class MeasuredRpcs(Interceptor):
    """Time every RPC, and count its status and bytes (the outermost interceptor)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._received = metrics.server_received.labels("grpc")
        self._sent = metrics.server_sent.labels("grpc")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        requests = self.metrics.server_requests
        received, sent = self._received, self._sent
        parse, out = handler.request_deserializer, handler.response_serializer

        def deserialize(data: bytes) -> Any:
            received.inc(len(data))
            return parse(data) if parse is not None else data

        def serialize(message: Any) -> bytes:
            data: bytes = out(message) if out is not None else message
            sent.inc(len(data))
            return data

        def finish(context: grpc.ServicerContext, start: float, status: str | None) -> None:
            if status is None:
                code = context.code()  # type: ignore[attr-defined]
                status = code.name if code is not None else "OK"
            requests.labels("grpc", method, status).observe(time.perf_counter() - start)

        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                failed = None
                try:
                    return behaviour(request, context)
                except Exception:
                    failed = _failure(context)
                    raise
                finally:
                    finish(context, start, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserialize, response_serializer=serialize
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                failed = None
                try:
                    yield from streaming(request, context)
                except Exception:
                    failed = _failure(context)
                    raise
                finally:
                    finish(context, start, failed)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserialize, response_serializer=serialize
            )
        if handler.stream_unary is not None:
            taking = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                failed = None
                try:
                    return taking(requests, context)
                except Exception:
                    failed = _failure(context)
                    raise
                finally:
                    finish(context, start, failed)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=deserialize, response_serializer=serialize
            )
        return handler  # no service of ours streams both ways


def _failure(context: grpc.ServicerContext) -> str:
    """The status of a call that raised: the one it aborted with, else UNKNOWN."""
    code = context.code()  # type: ignore[attr-defined]
    return code.name if code is not None else "UNKNOWN"


class MeasuredHttp:
    """The HTTP app, each request timed and counted by status and bytes."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._received = metrics.server_received.labels("http")
        self._sent = metrics.server_sent.labels("http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = "500"  # unless the app answers
        received, sent = self._received, self._sent

        async def counted_receive() -> Any:
            message = await receive()
            received.inc(len(message.get("body", b"")))
            return message

        async def counted_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body":
                sent.inc(len(message.get("body", b"")))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            self.metrics.server_requests.labels("http", _resource(scope), status).observe(
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
