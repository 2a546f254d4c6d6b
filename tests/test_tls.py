"""TLS and mutual TLS on both servers (``--tls-cert``, ``--tls-key``,
``--tls-client-ca``): clients that trust the CA are served, over TLS only;
with a client CA, only clients with one of its certificates are, and the
certificate's subject names them in the audit log."""

from __future__ import annotations

import http.client
import os
import ssl
from pathlib import Path

import grpc
import pytest

from cachefs.engine import Digest
from cachefs.errors import ConfigError, RemoteError
from cachefs.format.digest import SHA256
from cachefs.protocol import re_pb2
from cachefs.remote import open_remote
from tests.certs import Authority, Pem
from tests.mounting import cachefs
from tests.reapi import Server, serving
from tests.test_audit import lines_of
from tests.test_auth import add


def _grpc_tls(ca: Authority, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.pem.cert.read_bytes(),
        private_key=None if client is None else client.key.read_bytes(),
        certificate_chain=None if client is None else client.cert.read_bytes(),
    )


def _https(
    server: Server, ca: Authority, path: str, *, client: Pem | None = None, token: str | None = None
) -> int:
    assert server.http is not None
    context = ssl.create_default_context(cafile=str(ca.pem.cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    host, port = server.http.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), timeout=30, context=context)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _tls_args(server_pem: Pem) -> list[str]:
    return ["--tls-cert", str(server_pem.cert), "--tls-key", str(server_pem.key)]


def test_tls_with_tokens(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "ca")
    tokens = tmp_path / "tokens"
    token = add(tokens, "ci", "read-write")
    with serving(
        tmp_path / "store", *_tls_args(ca.issue("server", server=True)), "--tokens", str(tokens)
    ) as server:
        data = os.urandom(10_000)
        with server.client(token=token, tls=_grpc_tls(ca)) as client:
            client.write(data)
            assert client.find_missing([client.digest(data)]) == []
        # Plain text to a TLS port, or TLS without the token, gets nowhere.
        with server.client(token=token) as plain, pytest.raises(grpc.RpcError) as info:
            plain.find_missing([])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with server.client(tls=_grpc_tls(ca)) as anonymous, pytest.raises(grpc.RpcError) as info:
            anonymous.find_missing([])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _https(server, ca, "/status", token=token) == 200
        assert _https(server, ca, "/status") == 401
        with pytest.raises(ssl.SSLError):  # a client that does not trust the server's CA
            _https(server, Authority(tmp_path / "other"), "/status", token=token)


def test_mutual_tls(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "ca")
    other = Authority(tmp_path / "other", "another CA")
    store = tmp_path / "store"
    args = [*_tls_args(ca.issue("server", server=True)), "--tls-client-ca", str(ca.pem.cert)]
    good, stranger = ca.issue("builder-7", server=False), other.issue("intruder", server=False)
    with serving(store, *args) as server:
        with server.client(tls=_grpc_tls(ca, good)) as client:
            client.write(b"hello")
            client.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    action_digest=client.digest(b"action"),
                    action_result=re_pb2.ActionResult(
                        output_files=[re_pb2.OutputFile(path="o", digest=client.digest(b"hello"))]
                    ),
                )
            )
        for who in (None, stranger):
            with (
                server.client(tls=_grpc_tls(ca, who)) as refused,
                pytest.raises(grpc.RpcError) as info,
            ):
                refused.find_missing([])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        assert _https(server, ca, "/status", client=good) == 200
        for who in (None, stranger):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _https(server, ca, "/status", client=who)
    writes = [e for e in lines_of(store / "audit") if e["event"] == "ac.write"]
    assert len(writes) == 1 and "CN=builder-7" in str(writes[0]["by"])


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("cert only", "--tls-cert and --tls-key go together"),
        ("ca only", "--tls-client-ca needs TLS"),
        ("missing", "no such file"),
        ("garbage", "cannot use the TLS certificate"),
    ],
)
def test_bad_tls_options(tmp_path: Path, which: str, words: str) -> None:
    ca = Authority(tmp_path / "ca")
    pem = ca.issue("server", server=True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    args = {
        "cert only": ["--tls-cert", str(pem.cert)],
        "ca only": ["--tls-client-ca", str(ca.pem.cert)],
        "missing": ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pem.key)],
        "garbage": ["--tls-cert", str(garbage), "--tls-key", str(pem.key)],
    }[which]
    result = cachefs(
        "serve", str(tmp_path / "store"), "--http", "127.0.0.1:0", *args, check=False, timeout=60
    )
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_remote_tiers_present_tokens_and_certificates(tmp_path: Path) -> None:
    """A tier that wants credentials gets them from the files its URL names:
    a token (gRPC and HTTP), a CA to trust, a client certificate (gRPC)."""
    ca = Authority(tmp_path / "ca")
    tokens = tmp_path / "tokens"
    token_file = tmp_path / "token"
    token_file.write_text(add(tokens, "tier", "read-write") + "\n")
    client_pem = ca.issue("a-runner", server=False)
    args = [*_tls_args(ca.issue("server", server=True)), "--tokens", str(tokens)]
    data = os.urandom(3000)
    digest = Digest(SHA256.hash(data), len(data))
    with serving(tmp_path / "tier", *args) as tier:
        files = f"token_file={token_file}&ca={ca.pem.cert}"
        for url in (
            f"grpcs://{tier.grpc}?{files}",
            f"grpcs://{tier.grpc}?{files}&cert={client_pem.cert}&key={client_pem.key}",
            f"https://{tier.http}?{files}",
        ):
            remote = open_remote(url, SHA256)
            remote.write(digest, data)
            assert remote.find_missing([digest]) == [] and remote.read(digest) == data
        for url in (
            f"grpcs://{tier.grpc}?ca={ca.pem.cert}",
            f"https://{tier.http}?ca={ca.pem.cert}",
        ):
            with pytest.raises(RemoteError):
                open_remote(url, SHA256).find_missing([digest])
    for url, words in [
        (f"grpc://h:1?ca={ca.pem.cert}", "unknown parameter 'ca'"),
        (f"https://h?cert={client_pem.cert}", "unknown parameter 'cert'"),
        (f"grpcs://h:1?cert={client_pem.cert}", "cert and key go together"),
        (f"grpcs://h:1?token_file={tmp_path / 'none'}", "cannot read its token file"),
    ]:
        with pytest.raises(ConfigError, match=words):
            open_remote(url, SHA256)
