"""`cachefs serve` against hostile or odd requests: instance names that would
share or reach another's place, decompression bombs, batch items whose data is
not their digest's, GetTree pages too large to send, sizes that are digits only
to ``str.isdigit``."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import zstandard

from cachefs.engine import SHA256
from cachefs.errors import ConfigError
from cachefs.protocol import bs_pb2, re_pb2
from cachefs.server._grpc_cas import TREE_PAGE_BYTES
from cachefs.server._names import BadRequest, instance_directory, parse_resource
from cachefs.server._tenants import parse_tenants
from tests.mounting import start, stop
from tests.reapi import Client, Server, code_of, serving
from tests.test_auth import add

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("hostile") / "store") as s:
        yield s


def _peak_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def _zeros_zstd(size: int) -> bytes:
    """A zstd stream of ``size`` zero bytes (1 GiB: about 32 KiB)."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    block = bytes(16 << 20)
    out = [compressor.compress(block) for _ in range(size // len(block))]
    return b"".join(out) + compressor.flush()


# --- instance names ------------------------------------------------------------------


def test_instance_directories_are_distinct_and_stay_where_they_were() -> None:
    names = ["", "_", ".uploads", ".x", "%2Euploads", "%5F", "a/b", "a_b.c", "team-a~1", "x/.."]
    directories = [instance_directory(name) for name in names]
    assert len(set(directories)) == len(names), directories
    assert not any(d in (b".", b"..", b".uploads") or b"/" in d for d in directories)
    # Names that do not collide keep the directory they had (no store moves).
    assert [instance_directory(n) for n in (".x", "a_b.c", "a/b", "blobs")] == [
        b".x",
        b"a_b.c",
        b"a%2Fb",
        b"blobs",
    ]
    for bad in (".", ".."):
        with pytest.raises(BadRequest):
            instance_directory(bad)
    with pytest.raises(BadRequest, match="255"):
        instance_directory("\U0001f600" * 80)  # 80 characters, 960 bytes encoded


def test_an_instance_named_uploads_keeps_its_blobs_and_the_server_restarts(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    blob = os.urandom(5000)
    with serving(store) as s, s.client(".uploads") as c:
        assert c.update_blobs([blob]).responses[0].status.code == 0
        digest = c.digest(blob)
    with serving(store) as s, s.client(".uploads") as c:
        assert c.find_missing([digest]) == []
        assert c.read(digest) == blob


def test_a_start_empties_directories_left_among_the_uploads(tmp_path: Path) -> None:
    """What an earlier server let an instance ``.uploads`` leave there: the start
    removes it, where it failed (EISDIR) at every start."""
    store = tmp_path / "store"
    with serving(store):
        pass
    mount = start(store, tmp_path / "mnt")
    try:
        deep = mount.path / "remote-cache" / ".uploads" / "cas" / "ab"
        deep.mkdir(parents=True)
        (deep / "blob").write_bytes(b"left over")
    finally:
        assert stop(mount) == 0
    with serving(store) as s, s.client() as c:
        blob = os.urandom(100)
        c.update_blobs([blob])
        assert c.read(c.digest(blob)) == blob
    mount = start(store, tmp_path / "mnt")
    try:
        assert list((mount.path / "remote-cache" / ".uploads").iterdir()) == []
    finally:
        assert stop(mount) == 0


def test_the_instance_underscore_is_not_the_empty_instance(server: Server) -> None:
    blob = os.urandom(1000)
    with server.client("") as c:
        c.update_blobs([blob])
        digest = c.digest(blob)
        key = c.digest(b"an action of the empty instance")
        c.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                action_digest=key, action_result=re_pb2.ActionResult(exit_code=7)
            )
        )
        assert c.find_missing([digest]) == []
        assert c.find_missing([digest], instance="_") == [digest]
        request = re_pb2.GetActionResultRequest(instance_name="_", action_digest=key)
        assert code_of(lambda: c.ac.GetActionResult(request)) == grpc.StatusCode.NOT_FOUND


def test_a_tenant_cannot_reach_another_through_the_underscore(tmp_path: Path) -> None:
    tokens, config = tmp_path / "tokens", tmp_path / "cachefs.toml"
    config.write_text('[tenants.a]\ninstances = [""]\n\n[tenants.b]\ninstances = ["_"]\n')
    a = add(tokens, "ci-a", "read-write", tenant="a")
    b = add(tokens, "ci-b", "read-write", tenant="b")
    blob = os.urandom(2000)
    with serving(tmp_path / "store", "--tokens", str(tokens), "--config", str(config)) as s:
        with s.client("", token=a) as ca:
            ca.update_blobs([blob])
            digest = ca.digest(blob)
        with s.client("_", token=b) as cb:
            assert cb.find_missing([digest]) == [digest]


@pytest.mark.parametrize("instance", [".", "..", "\U0001f600" * 80], ids=["dot", "dots", "long"])
def test_names_that_are_no_instance_are_invalid_arguments(server: Server, instance: str) -> None:
    with server.client(instance) as c:
        assert code_of(lambda: c.update_blobs([b"x"])) == INVALID
        assert code_of(lambda: c.find_missing([c.digest(b"x")])) == INVALID


def test_a_tenant_config_with_a_name_that_is_no_instance_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tenants\.a"):
        parse_tenants({"tenants": {"a": {"instances": [".."]}}}, int)


def test_a_size_of_other_digits_is_an_invalid_argument(server: Server) -> None:
    with pytest.raises(BadRequest):
        parse_resource("blobs/" + "ab" * 32 + "/\u00b2", SHA256, write=False)
    with server.client() as c:
        request = bs_pb2.ReadRequest(resource_name="blobs/" + "ab" * 32 + "/\u00b2")
        assert code_of(lambda: list(c.bytestream.Read(request))) == INVALID


# --- decompression bombs -------------------------------------------------------------


def test_a_compressed_write_cannot_blow_up_the_servers_memory(tmp_path: Path) -> None:
    bomb = _zeros_zstd(1 << 30)
    with serving(tmp_path / "store", http_on=False) as s, s.client() as c:
        before = _peak_mib(s.process.pid)
        name = c.write_name(c.digest(os.urandom(1000)), zstd=True)
        request = bs_pb2.WriteRequest(resource_name=name, data=bomb, finish_write=True)
        assert code_of(lambda: c.bytestream.Write(iter([request]), timeout=60)) == INVALID
        assert _peak_mib(s.process.pid) - before < 200


def test_a_compressed_put_cannot_blow_up_the_servers_memory(tmp_path: Path) -> None:
    bomb = _zeros_zstd(1 << 30)
    blob = os.urandom(1000)
    with serving(tmp_path / "store", grpc_on=False) as s:
        assert s.http is not None
        host, port = s.http.rsplit(":", 1)
        before = _peak_mib(s.process.pid)
        for hash_ in ("ab" * 32, SHA256.hash(blob).hex()):
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("PUT", f"/cas/{SHA256.hash(blob).hex()}", body=blob)
            assert conn.getresponse().status == 200
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("PUT", f"/cas/{hash_}", body=bomb, headers={"Content-Encoding": "zstd"})
            assert conn.getresponse().status == 400
            conn.close()
        assert _peak_mib(s.process.pid) - before < 200


def test_a_batch_is_limited_by_what_its_blobs_take_decompressed(server: Server) -> None:
    frame = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    before = _peak_mib(server.process.pid)
    with server.client() as c:
        requests = [
            re_pb2.BatchUpdateBlobsRequest.Request(
                digest=re_pb2.Digest(hash=f"{i:02x}" * 32, size_bytes=64 << 20),
                data=frame,
                compressor=re_pb2.Compressor.ZSTD,
            )
            for i in range(3)
        ]
        batch = re_pb2.BatchUpdateBlobsRequest(requests=requests)
        assert code_of(lambda: c.cas.BatchUpdateBlobs(batch, timeout=60)) == INVALID
    assert _peak_mib(server.process.pid) - before < 100


# --- each batch item is its own digest's ---------------------------------------------


def _batch(c: Client, *items: tuple[re_pb2.Digest, bytes]) -> list[int]:
    request = re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b) for d, b in items]
    )
    return [r.status.code for r in c.cas.BatchUpdateBlobs(request).responses]


