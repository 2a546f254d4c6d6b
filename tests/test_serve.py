"""``cachefs serve``: the command, the daemon's life, and what the servers keep.

Errors before serving (bad addresses, a taken port, a newer store, a locked
store) are one line and the right exit code; ``--daemon`` returns once both
servers answer; ``cachefs stats``, ``gc`` and ``cache ls`` reach the running
daemon through its control socket; SIGTERM stops it cleanly, kill -9 leaves a
store the next start serves.  What clients store is a cache directory: its
budget evicts blobs (and an action result whose blobs went is a miss), and a
blob larger than the budget is RESOURCE_EXHAUSTED / 507.  SplitBlob answers
with the store's own chunks, which are FastCDC 2020 as the API defines it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pyfastcdc
import pytest

from cachefs.daemon import mount_info
from cachefs.engine import ROOT_INODE, SHA256, FsError, Namespace, Store
from cachefs.format.header import HEADER_NAME
from cachefs.protocol import bs_pb2, re_pb2
from tests.mounting import cachefs, mounted
from tests.reapi import Client, read_log, serving, start_serve, stop_serve
from tests.test_mount_cli import assert_one_line_error, tree_bytes


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return cachefs("serve", *args, check=False, timeout=timeout)


def test_help_says_how_to_point_a_build_at_it() -> None:
    text = cachefs("serve", "--help").stdout
    for words in ("--grpc", "--http", "--max-size", "--daemon", "remote_cache=grpc://", "ccache"):
        assert words in text


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--grpc", "127.0.0.1:port"], "bad port"),
        (["--http", "127.0.0.1:99999"], "bad port"),
        (["--max-size", "0"], "--max-size"),
        (["--max-size", "lots"], "not a size"),
        (["--grpc", "192.0.2.1:9092", "--allow-unauthenticated"], "cannot serve gRPC"),
        (["--grpc", "192.0.2.1:9092"], "without authentication"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], words: str) -> None:
    result = serve(str(tmp_path / "store"), *args)
    assert_one_line_error(result, words, code=2)


def test_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--http", "--grpc"):
            result = serve(str(tmp_path / "store"), flag, f"127.0.0.1:{port}")
            assert_one_line_error(result, f"127.0.0.1:{port}", code=2)


def test_a_store_of_a_newer_format_is_refused_untouched(tmp_path: Path) -> None:
    store = tmp_path / "store"
    cachefs("init", str(store))
    header = store / HEADER_NAME
    doc = json.loads(header.read_text())
    doc["format_version"] += 1
    header.write_text(json.dumps(doc))
    before = tree_bytes(store)
    assert_one_line_error(serve(str(store)), "format version", code=6)
    assert_one_line_error(serve(str(store), "--daemon"), "format version", code=6)
    assert tree_bytes(store) == before


def test_a_store_served_already_is_locked(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with serving(store):
        result = serve(str(store), "--grpc", "127.0.0.1:0")
        assert_one_line_error(result, "open for writing", code=5)


def test_daemon_stats_gc_cache_ls_and_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = serve(
        str(store),
        "--daemon",
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--max-size",
        "64M",
        "--policy",
        "lfu",
    )
    assert result.returncode == 0, result.stderr
    info = mount_info(store)
    assert info is not None
    pid = info["pid"]
    try:
        stats = json.loads(cachefs("stats", "--json", str(store)).stdout)
        assert stats["pid"] == pid
        assert stats["servers"]["grpc"] and stats["servers"]["http"]
        [cache] = stats["caches"]
        assert (cache["path"], cache["max_size"], cache["policy"]) == (
            "/remote-cache",
            64 << 20,
            "lfu",
        )
        listing = cachefs("cache", "ls", str(store)).stdout
        assert "remote-cache" in listing and "64.0 MiB" in listing
        report = json.loads(cachefs("gc", "--json", str(store)).stdout)
        assert "chunks_removed" in report
        assert (store / "control.sock").exists()
        assert (store / "control.sock").stat().st_mode & 0o077 == 0  # root only
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid):
        assert time.monotonic() < deadline, "the daemon did not stop on SIGTERM"
        time.sleep(0.05)
    assert not (store / "control.sock").exists()
    assert "store closed cleanly" in (store / "cachefs.log").read_text()
    # The budget set once is kept by the next start.
    with serving(store) as server:
        assert (
            json.loads(cachefs("stats", "--json", str(store)).stdout)["caches"][0]["max_size"]
            == 64 << 20
        )
        del server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_kill_9_then_serve_again(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = start_serve(store)
    with server.client() as client:
        data = os.urandom(300_000)
        client.write(data)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert (store / "control.sock").exists()  # left behind
    assert cachefs("stats", "--json", str(store)).returncode == 0  # not mistaken for a live one
    with serving(store) as again, again.client() as client:
        assert client.read(client.digest(data)) == data
    assert cachefs("fsck", str(store), check=False).returncode == 0


def test_sigterm_in_the_foreground(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "store")
    assert stop_serve(server) == 0
    assert "Traceback" not in read_log(server.log)


def test_evicted_blobs_make_their_action_result_a_miss(tmp_path: Path) -> None:
    with serving(tmp_path / "store", "--max-size", "1M") as server, server.client() as client:
        output = os.urandom(600_000)
        client.write(output)
        key = client.digest(os.urandom(8))
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="big", digest=client.digest(output))]
        )
        client.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
        )
        client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
        # Another blob: the cache makes room by evicting the oldest, the output
        # (the action result, small and newer, stays).
        client.write(os.urandom(500_000))
        assert client.find_missing([client.digest(output)]) == [client.digest(output)]
        with pytest.raises(grpc.RpcError) as info:
            client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        figures = json.loads(cachefs("stats", "--json", str(server.store)).stdout)
        assert figures["caches"][0]["evictions"] >= 1
        assert figures["caches"][0]["bytes"] <= 1 << 20


def test_find_missing_blobs_extends_the_lives_of_the_blobs_it_finds(tmp_path: Path) -> None:
    """REAPI: lifetimes "long enough to allow for newly-added and recently looked-up
    entries to be used in subsequent calls" -- a blob FindMissingBlobs reported
    present counts as used (LRU: the other one goes first)."""
    with serving(tmp_path / "store", "--max-size", "1M") as server, server.client() as client:
        old, young = os.urandom(400_000), os.urandom(400_000)
        client.write(old)
        client.write(young)
        assert client.find_missing([client.digest(old)]) == []
        client.write(os.urandom(400_000))  # room for it: the least recently used goes
        wanted = [client.digest(old), client.digest(young)]
        assert client.find_missing(wanted) == [client.digest(young)]


def test_a_blob_larger_than_the_budget(tmp_path: Path) -> None:
    with serving(tmp_path / "store", "--max-size", "100K") as server, server.client() as client:
        data = os.urandom(200_000)
        with pytest.raises(grpc.RpcError) as info:
            client.write(data)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        response = client.update_blobs([data[:150_000]])
        assert response.responses[0].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        # A batch that does not fit whole is stored blob by blob: each fits alone.
        pair = [os.urandom(60_000), os.urandom(60_000)]
        response = client.update_blobs(pair)
        assert [r.status.code for r in response.responses] == [0, 0]
        assert client.find_missing([client.digest(pair[1])]) == []
        assert server.http is not None
        host, port = server.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("PUT", f"/cas/{client.digest(data).hash}", body=data)
        assert conn.getresponse().status == 507
        conn.close()
        assert client.find_missing([client.digest(data)]) == [client.digest(data)]


@pytest.mark.parametrize(
    ("init", "avg"),
    [
        ([], 64 << 10),
        (["--min-chunk", "4096", "--avg-chunk", "16384", "--max-chunk", "65536"], 16384),
    ],
    ids=["default", "vectors"],
)
def test_split_blob_answers_fastcdc_2020_chunks(tmp_path: Path, init: list[str], avg: int) -> None:
    """The chunks SplitBlob names are FastCDC 2020 with the announced parameters:
    normalization level 2, min = avg / 4, max = avg * 4, seed 0, as pyfastcdc
    cuts them (the chunker the API's test vectors were checked with)."""
    store = tmp_path / "store"
    cachefs("init", *init, str(store))
    data = os.urandom(3 << 20)
    expected = [
        (c.offset, c.length)
        for c in pyfastcdc.FastCDC(
            avg, min_size=avg // 4, max_size=avg * 4, normalized_chunking=2, seed=0
        ).cut_buf(data)
    ]
    with serving(store) as server, server.client() as client:
        params = client.capabilities().cache_capabilities.fast_cdc_2020_params
        assert (params.avg_chunk_size_bytes, params.seed) == (avg, 0)
        client.write(data)
        response = client.cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=client.digest(data)))
        assert response.chunking_function == re_pb2.ChunkingFunction.FAST_CDC_2020
        offsets, got = 0, []
        for chunk in response.chunk_digests:
            got.append((offsets, chunk.size_bytes))
            assert chunk == client.digest(data[offsets : offsets + chunk.size_bytes])
            offsets += chunk.size_bytes
        assert got == expected


