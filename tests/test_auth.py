"""Tokens and the servers' checks (``server/_tokens.py``, ``server/_auth.py``).

``cachefs token`` keeps hashes only; a server with ``--tokens`` refuses every
RPC and HTTP method without credentials or with a wrong token
(UNAUTHENTICATED / 401), a read token that writes (PERMISSION_DENIED / 403),
and a client that keeps failing (RESOURCE_EXHAUSTED / 429); nothing refused
changes the store; a server beyond loopback with no tokens does not start."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import grpc
import pytest

from cachefs.protocol import bs_pb2, re_grpc, re_pb2
from cachefs.server import _auth
from tests.mounting import cachefs
from tests.reapi import Client, Server, _Header, code_of, serving
from tests.test_audit import lines_of


def add(tokens: Path, name: str, permission: str, tenant: str = "team") -> str:
    result = cachefs(
        "token", "add", str(tokens), name, "--tenant", tenant, "--permission", permission
    )
    return result.stdout.strip()


def test_token_file_keeps_hashes_only(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    first = add(tokens, "ci", "read-write")
    second = add(tokens, "dev", "read", tenant="other")
    assert first.startswith("cfs_") and len(first) == 47 and first != second
    text = tokens.read_text()
    assert first not in text and second not in text
    assert "ci team read-write sha256:" in text and "dev other read sha256:" in text
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert cachefs("token", "ls", str(tokens)).stdout == "ci\tteam\tread-write\ndev\tother\tread\n"
    again = cachefs(
        "token", "add", str(tokens), "ci", "--tenant", "t", "--permission", "read", check=False
    )
    assert again.returncode == 2 and "has a token named ci already" in again.stderr
    bad = cachefs(
        "token", "add", str(tokens), "a b", "--tenant", "t", "--permission", "read", check=False
    )
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    cachefs("token", "remove", str(tokens), "ci")
    assert cachefs("token", "ls", str(tokens)).stdout == "dev\tother\tread\n"
    tokens.write_text(tokens.read_text() + "junk line\n")
    broken = cachefs("token", "ls", str(tokens), check=False)
    assert broken.returncode == 2 and f"{tokens}:3: not a token line" in broken.stderr


def test_a_token_file_edited_by_hand(tmp_path: Path) -> None:
    """A file edited by hand: a last line with no newline is kept whole when a
    token is added; a name given twice, or bytes that are not UTF-8, are errors
    naming the file; removing a name it lacks says so."""
    tokens = tmp_path / "tokens"
    add(tokens, "ci", "read-write")
    tokens.write_text(tokens.read_text().rstrip("\n"))
    add(tokens, "dev", "read")
    listed = cachefs("token", "ls", str(tokens)).stdout
    assert listed == "ci\tteam\tread-write\ndev\tteam\tread\n"
    nowhere = tmp_path / "no-such-dir" / "tokens"
    lost = cachefs(
        "token", "add", str(nowhere), "x", "--tenant", "t", "--permission", "read", check=False
    )
    assert lost.returncode == 2 and f"{nowhere.parent} is not a directory" in lost.stderr
    missing = cachefs("token", "remove", str(tokens), "nobody", check=False)
    assert missing.returncode == 2 and f"{tokens} has no token named nobody" in missing.stderr
    first_line = next(line for line in tokens.read_text().splitlines() if line.startswith("ci "))
    tokens.write_text(tokens.read_text() + first_line + "\n")
    twice = cachefs("token", "ls", str(tokens), check=False)
    assert twice.returncode == 2 and "a second token named ci" in twice.stderr
    tokens.write_bytes(b"ci team read sha256:\xff\xfe\n")
    garbled = cachefs("token", "ls", str(tokens), check=False)
    assert (
        garbled.returncode == 2 and f"the token file {tokens} is not UTF-8 text" in garbled.stderr
    )


@pytest.mark.parametrize(
    "args",
    [["--grpc", "0.0.0.0:0"], ["--http", "192.0.2.1:8080"], ["--grpc", "cache.example:9092"]],
)
def test_serving_beyond_loopback_needs_tokens(tmp_path: Path, args: list[str]) -> None:
    result = cachefs("serve", str(tmp_path / "store"), *args, check=False)
    assert result.returncode == 2
    assert "refusing to serve" in result.stderr and "--allow-unauthenticated" in result.stderr
    assert not (tmp_path / "store").exists()
    (tmp_path / "m").mkdir()
    mount = cachefs("mount", str(tmp_path / "s2"), str(tmp_path / "m"), *args, check=False)
    assert mount.returncode == 2 and "refusing to serve" in mount.stderr


def _blob_calls(client: Client, data: bytes) -> dict[str, Callable[[], Any]]:
    """One call of every RPC, by name (those after "write" change the store)."""
    digest = client.digest(data)
    return {
        "GetCapabilities": client.capabilities,
        "FindMissingBlobs": lambda: client.find_missing([digest]),
        "BatchReadBlobs": lambda: client.cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[digest])
        ),
        "Read": lambda: list(
            client.bytestream.Read(bs_pb2.ReadRequest(resource_name=client.read_name(digest)))
        ),
        "GetTree": lambda: list(client.cas.GetTree(re_pb2.GetTreeRequest(root_digest=digest))),
        "SplitBlob": lambda: client.cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=digest)),
        "GetActionResult": lambda: client.ac.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest)
        ),
        "write": lambda: None,
        "BatchUpdateBlobs": lambda: client.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]
            )
        ),
        "Write": lambda: client.write(data),
        "QueryWriteStatus": lambda: client.bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=client.write_name(digest))
        ),
        "SpliceBlob": lambda: client.cas.SpliceBlob(
            re_pb2.SpliceBlobRequest(blob_digest=digest, chunk_digests=[digest])
        ),
        "UpdateActionResult": lambda: client.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                action_digest=client.digest(b"action"),
                action_result=re_pb2.ActionResult(exit_code=1),
            )
        ),
    }


def _http(
    server: Server, method: str, path: str, token: str | None, body: bytes = b""
) -> tuple[int, dict[str, str]]:
    assert server.http is not None
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    conn.request(method, path, body=body if method == "PUT" else None, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}


def _state(store: Path) -> tuple[int, int]:
    figures = json.loads(cachefs("stats", "--json", str(store)).stdout)
    cache = figures["caches"][0]
    return cache["files"], cache["bytes"]


def test_every_request_needs_a_token_and_writes_a_writing_one(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    writer, reader = add(tokens, "ci", "read-write"), add(tokens, "dev", "read")
    store = tmp_path / "store"
    data = os.urandom(5000)
    with serving(store, "--tokens", str(tokens)) as server:
        before = _state(store)
        for token, expect_read, expect_write in [
            (None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
            ("cfs_" + "x" * 43, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
            (reader, None, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with server.client(token=token) as client:
                writing = False
                for name, call in _blob_calls(client, data).items():
                    if name == "write":
                        writing = True
                        continue
                    code = code_of(call)
                    expected = expect_write if writing else expect_read
                    if expected is None:
                        assert code not in _auth._GRPC_CODES.values(), name
                    else:
                        assert code == expected, (name, token)
            key = client.digest(data).hash
            for method, path in [
                ("GET", f"/cas/{key}"),
                ("HEAD", f"/ac/{key}"),
                ("GET", "/status"),
                ("PUT", f"/cas/{key}"),
                ("PUT", f"/ac/{key}"),
                ("PUT", f"/main/cas/{key}"),
            ]:
                status, headers = _http(server, method, path, token, data)
                if token != reader:
                    assert status == 401 and "bearer" in headers["www-authenticate"].lower(), path
                elif method == "PUT":
                    assert status == 403, path
                else:
                    assert status in (200, 404), path
        assert _state(store) == before  # nothing refused changed anything
        with server.client(token=writer) as client:
            for name, call in _blob_calls(client, data).items():
                assert code_of(call) not in _auth._GRPC_CODES.values(), name
            assert client.find_missing([client.digest(data)]) == []
            assert _http(server, "PUT", f"/ac/{'ab' * 32}", writer, b"\x08\x01")[0] == 200
        assert _state(store) != before
    events = lines_of(store / "audit")
    kinds = {str(e["event"]) for e in events}
    assert {"tokens.loaded", "auth.failed", "auth.denied", "ac.write"} <= kinds
    writes = [e for e in events if e["event"] == "ac.write"]
    assert writes and all("token ci (tenant team) from 127.0.0.1" in str(w["by"]) for w in writes)
    denied = [e for e in events if e["event"] == "auth.denied"]
    assert all(e["by"] == "token dev (tenant team)" for e in denied)


def test_a_client_that_keeps_failing_is_refused_for_a_while(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    good = add(tokens, "ci", "read-write")
    with serving(tmp_path / "store", "--tokens", str(tokens)) as server:
        with server.client(token="cfs_wrong") as bad:
            codes = [code_of(lambda: bad.find_missing([])) for _ in range(_auth.MAX_FAILURES + 2)]
        assert codes[: _auth.MAX_FAILURES] == [grpc.StatusCode.UNAUTHENTICATED] * _auth.MAX_FAILURES
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Anything but good credentials waits for the window to pass; good ones
        # are let in (an address shared behind NAT is not locked out).
        status, headers = _http(server, "GET", "/status", "cfs_wrong")
        assert status == 429 and int(headers["retry-after"]) > 0
        assert _http(server, "GET", "/status", None)[0] == 429
        with server.client(token=good) as client:
            assert code_of(lambda: client.find_missing([])) == grpc.StatusCode.OK
        assert _http(server, "GET", "/status", good)[0] == 200


def test_a_token_file_that_goes_lets_nobody_in(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    good = add(tokens, "ci", "read-write")
    with (
        serving(tmp_path / "store", "--tokens", str(tokens)) as server,
        server.client(token=good) as client,
    ):
        assert code_of(lambda: client.find_missing([])) == grpc.StatusCode.OK
        tokens.write_text("this is not a token file\n")
        deadline = time.monotonic() + 20
        while code_of(lambda: client.find_missing([])) == grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "a broken token file kept its tokens"
            time.sleep(0.5)
        assert code_of(lambda: client.find_missing([])) == grpc.StatusCode.UNAUTHENTICATED
    events = [e["event"] for e in lines_of(tmp_path / "store" / "audit")]
    assert "tokens.unreadable" in events


def test_tokens_added_and_removed_while_serving(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    add(tokens, "ci", "read-write")
    with serving(tmp_path / "store", "--tokens", str(tokens)) as server:
        late = add(tokens, "late", "read")
        deadline = time.monotonic() + 20
        with server.client(token=late) as client:
            while code_of(lambda: client.find_missing([])) != grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "a new token was never accepted"
                time.sleep(0.5)
            cachefs("token", "remove", str(tokens), "late")
            while code_of(lambda: client.find_missing([])) == grpc.StatusCode.OK:
                assert time.monotonic() < deadline, "a removed token was still accepted"
                time.sleep(0.5)


def test_a_missing_token_file_is_a_clear_error(tmp_path: Path) -> None:
    result = cachefs(
        "serve",
        str(tmp_path / "store"),
        "--tokens",
        str(tmp_path / "nope"),
        check=False,
        timeout=60,
    )
    assert (
        result.returncode == 2
        and "no token file" in result.stderr
        and "cachefs token add" in result.stderr
    )


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for u, p in users.items()
    ]
    path.write_text("# users\n" + "\n".join(lines) + "\n")
    return path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_http_basic_auth_from_htpasswd(tmp_path: Path) -> None:
    users = htpasswd(tmp_path / "htpasswd", {"ci": "s3cret", "dev": "other"})
    store = tmp_path / "store"
    data = b"some bytes"
    key = hashlib.sha256(data).hexdigest()
    with serving(store, "--htpasswd", str(users)) as server:
        assert server.http is not None
        host, port = server.http.rsplit(":", 1)

        def request(method: str, path: str, authorization: str | None) -> tuple[int, list[str]]:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            headers = {} if authorization is None else {"Authorization": authorization}
            conn.request(method, path, body=data if method == "PUT" else None, headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            challenges = [v for k, v in response.getheaders() if k.lower() == "www-authenticate"]
            return response.status, challenges

        status, challenges = request("GET", "/status", None)
        assert status == 401 and any(c.startswith("Basic") for c in challenges)
        assert request("PUT", f"/cas/{key}", _basic("ci", "wrong"))[0] == 401
        assert request("PUT", f"/cas/{key}", _basic("nobody", "s3cret"))[0] == 401
        assert request("PUT", f"/cas/{key}", "Basic !!notbase64")[0] == 401
        assert request("PUT", f"/cas/{key}", _basic("ci", "s3cret"))[0] == 200
        assert request("GET", f"/cas/{key}", _basic("dev", "other"))[0] == 200
        # gRPC clients may send the same header.
        with server.client() as client:
            client.channel = grpc.intercept_channel(client.channel, _Header(_basic("ci", "s3cret")))
            client.cas = re_grpc.ContentAddressableStorageStub(client.channel)
            assert client.find_missing([client.digest(data)]) == []
    kinds = [e["event"] for e in lines_of(store / "audit")]
    assert "htpasswd.loaded" in kinds and kinds.count("auth.failed") == 4
    bad = tmp_path / "md5"
    bad.write_text("ci:$apr1$abc$def\n")
    result = cachefs("serve", str(store), "--htpasswd", str(bad), check=False, timeout=60)
    assert result.returncode == 2 and "md5:1: not USER:BCRYPT-HASH" in result.stderr
