"""The Bazel HTTP cache protocol of ``cachefs serve``, spoken by hand (http.client).

GET/HEAD/PUT of ``/cas/<hex>`` and ``/ac/<hex>`` with and without an instance
prefix, zstd both ways, chunked uploads, ``/status``; what HTTP stores gRPC
sees and the other way round; and bad input: wrong bodies, paths that escape,
bodies longer or shorter than declared, unknown encodings and methods.  The
store is checked with fsck at the end: nothing bad input did may damage it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from cachefs.protocol import re_pb2
from tests.mounting import cachefs
from tests.reapi import Server, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("http") / "store"
    with serving(store) as started:
        yield started
    result = cachefs("fsck", str(store), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


class Http:
    """One connection to the server, and the calls the tests make."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def web(server: Server) -> Iterator[Http]:
    assert server.http is not None
    client = Http(server.http)
    yield client
    client.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_status(web: Http) -> None:
    status, headers, body = web.request("GET", "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["digest_function"] == "sha256"
    assert doc["cache"]["path"] == "/remote-cache"
    assert doc["cache"]["max_size"] == 10 << 30
    assert doc["servers"]["http"] and doc["servers"]["grpc"]


@pytest.mark.parametrize("prefix", ["", "/main", "/team/linux"])
def test_put_get_head_of_a_blob(web: Http, prefix: str) -> None:
    data = os.urandom(300_000)
    path = f"{prefix}/cas/{sha(data)}"
    assert web.request("GET", path)[0] == 404
    assert web.request("HEAD", path)[0] == 404
    assert web.request("PUT", path, data)[0] == 200
    status, headers, body = web.request("GET", path)
    assert (status, body) == (200, data)
    assert headers["content-length"] == str(len(data))
    status, headers, body = web.request("HEAD", path)
    assert (status, headers["content-length"], body) == (200, str(len(data)), b"")
    # A second PUT of the same blob is fine (and stores nothing new).
    assert web.request("PUT", path, data)[0] == 200


def test_instances_are_kept_apart(web: Http) -> None:
    data = os.urandom(1000)
    assert web.request("PUT", f"/one/cas/{sha(data)}", data)[0] == 200
    assert web.request("GET", f"/two/cas/{sha(data)}")[0] == 404
    assert web.request("GET", f"/cas/{sha(data)}")[0] == 404


def test_a_wrong_body_is_refused_and_stores_nothing(web: Http) -> None:
    data = os.urandom(100_000)
    said = sha(os.urandom(10))
    status, _, body = web.request("PUT", f"/cas/{said}", data)
    assert status == 400
    assert b"digest" in body
    assert web.request("GET", f"/cas/{said}")[0] == 404
    assert web.request("GET", f"/cas/{sha(data)}")[0] == 404
    # Also when the blob is there already: the body must still be it.
    good = os.urandom(5000)
    assert web.request("PUT", f"/cas/{sha(good)}", good)[0] == 200
    assert web.request("PUT", f"/cas/{sha(good)}", data)[0] == 400
    assert web.request("GET", f"/cas/{sha(good)}")[2] == good


def test_zstd_both_ways(web: Http) -> None:
    data = b"a build output that compresses well " * 20_000
    frame = zstandard.ZstdCompressor().compress(data)
    path = f"/cas/{sha(data)}"
    assert web.request("PUT", path, frame, {"Content-Encoding": "zstd"})[0] == 200
    status, headers, body = web.request("GET", path, headers={"Accept-Encoding": "gzip, zstd"})
    assert status == 200
    assert headers["content-encoding"] == "zstd"
    assert len(body) < len(data)
    assert zstandard.ZstdDecompressor().stream_reader(body).read() == data
    status, headers, body = web.request("GET", path, headers={"Accept-Encoding": "zstd;q=0"})
    assert "content-encoding" not in headers and body == data
    # A frame of something else: 400, nothing stored; garbage: 400.
    other = sha(os.urandom(8))
    assert web.request("PUT", f"/cas/{other}", frame, {"Content-Encoding": "zstd"})[0] == 400
    assert web.request("PUT", f"/cas/{other}", b"junk", {"Content-Encoding": "zstd"})[0] == 400
    assert web.request("GET", f"/cas/{other}")[0] == 404


def test_a_chunked_upload_streams_in(web: Http) -> None:
    pieces = [os.urandom(100_000) for _ in range(30)]
    data = b"".join(pieces)
    status, _, _ = web.request("PUT", f"/cas/{sha(data)}", iter(pieces))
    assert status == 200
    assert web.request("GET", f"/cas/{sha(data)}")[2] == data


def test_action_cache_entries_are_any_bytes(web: Http) -> None:
    key = sha(os.urandom(8))
    entry = b"cCrS not a protobuf: a ccache result, say" + os.urandom(1000)
    assert web.request("GET", f"/ac/{key}")[0] == 404
    assert web.request("PUT", f"/ac/{key}", entry)[0] == 200
    assert web.request("GET", f"/ac/{key}")[2] == entry
    # An entry is replaced by the next PUT under its key.
    assert web.request("PUT", f"/ac/{key}", b"newer")[0] == 200
    assert web.request("GET", f"/ac/{key}")[2] == b"newer"


def test_an_action_result_naming_missing_blobs_is_a_miss(web: Http) -> None:
    missing = os.urandom(100)
    present = os.urandom(100)
    web.request("PUT", f"/cas/{sha(present)}", present)
    complete = re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(
                path="a", digest=re_pb2.Digest(hash=sha(present), size_bytes=len(present))
            )
        ]
    )
    broken = re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(
                path="a", digest=re_pb2.Digest(hash=sha(missing), size_bytes=len(missing))
            )
        ]
    )
    for result, expected in ((complete, 200), (broken, 404)):
        key = sha(os.urandom(8))
        assert web.request("PUT", f"/ac/{key}", result.SerializeToString())[0] == 200
        assert web.request("GET", f"/ac/{key}")[0] == expected


