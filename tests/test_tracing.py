"""OpenTelemetry traces: spans received by a real OTLP receiver (an OTLP/gRPC
TraceService served by the test on 127.0.0.1, with OpenTelemetry's own
protocol messages), their parentage across a client -> cachefs serve ->
remote fetch -> cachefs serve chain, and tracing off costing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cachefs.format.digest import SHA256
from cachefs.protocol import bs_pb2
from tests.mounting import cachefs, mounted
from tests.otlp import OTLP_SPAN_KIND_CLIENT, OTLP_SPAN_KIND_SERVER, Span, receiver
from tests.reapi import Client, serving


def ancestors(span: Span, spans: list[Span]) -> list[str]:
    """The span ids above ``span`` among ``spans`` (nearest first)."""
    by_id = {s.span: s for s in spans}
    chain, parent = [], span.parent
    while parent:
        chain.append(parent)
        above = by_id.get(parent)
        parent = above.parent if above is not None else ""
    return chain


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.1)


def test_a_client_trace_continues_through_serve_and_its_remote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """client -> serve A2 (ByteStream Read of a blob it lacks) -> A2's fetch
    from its tier -> serve B: one trace, each span the child of the one
    before.  A1 stored the blob (its upload span has a publication under it)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with receiver() as (spans, endpoint):
        traced = ("--otlp-endpoint", endpoint)
        with serving(tmp_path / "b", *traced, http_on=False) as b:
            tier = ("--remote", f"grpc://{b.grpc}")
            with (
                serving(tmp_path / "a1", *tier, *traced) as a1,
                serving(tmp_path / "a2", *tier, *traced) as a2,
            ):
                blob = os.urandom(300_000)
                with Client(a1.grpc, SHA256) as client:
                    client.write(blob)
                    digest = client.digest(blob)

                def settled() -> bool:
                    stats = json.loads(cachefs("stats", str(tmp_path / "a1"), "--json").stdout)
                    remote = stats["remote"]
                    return bool(remote["queue"] == 0 and remote["shared_settling"] == 0)

                wait_for(settled)
                trace, parent = os.urandom(16).hex(), os.urandom(8).hex()
                traceparent = f"00-{trace}-{parent}-01"
                with Client(a2.grpc, SHA256) as client:
                    responses = client.bytestream.Read(
                        bs_pb2.ReadRequest(resource_name=client.read_name(digest)),
                        metadata=(("traceparent", traceparent),),
                        timeout=60,
                    )
                    assert b"".join(r.data for r in responses) == blob
        # Every server has stopped: their spans were flushed on the way out.
        everything = list(spans.spans)
    mine = [s for s in everything if s.trace == trace]
    (read,) = [s for s in mine if s.name == "grpc ByteStream/Read"]
    assert read.service == "cachefs-serve" and read.kind == OTLP_SPAN_KIND_SERVER
    assert read.parent == parent, "the server span is the client's child"
    assert read.attributes["rpc.grpc.status_code"] == "OK"
    fetches = [s for s in mine if s.name.startswith("remote ")]
    assert fetches, f"no remote requests in the trace: {[s.name for s in mine]}"
    for fetch in fetches:
        assert fetch.kind == OTLP_SPAN_KIND_CLIENT
        assert read.span in ancestors(fetch, mine), f"{fetch.name} is not under the Read"
        assert fetch.attributes["cachefs.endpoint"] == f"grpc://{b.grpc}"
    fetch_ids = {s.span for s in fetches}
    on_b = [s for s in mine if s.kind == OTLP_SPAN_KIND_SERVER and s is not read]
    assert on_b, "the remote server did not continue the trace"
    for served in on_b:
        assert served.parent in fetch_ids, f"{served.name}'s parent is no fetch of A2"
    assert {s.name for s in on_b} & {
        "grpc ActionCache/GetActionResult",
        "grpc ContentAddressableStorage/BatchReadBlobs",
        "grpc ByteStream/Read",
    }
    # The upload to A1 was published under its server span; B's pushes came in traced.
    (write,) = [s for s in everything if s.name == "grpc ByteStream/Write"]
    publishes = [s for s in everything if s.name == "cachefs publish" and s.trace == write.trace]
    assert any(write.span in ancestors(p, everything) for p in publishes)
    assert [s for s in everything if s.name == "cachefs push"]


def test_a_mount_traces_a_share_of_fuse_requests_and_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with receiver() as (spans, endpoint):
        mnt = tmp_path / "mnt"
        args = ("--otlp-endpoint", endpoint, "--otlp-fuse-ratio", "1")
        with mounted(tmp_path / "store", mnt, *args):
            for n in range(5):
                (mnt / f"f{n}").write_bytes(os.urandom(10_000))
            # Published a moment after their releases, together, in the trace
            # of the first (unlinked before, they would not be published).
            wait_for(lambda: spans.named("cachefs publish"))
            for n in range(5):
                (mnt / f"f{n}").unlink()
            cachefs("gc", str(mnt))
        writes = spans.named("fuse write", "cachefs-mount")
        assert len(writes) >= 5
        assert all(s.kind == OTLP_SPAN_KIND_SERVER for s in writes)
        releases = spans.named("fuse release")
        publishes = spans.named("cachefs publish")
        assert any(r.span in ancestors(p, spans.spans) for p in publishes for r in releases)
        (gc,) = spans.named("cachefs gc")
        assert gc.attributes["cachefs.bytes_reclaimed"] > 0
    with receiver() as (spans, endpoint):
        args = ("--otlp-endpoint", endpoint, "--otlp-fuse-ratio", "0")
        with mounted(tmp_path / "store", mnt, *args):
            (mnt / "g").write_bytes(b"x")
            cachefs("gc", str(mnt))
        assert not [s for s in spans.spans if s.name.startswith("fuse ")]
        # Publications are traced inside traced requests only; gc all the same.
        assert not spans.named("cachefs publish")
        assert spans.named("cachefs gc")


def test_tracing_off_imports_nothing_and_wraps_nothing() -> None:
    code = (
        "import sys\n"
        "from cachefs import tracing\n"
        "import cachefs.fuse, cachefs.server._serve, cachefs.daemon\n"
        "assert not tracing.configure(None, service='x')\n"
        "f = len\n"
        "assert tracing.in_context(f) is f and tracing.span('x') is tracing.span('y')\n"
        "assert tracing.headers() == [] and not tracing.fuse_sampled()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bad_tracing_options_are_refused_before_anything_starts(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = cachefs("serve", str(store), "--otlp-endpoint", "localhost:4317", check=False)
    assert result.returncode == 2
    assert "is not a URL" in result.stderr and "http://HOST:PORT" in result.stderr
    env = os.environ | {"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}
    result = cachefs(
        "serve", str(store), "--otlp-endpoint", "http://127.0.0.1:1", check=False, env=env
    )
    assert result.returncode == 2
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='thrift'" in result.stderr
    assert not store.exists()
    result = cachefs("mount", str(store), str(tmp_path), "--otlp-fuse-ratio", "2", check=False)
    assert result.returncode == 2 and "--otlp-fuse-ratio" in result.stderr
