"""OpenTelemetry traces (a leaf beside ``metrics``: every layer may open spans).

Off by default, and free when off: until :func:`configure` turns tracing on
(``--otlp-endpoint URL``, or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), nothing imports OpenTelemetry,
:func:`span` returns one shared no-op context manager and :func:`in_context`
hands back the function it was given.  Once on, spans go to the OTLP
endpoint in batches from the SDK's own thread (gRPC by default,
``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` for OTLP over HTTP); the other
``OTEL_*`` variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, headers, timeouts) are the SDK's and apply as
documented there.

What is traced, and where: server requests (``server/_measure.py``, the
client's W3C trace context taken from gRPC metadata and HTTP headers),
remote requests (``remote/_metered.py``; a REAPI remote is sent the trace
context in its metadata, so that a cachefs or any traced server continues
the trace), publications (``engine/_publish.py``), garbage collection and
scrubs (``engine``), and a sampled share of FUSE requests (``fuse.py``,
``--otlp-fuse-ratio``).  The span in progress lives in a context variable:
trio carries it into and out of worker threads; thread pools of our own carry
it with :func:`in_context`.  Only this module imports ``opentelemetry``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from cachefs import __version__
from cachefs.errors import ConfigError

T = TypeVar("T")


class _State:
    """Whether tracing is on: the SDK's tracer and provider (None: off)."""

    tracer: Any = None
    provider: Any = None
    #: The share of FUSE requests traced (``--otlp-fuse-ratio``).
    fuse_ratio = 0.0


_state = _State()
_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
#: Protocols of ``OTEL_EXPORTER_OTLP_PROTOCOL`` we export with.
PROTOCOLS = ("grpc", "http/protobuf")
#: The default share of FUSE requests traced: a request is cheap, a span is not.
DEFAULT_FUSE_RATIO = 0.01


def endpoint_from_environment() -> str | None:
    """The OTLP endpoint the standard variables name (None: tracing stays off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def _protocol() -> str:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: cachefs exports OTLP over "
            + " or ".join(PROTOCOLS)
        )
    return protocol


def check_options(endpoint: str | None, fuse_ratio: float) -> None:
    """Refuse (ConfigError) what :func:`configure` would, before anything starts."""
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            f"--otlp-endpoint {endpoint!r} is not a URL",
            hint="give http://HOST:PORT (4317 for OTLP/gRPC, 4318 for OTLP/HTTP)",
        )
    if not 0.0 <= fuse_ratio <= 1.0:
        raise ConfigError(f"--otlp-fuse-ratio {fuse_ratio}: a share from 0 to 1")
    if endpoint is not None or endpoint_from_environment() is not None:
        _protocol()


def configure(
    endpoint: str | None,
    *,
    service: str,
    instance: str = "",
    fuse_ratio: float = DEFAULT_FUSE_RATIO,
) -> bool:
    """Turn tracing on if ``endpoint`` or the environment names an OTLP
    endpoint (whether it is on); ``service`` names the process's kind
    (``service.name``), ``instance`` this one (``service.instance.id``: the
    machine and the store).  Call it in the process that will trace (after
    detaching: the SDK starts a thread)."""
    check_options(endpoint, fuse_ratio)
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the traces' URL as it is; the others
    # are a base URL, to which OTLP/HTTP adds /v1/traces.
    whole = endpoint is None and bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    if endpoint is None:
        endpoint = endpoint_from_environment()
        if endpoint is None:
            return False
    # Imported here: tracing off costs no import.
    from opentelemetry.sdk.resources import (  # noqa: PLC0415
        SERVICE_INSTANCE_ID,
        SERVICE_NAME,
        Resource,
    )
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    exporter: Any
    if _protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as HttpExporter,
        )

        if not whole:
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        exporter = HttpExporter(endpoint=endpoint)
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the service name.
    given = {} if _named() else {SERVICE_NAME: service}
    if instance:
        given[SERVICE_INSTANCE_ID] = instance
    resource = Resource.create(given)
    provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER applies
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _state.provider = provider
    _state.tracer = provider.get_tracer("cachefs", __version__)
    _state.fuse_ratio = fuse_ratio
    return True


def _named() -> bool:
    attributes = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return bool(os.environ.get("OTEL_SERVICE_NAME")) or "service.name=" in attributes


#: Milliseconds a stopping daemon gives its last spans to go out.
FLUSH_TIMEOUT_MS = 3000


def shutdown() -> None:
    """Send what is left (for ``FLUSH_TIMEOUT_MS`` at most: a collector that
    is away must not hold a stopping daemon) and stop exporting; tracing is
    off afterwards."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    # If the flush times out, what is left is dropped with the exporter's
    # thread (a daemon thread) when the process exits.
    if provider is not None and provider.force_flush(timeout_millis=FLUSH_TIMEOUT_MS):
        provider.shutdown()


