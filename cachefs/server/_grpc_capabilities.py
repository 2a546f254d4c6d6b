"""REAPI Capabilities over gRPC (server layer): what this cache offers.

The store's digest function; zstd for ByteStream and batches; the action
cache open to updates; batches up to ``MAX_BATCH``; SplitBlob and SpliceBlob,
with the FastCDC 2020 parameters of the store's own chunking when it is the
API's FastCDC 2020 (see ``_grpc_cas.fast_cdc_2020``).
"""

from __future__ import annotations

import grpc

from cachefs.protocol import re_grpc, re_pb2, semver_pb2
from cachefs.server._grpc import MAX_BATCH, Service, rpc
from cachefs.server._grpc_cas import fast_cdc_2020

#: The API versions served: 2.0 (what Bazel asks for) to 2.3.
LOW_API = semver_pb2.SemVer(major=2, minor=0)
HIGH_API = semver_pb2.SemVer(major=2, minor=3)


class CapabilitiesService(Service, re_grpc.CapabilitiesServicer):
    def add_to(self, server: grpc.Server) -> None:
        re_grpc.add_CapabilitiesServicer_to_server(self, server)

    @rpc
    def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re_pb2.ServerCapabilities:
        zstd = re_pb2.Compressor.ZSTD
        cache = re_pb2.CacheCapabilities(
            digest_functions=[self.function_value],
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=True
            ),
            max_batch_total_size_bytes=MAX_BATCH,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
            supported_compressors=[zstd],
            supported_batch_update_compressors=[zstd],
            split_blob_support=True,
            splice_blob_support=True,
        )
        params = fast_cdc_2020(self.cache.store.config.chunking)
        if params is not None:  # else SplitBlob's chunks are of no function a client knows
            cache.fast_cdc_2020_params.CopyFrom(params)
        return re_pb2.ServerCapabilities(
            cache_capabilities=cache, low_api_version=LOW_API, high_api_version=HIGH_API
        )
