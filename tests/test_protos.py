"""The protocol's messages: our own ``.proto`` files, and the modules generated from them.

The generated modules in ``cachefs/protocol/_gen`` are committed; they must be
exactly what ``scripts/gen_protos.py`` makes of the ``.proto`` files (so that
nobody edits them by hand, and a changed ``.proto`` is regenerated).  The
names and field numbers are the published REAPI v2 / ByteStream / google.rpc
ones: spot checks of the wire format against numbers from the specification.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError

from cachefs.protocol import bs_pb2, re_pb2
from cachefs.server._grpc import bytes_field, bytes_message
from cachefs.server._grpc_bytestream import WriteView, parse_write

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "cachefs" / "protocol" / "_gen"


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_modules_are_the_script_s_output(tmp_path: Path) -> None:
    out = tmp_path / "_gen"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh, committed = files(out), files(GENERATED)
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run scripts/gen_protos.py: {stale} differ"


def field_numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_field_numbers_are_the_published_ones() -> None:
    assert field_numbers(re_pb2.Digest) == {"hash": 1, "size_bytes": 2}
    assert field_numbers(re_pb2.CacheCapabilities) == {
        "digest_functions": 1,
        "action_cache_update_capabilities": 2,
        "cache_priority_capabilities": 3,
        "max_batch_total_size_bytes": 4,
        "symlink_absolute_path_strategy": 5,
        "supported_compressors": 6,
        "supported_batch_update_compressors": 7,
        "max_cas_blob_size_bytes": 8,
        "split_blob_support": 9,
        "splice_blob_support": 10,
        "fast_cdc_2020_params": 11,
        "rep_max_cdc_params": 12,
    }
    assert field_numbers(re_pb2.FindMissingBlobsResponse) == {"missing_blob_digests": 2}
    assert field_numbers(re_pb2.SpliceBlobRequest) == {
        "instance_name": 1,
        "blob_digest": 2,
        "chunk_digests": 3,
        "digest_function": 4,
        "chunking_function": 5,
    }
    assert field_numbers(bs_pb2.WriteRequest) == {
        "resource_name": 1,
        "write_offset": 2,
        "finish_write": 3,
        "data": 10,
    }
    assert re_pb2.DigestFunction.BLAKE3 == 9
    assert re_pb2.Compressor.ZSTD == 1
    assert re_pb2.ChunkingFunction.FAST_CDC_2020 == 1
    # The full names, as the method paths on the wire use them.
    assert (
        re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name
        == "build.bazel.remote.execution.v2.ContentAddressableStorage"
    )
    assert bs_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name == (
        "google.bytestream.ByteStream"
    )


def test_a_known_encoding() -> None:
    # Digest{hash: "ab", size_bytes: 300}: tag 1 (0x0a) len 2, tag 2 (0x10) varint 300.
    assert re_pb2.Digest(hash="ab", size_bytes=300).SerializeToString() == b"\n\x02ab\x10\xac\x02"


@pytest.mark.parametrize("length", [0, 1, 127, 128, 300, 16_383, 16_384, 2_097_151, 2_097_152])
def test_a_read_response_encoded_by_hand_is_the_message(length: int) -> None:
    """ByteStream reads send ReadResponses encoded by hand (``bytes_message``):
    protobuf parses them as the message, and encodes the message the same way,
    at the lengths where the varint grows."""
    data = os.urandom(length)
    cut = length // 3
    pieces: list[bytes | memoryview] = [data[:cut], memoryview(data)[cut:]]
    wire = bytes_message(bs_pb2.ReadResponse.DATA_FIELD_NUMBER, pieces, length).wire
    assert bs_pb2.ReadResponse.FromString(wire).data == data
    assert wire == bs_pb2.ReadResponse(data=data).SerializeToString() or length == 0


def written(parse: object, raw: bytes) -> tuple[str, int, bool, bytes] | str:
    """What a parser makes of a WriteRequest's wire form (or the error's kind)."""
    try:
        message = parse(raw)  # type: ignore[operator]
    except DecodeError:
        return "DecodeError"
    return (message.resource_name, message.write_offset, message.finish_write, bytes(message.data))


WRITES = [
    bs_pb2.WriteRequest(resource_name="uploads/u/blobs/ab/3", write_offset=7, data=b"abc"),
    bs_pb2.WriteRequest(write_offset=-1, finish_write=True, data=os.urandom(300)),
    bs_pb2.WriteRequest(resource_name="\u00e9t\u00e9", data=b"x"),
    bs_pb2.WriteRequest(resource_name="\u00e9t\u00e9", data=b""),
    bs_pb2.WriteRequest(resource_name="r", write_offset=1 << 40),
]
#: Wire forms protobuf's parser must be the judge of: a field given twice (the
#: last counts), the data field with another wire type, unknown fields of each
#: wire type, a group, a string that is not UTF-8, lengths that run past the end,
#: the data field's key or length in longer forms than their shortest (up to five
#: bytes protobuf takes them, past that it refuses them), a field number 0.
ODD_WIRES = [
    b"R\x02ab" + b"R\x03xyz",
    b"P\x05" + b"R\x01a",
    b"\x0a\x01r" + b"\x58\x05" + b"\x61" + bytes(8) + b"\x6d" + bytes(4) + b"R\x01z" + b"\x72\x00",
    b"\x5b\x60\x01\x5c" + b"R\x01a",
    b"\x0a\x02\xff\xfe" + b"R\x01a",
    b"R\x05ab",
    b"R\xff\xff\xff\xff\x0f",
    b"\x12\xff\xff\xff\xff\x0f",
    b"\x10" + b"\xff" * 11 + b"R\x01a",
    b"\x00\x01R\x01a",
    b"\xd2\x00\x01a",
    b"\xd2\x80\x80\x80\x00\x01a",
    b"\xd2\x80\x80\x80\x80\x00\x01a",
    b"R\x81\x80\x80\x80\x00a",
    b"R\x81\x80\x80\x80\x80\x00a",
    b"R\x01a" + b"\xd2\x00\x01b",
    b"\x08\x80\x80\x80\x80\x80\x00" + b"R\x01a",
]


@pytest.mark.parametrize("raw", [m.SerializeToString() for m in WRITES] + ODD_WIRES)
def test_a_write_request_parsed_without_copying_its_data_is_the_message(raw: bytes) -> None:
    """ByteStream writes take each WriteRequest's data as a view of the message
    (``parse_write``): whatever the wire form, what they read from it (or the
    error) is what protobuf's parser makes of it."""
    assert written(parse_write, raw) == written(bs_pb2.WriteRequest.FromString, raw)