def test_http_and_grpc_share_the_cache(server: Server, web: Http) -> None:
    data = os.urandom(70_000)
    assert web.request("PUT", f"/main/cas/{sha(data)}", data)[0] == 200
    with server.client("main") as client:
        assert client.read(client.digest(data)) == data
        other = os.urandom(5000)
        client.write(other)
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="o", digest=client.digest(other))]
        )
        key = client.digest(os.urandom(8))
        client.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                instance_name="main", action_digest=key, action_result=result
            )
        )
    assert web.request("GET", f"/main/cas/{sha(other)}")[2] == other
    got = re_pb2.ActionResult.FromString(web.request("GET", f"/main/ac/{key.hash}")[2])
    assert got.output_files == result.output_files


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/../cas/{h}", 400),
        ("/%2e%2e/cas/{h}", 400),
        ("/a/%2F/cas/{h}", 400),
        ("/a//cas/{h}", 400),
        ("/./cas/{h}", 400),
        ("/cas/{h}/extra", 404),
        ("/cas/zz{h}", 400),
        ("/cas/ABCD", 400),
        ("/cas/", 400),
        ("/nothing", 404),
        ("/" + "x" * 256 + "/cas/{h}", 400),
    ],
)
def test_bad_paths(web: Http, path: str, status: int) -> None:
    data = os.urandom(100)
    text = path.format(h=sha(data))
    answer, headers, _ = web.request("PUT", text, data)
    assert answer == status, text
    # Refused before its body was read: the connection does not go on (the rest
    # of the body would be taken for the next request).
    assert headers.get("connection") == "close", headers
    answer, headers, _ = web.request("GET", text)
    assert answer == status, text
    assert headers.get("connection") != "close", headers


def test_methods_and_encodings_it_does_not_take(web: Http) -> None:
    data = os.urandom(100)
    status, headers, _ = web.request("DELETE", f"/cas/{sha(data)}")
    assert status == 405 and "PUT" in headers["allow"]
    assert web.request("POST", "/status")[0] == 405
    assert web.request("PUT", f"/cas/{sha(data)}", data, {"Content-Encoding": "gzip"})[0] == 415
    assert web.request("GET", f"/cas/{sha(data)}")[0] == 404


