"""Small pure parts checked on their own: the chunker's readers and buffers,
what the action cache takes from an ``ActionResult``, and how a daemon settles
its heap once it is up."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from cachefs.daemon._process import settle_heap
from cachefs.engine._chunker import Chunker, reader_for
from cachefs.format.digest import SHA256
from cachefs.format.header import ChunkingParams
from cachefs.protocol import re_pb2
from cachefs.server._actions import blobs_of, check_result, complete
from cachefs.server._names import BadRequest

PARAMS = ChunkingParams(min_size=1024, avg_size=4096, max_size=16384)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_the_chunker_reads_any_bytes_like_source(kind: type) -> None:
    data = random.Random(1).randbytes(200_000)
    chunker = Chunker(PARAMS, buffer_size=32_768)  # many buffers, carried tails
    read = reader_for(kind(data))
    pieces = [bytes(c) for batch in chunker.batches(read, size_hint=10) for c in batch.chunks]
    assert b"".join(pieces) == data
    assert all(len(p) <= PARAMS.max_size for p in pieces)
    whole = [bytes(c) for batch in Chunker(PARAMS).batches(reader_for(data)) for c in batch.chunks]
    assert whole == pieces  # the same cut points whatever the buffers
    empty = list(Chunker(PARAMS).batches(reader_for(b"")))
    assert len(empty) == 1 and not bytes(empty[0].span)


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=SHA256.hash(data).hex(), size_bytes=len(data))


def test_the_blobs_an_action_result_names() -> None:
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="a.o", digest=_digest(b"a"))],
        output_directories=[
            re_pb2.OutputDirectory(
                path="out", tree_digest=_digest(b"tree"), root_directory_digest=_digest(b"root")
            ),
            re_pb2.OutputDirectory(path="", tree_digest=_digest(b"whole")),
        ],
        output_symlinks=[re_pb2.OutputSymlink(path="link", target="a.o")],
        stderr_digest=_digest(b"err"),
    )
    names = [d.hash for d in blobs_of(result)]
    assert names == [_digest(x).hash for x in (b"a", b"tree", b"root", b"whole", b"err")]
    check_result(result, SHA256)
    for bad in ("/abs", "../up", "a/../b", "..", "a//b"):
        broken = re_pb2.ActionResult()
        broken.CopyFrom(result)
        broken.output_directories[0].path = bad
        with pytest.raises(BadRequest):
            check_result(broken, SHA256)
    malformed = re_pb2.ActionResult(stdout_digest=re_pb2.Digest(hash="xyz", size_bytes=1))

    class NoCache:
        digest_function = SHA256

    assert not complete(NoCache(), "", malformed)  # type: ignore[arg-type]


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_a_settled_heap_is_collected_then_frozen() -> None:
    """``settle_heap``: garbage that starting left behind is collected, not
    frozen for ever; what is alive is frozen (full collections pass it by)."""
    cycle = _Node()
    gone = weakref.ref(cycle)
    del cycle
    before = gc.get_freeze_count()
    try:
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
