"""REAPI ActionCache over gRPC (server layer): a thin translation.

GetActionResult answers NOT_FOUND for a miss, and also for an entry whose
output blobs are no longer all in the CAS (it would be a broken hit); the blobs
of a hit count as used, so that eviction keeps them a while longer.  Standard
output and error and the output files asked for are inlined when they are
small.  UpdateActionResult checks the result it is given: its digests, its
paths, and that the blobs it names are in the CAS (FAILED_PRECONDITION if not).
What an action result is and when it is complete: ``_actions.py``.
"""

from __future__ import annotations

import grpc

from cachefs.engine import Digest
from cachefs.protocol import re_grpc, re_pb2
from cachefs.server._actions import blobs_of, check_result, complete, parse_result
from cachefs.server._auth import who
from cachefs.server._grpc import RpcFailure, Service, rpc

#: Inlined bytes of one answer at the most (stdout, stderr, output files).
INLINE_LIMIT = 1 << 20


class ActionCacheService(Service, re_grpc.ActionCacheServicer):
    def add_to(self, server: grpc.Server) -> None:
        re_grpc.add_ActionCacheServicer_to_server(self, server)

    @rpc
    def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        self.check_function(request.digest_function)
        key = self.digest(request.action_digest)
        instance = request.instance_name
        data = self.cache.get_action(instance, key)
        # Bytes that are no ActionResult are another client's entry (ccache's, over HTTP).
        result = None if data is None else parse_result(data)
        if result is None or not complete(self.cache, instance, result):
            raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"no action result for {key}")
        self._inline(request, result)
        return result

    def _inline(self, request: re_pb2.GetActionResultRequest, result: re_pb2.ActionResult) -> None:
        budget = INLINE_LIMIT
        instance = request.instance_name

        def read(digest: re_pb2.Digest) -> bytes | None:
            nonlocal budget
            if digest.size_bytes > budget:
                return None
            budget -= digest.size_bytes
            return b"".join(self.cache.read_blob(instance, self.digest(digest)))

        if request.inline_stdout and result.HasField("stdout_digest") and not result.stdout_raw:
            result.stdout_raw = read(result.stdout_digest) or b""
        if request.inline_stderr and result.HasField("stderr_digest") and not result.stderr_raw:
            result.stderr_raw = read(result.stderr_digest) or b""
        wanted = set(request.inline_output_files)
        for output in result.output_files:
            if output.path in wanted and not output.contents:
                output.contents = read(output.digest) or b""

    @rpc
    def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: grpc.ServicerContext
    ) -> re_pb2.ActionResult:
        self.check_function(request.digest_function)
        key = self.digest(request.action_digest)
        instance = request.instance_name
        result = request.action_result
        check_result(result, self.function)
        # What the client inlined is kept as blobs, and the entry stays small.
        self._store_inlined(instance, result)
        if not complete(self.cache, instance, result):
            missing = [
                str(d)
                for d in (self.digest(m) for m in blobs_of(result))
                if not self.cache.contains(instance, d)
            ]
            raise RpcFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the action result names blobs the CAS does not have: {', '.join(missing[:5])}",
            )
        self.cache.put_action(instance, key, result.SerializeToString(), by=who(context.peer()))
        return result

    def _store_inlined(self, instance: str, result: re_pb2.ActionResult) -> None:
        for output in result.output_files:
            if output.contents:
                self._keep(instance, output.digest, output.contents)
                output.contents = b""
        if result.stdout_raw:
            self._keep_output(instance, result.stdout_raw, result.stdout_digest)
            result.stdout_raw = b""
        if result.stderr_raw:
            self._keep_output(instance, result.stderr_raw, result.stderr_digest)
            result.stderr_raw = b""

    def _keep_output(self, instance: str, data: bytes, digest: re_pb2.Digest) -> None:
        """Keep an inlined output as a blob; ``digest`` is its digest, set when empty."""
        if not digest.hash:
            made = Digest(self.function.hash(data), len(data))
            digest.hash, digest.size_bytes = made.hex, made.size
        self._keep(instance, digest, data)

    def _keep(self, instance: str, message: re_pb2.Digest, data: bytes) -> None:
        self.cache.write_blob(instance, self.digest(message), data)
