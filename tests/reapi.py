"""REAPI servers and a client for tests, all on 127.0.0.1.

``serving(store)`` runs ``cachefs serve`` in a subprocess on free ports (port 0:
the addresses come from the daemon's control socket), waits until both servers
answer, and always stops it with SIGTERM (which must exit 0).

``buildgrid(tmp_path)`` runs BuildGrid (``bgd``, installed by
scripts/bootstrap.sh into ``.venv/buildgrid``, a venv of its own on Python
3.13) with a cache-only configuration: CAS, ByteStream and an action cache on
disk storage, instances ``""`` and ``main``.  It is the second REAPI
implementation the conformance suite runs against, so that the suite is known
to test the protocol and not our reading of it.

``Client`` wraps the generated stubs (the project's own ``.proto`` files) with
the few helpers the tests share: digests, resource names, uploads and reads.
A test whose server cannot start fails under ``CI=true`` and is skipped
elsewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from grpc import ChannelCredentials

from cachefs.daemon import mount_info
from cachefs.engine import SHA256, DigestFunction
from cachefs.format.header import read_header
from cachefs.protocol import bs_grpc, bs_pb2, re_grpc, re_pb2

ROOT = Path(__file__).resolve().parent.parent
CACHEFS = [sys.executable, "-m", "cachefs"]
BUILDGRID = ROOT / ".venv" / "buildgrid" / "bin" / "bgd"
READY_TIMEOUT = 60.0
#: The largest message either way (as the servers' own limit).
MAX_MESSAGE = 64 << 20

#: What a server implements beyond the RPCs every REAPI cache has.
ZSTD = "zstd"  # compressed-blobs/zstd resource names, zstd in batches
SPLIT = "split"  # SplitBlob and SpliceBlob
INLINE = "inline"  # inlined outputs in GetActionResult
NESTED = "nested"  # instance names of several segments
RESUMABLE = "resumable"  # ByteStream writes resumed after QueryWriteStatus, offsets checked
#: Requests checked past what BuildGrid checks (each a MAY or unspecified in the API):
#: batch limits enforced, digests and digest functions validated, action results that
#: name missing blobs or paths outside the working directory refused, malformed
#: protobufs answered INVALID_ARGUMENT (BuildGrid: INTERNAL, from grpcio).
VALIDATES = "validates"


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def wait_until(condition: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"{what} exited ({process.returncode}): {read_log(log)}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{what} was not ready after {READY_TIMEOUT}s: {read_log(log)}")
        time.sleep(0.05)


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


# --- servers ---------------------------------------------------------------------------


@dataclass
class Server:
    """A running REAPI server."""

    name: str
    grpc: str
    function: DigestFunction
    features: frozenset[str]
    process: subprocess.Popen[bytes]
    log: Path
    http: str | None = None
    store: Path | None = None
    instances: tuple[str, ...] = ("", "main")
    extra: dict[str, Any] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        return feature in self.features

    def client(
        self,
        instance: str = "",
        *,
        token: str | None = None,
        tls: ChannelCredentials | None = None,
    ) -> Client:
        return Client(self.grpc, self.function, instance, token=token, tls=tls)


CACHEFS_FEATURES = frozenset({ZSTD, SPLIT, INLINE, NESTED, RESUMABLE, VALIDATES})


def start_serve(store: Path, *args: str, grpc_on: bool = True, http_on: bool = True) -> Server:
    """``cachefs serve STORE`` in the foreground on free ports of 127.0.0.1."""
    store.parent.mkdir(parents=True, exist_ok=True)
    log = store.parent / f"{store.name}.serve.log"
    argv = [*CACHEFS, "-v", "serve", str(store), *args]
    if grpc_on:
        argv += ["--grpc", "127.0.0.1:0"]
    if http_on:
        argv += ["--http", "127.0.0.1:0"]
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    info: dict[str, Any] = {}

    def ready() -> bool:
        if not (store / "control.sock").exists():
            return False
        doc = mount_info(store)
        if doc is None or "servers" not in doc:
            return False
        info.update(doc)
        return True

    wait_until(ready, "cachefs serve", process, log)
    servers = info["servers"]
    return Server(
        name="cachefs",
        grpc=servers["grpc"] or "",
        http=servers["http"],
        function=read_header(store).config.digest,
        features=CACHEFS_FEATURES,
        process=process,
        log=log,
        store=store,
        instances=("", "main", "team/linux"),
    )


def stop_serve(server: Server, *, timeout: float = 60.0) -> int:
    """SIGTERM, and the exit status (the test fails if it does not exit)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail(f"cachefs serve did not stop within {timeout}s: {read_log(server.log)}")


@contextmanager
def serving(store: Path, *args: str, **kwargs: bool) -> Iterator[Server]:
    server = start_serve(store, *args, **kwargs)
    try:
        yield server
    finally:
        status = stop_serve(server)
    assert status == 0, f"cachefs serve exited {status}: {read_log(server.log)}"


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a gRPC call ends with (OK if it raises nothing)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


BUILDGRID_CONFIG = """\
description: cachefs tests - a reference REAPI cache
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
thread-pool-size: 16
storages:
  - !disk-storage &cas-storage
    path: {cas}
caches:
  - !lru-action-cache &ac
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
      - !action-cache
        cache: *ac
  - name: "main"
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
      - !action-cache
        cache: *ac
"""


