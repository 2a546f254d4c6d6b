"""ByteStream over gRPC (server layer): blobs read and written as streams.

Resource names as the REAPI specifies them (``_names.parse_resource``).  A read
streams the blob from the store, verified chunk by chunk, in messages of up to
``READ_PIECE`` bytes, or zstd-compressed for a ``compressed-blobs/zstd`` name.
A write is resumable (``_uploads.py``): what arrives is committed to a spool
as it comes, ``QueryWriteStatus`` says how much, and a write may go on from
there; once finished the blob is ingested and its digest checked (a mismatch
is INVALID_ARGUMENT and nothing is stored).  A write of a blob the cache has
answers at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import zstandard

from cachefs.server._cache import RemoteCache, pieces
from cachefs.server._gen.google.bytestream import bytestream_pb2 as bs_pb2
from cachefs.server._gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from cachefs.server._grpc import Malformed, RpcFailure, Service, rpc
from cachefs.server._names import BadRequest, OutOfRange, Resource, parse_resource
from cachefs.server._uploads import Uploads

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
            request: bs_pb2.WriteRequest | None = first
            while request is not None:
                if isinstance(request, Malformed):
                    request.refuse("Write")
                if request.resource_name and request.resource_name != name:
                    raise BadRequest(f"a write of {name!r} names {request.resource_name!r}")
                if request.write_offset != upload.committed:
                    raise OutOfRange(
                        f"write offset {request.write_offset}, but {upload.committed} bytes "
                        "are committed",
                    )
                upload.append(request.data)
                if request.finish_write:
                    break
                request = next(requests, None)
            else:
                # The client stopped without finishing: it may resume later.
                return bs_pb2.WriteResponse(committed_size=upload.committed)
            try:
                with upload.reader() as source:
                    self.cache.write_blob(resource.instance, resource.digest, source)
            except zstandard.ZstdError as exc:
                raise BadRequest(f"the upload is not a zstd stream: {exc}") from None
            finally:
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