def test_a_store_of_other_chunking_splits_with_unknown_function(tmp_path: Path) -> None:
    store = tmp_path / "store"
    cachefs(
        "init", "--min-chunk", "8192", "--avg-chunk", "16384", "--max-chunk", "65536", str(store)
    )
    with serving(store) as server, server.client() as client:
        caps = client.capabilities().cache_capabilities
        assert caps.split_blob_support and not caps.HasField("fast_cdc_2020_params")
        data = os.urandom(1 << 20)
        client.write(data)
        response = client.cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=client.digest(data)))
        assert response.chunking_function == re_pb2.ChunkingFunction.UNKNOWN
        assert b"".join(client.read(c) for c in response.chunk_digests) == data


def uploads_in(store: Path) -> list[bytes]:
    """The files of ``/remote-cache/.uploads`` of a store nobody serves."""
    with Store.open(store) as opened:
        namespace = Namespace(opened)
        try:
            uploads = namespace.lookup(namespace.lookup(ROOT_INODE, b"remote-cache"), b".uploads")
        except FsError:
            return []
        return [name for name, _ in namespace.entries(uploads)]


def test_an_upload_is_a_file_until_it_is_finished(tmp_path: Path) -> None:
    """What a ByteStream write brings is stored once, as a file of ``.uploads``,
    and moved into the CAS when finished; a write left unfinished stays there,
    to be resumed, until the server stops (the next start removes it)."""
    store = tmp_path / "store"
    data = os.urandom(3 << 20)
    with serving(store) as server, server.client() as client:
        client.write(data)  # finished: moved into place
        wrong = client.digest(os.urandom(len(data)))
        with pytest.raises(grpc.RpcError) as info:
            client.write(data, digest=wrong)  # refused: removed
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        other = os.urandom(2 << 20)
        name = client.write_name(client.digest(other))
        cut = bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=other[: 1 << 20])
        client.bytestream.Write(iter([cut]))
        query = bs_pb2.QueryWriteStatusRequest(resource_name=name)
        assert client.bytestream.QueryWriteStatus(query).committed_size == 1 << 20
    assert len(uploads_in(store)) == 1  # the unfinished one
    with serving(store) as server, server.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            client.bytestream.QueryWriteStatus(query)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.read(client.digest(data)) == data
        assert client.find_missing([client.digest(other), wrong]) == [client.digest(other), wrong]
    assert uploads_in(store) == []
    assert cachefs("fsck", str(store), check=False).returncode == 0


