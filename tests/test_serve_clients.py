"""Real build tools against ``cachefs serve``: Bazel over gRPC and over HTTP, against
a serve process and against a mount that also serves; ccache over HTTP with
``layout=bazel``.  A build, then a clean rebuild that must be served from the
remote cache alone, with identical outputs (``tests/clients.py`` has the recipes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import clients
from tests.certs import Authority
from tests.mounting import cachefs, mounted
from tests.reapi import serving
from tests.test_audit import lines_of
from tests.test_auth import add, htpasswd

SPAWNS = 33  # the genrules of tests/data/bazel


def remote_build(
    workspace: Path,
    output_root: Path,
    flags: tuple[str, ...],
    *,
    clean: bool,
    startup: tuple[str, ...] = (),
) -> clients.BazelBuild:
    return clients.bazel_build(
        workspace,
        None,
        output_root,
        clean=clean,
        extra=(*flags, "--remote_upload_local_results"),
        startup=startup,
    )


def check_rebuild_hits(
    workspace: Path, output_root: Path, *flags: str, startup: tuple[str, ...] = ()
) -> None:
    first = remote_build(workspace, output_root, flags, clean=False, startup=startup)
    assert first.hits == 0 and first.spawns == SPAWNS, first.log
    second = remote_build(workspace, output_root, flags, clean=True, startup=startup)
    assert second.hits == second.spawns == SPAWNS, second.log
    assert second.summary.get("remote cache hit") == SPAWNS, second.summary
    assert second.outputs == first.outputs


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bazel_remote_cache(tmp_path: Path, protocol: str) -> None:
    clients.require_bazel()
    workspace = clients.bazel_workspace(tmp_path)
    store = tmp_path / "store"
    with serving(store) as server:
        address = server.grpc if protocol == "grpc" else server.http
        check_rebuild_hits(workspace, tmp_path / "out", f"--remote_cache={protocol}://{address}")
        figures = json.loads(cachefs("stats", "--json", str(store)).stdout)
        [cache] = figures["caches"]
        assert cache["path"] == "/remote-cache"
        assert cache["hits"] >= 2 * SPAWNS  # an action result and its output, each
    assert cachefs("fsck", str(store), check=False).returncode == 0


def test_bazel_against_a_mount_that_serves(tmp_path: Path) -> None:
    clients.require_bazel()
    workspace = clients.bazel_workspace(tmp_path)
    with mounted(tmp_path / "store", tmp_path / "mnt", "--grpc", "127.0.0.1:0") as mount:
        info = json.loads((mount.path / ".cachefs" / "stats.json").read_text())
        address = info["servers"]["grpc"]
        check_rebuild_hits(workspace, tmp_path / "out", f"--remote_cache=grpc://{address}")
        # What Bazel stored is there to look at: one file per action result and blob.
        ac = list((mount.path / "remote-cache" / "_" / "ac").rglob("*"))
        cas = [p for p in (mount.path / "remote-cache" / "_" / "cas").rglob("*") if p.is_file()]
        assert len([p for p in ac if p.is_file()]) == SPAWNS
        assert len(cas) >= SPAWNS
        some = cas[0]
        assert os.getxattr(some, "user.cachefs.digest").decode().startswith(some.name)


def test_bazel_with_tls_and_a_token(tmp_path: Path) -> None:
    """Bazel's own TLS and header flags against a server that wants both: over
    HTTPS, since Debian's Bazel 4 cannot make a gRPC TLS channel at all ("JDK
    provider does not support ALPN protocol", before it connects); gRPC over
    TLS with a token is tested with grpcio's client (tests/test_tls.py).  Bazel
    4's HTTP cache client trusts the JVM's trust store, not --tls_certificate:
    the CA goes into one of its own."""
    clients.require_bazel()
    workspace = clients.bazel_workspace(tmp_path)
    ca = Authority(tmp_path / "ca")
    pem = ca.issue("server", server=True)
    tokens = tmp_path / "tokens"
    token = add(tokens, "bazel", "read-write")
    tls = ["--tls-cert", str(pem.cert), "--tls-key", str(pem.key), "--tokens", str(tokens)]
    trust = tmp_path / "trust.p12"
    subprocess.run(
        ["keytool", "-importcert", "-noprompt", "-keystore", str(trust), "-storetype",
         "PKCS12", "-storepass", "changeit", "-alias", "ca", "-file", str(ca.pem.cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    startup = (
        f"--host_jvm_args=-Djavax.net.ssl.trustStore={trust}",
        "--host_jvm_args=-Djavax.net.ssl.trustStorePassword=changeit",
    )
    store = tmp_path / "store"
    with serving(store, *tls, grpc_on=False) as server:
        check_rebuild_hits(
            workspace,
            tmp_path / "out",
            f"--remote_cache=https://{server.http}",
            f"--tls_certificate={ca.pem.cert}",
            f"--remote_header=Authorization=Bearer {token}",
            startup=startup,
        )
    writes = [e for e in lines_of(store / "audit") if e["event"] == "ac.write"]
    assert len(writes) == SPAWNS and all("token bazel" in str(w["by"]) for w in writes)


def test_bazel_with_basic_auth(tmp_path: Path) -> None:
    """bazel-remote's way: a user of an htpasswd file, named in the URL."""
    clients.require_bazel()
    workspace = clients.bazel_workspace(tmp_path)
    users = htpasswd(tmp_path / "htpasswd", {"builder": "pa55word"})
    with serving(tmp_path / "store", "--htpasswd", str(users), grpc_on=False) as server:
        check_rebuild_hits(
            workspace, tmp_path / "out", f"--remote_cache=http://builder:pa55word@{server.http}"
        )


def test_ccache_remote_storage_over_http(tmp_path: Path) -> None:
    clients.require_ccache()
    src = clients.c_project(tmp_path)
    with serving(tmp_path / "store", grpc_on=False) as server:
        remote = {"CCACHE_REMOTE_STORAGE": f"http://{server.http}|layout=bazel"}
        first = clients.ccache_build(src, tmp_path / "ccache-1", env=remote)
        assert first.misses > 30 and first.hits == 0 and not first.errors, first.stats
        clients.smoke_test(src)
        # An empty local cache: every compilation comes from the server.
        shutil.rmtree(tmp_path / "ccache-1")
        second = clients.ccache_build(src, tmp_path / "ccache-2", env=remote)
        assert second.hits == first.misses and second.misses == 0 and not second.errors
        assert second.stats.get("remote_storage_hit") == first.misses, second.stats
        assert second.outputs == first.outputs
        clients.smoke_test(src)
