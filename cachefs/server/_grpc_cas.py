"""REAPI ContentAddressableStorage over gRPC (server layer): a thin translation.

FindMissingBlobs, BatchUpdateBlobs and BatchReadBlobs (zstd when the client
asks), GetTree (paged), SplitBlob and SpliceBlob.  Per-blob failures of a batch
are statuses in its answer; a batch over ``MAX_BATCH`` is refused whole
(INVALID_ARGUMENT), as the API specifies.

SplitBlob answers with the chunks the store already keeps the blob in (no
chunking again): FAST_CDC_2020 when the store cuts chunks as the API's FastCDC
2020 with the announced parameters, else UNKNOWN (the chunks still make the
blob).  SpliceBlob puts a blob together from chunks the instance has
(NOT_FOUND when one is missing) and checks its digest (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import zstandard
from google.protobuf.message import DecodeError

from cachefs.engine import CachefsError, ChunkingParams, Digest, ObjectNotFoundError
from cachefs.protocol import re_grpc, re_pb2, status_pb2
from cachefs.server._grpc import MAX_BATCH, Service, rpc, status_of
from cachefs.server._names import BadRequest, parse_digests

#: Directories of a GetTree page when the client sets no page size, and the
#: bytes a page holds at most (whatever the page size: the spec lets a server
#: cut pages shorter) unless one directory is larger.
TREE_PAGE, TREE_PAGE_BYTES = 1000, 2 << 20


def chunking_function(params: ChunkingParams) -> re_pb2.ChunkingFunction.Value.ValueType:
    """The REAPI chunking function a store's chunks are cut by."""
    if fast_cdc_2020(params) is not None:
        return re_pb2.ChunkingFunction.FAST_CDC_2020
    return re_pb2.ChunkingFunction.UNKNOWN


def fast_cdc_2020(params: ChunkingParams) -> re_pb2.FastCdc2020Params | None:
    """The FastCDC 2020 parameters of the API that a store's chunking is, if it
    is that: normalization level 2, min = avg / 4, max = avg * 4, seed 0."""
    avg = params.avg_size
    if (
        params.algorithm == "fastcdc2020"
        and params.normalization == 2
        and params.min_size == avg // 4
        and params.max_size == avg * 4
    ):
        return re_pb2.FastCdc2020Params(avg_chunk_size_bytes=avg, seed=0)
    return None


def status(exc: BaseException | None = None) -> status_pb2.Status:
    """A blob's status in a batch answer."""
    if exc is None:
        return status_pb2.Status(code=grpc.StatusCode.OK.value[0])
    return status_pb2.Status(code=status_of(exc).value[0], message=str(exc))


def decompress(data: bytes, size: int) -> bytes:
    """A zstd frame's content, which must be ``size`` bytes."""
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(size, 1))
    except zstandard.ZstdError as exc:
        raise BadRequest(f"not a zstd frame of the blob: {exc}") from None
    if len(out) != size:
        raise BadRequest(f"the zstd frame holds {len(out)} bytes, the digest says {size}")
    return out