def test_batch_items_are_each_checked_against_their_digest(server: Server) -> None:
    invalid = INVALID.value[0]
    with server.client() as c:
        blob, other = os.urandom(300), os.urandom(300)
        digest = c.digest(blob)
        assert _batch(c, (digest, blob), (digest, other)) == [0, invalid]
        blob = os.urandom(300)
        digest = c.digest(blob)
        assert _batch(c, (digest, other), (digest, blob)) == [invalid, 0]
        assert c.find_missing([digest]) == []
        assert c.read(digest) == blob
        # Stored already: the data must still be the blob.
        assert _batch(c, (digest, other)) == [invalid]
        assert _batch(c, (digest, blob)) == [0]


# --- GetTree pages -------------------------------------------------------------------


def test_gettree_pages_stay_small_enough_to_receive(server: Server) -> None:
    with server.client() as c:
        filler = c.digest(b"some file")
        children, blobs = [], []
        for d in range(6):
            files = [re_pb2.FileNode(name=f"d{d}f{i:06d}", digest=filler) for i in range(12000)]
            data = re_pb2.Directory(files=files).SerializeToString()  # about 1 MiB each
            blobs.append(data)
            children.append(re_pb2.DirectoryNode(name=f"d{d}", digest=c.digest(data)))
        root = re_pb2.Directory(directories=children).SerializeToString()
        for data in [*blobs, root]:
            c.write(data)
        pages = list(c.cas.GetTree(re_pb2.GetTreeRequest(root_digest=c.digest(root))))
        assert sum(len(p.directories) for p in pages) == 7
        assert len(pages) > 1
        for page in pages:
            assert len(page.directories) == 1 or page.ByteSize() <= TREE_PAGE_BYTES + 1024
