"""gRPC: errors and limits of every service (server layer).

Each service is a thin translation onto :class:`~cachefs.server._cache.RemoteCache`
in a module of its own (``_grpc_cas.py``, ``_grpc_ac.py``, ``_grpc_bytestream.py``,
``_grpc_capabilities.py``); ``_grpc_server.py`` puts them together.  What an
error becomes on the wire is decided here, once: :func:`rpc` wraps every
method, turns cachefs errors into the status codes the REAPI specifies, logs
one line for each, and never lets a traceback reach a client.  grpcio runs the
methods in its own thread pool, which is where ingest and reads belong; the
filesystem is reached through the cache's trio token.  A request that does not
parse reaches the method as :class:`Malformed` (``MalformedRequests``) and is
refused with INVALID_ARGUMENT, as any other bad argument.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from cachefs.engine import (
    CachefsError,
    ConfigError,
    CorruptDataError,
    Digest,
    DigestMismatchError,
    NotFoundError,
    StoreFullError,
)
from cachefs.protocol import re_pb2
from cachefs.server._cache import RemoteCache
from cachefs.server._names import BadRequest, OutOfRange, parse_digest

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: The largest gRPC message either way (batches are kept below it).
MAX_MESSAGE = 64 << 20
#: The largest total of a batch (BatchUpdateBlobs, BatchReadBlobs), announced
#: in the capabilities; what is left of a message is for its framing.
MAX_BATCH = MAX_MESSAGE - (1 << 20)
#: REAPI's names of the store's digest functions.
DIGEST_FUNCTIONS = {"sha256": re_pb2.DigestFunction.SHA256, "blake3": re_pb2.DigestFunction.BLAKE3}


class RpcFailure(CachefsError):
    """A call answered with a status of its own (not one an error class implies)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message, hint="")
        self.code = code


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an error is answered with."""
    if isinstance(exc, RpcFailure):
        return exc.code
    if isinstance(exc, OutOfRange):
        return grpc.StatusCode.OUT_OF_RANGE
    if isinstance(exc, BadRequest | DigestMismatchError | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, StoreFullError) or getattr(exc, "errno", None) == errno.ENOSPC:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, CorruptDataError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, CachefsError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, name: str, exc: BaseException) -> NoReturn:
    code = status_of(exc)
    if isinstance(exc, CachefsError):
        level = (
            logging.ERROR
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS)
            else logging.DEBUG  # a miss is what a cache answers every day
            if code is grpc.StatusCode.NOT_FOUND
            else logging.INFO
        )
        log.log(
            level,
            "%s: %s: %s",
            name,
            code.name,
            exc,
        )
        context.abort(code, str(exc))
    log.exception("%s: unexpected error", name)
    context.abort(code, f"internal error in {name}; see the server's log")


class Encoded:
    """A response already in its wire form: sent as it is.  Made by hand only
    where a large payload would otherwise be copied into a message and out of
    it again (ByteStream reads, :func:`bytes_message`)."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire


def bytes_message(field: int, pieces: list[bytes | memoryview], length: int) -> Encoded:
    """The wire form of a message whose only field set is the bytes field
    number ``field``, holding the pieces (``length`` bytes in all): its key,
    its length as a varint, the bytes -- made with one copy of the bytes."""
    assert 1 <= field <= 15, "a one-byte key: field numbers 1 to 15"
    head = bytearray([field << 3 | 2])  # wire type 2: length-delimited
    while length > 0x7F:
        head.append(length & 0x7F | 0x80)
        length >>= 7
    head.append(length)
    return Encoded(b"".join([head, *pieces]))


def bytes_field(
    raw: bytes, field: int, *, most_fields: int = 16
) -> tuple[bytes, memoryview] | None:
    """The reverse of :func:`bytes_message`, for a request that brings a large
    payload: the wire form of message ``raw`` without its bytes field number
    ``field``, and a view of that field's value in ``raw`` (its bytes are not
    copied).  None when the field is not there once, or the wire form is not
    one walked here: groups, a key or length of more than five bytes (which
    protobuf refuses), the field's key in other than its shortest form, more
    than ``most_fields`` fields (a message padded with thousands of small
    fields, which this loop would walk far slower than protobuf does), or it
    ends short.  The caller then parses ``raw`` whole, and the protobuf parser
    says what is wrong with it."""
    found: tuple[int, int, int] | None = None
    end = len(raw)
    wanted = field << 3 | 2
    wanted_size = 1 + sum(wanted >= n for n in _VARINT_SIZES)  # its key's shortest form
    i = fields = 0
    try:
        while i < end:
            fields += 1
            if fields > most_fields:
                return None
            start = i
            key, i = _varint(raw, i)
            if i - start > 5 or key >> 32:
                return None
            kind = key & 7
            if kind == 0:
                i = _varint(raw, i)[1]
            elif kind == 1:
                i += 8
            elif kind == 5:
                i += 4
            elif kind == 2:
                at = i
                length, i = _varint(raw, i)
                if i - at > 5:
                    return None
                if key >> 3 == field:
                    if found is not None or at - start != wanted_size:
                        return None  # twice (the last counts), or a key not as it is written
                    found = (start, i, i + length)
                i += length
            else:
                return None
    except IndexError:
        return None
    if found is None or i != end:
        return None
    start, begin, stop = found
    return raw[:start] + raw[stop:], memoryview(raw)[begin:stop]