class CasService(Service, re_grpc.ContentAddressableStorageServicer):
    def add_to(self, server: grpc.Server) -> None:
        re_grpc.add_ContentAddressableStorageServicer_to_server(self, server)

    @rpc
    def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.FindMissingBlobsResponse:
        self.check_function(request.digest_function)
        wanted = parse_digests(
            ((d.hash, d.size_bytes) for d in request.blob_digests), self.function
        )
        missing = self.cache.find_missing(request.instance_name, wanted, use=True)
        given = request.blob_digests
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[given[i] for i in missing])

    @rpc
    def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchUpdateBlobsResponse:
        self.check_function(request.digest_function)
        # The blobs' sizes as well as the bytes sent: a compressed blob is
        # decoded into memory, and its digest's size is what that takes.
        total = max(
            sum(len(r.data) for r in request.requests),
            sum(max(0, r.digest.size_bytes) for r in request.requests),
        )
        if total > MAX_BATCH:
            raise BadRequest(f"a batch of {total} bytes (at most {MAX_BATCH})")
        # Each blob checked and decoded, then those that are fine stored together.
        outcomes: list[BaseException | None] = []
        blobs: list[tuple[Digest, bytes]] = []
        for item in request.requests:
            try:
                digest = self.digest(item.digest)
                if item.compressor == re_pb2.Compressor.ZSTD:
                    data = decompress(item.data, digest.size)
                elif item.compressor == re_pb2.Compressor.IDENTITY:
                    data = item.data
                else:
                    raise BadRequest(
                        f"compressor {item.compressor} is not one this server speaks (zstd)"
                    )
                # Each one, even a blob stored already or named twice in the batch.
                if len(data) != digest.size or self.function.hash(data) != digest.hash:
                    raise BadRequest(f"the data sent is not the blob {digest}")
            except CachefsError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(None)
            blobs.append((digest, data))
        stored = iter(self.cache.write_blobs(request.instance_name, blobs))
        return re_pb2.BatchUpdateBlobsResponse(
            responses=[
                re_pb2.BatchUpdateBlobsResponse.Response(
                    digest=item.digest, status=status(outcome or next(stored))
                )
                for item, outcome in zip(request.requests, outcomes, strict=True)
            ]
        )

    @rpc
    def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchReadBlobsResponse:
        self.check_function(request.digest_function)
        wanted = [self.digest(d) for d in request.digests]
        total = sum(d.size for d in wanted)
        if total > MAX_BATCH:
            raise BadRequest(f"a batch of {total} bytes (at most {MAX_BATCH})")
        compressor = (
            zstandard.ZstdCompressor()
            if re_pb2.Compressor.ZSTD in request.acceptable_compressors
            else None
        )
        blobs = self.cache.read_blobs(request.instance_name, wanted)
        # Each answer made in place (a list handed to the message's constructor
        # would be copied whole: blobs and all).
        out = re_pb2.BatchReadBlobsResponse()
        add = out.responses.add
        for message, data in zip(request.digests, blobs, strict=True):
            if isinstance(data, CachefsError):
                add(digest=message, status=status(data))
            elif compressor is not None:
                add(
                    digest=message,
                    data=compressor.compress(data),
                    compressor=re_pb2.Compressor.ZSTD,
                )
            else:
                add(digest=message, data=data)
        return out

    @rpc
    def GetTree(
        self, request: re_pb2.GetTreeRequest, context: grpc.ServicerContext
    ) -> Iterator[re_pb2.GetTreeResponse]:
        self.check_function(request.digest_function)
        root = self.digest(request.root_digest)
        if request.page_size < 0:
            raise BadRequest("a page size may not be negative")
        page = request.page_size or TREE_PAGE
        start = 0
        if request.page_token:
            if not request.page_token.isascii() or not request.page_token.isdigit():
                raise BadRequest(f"not a page token of this server: {request.page_token!r}")
            start = int(request.page_token)
        directories = self._tree(request.instance_name, root)
        while True:
            # A page ends at ``page`` directories, or once it holds about
            # TREE_PAGE_BYTES (clients take messages of 4 MiB by default; one
            # larger directory goes alone).
            end, held = start, 0
            while end < len(directories) and end - start < page:
                size = directories[end].ByteSize()
                if end > start and held + size > TREE_PAGE_BYTES:
                    break
                held += size
                end += 1
            more = end < len(directories)
            yield re_pb2.GetTreeResponse(
                directories=directories[start:end], next_page_token=str(end) if more else ""
            )
            if not more:
                return
            start = end

    @rpc
    def SplitBlob(
        self, request: re_pb2.SplitBlobRequest, context: grpc.ServicerContext
    ) -> re_pb2.SplitBlobResponse:
        self.check_function(request.digest_function)
        chunks = self.cache.split(request.instance_name, self.digest(request.blob_digest))
        return re_pb2.SplitBlobResponse(
            chunk_digests=[re_pb2.Digest(hash=c.hex, size_bytes=c.size) for c in chunks],
            chunking_function=chunking_function(self.cache.store.config.chunking),
        )

    @rpc
    def SpliceBlob(
        self, request: re_pb2.SpliceBlobRequest, context: grpc.ServicerContext
    ) -> re_pb2.SpliceBlobResponse:
        self.check_function(request.digest_function)
        instance = request.instance_name
        blob = self.digest(request.blob_digest)
        chunks = [self.digest(d) for d in request.chunk_digests]
        if sum(c.size for c in chunks) != blob.size:
            raise BadRequest(
                f"the chunks add up to {sum(c.size for c in chunks)} bytes, not {blob.size}"
            )
        if not self.cache.contains(instance, blob):
            missing = self.cache.find_missing(instance, [(c.hash, c.size) for c in chunks])
            if missing:
                raise ObjectNotFoundError(
                    f"{len(missing)} of the chunks are not in the cache, e.g. {chunks[missing[0]]}"
                )
            content = (piece for c in chunks for piece in self.cache.read_blob(instance, c))
            self.cache.write_blob(instance, blob, content)
        return re_pb2.SpliceBlobResponse(blob_digest=request.blob_digest)

    def _tree(self, instance: str, root: Digest) -> list[re_pb2.Directory]:
        """The directories of a tree, breadth first; parts missing from the CAS
        are left out (NOT_FOUND when the root is)."""
        seen: set[Digest] = set()
        order = [root]
        out = []
        while order:
            digest = order.pop(0)
            if digest in seen:
                continue
            seen.add(digest)
            try:
                data = b"".join(self.cache.read_blob(instance, digest))
            except ObjectNotFoundError:
                if digest == root:
                    raise
                continue
            directory = re_pb2.Directory()
            try:
                directory.ParseFromString(data)
            except DecodeError:
                raise BadRequest(f"blob {digest} is not a Directory") from None
            out.append(directory)
            order.extend(self.digest(node.digest) for node in directory.directories)
        return out