def test_write_requests_cut_anywhere_or_mangled_parse_as_protobuf_parses_them() -> None:
    rng = random.Random(7)
    message = bs_pb2.WriteRequest(
        resource_name="i/uploads/u/blobs/ab/9", write_offset=300, finish_write=True, data=b"x" * 200
    ).SerializeToString()
    data_first = bs_pb2.WriteRequest(data=b"y" * 20).SerializeToString() + message[:-203]
    cuts = [m[:cut] for m in (message, data_first) for cut in range(len(m) + 1)]
    for raw in cuts + [
        bytes(b ^ rng.randrange(256) if rng.random() < 0.05 else b for b in message)
        for _ in range(300)
    ]:
        assert written(parse_write, raw) == written(bs_pb2.WriteRequest.FromString, raw), raw
    for raw in (message, data_first):
        viewed = parse_write(raw)
        assert isinstance(viewed, WriteView) and isinstance(viewed.data, memoryview)


def test_a_write_request_of_many_fields_is_left_to_protobuf() -> None:
    """A WriteRequest has four fields: one padded with thousands of others is
    not walked field by field here (far slower than protobuf), but parsed whole."""
    few = b"\x08\x01" * 15 + b"R\x01a"
    many = b"\x08\x01" * 100_000 + b"R\x01a"
    assert bytes_field(few, bs_pb2.WriteRequest.DATA_FIELD_NUMBER) is not None
    assert bytes_field(many, bs_pb2.WriteRequest.DATA_FIELD_NUMBER) is None
    assert written(parse_write, many) == written(bs_pb2.WriteRequest.FromString, many)


def test_google_rpc_status_can_be_imported_beside_ours() -> None:
    """googleapis-common-protos' google/rpc/status.proto (which gRPC's and
    OpenTelemetry's libraries import) registers the file ours does in
    protobuf's descriptor pool: they must be identical, or the second import
    fails ("duplicate file name")."""
    code = (
        "from cachefs.protocol import re_pb2\n"
        "import google.rpc.status_pb2 as theirs\n"
        "from cachefs.protocol._gen.google.rpc import status_pb2 as ours\n"
        "assert theirs.DESCRIPTOR.serialized_pb == ours.DESCRIPTOR.serialized_pb\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
