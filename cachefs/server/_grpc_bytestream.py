"""ByteStream over gRPC (server layer): blobs read and written as streams.

Resource names as the REAPI specifies them (``_names.parse_resource``).  A read
streams the blob from the store, verified chunk by chunk, in messages of up to
``READ_PIECE`` bytes, or zstd-compressed for a ``compressed-blobs/zstd`` name.
A write is resumable (``_uploads.py``): what arrives is stored as it comes,
as a file of ``.uploads/`` (the bytes are written once, and the network and
the chunking overlap); ``QueryWriteStatus`` says how much, and a write may go
on from there.  When the client finishes, the digest is checked (a mismatch,
or more bytes than the digest says, is INVALID_ARGUMENT and nothing is stored)
and the file moved into the CAS, durably, before the answer.  A write of a blob
the cache has answers at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import zstandard

from cachefs.protocol import bs_grpc, bs_pb2
from cachefs.server._cache import RemoteCache, groups, pieces, unzstd
from cachefs.server._grpc import (
    Encoded,
    Malformed,
    RpcFailure,
    Service,
    bytes_field,
    bytes_message,
    rpc,
)
from cachefs.server._names import BadRequest, OutOfRange, Resource, parse_resource
from cachefs.server._uploads import Upload, Uploads

#: Bytes of one ReadResponse at the most.
READ_PIECE = 1 << 20
#: The field number of ``ReadResponse.data``.
READ_DATA = bs_pb2.ReadResponse.DATA_FIELD_NUMBER
#: The full name of the Write method, and the field number of ``WriteRequest.data``.
WRITE, WRITE_DATA = "/google.bytestream.ByteStream/Write", bs_pb2.WriteRequest.DATA_FIELD_NUMBER


@dataclass(frozen=True, slots=True)
class WriteView:
    """A WriteRequest whose ``data`` is a view of the message as it came off
    the wire: an upload's bytes are copied once on their way into the store
    (into the chunker's buffer), not out of each message first."""

    resource_name: str
    write_offset: int
    finish_write: bool
    data: memoryview


def parse_write(raw: bytes) -> bs_pb2.WriteRequest | WriteView:
    """A WriteRequest from its wire form, its data not copied (``bytes_field``;
    the other fields parsed as protobuf parses them).  DecodeError if it is
    not one."""
    split = bytes_field(raw, WRITE_DATA)
    if split is None:
        return bs_pb2.WriteRequest.FromString(raw)
    rest, data = split
    message = bs_pb2.WriteRequest.FromString(rest)
    return WriteView(message.resource_name, message.write_offset, message.finish_write, data)


class ByteStreamService(Service, bs_grpc.ByteStreamServicer):
    def __init__(self, cache: RemoteCache) -> None:
        super().__init__(cache)
        self.uploads = Uploads(cache.drop_upload)

    def add_to(self, server: grpc.Server) -> None:
        bs_grpc.add_ByteStreamServicer_to_server(self, server)

    def _resource(self, name: str, *, write: bool) -> Resource:
        return parse_resource(name, self.function, write=write)

    @rpc
    def Read(  # type: ignore[override]  # an Encoded response is sent as it is
        self, request: bs_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[bs_pb2.ReadResponse | Encoded]:
        resource = self._resource(request.resource_name, write=False)
        digest = resource.digest
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise OutOfRange(f"read offset {request.read_offset} of a blob of {digest.size} bytes")
        if request.read_limit < 0:
            raise BadRequest(f"read limit {request.read_limit} is negative")
        if resource.compressor is not None and request.read_limit:
            raise BadRequest("a read of compressed blobs takes no read limit")
        data = self.cache.read_blob(
            resource.instance, digest, request.read_offset, request.read_limit or None
        )
        if resource.compressor is None:
            # Each ReadResponse encoded by hand: the blob's bytes copied once
            # into the message, not into a ReadResponse and out of it again.
            for group, length in groups(data, READ_PIECE):
                yield bytes_message(READ_DATA, group, length)
            return
        compressor = zstandard.ZstdCompressor().compressobj()
        for piece in pieces(data, READ_PIECE):
            out = compressor.compress(piece)
            if out:
                yield bs_pb2.ReadResponse(data=out)
        yield bs_pb2.ReadResponse(data=compressor.flush())

    @rpc
    def Write(
        self,
        request_iterator: Iterator[bs_pb2.WriteRequest | WriteView | Malformed],
        context: grpc.ServicerContext,
    ) -> bs_pb2.WriteResponse:
        requests = iter(request_iterator)
        first = next(requests, None)
        if first is None:
            raise BadRequest("a write with no request")
        if isinstance(first, Malformed):
            first.refuse("Write")
        name = first.resource_name
        resource = self._resource(name, write=True)
        compressed = resource.compressor is not None
        if self.cache.contains(resource.instance, resource.digest):
            return bs_pb2.WriteResponse(committed_size=-1 if compressed else resource.digest.size)
        upload = self.uploads.begin(name, compressed=compressed)
        with upload.lock:
            if first.write_offset == 0 and (old := upload.reset()) is not None:
                self.cache.drop_upload(old)
            stream = _Arriving(name, first, requests, upload, resource)
            previous = upload.stored
            source: Iterator[bytes | memoryview] = stream.pieces()
            if previous is not None:
                source = itertools.chain(self.cache.read_upload(previous), source)
            try:
                stored = self.cache.store_upload(source, resource.digest.size)
            except BaseException:
                if compressed:  # its decompressor has taken what was not stored
                    self.uploads.finish(name, upload, drop=True)
                raise
            upload.stored, upload.committed = stored, stream.offset
            if previous is not None:
                self.cache.drop_upload(previous)
            if not stream.finished:
                # The client stopped without finishing: it may resume later.
                return bs_pb2.WriteResponse(committed_size=upload.committed)
            self.uploads.finish(name, upload, drop=False)
            if not self.cache.commit_upload(resource.instance, resource.digest, stored):
                # The cache has it (another client's upload finished meanwhile).
                return bs_pb2.WriteResponse(committed_size=-1 if compressed else stored.digest.size)
            return bs_pb2.WriteResponse(committed_size=upload.committed)

    @rpc
    def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> bs_pb2.QueryWriteStatusResponse:
        resource = self._resource(request.resource_name, write=True)
        if self.cache.contains(resource.instance, resource.digest):
            return bs_pb2.QueryWriteStatusResponse(
                committed_size=resource.digest.size, complete=True
            )
        upload = self.uploads.get(request.resource_name)
        if upload is None:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"no upload of {request.resource_name!r}")
        return bs_pb2.QueryWriteStatusResponse(committed_size=upload.committed, complete=False)


class _Arriving:
    """The requests of one Write, checked as they arrive."""

    def __init__(
        self,
        name: str,
        first: bs_pb2.WriteRequest | WriteView,
        requests: Iterator[bs_pb2.WriteRequest | WriteView | Malformed],
        upload: Upload,
        resource: Resource,
    ) -> None:
        self.name = name
        self.first = first
        self.requests = requests
        self.upload = upload
        self.resource = resource
        #: Where the write has got to (bytes of the stream as the client sends it).
        self.offset = upload.committed
        #: Whether the client finished the write.
        self.finished = False

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The blob's bytes that this write brings (decompressed when the upload
        is compressed); they end where the client finishes the write, or stops
        sending (it may resume later)."""
        data: Iterator[bytes | memoryview] = self._data()
        if self.upload.decompressor is not None:
            data = unzstd(data, self.upload.decompressor)
        size = self.resource.digest.size
        seen = self.upload.stored.digest.size if self.upload.stored is not None else 0
        for piece in data:
            seen += len(piece)
            if seen > size:
                raise BadRequest(f"the upload is longer than the digest's {size} bytes")
            yield piece

    def _data(self) -> Iterator[bytes | memoryview]:
        request: bs_pb2.WriteRequest | WriteView | Malformed | None = self.first
        while request is not None:
            if isinstance(request, Malformed):
                request.refuse("Write")
            if request.resource_name and request.resource_name != self.name:
                raise BadRequest(f"a write of {self.name!r} names {request.resource_name!r}")
            if request.write_offset != self.offset:
                raise OutOfRange(
                    f"write offset {request.write_offset}, but {self.offset} bytes are committed"
                )
            self.offset += len(request.data)
            if request.data:
                yield request.data
            if request.finish_write:
                self.finished = True
                return
            try:
                request = next(self.requests, None)
            except grpc.RpcError:
                return  # the connection was lost: what came is kept, to be resumed