@contextmanager
def buildgrid(directory: Path) -> Iterator[Server]:
    """BuildGrid serving a disk CAS and an action cache on a free port."""
    if not BUILDGRID.exists():
        unavailable(f"BuildGrid is not installed at {BUILDGRID} (run scripts/bootstrap.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cas").mkdir(exist_ok=True)
    port = free_port()
    config = directory / "bgd.yml"
    config.write_text(BUILDGRID_CONFIG.format(port=port, cas=directory / "cas"))
    log = directory / "bgd.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(BUILDGRID), "server", "start", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=directory,
            start_new_session=True,
        )
    server = Server(
        name="buildgrid",
        grpc=f"127.0.0.1:{port}",
        function=SHA256,
        features=frozenset(),
        process=process,
        log=log,
    )
    try:
        client = server.client()

        def ready() -> bool:
            try:
                client.capabilities()
            except grpc.RpcError:
                return False
            return True

        wait_until(ready, "BuildGrid", process, log)
        client.close()
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started in a session of its own: SIGTERM to its process
    group, SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- a client ---------------------------------------------------------------------------


class _Header(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization`` to the metadata of every call."""

    def __init__(self, value: str) -> None:
        self.value = value

    def _with(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", self.value)]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with(details), requests)


class Client:
    """The REAPI stubs on one channel, and helpers."""

    def __init__(
        self,
        address: str,
        function: DigestFunction,
        instance: str = "",
        *,
        token: str | None = None,
        tls: grpc.ChannelCredentials | None = None,
    ) -> None:
        """With ``token``, every call carries ``authorization: Bearer <token>``;
        with ``tls``, the channel is TLS."""
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        self.channel = (
            grpc.insecure_channel(address, options=options)
            if tls is None
            else grpc.secure_channel(address, tls, options=options)
        )
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, _Header("Bearer " + token))
        self.function = function
        self.instance = instance
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        self.caps = re_grpc.CapabilitiesStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- names ---

    def digest(self, data: bytes) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.function.hash(data).hex(), size_bytes=len(data))

    def _prefix(self, instance: str | None) -> str:
        name = self.instance if instance is None else instance
        return f"{name}/" if name else ""

    def _function_part(self) -> str:
        return "" if self.function.name == "sha256" else f"{self.function.name}/"

    def read_name(
        self, digest: re_pb2.Digest, *, zstd: bool = False, instance: str | None = None
    ) -> str:
        kind = "compressed-blobs/zstd" if zstd else "blobs"
        return (
            f"{self._prefix(instance)}{kind}/{self._function_part()}"
            f"{digest.hash}/{digest.size_bytes}"
        )

    def write_name(
        self,
        digest: re_pb2.Digest,
        *,
        zstd: bool = False,
        instance: str | None = None,
        upload: str | None = None,
    ) -> str:
        kind = "compressed-blobs/zstd" if zstd else "blobs"
        return (
            f"{self._prefix(instance)}uploads/{upload or uuid.uuid4()}/{kind}/"
            f"{self._function_part()}{digest.hash}/{digest.size_bytes}"
        )

    # --- calls ---

    def capabilities(self) -> re_pb2.ServerCapabilities:
        return self.caps.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name=self.instance), timeout=10
        )

    def find_missing(
        self, digests: list[re_pb2.Digest], instance: str | None = None
    ) -> list[re_pb2.Digest]:
        response = self.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance if instance is None else instance,
                blob_digests=digests,
            ),
            timeout=60,
        )
        return list(response.missing_blob_digests)

    def write(
        self,
        data: bytes,
        *,
        piece: int = 1 << 20,
        instance: str | None = None,
        digest: re_pb2.Digest | None = None,
    ) -> bs_pb2.WriteResponse:
        """Upload ``data`` over ByteStream (``digest``: what it is said to be)."""
        digest = digest or self.digest(data)
        name = self.write_name(digest, instance=instance)

        def requests() -> Iterator[bs_pb2.WriteRequest]:
            offset = 0
            while True:
                chunk = data[offset : offset + piece]
                last = offset + len(chunk) >= len(data)
                yield bs_pb2.WriteRequest(
                    resource_name=name if offset == 0 else "",
                    write_offset=offset,
                    data=chunk,
                    finish_write=last,
                )
                offset += len(chunk)
                if last:
                    return

        response: bs_pb2.WriteResponse = self.bytestream.Write(requests(), timeout=120)
        return response

    def read(
        self,
        digest: re_pb2.Digest,
        *,
        offset: int = 0,
        limit: int = 0,
        zstd: bool = False,
        instance: str | None = None,
    ) -> bytes:
        name = self.read_name(digest, zstd=zstd, instance=instance)
        responses = self.bytestream.Read(
            bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit),
            timeout=120,
        )
        return b"".join(r.data for r in responses)

    def update_blobs(
        self, blobs: list[bytes], instance: str | None = None
    ) -> re_pb2.BatchUpdateBlobsResponse:
        return self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance if instance is None else instance,
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=self.digest(b), data=b)
                    for b in blobs
                ],
            ),
            timeout=120,
        )
