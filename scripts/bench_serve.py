"""Benchmark ``cachefs serve`` against BuildGrid and the floor of Python gRPC on loopback.

Figures, each the median of ``--runs`` runs, each run on fresh servers and fresh data:

* large blobs: upload and download of ``--large-total`` bytes in blobs of
  ``--large-blob`` bytes over ByteStream (1 MiB messages, one stream at a time);
* small blobs: ``--small-count`` blobs of ``--small-size`` bytes uploaded with
  BatchUpdateBlobs and downloaded with BatchReadBlobs, in batches of at most 4 MiB
  (BuildGrid's limit, so that every server gets the same requests);
* FindMissingBlobs of ``--small-count`` digests (all present) in one request;
* with ``--tls``, cachefs serve again behind TLS with a bearer token on every
  call (``--tls-cert``, ``--tokens``): the cost of both, as ratios;
* Bazel (tests/data/bazel): the wall time of a clean rebuild with
  ``--remote_cache=grpc://`` cachefs serve against one with ``--disk_cache`` on local
  disk (``--no-bazel`` skips it).

The servers: ``cachefs serve`` on a fresh store, BuildGrid 0.9.1 with disk storage
(scripts/bootstrap.sh installs it; ``--no-buildgrid`` skips it), and the floor: a
trivial in-memory ByteStream/CAS server in Python (``--floor-server PORT``, this script
run as a server), which costs only what grpcio and Python cost.  Ratios are printed
against BuildGrid (goal: cachefs at least 2x on every figure) and against the floor
(goal: at least 0.7x for large blobs).  Run from the repository root::

    .venv/bin/python scripts/bench_serve.py [--runs 5] [--large-total 1G] ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachefs.engine import SHA256, Digest
from cachefs.protocol import bs_grpc, bs_pb2, re_grpc, re_pb2
from cachefs.server import add_token
from cachefs.signing import Signer, Verifier, generate_key
from tests import clients
from tests.certs import Authority
from tests.reapi import (
    Client,
    Server,
    buildgrid,
    free_port,
    start_serve,
    stop_serve,
)

MIB = 1 << 20
BATCH = 4 * MIB - 64 * 1024  # under BuildGrid's 4 MiB - 1 KiB, with room for framing
PIECE = MIB


# --- the floor: an in-memory server ----------------------------------------------------


class MemoryCas(re_grpc.ContentAddressableStorageServicer, bs_grpc.ByteStreamServicer):
    """Blobs in a dict: nothing checked, nothing stored on disk."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.FindMissingBlobsResponse:
        missing = [d for d in request.blob_digests if d.hash not in self.blobs]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)

    def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchUpdateBlobsResponse:
        for item in request.requests:
            self.blobs[item.digest.hash] = item.data
        return re_pb2.BatchUpdateBlobsResponse(
            responses=[
                re_pb2.BatchUpdateBlobsResponse.Response(digest=r.digest) for r in request.requests
            ]
        )

    def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: grpc.ServicerContext
    ) -> re_pb2.BatchReadBlobsResponse:
        return re_pb2.BatchReadBlobsResponse(
            responses=[
                re_pb2.BatchReadBlobsResponse.Response(digest=d, data=self.blobs[d.hash])
                for d in request.digests
            ]
        )

    def Read(
        self, request: bs_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[bs_pb2.ReadResponse]:
        data = self.blobs[request.resource_name.split("/")[-2]]
        for start in range(0, len(data), PIECE):
            yield bs_pb2.ReadResponse(data=data[start : start + PIECE])

    def Write(
        self, request_iterator: Iterator[bs_pb2.WriteRequest], context: grpc.ServicerContext
    ) -> bs_pb2.WriteResponse:
        name, pieces = "", []
        for request in request_iterator:
            name = name or request.resource_name
            pieces.append(request.data)
        data = b"".join(pieces)
        self.blobs[name.split("/")[-2]] = data
        return bs_pb2.WriteResponse(committed_size=len(data))

    def _unimplemented(self, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the floor")

    def GetTree(self, request: object, context: grpc.ServicerContext) -> None:  # type: ignore[override]
        self._unimplemented(context)

    def SplitBlob(self, request: object, context: grpc.ServicerContext) -> None:  # type: ignore[override]
        self._unimplemented(context)

    def SpliceBlob(self, request: object, context: grpc.ServicerContext) -> None:  # type: ignore[override]
        self._unimplemented(context)

    def QueryWriteStatus(self, request: object, context: grpc.ServicerContext) -> None:  # type: ignore[override]
        self._unimplemented(context)


def floor_server(port: int) -> None:
    server = grpc.server(
        ThreadPoolExecutor(16),
        options=[
            ("grpc.max_receive_message_length", 64 * MIB),
            ("grpc.max_send_message_length", 64 * MIB),
        ],
    )
    servicer = MemoryCas()
    re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
    bs_grpc.add_ByteStreamServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


class Floor:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--floor-server", str(self.port)],
            stdin=subprocess.DEVNULL,
        )
        client = Client(f"127.0.0.1:{self.port}", SHA256)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.find_missing([])
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.close()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)


