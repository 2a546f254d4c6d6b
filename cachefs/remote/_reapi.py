"""REAPI v2 remotes: any CAS server over gRPC (remote layer).

Another ``cachefs serve``, BuildGrid, Buildbarn, bazel-remote, NativeLink: the
blobs are the instance's CAS.  ``find_missing`` is FindMissingBlobs in batches;
action cache entries (``get_action``,
``update_action``) are the instance's ActionCache; a blob of up to
``BATCH_BLOB`` bytes is read and written with
BatchReadBlobs / BatchUpdateBlobs, a larger one streamed over ByteStream in
``PIECE`` messages (``{instance}/blobs/...`` and ``{instance}/uploads/{uuid}/
blobs/...``, with ``blake3/`` for a BLAKE3 store, as the API names them).
A server that advertises SpliceBlob (GetCapabilities) gets whole objects
spliced from the chunks it holds (``splice``) instead of uploaded again.
Every call has the tier's timeout as its deadline.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from cachefs import tracing
from cachefs.errors import ObjectNotFoundError, RemoteError
from cachefs.format.digest import BLAKE3, Digest, DigestFunction
from cachefs.protocol import bs_grpc, bs_pb2, re_grpc, re_pb2
from cachefs.remote._blobs import verified
from cachefs.remote._urls import RemoteUrl

#: Blobs up to this size go in batch calls; larger ones over ByteStream.
BATCH_BLOB = 1 << 20
#: Bytes of one ByteStream WriteRequest.
PIECE = 1 << 20
#: Digests of one FindMissingBlobs call.
FIND_BATCH = 10_000
#: The slowest transfer a stream's deadline allows for (bytes per second).
MIN_RATE = 1 << 20
#: The largest message taken from a server.
MAX_MESSAGE = 64 << 20


#: Answers that refuse a request for what it is (a retry gets the same).
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")
    ),
    grpc.ClientCallDetails,
):
    """A call's details with metadata of our own."""


class CallMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
):
    """Send with every call the W3C trace context of the span in progress
    (``traceparent`` metadata), so that a traced server continues the trace,
    and the bearer token the server asks for, if any."""

    def __init__(self, token: str | None = None) -> None:
        self.token = [] if token is None else [("authorization", f"Bearer {token}")]

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), *tracing.headers(), *self.token]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class ReapiRemote:
    """The CAS of one REAPI instance."""

    def __init__(self, url: RemoteUrl, function: DigestFunction, timeout: float = 30.0) -> None:
        self.name = url.text
        self.key = f"grpc:{url.address}/{url.instance}"
        self.function = function
        self.instance = url.instance
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        token, ca, cert, key = url.credentials()
        self.channel = (
            grpc.secure_channel(
                url.address,
                grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert),
                options=options,
            )
            if url.tls
            else grpc.insecure_channel(url.address, options=options)
        )
        if tracing.active() or token is not None:  # calls carry the trace context, a token
            self.channel = grpc.intercept_channel(self.channel, CallMetadata(token))
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.capabilities = re_grpc.CapabilitiesStub(self.channel)
        self._splices: bool | None = None
        self._function = (
            re_pb2.DigestFunction.BLAKE3 if function == BLAKE3 else re_pb2.DigestFunction.UNKNOWN
        )
        self._path = "blake3/" if function == BLAKE3 else ""
        #: Blobs of any size are written as streams (``write_stream``).
        self.streams = True
        self.documents = None  # entries in the action cache
        self.packs = None  # a CAS keeps blobs one by one

    def _failed(self, what: str, exc: grpc.RpcError | ValueError) -> RemoteError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        error = RemoteError(f"{self.name}: {what}: {code.name if code else 'error'}: {detail}")
        error.permanent = code in _REFUSALS
        return error

    @staticmethod
    def _message(digest: Digest) -> re_pb2.Digest:
        return re_pb2.Digest(hash=digest.hex, size_bytes=digest.size)

    def _deadline(self, digest: Digest) -> float:
        """A stream's deadline: the timeout, and a second for each ``MIN_RATE`` bytes."""
        return self.timeout + digest.size / MIN_RATE

    def _resource(self, digest: Digest, *, upload: bool) -> str:
        head = f"{self.instance}/" if self.instance else ""
        if upload:
            head += f"uploads/{uuid.uuid4()}/"
        return f"{head}blobs/{self._path}{digest.hex}/{digest.size}"

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        missing: list[Digest] = []
        for start in range(0, len(digests), FIND_BATCH):
            batch = digests[start : start + FIND_BATCH]
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance,
                blob_digests=[self._message(d) for d in batch],
                digest_function=self._function,
            )
            try:
                response = self.cas.FindMissingBlobs(request, timeout=self.timeout)
            except (grpc.RpcError, ValueError) as exc:  # ValueError: a closed channel
                raise self._failed("asking for blobs", exc) from None
            gone = {(d.hash.lower(), d.size_bytes) for d in response.missing_blob_digests}
            missing.extend(d for d in batch if (d.hex, d.size) in gone)
        return missing

    def read(self, digest: Digest) -> bytes:
        try:
            data = (
                self._read_batch(digest) if digest.size <= BATCH_BLOB else self._read_stream(digest)
            )
        except (grpc.RpcError, ValueError) as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ObjectNotFoundError(f"blob {digest} is not in {self.name}") from None
            raise self._failed(f"reading blob {digest}", exc) from None
        return verified(self.name, self.function, digest, data)

    def _read_batch(self, digest: Digest) -> bytes:
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance,
            digests=[self._message(digest)],
            digest_function=self._function,
        )
        response = self.cas.BatchReadBlobs(request, timeout=self.timeout)
        if len(response.responses) != 1:
            raise RemoteError(f"{self.name}: {len(response.responses)} answers for one blob")
        (answer,) = response.responses
        if answer.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
            raise ObjectNotFoundError(f"blob {digest} is not in {self.name}")
        if answer.status.code != grpc.StatusCode.OK.value[0]:
            raise RemoteError(f"{self.name}: reading blob {digest}: {answer.status.message}")
        if answer.compressor != re_pb2.Compressor.IDENTITY:
            raise RemoteError(f"{self.name}: blob {digest} came compressed, unasked")
        return answer.data

    def _read_stream(self, digest: Digest) -> bytes:
        request = bs_pb2.ReadRequest(resource_name=self._resource(digest, upload=False))
        pieces, held = [], 0
        for response in self.bytestream.Read(request, timeout=self._deadline(digest)):
            pieces.append(response.data)
            held += len(response.data)
            if held > digest.size:
                break  # longer than the blob: verified() refuses it
        return b"".join(pieces)

    def write(self, digest: Digest, data: bytes) -> None:
        try:
            if digest.size <= BATCH_BLOB:
                self._write_batch(digest, data)
            else:
                self._write_stream(digest, data)
        except (grpc.RpcError, ValueError) as exc:
            raise self._failed(f"writing blob {digest}", exc) from None

    def _write_batch(self, digest: Digest, data: bytes) -> None:
        request = re_pb2.BatchUpdateBlobsRequest(
            instance_name=self.instance,
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=self._message(digest), data=data)
            ],
            digest_function=self._function,
        )
        response = self.cas.BatchUpdateBlobs(request, timeout=self.timeout)
        codes = [r.status.code for r in response.responses]
        if codes != [grpc.StatusCode.OK.value[0]]:
            messages = [r.status.message for r in response.responses]
            raise RemoteError(f"{self.name}: writing blob {digest}: {messages or 'no answer'}")

    def write_stream(
        self, digest: Digest, pieces: Callable[[], Iterable[bytes | memoryview]]
    ) -> None:
        try:
            self._write_stream(digest, pieces())
        except (grpc.RpcError, ValueError) as exc:
            raise self._failed(f"writing blob {digest}", exc) from None

    def _write_stream(self, digest: Digest, data: bytes | Iterable[bytes | memoryview]) -> None:
        name = self._resource(digest, upload=True)
        source = (data,) if isinstance(data, bytes) else data

        def requests() -> Iterator[bs_pb2.WriteRequest]:
            start = 0
            for piece in pieces_of(source, PIECE):
                yield bs_pb2.WriteRequest(
                    resource_name=name if start == 0 else "",
                    write_offset=start,
                    data=piece,
                    finish_write=start + len(piece) >= digest.size,
                )
                start += len(piece)

        response = self.bytestream.Write(requests(), timeout=self._deadline(digest))
        # -1 (or any size) for a blob the server had already; the size otherwise.
        if response.committed_size not in (-1, digest.size):
            raise RemoteError(
                f"{self.name}: writing blob {digest}: committed {response.committed_size} bytes"
            )

    @property
    def splices(self) -> bool:
        """Whether the server advertises SpliceBlob (asked once, by
        GetCapabilities; a server that cannot be asked is asked again later)."""
        if self._splices is None:
            request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance)
            try:
                answer = self.capabilities.GetCapabilities(request, timeout=self.timeout)
            except (grpc.RpcError, ValueError) as exc:
                if self._failed("asking for capabilities", exc).permanent:
                    self._splices = False  # it will not say
                return False
            self._splices = bool(answer.cache_capabilities.splice_blob_support)
        return self._splices

    def splice(self, digest: Digest, chunks: Sequence[Digest]) -> None:
        request = re_pb2.SpliceBlobRequest(
            instance_name=self.instance,
            blob_digest=self._message(digest),
            chunk_digests=[self._message(c) for c in chunks],
            digest_function=self._function,
        )
        try:
            answer = self.cas.SpliceBlob(request, timeout=self._deadline(digest))
        except (grpc.RpcError, ValueError) as exc:
            raise self._failed(f"splicing blob {digest}", exc) from None
        made = answer.blob_digest
        if (made.hash.lower(), made.size_bytes) != (digest.hex, digest.size):
            raise RemoteError(
                f"{self.name}: splicing blob {digest} made {made.hash}/{made.size_bytes}"
            )

    def get_action(self, key: Digest) -> re_pb2.ActionResult | None:
        request = re_pb2.GetActionResultRequest(
            instance_name=self.instance,
            action_digest=self._message(key),
            digest_function=self._function,
        )
        try:
            result: re_pb2.ActionResult = self.ac.GetActionResult(request, timeout=self.timeout)
        except (grpc.RpcError, ValueError) as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._failed(f"reading action cache entry {key}", exc) from None
        return result

    def update_action(self, key: Digest, result: re_pb2.ActionResult) -> None:
        request = re_pb2.UpdateActionResultRequest(
            instance_name=self.instance,
            action_digest=self._message(key),
            action_result=result,
            digest_function=self._function,
        )
        try:
            self.ac.UpdateActionResult(request, timeout=self.timeout)
        except (grpc.RpcError, ValueError) as exc:
            raise self._failed(f"writing action cache entry {key}", exc) from None

    def close(self) -> None:
        self.channel.close()


def pieces_of(source: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """The bytes of ``source`` again, in pieces of ``size`` (the last one shorter)."""
    held = bytearray()
    for part in source:
        held += part
        while len(held) >= size:
            yield bytes(held[:size])
            del held[:size]
    if held:
        yield bytes(held)


__all__ = ["ReapiRemote", "pieces_of"]
