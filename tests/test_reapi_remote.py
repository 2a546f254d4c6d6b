"""A REAPI remote that answers wrongly (``cachefs/remote/_reapi.py``): every
wrong answer -- the wrong number of answers, an error status inside an OK
call, bytes compressed unasked, a stream longer than its blob, a write
committed short, a splice that makes another blob, a failing action cache --
is a RemoteError naming the remote and what it did, never wrong bytes.  The
server is a small gRPC servicer here, on 127.0.0.1, told how to misbehave."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
import pytest

from cachefs.errors import ObjectNotFoundError, RemoteError
from cachefs.format.digest import SHA256, Digest
from cachefs.protocol import bs_grpc, bs_pb2, re_grpc, re_pb2, status_pb2
from cachefs.remote import open_remote, parse_remote
from cachefs.remote._reapi import BATCH_BLOB, ReapiRemote

INTERNAL = grpc.StatusCode.INTERNAL.value[0]


class Misbehaving(
    re_grpc.ContentAddressableStorageServicer,
    bs_grpc.ByteStreamServicer,
    re_grpc.ActionCacheServicer,
    re_grpc.CapabilitiesServicer,
):
    """Holds blobs in memory and answers as ``self.fault`` says (None: right)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fault: str | None = None
        self.capability_calls = 0

    def _fail(self, context: grpc.ServicerContext, code: grpc.StatusCode) -> NoReturn:
        context.abort(code, f"told to fail with {code.name}")
        raise AssertionError("abort() raises")

    def FindMissingBlobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        missing = [d for d in request.blob_digests if d.hash not in self.blobs]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)

    def GetTree(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context, grpc.StatusCode.UNIMPLEMENTED)

    def SplitBlob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context, grpc.StatusCode.UNIMPLEMENTED)

    def QueryWriteStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._fail(context, grpc.StatusCode.UNIMPLEMENTED)

    def BatchReadBlobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        answers = [
            re_pb2.BatchReadBlobsResponse.Response(digest=d, data=self.blobs.get(d.hash, b""))
            for d in request.digests
        ]
        if self.fault == "two answers":
            answers.append(answers[0])
        elif self.fault == "error status":
            answers[0].status.CopyFrom(status_pb2.Status(code=INTERNAL, message="disk on fire"))
        elif self.fault == "compressed":
            answers[0].compressor = re_pb2.Compressor.ZSTD
        elif self.fault == "lacks it":
            answers[0].status.code = grpc.StatusCode.NOT_FOUND.value[0]
        return re_pb2.BatchReadBlobsResponse(responses=answers)

    def BatchUpdateBlobs(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.fault == "no answer":
            return re_pb2.BatchUpdateBlobsResponse()
        answers = []
        for item in request.requests:
            answer = re_pb2.BatchUpdateBlobsResponse.Response(digest=item.digest)
            if self.fault == "error status":
                answer.status.CopyFrom(status_pb2.Status(code=INTERNAL, message="disk on fire"))
            else:
                self.blobs[item.digest.hash] = item.data
            answers.append(answer)
        return re_pb2.BatchUpdateBlobsResponse(responses=answers)

    def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if self.fault == "lacks it":
            self._fail(context, grpc.StatusCode.NOT_FOUND)
        data = self.blobs[request.resource_name.split("/")[-2]]
        yield bs_pb2.ReadResponse(data=data)
        if self.fault == "long stream":
            yield bs_pb2.ReadResponse(data=b"and then some")

    def Write(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        name, data = "", bytearray()
        for request in requests:
            name = name or request.resource_name
            data += request.data
        self.blobs[name.split("/")[-2]] = bytes(data)
        size = len(data) - 1 if self.fault == "short commit" else len(data)
        return bs_pb2.WriteResponse(committed_size=size)

    def GetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.capability_calls += 1
        if self.fault == "capabilities unimplemented":
            self._fail(context, grpc.StatusCode.UNIMPLEMENTED)
        if self.fault == "capabilities unavailable":
            self._fail(context, grpc.StatusCode.UNAVAILABLE)
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(splice_blob_support=True)
        )

    def SpliceBlob(self, request: Any, context: grpc.ServicerContext) -> Any:
        made = request.blob_digest
        if self.fault == "splice makes another blob":
            made = re_pb2.Digest(hash="0" * 64, size_bytes=made.size_bytes)
        return re_pb2.SpliceBlobResponse(blob_digest=made)

    def GetActionResult(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.fault == "action cache fails":
            self._fail(context, grpc.StatusCode.INTERNAL)
        self._fail(context, grpc.StatusCode.NOT_FOUND)

    def UpdateActionResult(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.fault == "action cache refuses":
            self._fail(context, grpc.StatusCode.INVALID_ARGUMENT)
        if self.fault == "action cache fails":
            self._fail(context, grpc.StatusCode.INTERNAL)
        return request.action_result


@pytest.fixture
def misbehaving() -> Iterator[tuple[Misbehaving, ReapiRemote]]:
    servicer = Misbehaving()
    pool = ThreadPoolExecutor(4)
    server = grpc.server(pool, options=[("grpc.max_receive_message_length", 64 << 20)])
    re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
    bs_grpc.add_ByteStreamServicer_to_server(servicer, server)
    re_grpc.add_ActionCacheServicer_to_server(servicer, server)
    re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    remote = open_remote(f"grpc://127.0.0.1:{port}/main", SHA256, timeout=10)
    assert isinstance(remote, ReapiRemote)
    try:
        yield servicer, remote
    finally:
        remote.close()
        server.stop(None).wait()
        pool.shutdown()


def blob(size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest(SHA256.hash(data), size), data


@pytest.mark.parametrize(
    ("fault", "size", "words"),
    [
        ("two answers", 1000, "2 answers for one blob"),
        ("error status", 1000, "disk on fire"),
        ("compressed", 1000, "came compressed, unasked"),
        ("long stream", BATCH_BLOB + 1, f"answered {BATCH_BLOB + 14} bytes"),
    ],
)
def test_a_wrong_read_is_an_error(
    misbehaving: tuple[Misbehaving, ReapiRemote], fault: str, size: int, words: str
) -> None:
    servicer, remote = misbehaving
    digest, data = blob(size)
    remote.write(digest, data)
    assert remote.read(digest) == data
    servicer.fault = fault
    with pytest.raises(RemoteError, match=words) as raised:
        remote.read(digest)
    assert remote.name in raised.value.message


@pytest.mark.parametrize(
    ("fault", "size", "words"),
    [
        ("error status", 1000, "disk on fire"),
        ("no answer", 1000, "no answer"),
        ("short commit", BATCH_BLOB + 1, f"committed {BATCH_BLOB} bytes"),
    ],
)
def test_a_write_the_server_does_not_take_whole_is_an_error(
    misbehaving: tuple[Misbehaving, ReapiRemote], fault: str, size: int, words: str
) -> None:
    servicer, remote = misbehaving
    servicer.fault = fault
    digest, data = blob(size)
    assert remote.find_missing([digest]) == [digest]
    with pytest.raises(RemoteError, match=words):
        remote.write(digest, data)
    if size > BATCH_BLOB:  # the same through write_stream, given pieces
        with pytest.raises(RemoteError, match=words):
            remote.write_stream(digest, lambda: [data[:1000], data[1000:]])


def test_a_splice_that_makes_another_blob_is_an_error(
    misbehaving: tuple[Misbehaving, ReapiRemote],
) -> None:
    servicer, remote = misbehaving
    chunks = [blob(1000), blob(2000)]
    whole = b"".join(data for _, data in chunks)
    digest = Digest(SHA256.hash(whole), len(whole))
    assert remote.splices
    remote.splice(digest, [d for d, _ in chunks])
    servicer.fault = "splice makes another blob"
    with pytest.raises(RemoteError, match="made 0000"):
        remote.splice(digest, [d for d, _ in chunks])


def test_capabilities_are_asked_again_only_after_a_passing_failure(
    misbehaving: tuple[Misbehaving, ReapiRemote],
) -> None:
    """A server that cannot answer now (UNAVAILABLE) is asked again; one that
    says it never will (UNIMPLEMENTED) is taken as not splicing, and not asked
    again; a server's yes is kept."""
    servicer, remote = misbehaving
    servicer.fault = "capabilities unavailable"
    assert not remote.splices and not remote.splices
    assert servicer.capability_calls == 2
    servicer.fault = "capabilities unimplemented"
    assert not remote.splices and not remote.splices
    assert servicer.capability_calls == 3
    servicer.fault = None
    assert not remote.splices  # it said it never will
    fresh = ReapiRemote(parse_remote(remote.name), SHA256, timeout=10)
    try:
        assert fresh.splices and fresh.splices
        assert servicer.capability_calls == 4
    finally:
        fresh.close()


def test_a_failing_action_cache_is_an_error_and_a_miss_is_none(
    misbehaving: tuple[Misbehaving, ReapiRemote],
) -> None:
    servicer, remote = misbehaving
    key, _ = blob(100)
    result = re_pb2.ActionResult(exit_code=0)
    assert remote.get_action(key) is None
    remote.update_action(key, result)
    servicer.fault = "action cache fails"
    with pytest.raises(RemoteError, match="reading action cache entry") as read:
        remote.get_action(key)
    assert not read.value.permanent  # a retry may do
    with pytest.raises(RemoteError, match="writing action cache entry") as written:
        remote.update_action(key, result)
    assert not written.value.permanent
    servicer.fault = "action cache refuses"
    with pytest.raises(RemoteError, match="INVALID_ARGUMENT") as refused:
        remote.update_action(key, result)
    assert refused.value.permanent  # the same request is refused again


def test_a_blob_the_server_lacks_is_not_found(
    misbehaving: tuple[Misbehaving, ReapiRemote],
) -> None:
    servicer, remote = misbehaving
    servicer.fault = "lacks it"
    for size in (1000, BATCH_BLOB + 1):  # asked in a batch, and over a stream
        with pytest.raises(ObjectNotFoundError, match="not in"):
            remote.read(blob(size)[0])