def active() -> bool:
    return _state.tracer is not None


def fuse_sampled() -> bool:
    """Whether to trace this FUSE request (``--otlp-fuse-ratio``)."""
    return _state.tracer is not None and random.random() < _state.fuse_ratio


def fuse_ratio() -> float:
    return _state.fuse_ratio if _state.tracer is not None else 0.0


def span(
    name: str, *, kind: str = "internal", attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Any]:
    """A span over a ``with`` block, child of the span in progress (a no-op
    when tracing is off).  ``kind``: internal, client, server."""
    tracer = _state.tracer
    if tracer is None:
        return _NOOP
    return tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, kind=_kind(kind), attributes=dict(attributes or {})
    )


def child_span(
    name: str, *, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Any]:
    """A span only inside a trace that is being recorded (a no-op outside
    one): for work as frequent as a publication, which is worth a span when
    a request it serves is traced, and not a trace of its own every time."""
    tracer = _state.tracer
    if tracer is None:
        return _NOOP
    if not _in_sampled_trace():
        return _NOOP
    return tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, kind=_kind("internal"), attributes=dict(attributes or {})
    )


def server_span(
    name: str,
    headers: Iterable[tuple[str, str | bytes]],
    attributes: Mapping[str, Any] | None = None,
) -> AbstractContextManager[Any]:
    """A server span continuing the trace whose context ``headers`` carry
    (W3C ``traceparent``, or what ``OTEL_PROPAGATORS`` names; a new trace
    without)."""
    tracer = _state.tracer
    if tracer is None:
        return _NOOP
    from opentelemetry import propagate  # noqa: PLC0415

    # All of them: the propagators (OTEL_PROPAGATORS: W3C by default, B3, ...) pick.
    carrier = {
        key.lower(): value.decode("latin-1") if isinstance(value, bytes) else value
        for key, value in headers
    }
    context = propagate.extract(carrier)
    return tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, context=context, kind=_kind("server"), attributes=dict(attributes or {})
    )


def set_attribute(current: Any, key: str, value: Any) -> None:
    """Set an attribute on the span a ``with span(...)`` gave (nothing when off)."""
    if current is not None:
        current.set_attribute(key, value)


def headers() -> list[tuple[str, str]]:
    """The W3C trace context of the span in progress, as headers for an
    outgoing request (none when tracing is off)."""
    if _state.tracer is None:
        return []
    from opentelemetry import propagate  # noqa: PLC0415

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, run in the trace context of the caller of this function (for
    work handed to a thread pool); ``fn`` itself when tracing is off."""
    if _state.tracer is None:
        return fn
    from opentelemetry import context  # noqa: PLC0415

    captured = context.get_current()

    def run(*args: Any, **kwargs: Any) -> T:
        return run_in(captured, functools.partial(fn, *args, **kwargs))

    return run


def recorded_context() -> Any:
    """The trace context of the caller when a span is being recorded there
    (None otherwise): for work done later on its behalf (:func:`run_in`), such
    as the publication of files released together."""
    if _state.tracer is None or not _in_sampled_trace():
        return None
    from opentelemetry import context  # noqa: PLC0415

    return context.get_current()


def _in_sampled_trace() -> bool:
    """Whether the span in progress (or the one a context taken earlier names,
    ended since) belongs to a trace that is recorded."""
    from opentelemetry import trace  # noqa: PLC0415

    current = trace.get_current_span().get_span_context()
    return bool(current.is_valid and current.trace_flags.sampled)


def run_in(captured: Any, fn: Callable[[], T]) -> T:
    """``fn()`` in a trace context :func:`in_context` or
    :func:`recorded_context` took (None: in the caller's)."""
    if captured is None:
        return fn()
    from opentelemetry import context  # noqa: PLC0415

    token = context.attach(captured)
    try:
        return fn()
    finally:
        context.detach(token)


def _kind(kind: str) -> Any:
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    return {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER}[
        kind
    ]


__all__ = [
    "DEFAULT_FUSE_RATIO",
    "PROTOCOLS",
    "active",
    "check_options",
    "child_span",
    "configure",
    "endpoint_from_environment",
    "fuse_ratio",
    "fuse_sampled",
    "headers",
    "in_context",
    "recorded_context",
    "run_in",
    "server_span",
    "set_attribute",
    "shutdown",
    "span",
]