#: The values from which a varint takes 2, 3, ... 10 bytes.
_VARINT_SIZES = [1 << 7 * n for n in range(1, 10)]


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    """The varint at ``raw[i:]`` and where it ends; IndexError if it does not
    end within ten bytes, or within ``raw``."""
    value = shift = 0
    while shift < 70:
        byte = raw[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise IndexError("a varint of more than ten bytes")


def _passing(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message.wire if type(message) is Encoded else serializer(message)

    return serialize


class Malformed:
    """A request message that does not parse (in place of the message)."""

    def __init__(self, error: str) -> None:
        self.error = error

    def refuse(self, name: str) -> NoReturn:
        raise BadRequest(f"malformed {name} request: {self.error}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError) as exc:
            return Malformed(str(exc) or "it is not a protobuf message")

    return parse


if TYPE_CHECKING:  # grpc-stubs makes them generic; grpcio's classes are not
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.ServerInterceptor


def _same(behaviour: Any) -> Any:
    return behaviour


def rebuilt(
    handler: Handler,
    *,
    call: Callable[[Any], Any] = _same,
    stream: Callable[[Any], Any] = _same,
    upload: Callable[[Any], Any] | None = None,
    parse: Callable[[bytes], Any] | None = None,
    out: Callable[[Any], bytes] | None = None,
) -> Handler:
    """An interceptor's handler in the place of ``handler``: its behaviour
    wrapped by ``call`` (one response), ``stream`` (a stream of them) or
    ``upload`` (a stream of requests, one response; ``call`` unless given), and
    ``parse``/``out`` (None: the handler's) as its (de)serializers."""
    kinds = {
        "request_deserializer": parse or handler.request_deserializer,
        "response_serializer": out or handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(call(handler.unary_unary), **kinds)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kinds)
    if handler.stream_unary is not None:
        wrap = call if upload is None else upload
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kinds)
    return handler  # no service of ours streams both ways


class MalformedRequests(Interceptor):
    """Hand a request that does not parse to the method as :class:`Malformed`
    (refused with INVALID_ARGUMENT and a log line), not to grpcio, which would
    answer INTERNAL ("Exception deserializing request!"); send an
    :class:`Encoded` response as it is.  ``parsers``: the parser of the
    requests of a method (by its full name), in place of the generated one."""

    def __init__(self, parsers: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
        self.parsers = dict(parsers or {})

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        parse = _tolerant(self.parsers.get(details.method, handler.request_deserializer))
        return rebuilt(handler, parse=parse, out=_passing(handler.response_serializer))


def rpc(method: F) -> F:
    """Answer a servicer method's cachefs errors with their status codes (and
    any other error with INTERNAL, logged with its traceback); a malformed
    request (:class:`Malformed`) is INVALID_ARGUMENT."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                if isinstance(request, Malformed):
                    request.refuse(name)
                yield from method(self, request, context)
            except Exception as exc:
                _abort(context, name, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                request.refuse(name)
            return method(self, request, context)
        except Exception as exc:
            _abort(context, name, exc)

    return unary  # type: ignore[return-value]


class Service:
    """What every service of this server knows: the cache and its digest function."""

    def __init__(self, cache: RemoteCache) -> None:
        self.cache = cache
        self.function = cache.digest_function
        self.function_value = DIGEST_FUNCTIONS[self.function.name]

    def check_function(self, value: int) -> None:
        """A request's digest function must be the store's (or left unset)."""
        if value not in (re_pb2.DigestFunction.UNKNOWN, self.function_value):
            name = re_pb2.DigestFunction.Value.Name(value)  # type: ignore[arg-type]
            raise BadRequest(
                f"digest function {name} is not this store's ({self.function.name})",
                hint="ask the server's capabilities for its digest function",
            )

    def digest(self, message: re_pb2.Digest) -> Digest:
        return parse_digest(message.hash, message.size_bytes, self.function)
