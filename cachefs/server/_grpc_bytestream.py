"""ByteStream over gRPC (server layer): blobs read and written as streams.

Resource names as the REAPI specifies them (``_names.parse_resource``).  A read
streams the blob from the store, verified chunk by chunk, in messages of up to
``READ_PIECE`` bytes, or zstd-compressed for a ``compressed-blobs/zstd`` name.
A write is resumable (``_uploads.py``): what arrives is committed to a spool
as it comes, ``QueryWriteStatus`` says how much, and a write may go on from
there.  A write from offset 0 is ingested as it arrives, beside the spool (the
network and the chunking overlap); a resumed one is ingested from the spool
once finished.  Either way the digest is checked at the end (a mismatch, or
more bytes than the digest says, is INVALID_ARGUMENT and nothing is stored),
and a write the client leaves unfinished stores nothing but its spool.  A
write of a blob the cache has answers at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import zstandard

from cachefs.server._cache import RemoteCache, pieces, unzstd
from cachefs.server._gen.google.bytestream import bytestream_pb2 as bs_pb2
from cachefs.server._gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from cachefs.server._grpc import Malformed, RpcFailure, Service, rpc
from cachefs.server._names import BadRequest, OutOfRange, Resource, parse_resource
from cachefs.server._uploads import Upload, Uploads

#: Bytes of one ReadResponse at the most.
READ_PIECE = 1 << 20


class ByteStreamService(Service, bs_grpc.ByteStreamServicer):
    def __init__(self, cache: RemoteCache) -> None:
        super().__init__(cache)
        self.uploads = Uploads(cache.store.tmp_root)

    def add_to(self, server: grpc.Server) -> None:
        bs_grpc.add_ByteStreamServicer_to_server(self, server)

    def _resource(self, name: str, *, write: bool) -> Resource:
        return parse_resource(name, self.function, write=write)

    @rpc
    def Read(
        self, request: bs_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[bs_pb2.ReadResponse]:
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
            for piece in pieces(data, READ_PIECE):
                yield bs_pb2.ReadResponse(data=piece)
            return
        compressor = zstandard.ZstdCompressor().compressobj()
        for piece in pieces(data, READ_PIECE):
            out = compressor.compress(piece)
            if out:
                yield bs_pb2.ReadResponse(data=out)
        yield bs_pb2.ReadResponse(data=compressor.flush())

    @rpc
    def Write(
        self, request_iterator: Iterator[bs_pb2.WriteRequest], context: grpc.ServicerContext
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
            if first.write_offset == 0:
                upload.reset()
            stream = _Arriving(name, first, requests, upload, resource)
            try:
                if first.write_offset == 0:
                    # The blob goes into the store as it arrives (and to the
                    # spool, in case the write is cut short and resumed).
                    source = stream.pieces()
                else:
                    # A resumed write: the spool first, then the whole blob from it.
                    stream.spool_rest()
                    source = upload.reader()
                if not self.cache.write_blob(resource.instance, resource.digest, source):
                    # The cache has it (another client's upload finished meanwhile).
                    stream.finished = True
                    size = -1 if compressed else resource.digest.size
                    return bs_pb2.WriteResponse(committed_size=size)
            except _Unfinished:
                # The client stopped without finishing: it may resume later.
                return bs_pb2.WriteResponse(committed_size=upload.committed)
            except zstandard.ZstdError as exc:
                raise BadRequest(f"the upload is not a zstd stream: {exc}") from None
            finally:
                if stream.finished:
                    self.uploads.finish(name, upload)
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


class _Unfinished(Exception):
    """The client stopped writing before it finished the write."""


class _Arriving:
    """The requests of one Write, checked and committed to the upload's spool as
    they arrive."""

    def __init__(
        self,
        name: str,
        first: bs_pb2.WriteRequest,
        requests: Iterator[bs_pb2.WriteRequest | Malformed],
        upload: Upload,
        resource: Resource,
    ) -> None:
        self.name = name
        self.first = first
        self.requests = requests
        self.upload = upload
        self.resource = resource
        self.finished = False

    def pieces(self) -> Iterator[bytes]:
        """The blob's bytes from the write's offset on (decompressed when the
        upload is compressed); _Unfinished when the client stops before it
        finishes the write."""
        data = self._data()
        if self.resource.compressor is not None:
            data = unzstd(data)
        size = self.resource.digest.size
        seen = 0
        for piece in data:
            seen += len(piece)
            if seen > size:
                raise BadRequest(f"the upload is longer than the digest's {size} bytes")
            yield piece

    def spool_rest(self) -> None:
        """Commit the rest of the write to the spool (a resumed write);
        _Unfinished when the client stops before it finishes the write."""
        size = self.resource.digest.size
        for _ in self._data():
            if self.resource.compressor is None and self.upload.committed > size:
                raise BadRequest(f"the upload is longer than the digest's {size} bytes")

    def _data(self) -> Iterator[bytes]:
        upload = self.upload
        request: bs_pb2.WriteRequest | Malformed | None = self.first
        while request is not None:
            if isinstance(request, Malformed):
                request.refuse("Write")
            if request.resource_name and request.resource_name != self.name:
                raise BadRequest(f"a write of {self.name!r} names {request.resource_name!r}")
            if request.write_offset != upload.committed:
                raise OutOfRange(
                    f"write offset {request.write_offset}, but {upload.committed} bytes "
                    "are committed",
                )
            upload.append(request.data)
            if request.data:
                yield request.data
            if request.finish_write:
                self.finished = True
                return
            request = next(self.requests, None)
        raise _Unfinished
