"""Tenants (``server/_tenants.py``): a tenant's action cache and blobs are
invisible to another (GetActionResult, FindMissingBlobs, ByteStream Read, HTTP
GET/HEAD), including blobs the other never uploaded; uploading the same bytes
makes them visible to it and adds no stored bytes; quotas refuse what would
pass them."""

from __future__ import annotations

import functools
import http.client
import json
import os
from pathlib import Path

import grpc
import pytest

from cachefs.protocol import bs_pb2, re_pb2
from tests.mounting import cachefs
from tests.reapi import Server, code_of, serving
from tests.test_audit import lines_of
from tests.test_auth import add

CONFIG = """
[tenants.a]
instances = ["a", "a/linux"]
quota = "1M"

[tenants.b]
instances = ["b"]
"""


def _http(server: Server, method: str, path: str, token: str, body: bytes = b"") -> int:
    assert server.http is not None
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body or None, headers={"Authorization": f"Bearer {token}"})
    status = conn.getresponse().status
    conn.close()
    return status


def _stored(store: Path) -> int:
    return int(json.loads(cachefs("stats", "--json", str(store)).stdout)["stored_bytes"])


def test_tenants_see_only_their_own(tmp_path: Path) -> None:
    tokens, config = tmp_path / "tokens", tmp_path / "cachefs.toml"
    config.write_text(CONFIG)
    a, b = (
        add(tokens, "ci-a", "read-write", tenant="a"),
        add(tokens, "ci-b", "read-write", tenant="b"),
    )
    store = tmp_path / "store"
    blob = os.urandom(200_000)
    with serving(store, "--tokens", str(tokens), "--config", str(config)) as server:
        with server.client("a", token=a) as client:
            client.write(blob)
            digest = client.digest(blob)
            key = client.digest(b"an action of a")
            client.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    instance_name="a",
                    action_digest=key,
                    action_result=re_pb2.ActionResult(
                        output_files=[re_pb2.OutputFile(path="o", digest=digest)]
                    ),
                )
            )
            assert client.find_missing([digest]) == []
        before = _stored(store)
        with server.client("b", token=b) as client:
            # a's instance: refused outright, whatever the key.
            for instance in ("a", "a/linux"):
                request = re_pb2.GetActionResultRequest(instance_name=instance, action_digest=key)
                get = functools.partial(client.ac.GetActionResult, request)
                assert code_of(get) == grpc.StatusCode.PERMISSION_DENIED
            read_a = bs_pb2.ReadRequest(resource_name=client.read_name(digest, instance="a"))
            assert (
                code_of(lambda: list(client.bytestream.Read(read_a)))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            missing_a = re_pb2.FindMissingBlobsRequest(instance_name="a", blob_digests=[digest])
            assert (
                code_of(lambda: client.cas.FindMissingBlobs(missing_a))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            # b's own instance: a's blob and entry are not there.
            assert client.find_missing([digest]) == [digest]
            request = re_pb2.GetActionResultRequest(instance_name="b", action_digest=key)
            assert code_of(lambda: client.ac.GetActionResult(request)) == grpc.StatusCode.NOT_FOUND
            read_b = bs_pb2.ReadRequest(resource_name=client.read_name(digest))
            assert (
                code_of(lambda: list(client.bytestream.Read(read_b))) == grpc.StatusCode.NOT_FOUND
            )
            # An instance nobody owns is nobody's to use.
            other = re_pb2.FindMissingBlobsRequest(instance_name="", blob_digests=[digest])
            assert (
                code_of(lambda: client.cas.FindMissingBlobs(other))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            assert _http(server, "GET", f"/a/cas/{digest.hash}", b) == 403
            assert _http(server, "HEAD", f"/a/ac/{key.hash}", b) == 403
            assert _http(server, "GET", f"/b/cas/{digest.hash}", b) == 404
            assert _http(server, "HEAD", f"/b/ac/{key.hash}", b) == 404
            assert _http(server, "PUT", f"/a/ac/{key.hash}", b, b"\x08\x01") == 403
            # b sends the same bytes: visible to b now, at no cost in storage.
            client.write(blob)
            assert client.find_missing([digest]) == []
            assert client.read(digest) == blob
        assert _stored(store) == before
        status = json.loads(cachefs("stats", "--json", str(store)).stdout)["tenants"]
        assert status["a"]["bytes"] >= len(blob) and status["b"]["bytes"] >= len(blob)
    denied = [e for e in lines_of(store / "audit") if e["event"] == "auth.denied"]
    assert denied and all(e["by"] == "token ci-b (tenant b)" for e in denied)


def test_a_tenant_quota(tmp_path: Path) -> None:
    tokens, config = tmp_path / "tokens", tmp_path / "cachefs.toml"
    config.write_text(CONFIG)
    a = add(tokens, "ci-a", "read-write", tenant="a")
    store = tmp_path / "store"
    with serving(store, "--tokens", str(tokens), "--config", str(config)) as server:
        with server.client("a", token=a) as client:
            client.write(os.urandom(600_000))
            with pytest.raises(grpc.RpcError) as info:
                client.write(os.urandom(600_000))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "quota" in (info.value.details() or "")
            batch = re_pb2.BatchUpdateBlobsRequest(
                instance_name="a",
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=client.digest(d), data=d)
                    for d in (os.urandom(300_000), os.urandom(300_000))
                ],
            )
            assert (
                code_of(lambda: client.cas.BatchUpdateBlobs(batch))
                == grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            small = os.urandom(1000)
            client.write(small)  # what fits still goes in
        data = os.urandom(500_000)
        digest = client.digest(data)
        assert _http(server, "PUT", f"/a/cas/{digest.hash}", a, data) == 507
        figures = json.loads(cachefs("stats", "--json", str(store)).stdout)["tenants"]["a"]
        assert figures["quota"] == 1 << 20 and figures["quota_refusals"] == 3
        assert 600_000 <= figures["bytes"] <= 1 << 20
    events = [e for e in lines_of(store / "audit") if e["event"] == "tenant.quota"]
    assert len(events) == 3 and all(e["tenant"] == "a" for e in events)


def test_a_tenant_quota_counts_what_it_held_before_a_restart(tmp_path: Path) -> None:
    """A server that starts over a store measures each tenant's usage from
    what its instances hold (their directories walked, nested instance
    names included): the quota still refuses what would pass it."""
    tokens, config = tmp_path / "tokens", tmp_path / "cachefs.toml"
    config.write_text(CONFIG)
    a = add(tokens, "ci-a", "read-write", tenant="a")
    store = tmp_path / "store"
    held = [os.urandom(300_000), os.urandom(400_000)]
    with serving(store, "--tokens", str(tokens), "--config", str(config)) as server:
        for instance, data in zip(("a", "a/linux"), held, strict=True):
            with server.client(instance, token=a) as client:
                client.write(data)
    with serving(store, "--tokens", str(tokens), "--config", str(config)) as server:
        figures = json.loads(cachefs("stats", "--json", str(store)).stdout)["tenants"]
        assert figures["a"]["bytes"] == sum(map(len, held))
        assert figures["b"]["bytes"] == 0
        with server.client("a/linux", token=a) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.write(os.urandom(400_000))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.write(os.urandom(300_000))  # what fits still goes in


@pytest.mark.parametrize(
    ("config", "args", "words"),
    [
        (CONFIG, [], "tenants need --tokens"),
        (
            '[tenants.a]\ninstances = ["x"]\n[tenants.b]\ninstances = ["x"]\n',
            ["--tokens"],
            "belongs to tenant a",
        ),
        ('[tenants.a]\ninstances = "x"\n', ["--tokens"], "list of instance names"),
        ('[tenants.a]\nquota = "lots"\n', ["--tokens"], "not a size"),
    ],
)
def test_bad_tenant_configs(tmp_path: Path, config: str, args: list[str], words: str) -> None:
    (tmp_path / "cachefs.toml").write_text(config)
    if args:
        add(tmp_path / "tokens", "t", "read")
        args = ["--tokens", str(tmp_path / "tokens")]
    result = cachefs(
        "serve",
        str(tmp_path / "store"),
        "--config",
        str(tmp_path / "cachefs.toml"),
        *args,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2 and words in result.stderr, result.stderr
