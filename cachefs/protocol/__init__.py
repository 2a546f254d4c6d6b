"""The protocol messages cachefs speaks: REAPI v2, ByteStream, google.rpc (wire formats).

The ``.proto`` files under ``protos/`` declare the messages and services with
the published names and field numbers; ``scripts/gen_protos.py`` compiles them
into ``_gen/`` (committed).  The servers (``cachefs.server``) answer with these
messages and the remote tiers' clients send them; both import them from here::

    from cachefs.protocol import re_pb2, re_grpc, bs_pb2, bs_grpc, status_pb2, signature_pb2
"""

from __future__ import annotations

import os

# grpcio's core would log its own errors (a port it cannot bind, a remote it
# cannot reach) to stderr, beside ours; set before grpcio is first imported
# (a variable set by hand wins).  The servers and the remote tiers import this
# package before grpcio.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import importlib
from typing import TYPE_CHECKING, Any

from cachefs.protocol._gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from cachefs.protocol._gen.build.bazel.semver import semver_pb2
from cachefs.protocol._gen.cachefs.trust.v1 import signature_pb2
from cachefs.protocol._gen.google.bytestream import bytestream_pb2 as bs_pb2
from cachefs.protocol._gen.google.rpc import status_pb2

if TYPE_CHECKING:
    from cachefs.protocol._gen.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as re_grpc,
    )
    from cachefs.protocol._gen.google.bytestream import bytestream_pb2_grpc as bs_grpc

#: The gRPC stubs import grpcio: imported when first used, so that the messages
#: alone (signed entries: ``cachefs key``, ``cachefs.signing``) do without it.
_STUBS = {
    "re_grpc": "_gen.build.bazel.remote.execution.v2.remote_execution_pb2_grpc",
    "bs_grpc": "_gen.google.bytestream.bytestream_pb2_grpc",
}


# Not seen by mypy: it takes the names from the imports under TYPE_CHECKING,
# and so still reports a name this package does not have.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name in _STUBS:
            return importlib.import_module(f"{__name__}.{_STUBS[name]}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["bs_grpc", "bs_pb2", "re_grpc", "re_pb2", "semver_pb2", "signature_pb2", "status_pb2"]