def raw_request(address: str, head: bytes, body: bytes, *, close: bool = False) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        if close:
            sock.shutdown(socket.SHUT_WR)
        pieces = []
        while piece := sock.recv(65536):
            pieces.append(piece)
            if not close and b"\r\n\r\n" in b"".join(pieces):
                break
        return b"".join(pieces)


def test_a_body_longer_than_declared(server: Server, web: Http) -> None:
    assert server.http is not None
    data = os.urandom(2000)
    head = (
        f"PUT /cas/{sha(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = raw_request(server.http, head, data, close=True)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert web.request("GET", f"/cas/{sha(data)}")[0] == 404
    assert web.request("GET", f"/cas/{sha(data[:1000])}")[0] == 404


def test_a_body_shorter_than_declared(server: Server, web: Http) -> None:
    assert server.http is not None
    data = os.urandom(2000)
    head = f"PUT /cas/{sha(data)} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode()
    raw_request(server.http, head, data, close=True)  # the client gives up
    assert web.request("GET", f"/cas/{sha(data)}")[0] == 404


def test_a_big_blob_streams_both_ways(web: Http, tmp_path: Path) -> None:
    piece = os.urandom(1 << 20)
    count = 64
    hasher = hashlib.sha256()
    for _ in range(count):
        hasher.update(piece)
    path = f"/cas/{hasher.hexdigest()}"
    status, _, _ = web.request(
        "PUT", path, iter([piece] * count), {"Content-Length": str(count << 20)}
    )
    assert status == 200
    web.conn.request("GET", path)
    response = web.conn.getresponse()
    got = hashlib.sha256()
    total = 0
    while chunk := response.read(1 << 20):
        got.update(chunk)
        total += len(chunk)
    assert (total, got.hexdigest()) == (count << 20, hasher.hexdigest())


def test_action_cache_entries_in_zstd_and_their_limits(web: Http) -> None:
    key = sha(os.urandom(8))
    entry = b"an entry that compresses " * 1000
    frame = zstandard.ZstdCompressor().compress(entry)
    assert web.request("PUT", f"/ac/{key}", frame, {"Content-Encoding": "zstd"})[0] == 200
    assert web.request("GET", f"/ac/{key}")[2] == entry
    assert web.request("PUT", f"/ac/{key}", b"junk", {"Content-Encoding": "zstd"})[0] == 400
    # Larger than an entry may be: declared, or found while streaming in.
    status, _, body = web.request("PUT", f"/ac/{key}", b"x", {"Content-Length": str(65 << 20)})
    assert status == 413, body
    web.close()
    web.conn.connect()
    huge = (b"\0" * (1 << 20) for _ in range(65))
    assert web.request("PUT", f"/ac/{key}", huge)[0] == 413
    web.close()
    web.conn.connect()
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (65 << 20))  # small, but 65 MiB inside
    assert web.request("PUT", f"/ac/{key}", bomb, {"Content-Encoding": "zstd"})[0] == 413
    assert web.request("GET", f"/ac/{key}")[2] == entry  # what was there stays


@pytest.mark.parametrize(
    "accept, compressed",
    [("zstd", True), ("zstd;q=0.5", True), ("zstd;q=zero", False), ("zstd;level=1", True)],
)
def test_accept_encoding_qualities(web: Http, accept: str, compressed: bool) -> None:
    data = b"compressible " * 10_000
    path = f"/cas/{sha(data)}"
    assert web.request("PUT", path, data)[0] == 200
    status, headers, body = web.request("GET", path, headers={"Accept-Encoding": accept})
    assert status == 200 and ("content-encoding" in headers) == compressed
    if compressed:
        body = zstandard.ZstdDecompressor().stream_reader(body).read()
    assert body == data