# --- the workloads ------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_workloads(
    address: str,
    args: argparse.Namespace,
    *,
    tls: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> dict[str, float]:
    """MB/s of each figure against the server at ``address`` (fresh random data;
    over TLS with a token when given)."""
    client = Client(address, SHA256, tls=tls, token=token)
    out: dict[str, float] = {}
    count = args.large_total // args.large_blob
    large = [os.urandom(args.large_blob) for _ in range(count)]
    digests = [client.digest(b) for b in large]
    seconds = timed(lambda: [client.write(b, piece=PIECE) for b in large])
    out["large upload MB/s"] = args.large_total / seconds / 1e6

    def download() -> None:
        for digest in digests:
            got = hashlib.sha256()
            for response in client.bytestream.Read(
                bs_pb2.ReadRequest(resource_name=client.read_name(digest)), timeout=600
            ):
                got.update(response.data)
            assert got.hexdigest() == digest.hash, "a download came back wrong"

    out["large download MB/s"] = args.large_total / timed(download) / 1e6
    large.clear()
    small = [os.urandom(args.small_size) for _ in range(args.small_count)]
    small_digests = [client.digest(b) for b in small]
    per_batch = max(1, BATCH // args.small_size)
    batches = [
        list(range(i, min(i + per_batch, len(small)))) for i in range(0, len(small), per_batch)
    ]
    total = args.small_count * args.small_size

    def upload_small() -> None:
        for batch in batches:
            response = client.cas.BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest(
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(
                            digest=small_digests[i], data=small[i]
                        )
                        for i in batch
                    ]
                ),
                timeout=600,
            )
            assert all(r.status.code == 0 for r in response.responses)

    def read_small() -> None:
        for batch in batches:
            response = client.cas.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(digests=[small_digests[i] for i in batch]),
                timeout=600,
            )
            assert len(response.responses) == len(batch)

    out["small upload MB/s"] = total / timed(upload_small) / 1e6
    out["small download MB/s"] = total / timed(read_small) / 1e6
    seconds = timed(lambda: client.find_missing(small_digests))
    out["FindMissingBlobs digests/s"] = args.small_count / seconds
    client.close()
    return out


def bench_cachefs(args: argparse.Namespace, work: Path) -> dict[str, float]:
    server = start_serve(work / "store", http_on=False)
    try:
        return run_workloads(server.grpc, args)
    finally:
        stop_serve(server)
        shutil.rmtree(work / "store", ignore_errors=True)


def bench_cachefs_tls(args: argparse.Namespace, work: Path) -> dict[str, float]:
    """cachefs serve behind TLS, every call with a bearer token (--tls)."""
    ca = Authority(work / "ca")
    pem = ca.issue("server", server=True)
    token = add_token(work / "tokens", "bench", "bench", "read-write")
    secured = ["--tls-cert", str(pem.cert), "--tls-key", str(pem.key)]
    server = start_serve(work / "store", *secured, "--tokens", str(work / "tokens"), http_on=False)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem.cert.read_bytes())
        return run_workloads(server.grpc, args, tls=credentials, token=token)
    finally:
        stop_serve(server)
        shutil.rmtree(work / "store", ignore_errors=True)
        shutil.rmtree(work / "ca", ignore_errors=True)
        (work / "tokens").unlink()


def signing_costs(work: Path, runs: int, count: int = 2000) -> tuple[float, float]:
    """Microseconds to sign and to verify one action result (five outputs):
    medians of ``runs`` runs of ``count`` each (``cachefs.signing``)."""
    generate_key(work / "bench.key")
    signer = Signer.load(work / "bench.key")
    verifier = Verifier.load([work / "bench.key.pub"], [])
    key = Digest(SHA256.hash(b"an action"), 9)
    result = re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(path=f"out/{i}.o", digest=re_pb2.Digest(hash="ab" * 32, size_bytes=i))
            for i in range(5)
        ]
    )
    signs, checks = [], []
    for _ in range(runs):
        start = time.perf_counter()
        signed = [signer.sign(key, result) for _ in range(count)]
        signs.append((time.perf_counter() - start) / count * 1e6)
        start = time.perf_counter()
        assert all(verifier.check(key, entry) is None for entry in signed)
        checks.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(signs), statistics.median(checks)


