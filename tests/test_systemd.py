"""The systemd units in ``systemd/``.

``systemd-analyze verify`` must accept them, instantiated, without a single warning;
the services must not get a mount namespace of their own (the mount would not reach
the host); and the mount unit's commands, run the way systemd runs them, must work
against a real mount: the environment file, the notify protocol (READY=1 only once
the mount answers, STOPPING=1 when stopping), ExecStop= and SIGTERM stopping
cleanly, ExecStopPost= detaching the dead mount of a killed daemon and nothing else.

systemd need not be running: :class:`ServiceRunner` is a stand-in for the service
manager that reads the commands from the unit file.  It knows the few parts of the
unit syntax the units use (specifiers %i %f %%, Environment=, EnvironmentFile=,
$VAR / ${VAR} / $$, the "-" prefix) and refuses anything else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cachefs.daemon import mount_info
from cachefs.engine import SHA256
from tests.mounting import require_fuse
from tests.reapi import Client

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
MOUNT_UNIT = "cachefs@.service"
GC_UNIT = "cachefs-gc@.service"
GC_TIMER = "cachefs-gc@.timer"
SCRUB_UNIT = "cachefs-scrub@.service"
SCRUB_TIMER = "cachefs-scrub@.timer"
SERVE_UNIT = "cachefs-serve@.service"
UNITS = (MOUNT_UNIT, GC_UNIT, GC_TIMER, SCRUB_UNIT, SCRUB_TIMER, SERVE_UNIT)
INSTANCES = (
    "cachefs@mnt-cache.service",
    "cachefs-gc@mnt-cache.service",
    "cachefs-gc@mnt-cache.timer",
    "cachefs-scrub@mnt-cache.service",
    "cachefs-scrub@mnt-cache.timer",
    "cachefs-serve@team.service",
)
#: Where the units expect the command (systemd/README.md says how to link it).
SHIPPED_CACHEFS = "/usr/local/bin/cachefs"
#: Where the units read their environment files from.
CONFIG_DIR = "/etc/cachefs/"
#: The PATH systemd gives system services.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 30.0

#: Settings that give a service a mount namespace of its own (systemd.exec(5)): a
#: FUSE mount made inside one never reaches the host.  (PrivateUsers= is a user
#: namespace, in which mounting cannot work at all.)
MOUNT_NAMESPACE_SETTINGS = {
    "BindPaths",
    "BindReadOnlyPaths",
    "DynamicUser",
    "ExecPaths",
    "InaccessiblePaths",
    "MountAPIVFS",
    "NoExecPaths",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateTmp",
    "PrivateUsers",
    "ProcSubset",
    "ProtectControlGroups",
    "ProtectHome",
    "ProtectKernelLogs",
    "ProtectKernelModules",
    "ProtectKernelTunables",
    "ProtectProc",
    "ProtectSystem",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "RootDirectory",
    "RootImage",
    "TemporaryFileSystem",
}
OFF = {"", "no", "false", "off", "0"}


def require_tool(name: str) -> str:
    """The path of a systemd tool: skip without it, but fail under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- the unit files ----------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section name -> its (key, value) pairs in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not supported"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"{path.name}: cannot parse {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def cachefs_wrapper(directory: Path) -> Path:
    """An executable running this checkout's cachefs, standing in for SHIPPED_CACHEFS."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cachefs"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cachefs "$@"\n')
    path.chmod(0o755)
    return path


def install_units(directory: Path, cachefs: Path) -> None:
    """Copy the units to ``directory``, running ``cachefs`` instead of SHIPPED_CACHEFS."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        (directory / name).write_text(text.replace(SHIPPED_CACHEFS, str(cachefs)))


def escape_path(path: str) -> str:
    """``systemd-escape --path``: the instance name of a mount point."""
    text = "/".join(part for part in path.split("/") if part)
    if not text:
        return "-"
    out: list[str] = []
    for i, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_.") and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


# --- a stand-in for the service manager --------------------------------------------


@dataclass
class Command:
    argv: list[str]
    ignore_failure: bool  # the "-" prefix


def read_environment_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: cannot parse {raw!r}"
        env[key.strip()] = " ".join(shlex.split(value))
    return env


class ServiceRunner:
    """The [Service] section of a unit, instantiated for a mount point.

    Environment files are read from ``config_dir`` instead of /etc/cachefs.
    """

    def __init__(self, unit: Path, mountpoint: Path, config_dir: Path) -> None:
        self.instance = escape_path(str(mountpoint))
        self.mountpoint = mountpoint
        self.settings = [
            (key, self._specifiers(value)) for key, value in read_unit(unit)["Service"]
        ]
        self.env: dict[str, str] = {}
        for key, value in self.settings:
            if key == "Environment":
                for assignment in shlex.split(value):
                    name, _, text = assignment.partition("=")
                    self.env[name] = text
        for key, value in self.settings:  # files override Environment=, in any order
            if key == "EnvironmentFile":
                path = value.removeprefix("-")
                assert path.startswith(CONFIG_DIR), f"unexpected EnvironmentFile={value}"
                local = config_dir / path.removeprefix(CONFIG_DIR)
                if local.exists():
                    self.env.update(read_environment_file(local))
                else:
                    assert value.startswith("-"), f"{path} is required but missing"

    def _specifiers(self, text: str) -> str:
        def expand(match: re.Match[str]) -> str:
            letter = match.group(1)
            if letter == "%":
                return "%"
            if letter == "i":
                return self.instance
            if letter == "f":
                return str(self.mountpoint)
            raise AssertionError(f"specifier %{letter} is not supported by this stand-in")

        return re.sub(r"%(.)", expand, text)

    def commands(self, key: str, extra: dict[str, str] | None = None) -> list[Command]:
        env = {**self.env, **(extra or {})}
        out = []
        for k, line in self.settings:
            if k != key:
                continue
            prefixes = re.match(r"[-@:+!]*", line)
            assert prefixes is not None
            assert set(prefixes.group()) <= {"-"}, f"prefix not supported here: {line}"
            argv: list[str] = []
            for word in shlex.split(line[prefixes.end() :]):
                whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
                if whole:  # $VAR as a word: split at whitespace, maybe into nothing
                    argv.extend(env.get(whole.group(1), "").split())
                    continue
                argv.append(
                    re.sub(
                        r"\$\$|\$\{([A-Za-z_]\w*)\}",
                        lambda m: "$" if m.group() == "$$" else env.get(m.group(1), ""),
                        word,
                    )
                )
            out.append(Command(argv, ignore_failure=bool(prefixes.group())))
        return out

    @property
    def umask(self) -> int:
        values = [value for key, value in self.settings if key == "UMask"]
        return int(values[-1], 8) if values else 0o022

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", **self.env, **(extra or {})}

    def run(self, key: str, **extra: str) -> list[subprocess.CompletedProcess[str]]:
        """Run every ``key=`` command in turn, as systemd would; fail the test on an
        error that the unit does not tell systemd to ignore."""
        results = []
        for command in self.commands(key, extra):
            result = subprocess.run(
                command.argv,
                env=self.process_env(extra),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd="/",
                umask=self.umask,
            )
            if result.returncode != 0 and not command.ignore_failure:
                pytest.fail(f"{key}={command.argv} exited {result.returncode}: {result.stderr}")
            results.append(result)
        return results


# --- the notify protocol and the mount ---------------------------------------------


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def _receive(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        self.messages.extend(data.decode().splitlines())

    def drain(self) -> list[str]:
        self._receive(0.2)
        while True:
            count = len(self.messages)
            self._receive(0.01)
            if len(self.messages) == count:
                return self.messages

    def wait_for(
        self, message: str, process: subprocess.Popen[bytes], log: Path, since: int = 0
    ) -> None:
        """Wait until ``message`` is among the messages from index ``since`` on."""
        deadline = time.monotonic() + TIMEOUT
        while message not in self.messages[since:]:
            if process.poll() is not None:
                self.drain()
                if message in self.messages[since:]:
                    return
                pytest.fail(
                    f"the daemon exited ({process.returncode}) before {message}: "
                    f"{log.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {message} after {TIMEOUT}s: {log.read_text(errors='replace')}")
            self._receive(0.1)

    def close(self) -> None:
        self.sock.close()


def in_mount_table(path: Path) -> bool:
    """Is ``path`` a mount point, dead or alive?  (No stat: that may hang or fail.)"""
    with open("/proc/self/mountinfo") as table:
        for line in table:
            field = line.split()[4]
            if re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field) == str(path):
                return True
    return False


def probe(mountpoint: Path) -> dict[str, Any] | None:
    """The mount's stats.json if it is a mount that answers, else None.  In another
    process, so that a daemon that does not answer cannot hang the test."""
    script = (
        "import json, os, sys\n"
        "path = sys.argv[1]\n"
        "if os.path.ismount(path):\n"
        "    print(open(os.path.join(path, '.cachefs', 'stats.json')).read())\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mountpoint} does not answer")
    if result.returncode != 0 or not result.stdout.strip():
        return None
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


class MountService:
    """cachefs@<mountpoint>.service, run by the stand-in in a temporary directory."""

    def __init__(self, tmp_path: Path, options: str = "") -> None:
        self.tmp_path = tmp_path
        self.store = tmp_path / "store"
        self.mountpoint = tmp_path / "mnt" / "cache"
        self.log = tmp_path / "daemon.log"
        units = tmp_path / "units"
        install_units(units, cachefs_wrapper(tmp_path / "bin"))
        config_dir = tmp_path / "etc"
        config_dir.mkdir()
        instance = escape_path(str(self.mountpoint))
        (config_dir / f"{instance}.conf").write_text(
            f"# written by {__name__}\nCACHEFS_STORE={self.store}\nCACHEFS_OPTIONS={options}\n"
        )
        self.unit = ServiceRunner(units / MOUNT_UNIT, self.mountpoint, config_dir)
        self.notify = NotifySocket(tmp_path / "notify")
        self.since = 0  # the first notify message of the latest start
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        """ExecStartPre=, then ExecStart= with $NOTIFY_SOCKET (not yet waiting for it)."""
        self.unit.run("ExecStartPre")
        self.since = len(self.notify.messages)
        (command,) = self.unit.commands("ExecStart")
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                command.argv,
                env=self.unit.process_env({"NOTIFY_SOCKET": str(self.notify.path)}),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                umask=self.unit.umask,
            )
        self.processes.append(process)
        return process

    def start_ready(self) -> subprocess.Popen[bytes]:
        """Start and wait for READY=1; the mount must answer by then."""
        process = self.start()
        self.notify.wait_for("READY=1", process, self.log, self.since)
        assert in_mount_table(self.mountpoint), "READY=1 before the mount"
        stats = probe(self.mountpoint)
        assert stats is not None, f"READY=1, but {self.mountpoint} does not answer"
        assert stats["pid"] == process.pid
        return process

    def wait(self, process: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within {timeout}s: {self.daemon_log()}")

    def daemon_log(self) -> str:
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if in_mount_table(self.mountpoint):
            subprocess.run(
                ["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False
            )
        self.notify.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[MountService]:
    require_fuse()
    running = MountService(tmp_path, options="-o noatime --cache-size 16M")
    try:
        yield running
    finally:
        running.cleanup()


# --- the tests -------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    install_units(tmp_path, cachefs_wrapper(tmp_path / "bin"))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in INSTANCES)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings to systemd-analyze: none either.
    ours = [line for line in output.splitlines() if "cachefs" in line]
    assert not ours, output


def test_shipped_units_run_the_documented_command() -> None:
    for name in (MOUNT_UNIT, GC_UNIT, SCRUB_UNIT, SERVE_UNIT):
        for key, value in read_unit(UNIT_DIR / name)["Service"]:
            if key.startswith("Exec") and "cachefs" in value.split()[0]:
                assert value.lstrip("-").split()[0] == SHIPPED_CACHEFS, f"{name}: {key}={value}"
    assert SHIPPED_CACHEFS in (UNIT_DIR / "README.md").read_text()


@pytest.mark.parametrize("path", ["/mnt/cache", "/srv/build cache/x-y", "/.hidden//dir/", "/"])
def test_escape_path_matches_systemd_escape(path: str) -> None:
    escape = require_tool("systemd-escape")
    result = subprocess.run([escape, "--path", path], capture_output=True, text=True, check=True)
    assert escape_path(path) == result.stdout.strip()


@pytest.mark.parametrize("name", [MOUNT_UNIT, GC_UNIT, SCRUB_UNIT])
def test_services_stay_in_the_host_mount_namespace(name: str) -> None:
    private = [
        f"{key}={value}"
        for key, value in read_unit(UNIT_DIR / name)["Service"]
        if key in MOUNT_NAMESPACE_SETTINGS and value.lower() not in OFF
    ]
    assert not private, f"{name} would get a mount namespace of its own: {private}"


def test_mount_unit_is_a_notify_service_with_fuse_access() -> None:
    service = dict(read_unit(UNIT_DIR / MOUNT_UNIT)["Service"])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["KillSignal"] == "SIGTERM"
    assert "/dev/fuse rw" in service["DeviceAllow"]
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"].split()
    assert "@mount" in service["SystemCallFilter"].split()


def test_gc_runs_through_the_mount(tmp_path: Path) -> None:
    runner = ServiceRunner(UNIT_DIR / GC_UNIT, Path("/mnt/cache"), tmp_path)
    (command,) = runner.commands("ExecStart")
    assert command.argv == [SHIPPED_CACHEFS, "gc", "/mnt/cache"]  # the daemon does the gc
    unit = dict(read_unit(UNIT_DIR / GC_UNIT)["Unit"])
    assert unit["Requisite"] == unit["After"] == "cachefs@%i.service"
    timer = dict(read_unit(UNIT_DIR / GC_TIMER)["Timer"])
    assert timer["Persistent"] == "true"


def test_scrub_runs_through_the_mount_weekly(tmp_path: Path) -> None:
    runner = ServiceRunner(UNIT_DIR / SCRUB_UNIT, Path("/mnt/cache"), tmp_path)
    (command,) = runner.commands("ExecStart")
    assert command.argv == [SHIPPED_CACHEFS, "scrub", "--rate", "50M", "/mnt/cache"]
    unit = dict(read_unit(UNIT_DIR / SCRUB_UNIT)["Unit"])
    assert unit["Requisite"] == unit["After"] == "cachefs@%i.service"
    timer = dict(read_unit(UNIT_DIR / SCRUB_TIMER)["Timer"])
    assert (timer["OnCalendar"], timer["Persistent"]) == ("weekly", "true")


def test_store_defaults_without_a_config_file(tmp_path: Path) -> None:
    runner = ServiceRunner(UNIT_DIR / MOUNT_UNIT, Path("/mnt/cache"), tmp_path)
    (command,) = runner.commands("ExecStart")
    assert command.argv == [
        SHIPPED_CACHEFS,
        "-v",
        "mount",
        "--foreground",
        "/var/lib/cachefs/mnt-cache",
        "/mnt/cache",
    ]


def test_ready_when_usable_and_execstop_unmounts(service: MountService) -> None:
    assert not service.mountpoint.parent.exists()  # ExecStartPre= makes it
    process = service.start_ready()
    # Every user can reach the mount; only root can read the store underneath.
    assert service.mountpoint.parent.stat().st_mode & 0o777 == 0o755
    assert service.store.stat().st_mode & 0o777 == 0o700
    stats = probe(service.mountpoint)
    assert stats is not None
    assert stats["store"] == str(service.store)  # from the environment file
    assert "noatime" in stats["mount_options"]
    (service.mountpoint / "artifact.o").write_bytes(b"compiled" * 1000)

    service.unit.run("ExecStop")
    assert process.poll() == 0, service.daemon_log()  # `cachefs umount` waited for it
    assert not in_mount_table(service.mountpoint)
    assert service.notify.drain() == ["READY=1", "STOPPING=1"]
    service.unit.run("ExecStopPost", EXIT_CODE="exited", EXIT_STATUS="0")

    # Started again, the file is there.
    process = service.start_ready()
    assert (service.mountpoint / "artifact.o").read_bytes() == b"compiled" * 1000
    service.unit.run("ExecStop")
    assert service.wait(process) == 0


def test_sigterm_stops_cleanly(service: MountService) -> None:
    process = service.start_ready()
    process.send_signal(signal.SIGTERM)
    assert service.wait(process) == 0, service.daemon_log()
    assert not in_mount_table(service.mountpoint)
    assert service.notify.drain() == ["READY=1", "STOPPING=1"]


@pytest.mark.parametrize("trigger", ["never looked at", "file created in the root"])
def test_sigterm_stops_the_daemon(service: MountService, trigger: str) -> None:
    process = service.start()
    service.notify.wait_for("READY=1", process, service.log)
    if trigger == "file created in the root":
        (service.mountpoint / "artifact.o").write_bytes(b"x" * 100_000)
    # Right after READY=1: the SIGTERM handler is in place before it is sent, and
    # stopping must not look at the (stale) root of the mount.
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        status = None
    assert status == 0, service.daemon_log()
    assert not in_mount_table(service.mountpoint)


def test_execstoppost_detaches_the_mount_of_a_killed_daemon(service: MountService) -> None:
    process = service.start_ready()
    process.kill()
    process.wait()
    assert in_mount_table(service.mountpoint)  # dead: "Transport endpoint is not connected"

    service.unit.run("ExecStopPost", EXIT_CODE="exited", EXIT_STATUS="1")
    assert in_mount_table(service.mountpoint), "detached although the daemon was not killed"
    service.unit.run("ExecStopPost", EXIT_CODE="killed", EXIT_STATUS="KILL")
    assert not in_mount_table(service.mountpoint)

    # Restart= can mount again.
    process = service.start_ready()
    service.unit.run("ExecStop")
    assert service.wait(process) == 0


def test_failed_start_leaves_another_mount_alone(service: MountService) -> None:
    other_store = service.tmp_path / "other-store"
    service.mountpoint.mkdir(parents=True)
    other = subprocess.run(
        [sys.executable, "-m", "cachefs", "mount", str(other_store), str(service.mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert other.returncode == 0, other.stderr
    try:
        process = service.start()
        assert service.wait(process) == 8  # MountError: already a mount point
        # A failed start runs ExecStopPost= only (ExecStop= needs a started service).
        service.unit.run("ExecStopPost", EXIT_CODE="exited", EXIT_STATUS="8")
        stats = probe(service.mountpoint)
        assert stats is not None
        assert stats["store"] == str(other_store)
    finally:
        subprocess.run(
            [sys.executable, "-m", "cachefs", "umount", str(service.mountpoint)],
            capture_output=True,
            check=False,
        )
    assert not in_mount_table(service.mountpoint)


# --- cachefs-serve@.service ------------------------------------------------------------


def test_serve_store_defaults_without_a_config_file(tmp_path: Path) -> None:
    runner = ServiceRunner(UNIT_DIR / SERVE_UNIT, Path("/team"), tmp_path)
    (command,) = runner.commands("ExecStart")
    assert command.argv == [SHIPPED_CACHEFS, "-v", "serve", "/var/lib/cachefs/serve-team"]
    service = dict(read_unit(UNIT_DIR / SERVE_UNIT)["Service"])
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(service["RestrictAddressFamilies"].split())


def test_serve_unit_ready_when_serving_and_sigterm_stops(tmp_path: Path) -> None:
    store = tmp_path / "store"
    units = tmp_path / "units"
    install_units(units, cachefs_wrapper(tmp_path / "bin"))
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "serve-team.conf").write_text(
        f"CACHEFS_STORE={store}\n"
        'CACHEFS_OPTIONS="--grpc 127.0.0.1:0 --http 127.0.0.1:0 --max-size 1G"\n'
    )
    unit = ServiceRunner(units / SERVE_UNIT, Path("/team"), config_dir)
    notify = NotifySocket(tmp_path / "notify")
    log = tmp_path / "serve.log"
    (command,) = unit.commands("ExecStart")
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command.argv,
            env=unit.process_env({"NOTIFY_SOCKET": str(notify.path)}),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd="/",
            umask=unit.umask,
        )
    try:
        notify.wait_for("READY=1", process, log)
        # READY=1 once both servers answer.
        info = mount_info(store)
        assert info is not None and info["pid"] == process.pid
        assert info["caches"][0]["max_size"] == 1 << 30
        with Client(info["servers"]["grpc"], SHA256) as client:
            assert client.capabilities().cache_capabilities.action_cache_update_capabilities
        host, port = info["servers"]["http"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10):
            pass
        assert store.stat().st_mode & 0o777 == 0o700
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert notify.drain() == ["READY=1", "STOPPING=1"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