def test_a_blob_changed_through_the_mount_is_that_blob_no_more(tmp_path: Path) -> None:
    """A mount that serves shows the blobs as files; one changed through the
    mount is missing (not a wrong answer), and an upload puts it back."""
    with mounted(tmp_path / "store", tmp_path / "mnt", "--grpc", "127.0.0.1:0") as mount:
        address = json.loads((mount.path / ".cachefs" / "stats.json").read_text())["servers"]
        with Client(address["grpc"], SHA256) as client:
            batch, stream = os.urandom(10_000), os.urandom(300_000)
            client.update_blobs([batch])
            client.write(stream)
            for data, batched in ((batch, True), (stream, False)):
                digest = client.digest(data)
                cas = mount.path / "remote-cache" / "_" / "cas"
                (cas / digest.hash[:2] / digest.hash).write_bytes(b"something else")
                assert client.find_missing([digest]) == [digest]
                request = re_pb2.BatchReadBlobsRequest(digests=[digest])
                [answer] = client.cas.BatchReadBlobs(request).responses
                assert answer.status.code == grpc.StatusCode.NOT_FOUND.value[0]
                if batched:
                    [stored] = client.update_blobs([data]).responses
                    assert stored.status.code == 0
                else:
                    client.write(data)
                assert client.find_missing([digest]) == []
                assert client.read(digest) == data
                assert (cas / digest.hash[:2] / digest.hash).read_bytes() == data
    assert cachefs("fsck", str(tmp_path / "store"), check=False).returncode == 0


@pytest.mark.parametrize(
    ("action", "status", "http_status"),
    [("enospc", "RESOURCE_EXHAUSTED", 507), ("eio", "INTERNAL", 500)],
)
def test_a_failing_disk_under_the_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, status: str, http_status: int
) -> None:
    """Every segment append fails (``CACHEFS_FAULTS``, armed in the server from
    its start): each upload is refused with the status of the failure, nothing
    is stored, reads and lookups go on, and the store stays whole."""
    monkeypatch.setenv("CACHEFS_FAULTS", f"segment.append={action}@1+")
    with serving(tmp_path / "store") as server, server.client() as client:
        code = getattr(grpc.StatusCode, status)
        data = os.urandom(100_000)
        with pytest.raises(grpc.RpcError) as info:
            client.write(data)
        assert info.value.code() == code
        response = client.update_blobs([data])
        assert response.responses[0].status.code == code.value[0]
        assert server.http is not None
        host, port = server.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("PUT", f"/cas/{client.digest(data).hash}", body=data)
        assert conn.getresponse().status == http_status
        conn.close()
        assert client.find_missing([client.digest(data)]) == [client.digest(data)]
        assert client.update_blobs([b""]).responses[0].status.code == 0  # the empty blob
    monkeypatch.delenv("CACHEFS_FAULTS")
    result = cachefs("fsck", str(tmp_path / "store"), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