def bench_buildgrid(args: argparse.Namespace, work: Path) -> dict[str, float]:
    with buildgrid(work / "bgd") as server:
        figures = run_workloads(server.grpc, args)
    shutil.rmtree(work / "bgd", ignore_errors=True)
    return figures


def bench_floor(args: argparse.Namespace, work: Path) -> dict[str, float]:
    floor = Floor()
    try:
        return run_workloads(floor.address, args)
    finally:
        floor.stop()


def bench_bazel(work: Path) -> dict[str, float]:
    """Seconds of a clean rebuild: from cachefs serve over gRPC, and from a local disk cache."""
    workspace = clients.bazel_workspace(work)
    out: dict[str, float] = {}
    server: Server = start_serve(work / "bazel-store", http_on=False)
    try:
        flags = (f"--remote_cache=grpc://{server.grpc}", "--remote_upload_local_results")
        clients.bazel_build(workspace, None, work / "out-remote", extra=flags)
        again = clients.bazel_build(workspace, None, work / "out-remote", clean=True, extra=flags)
        assert again.hits == again.spawns, again.log
        out["bazel rebuild, remote cache s"] = again.seconds
    finally:
        stop_serve(server)
    disk = work / "disk-cache"
    clients.bazel_build(workspace, disk, work / "out-disk")
    again = clients.bazel_build(workspace, disk, work / "out-disk", clean=True)
    assert again.hits == again.spawns, again.log
    out["bazel rebuild, disk cache s"] = again.seconds
    shutil.rmtree(workspace, ignore_errors=True)
    return out


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1:].isalpha() else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large-total", type=size, default=1 << 30)
    parser.add_argument("--large-blob", type=size, default=64 * MIB)
    parser.add_argument("--small-count", type=int, default=10_000)
    parser.add_argument("--small-size", type=size, default=16 << 10)
    parser.add_argument("--no-buildgrid", action="store_true")
    parser.add_argument("--no-bazel", action="store_true")
    parser.add_argument(
        "--tls", action="store_true", help="also cachefs behind TLS with a token (its cost)"
    )
    parser.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        floor_server(args.floor_server)
        return 0
    servers: dict[str, Callable[[argparse.Namespace, Path], dict[str, float]]] = {
        "cachefs": bench_cachefs,
        "floor": bench_floor,
    }
    if args.tls:
        servers["cachefs+tls"] = bench_cachefs_tls
    if not args.no_buildgrid:
        servers["buildgrid"] = bench_buildgrid
    results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for run in range(args.runs):
            for name, bench in servers.items():
                results[name].append(bench(args, work))
                print(f"run {run + 1} {name}: {results[name][-1]}", file=sys.stderr)
        bazel = (
            [] if args.no_bazel else [bench_bazel(work / f"bazel-{i}") for i in range(args.runs)]
        )
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    print(
        f"{'figure':<30} {'cachefs':>10} {'floor':>10} {'buildgrid':>10} {'/floor':>8} {'/bgd':>8}"
    )
    for key, value in medians["cachefs"].items():
        floor = medians["floor"][key]
        bgd = medians.get("buildgrid", {}).get(key)
        print(
            f"{key:<30} {value:>10.1f} {floor:>10.1f} "
            f"{'-' if bgd is None else f'{bgd:.1f}':>10} {value / floor:>8.2f} "
            f"{'-' if bgd is None else f'{value / bgd:.2f}':>8}"
        )
    if args.tls:
        with tempfile.TemporaryDirectory(prefix="bench-keys-") as keys:
            sign, verify = signing_costs(Path(keys), max(args.runs, 5))
        print(f"\nsigning an action result: {sign:.0f} us, verifying it: {verify:.0f} us")
    if "cachefs+tls" in medians:
        print(f"\n{'figure':<30} {'plain':>10} {'TLS+token':>10} {'ratio':>8}")
        for key, value in medians["cachefs"].items():
            secured = medians["cachefs+tls"][key]
            print(f"{key:<30} {value:>10.1f} {secured:>10.1f} {secured / value:>8.2f}")
    if bazel:
        remote = statistics.median(b["bazel rebuild, remote cache s"] for b in bazel)
        disk = statistics.median(b["bazel rebuild, disk cache s"] for b in bazel)
        print(
            f"bazel clean rebuild: remote cache {remote:.2f} s, disk cache {disk:.2f} s, "
            f"ratio {remote / disk:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
