"""Mounting and unmounting a store (mount layer).

``mount`` checks what can be checked before anything changes (the mount point,
``/dev/fuse``, ``fusermount3``), then, unless in the foreground, forks: the
child opens the store, mounts, and tells the parent through a pipe that the
mount is ready (or why it failed), so that ``cachefs mount`` returns only once
the mount can be used and fails with the daemon's own error.  Under systemd
(``Type=notify``) readiness is also sent to ``$NOTIFY_SOCKET``.

The daemon logs to ``STORE/cachefs.log`` and, in the foreground, to stderr
(which systemd sends to the journal).  On SIGTERM or SIGINT, or when the file
system is unmounted from outside, it publishes every unpublished write,
syncs the store, unmounts if still mounted and exits 0.

``umount`` unmounts through ``fusermount3 -u`` and waits for the daemon to
exit; the daemon's pid and store are found in ``MOUNT/.cachefs/stats.json``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from cachefs.errors import CachefsError, ConfigError, MountError, NotFoundError
from cachefs.fs import DEFAULT_PUBLISH_THRESHOLD, Filesystem
from cachefs.fuse import Operations
from cachefs.header import read_header
from cachefs.memory import DEFAULT_MEMORY_LIMIT
from cachefs.store import Store, StoreOptions
from cachefs.trace import check_outside

log = logging.getLogger(__name__)

LOG_NAME = "cachefs.log"
FUSE_DEVICE = "/dev/fuse"
FSNAME = "cachefs"


def check_mountpoint(mountpoint: Path) -> Path:
    path = mountpoint.absolute()
    if not path.exists():
        raise MountError(
            f"mount point {path} does not exist", hint=f"create it first: mkdir -p {path}"
        )
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory", hint="mount on a directory")
    if os.path.ismount(path):
        raise MountError(
            f"{path} is already a mount point",
            hint=f"unmount it first (`cachefs umount {path}`) or choose another directory",
        )
    return path


def check_fuse() -> None:
    if not os.path.exists(FUSE_DEVICE):
        raise MountError(
            "/dev/fuse is missing: this machine (or container) has no FUSE",
            hint="load the fuse module (`modprobe fuse`), or give the container --device /dev/fuse",
        )
    if shutil.which("fusermount3") is None:
        raise MountError(
            "fusermount3 was not found on PATH",
            hint="install FUSE 3 (`apt-get install fuse3`)",
        )


def mount_options(store: Path, extra: list[str]) -> set[str]:
    """The FUSE options: ours, then the user's ``-o`` options (which may add
    ``allow_other``, ``ro``, ... or remove a default with ``no<option>``)."""
    fsname = str(store).replace(",", "_")
    options = {f"fsname={fsname}", f"subtype={FSNAME}", "default_permissions"}
    if os.geteuid() == 0:
        options.add("allow_other")  # other users' processes, kernel permission checks
    for group in extra:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt:
                continue
            if opt in ("nodefault_permissions", "noallow_other"):
                options.discard(opt[2:])
            else:
                options.add(opt)
    return options


def sd_notify(message: str) -> None:
    """Send a state to systemd, if it asked for notifications."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


def setup_logging(store: Path, *, foreground: bool, verbose: int) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.handlers.RotatingFileHandler(
        store / LOG_NAME, maxBytes=10 << 20, backupCount=3
    )
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(file_handler)
    if foreground:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("cachefs: %(levelname)s %(message)s"))
        stream.setLevel(logging.INFO if verbose else logging.WARNING)
        root.addHandler(stream)


def serve(
    store_path: Path,
    mountpoint: Path,
    options: set[str],
    *,
    ready: Callable[[], None],
    foreground: bool,
    verbose: int = 0,
    publish_threshold: int = DEFAULT_PUBLISH_THRESHOLD,
    cache_size: int | None = None,
    max_store_size: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    trace: Path | None = None,
) -> None:
    """Open the store, mount it, serve until unmounted or signalled."""
    store_options = StoreOptions() if cache_size is None else StoreOptions(cache_size=cache_size)
    store = Store.open(store_path, create=True, options=store_options)
    try:
        setup_logging(store.path, foreground=foreground, verbose=verbose)
        fs = Filesystem(
            store,
            publish_threshold=publish_threshold,
            max_store_size=max_store_size,
            memory_limit=memory_limit,
        )
        try:
            fs.control.info = {"mountpoint": str(mountpoint), "mount_options": sorted(options)}
            if trace is not None:
                fs.start_trace(trace)
            operations = Operations(fs)
            try:
                pyfuse3.init(operations, str(mountpoint), options)
            except RuntimeError as exc:
                raise MountError(f"cannot mount {mountpoint}: {exc}") from None
            log.info("mounted %s on %s (pid %d)", store.path, mountpoint, os.getpid())
            # Worker threads (ingest) must not keep the request loop waiting for
            # the GIL for the default 5 ms at a time.
            sys.setswitchinterval(0.0005)
            try:
                trio.run(_main, fs, ready)
            finally:
                # Not os.path.ismount(): a stat of our own mount would wait for
                # an answer that nobody is left to give.
                pyfuse3.close(unmount=mounted_fstype(mountpoint) is not None)
                sd_notify("STOPPING=1")
        finally:
            fs.close()
    finally:
        store.close()
    log.info("unmounted %s; store closed cleanly", mountpoint)


async def _main(fs: Filesystem, ready: Callable[[], None]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        await nursery.start(_stop_on_signal)  # before READY: a SIGTERM then stops cleanly
        ready()
        sd_notify("READY=1")
        await pyfuse3.main()
        log.info("file system unmounted or stopped; publishing what is left")
        await fs.flush_all()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("signal %d: stopping", signum)
            pyfuse3.terminate()


def mount(
    store: Path,
    mountpoint: Path,
    extra_options: list[str],
    *,
    foreground: bool,
    verbose: int = 0,
    publish_threshold: int = DEFAULT_PUBLISH_THRESHOLD,
    cache_size: int | None = None,
    max_store_size: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    trace: Path | None = None,
) -> None:
    """``cachefs mount``: returns once the mount is ready (or raises why not)."""
    mountpoint = check_mountpoint(mountpoint)
    check_fuse()
    store = store.absolute()
    if store.exists() and any(store.iterdir()):
        read_header(store)  # a newer or foreign store fails here, untouched
    options = mount_options(store, extra_options)
    kwargs: dict[str, Any] = {
        "foreground": foreground,
        "verbose": verbose,
        "publish_threshold": publish_threshold,
        "cache_size": cache_size,
        "max_store_size": max_store_size,
        "memory_limit": memory_limit,
        "trace": None if trace is None else check_outside(trace, mountpoint),
    }
    if foreground:
        serve(store, mountpoint, options, ready=lambda: None, **kwargs)
        return
    _daemonize(lambda ready: serve(store, mountpoint, options, ready=ready, **kwargs))


def _daemonize(run: Callable[[Callable[[], None]], None]) -> None:
    """Run ``run`` in a detached child; return in the parent once it calls ready()."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read()
        if answer.startswith(b"ok"):
            return
        if not answer:
            _, status = os.waitpid(pid, 0)
            raise CachefsError(
                f"the mount daemon exited before the mount was ready (status {status})",
                hint="run with --foreground to see why",
            )
        os.waitpid(pid, 0)
        status_text, _, message = answer.decode("utf-8", "replace").partition(" ")
        err = CachefsError(message.strip(), hint="")
        err.exit_code = int(status_text) if status_text.isdigit() else 1
        raise err
    # The child: a daemon of its own session, stdio on /dev/null.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    told = False

    def ready() -> None:
        nonlocal told
        os.write(write_fd, b"ok\n")
        os.close(write_fd)
        told = True

    code = 0
    try:
        run(ready)
    except CachefsError as exc:
        code = exc.exit_code
        if not told:
            os.write(write_fd, f"{exc.exit_code} {exc}".encode())
        log.error("%s", exc)
    except BaseException as exc:
        code = 1
        if not told:
            os.write(write_fd, f"1 unexpected error in the mount daemon: {exc!r}".encode())
        log.exception("unexpected error in the mount daemon")
    finally:
        logging.shutdown()
        os._exit(code)


# --- finding a mounted store ---------------------------------------------------------


def mounted_fstype(path: Path) -> str | None:
    """The type of the file system mounted exactly at ``path`` (from the mount
    table: never touches the mount itself, which may be dead)."""
    # Resolve symlinks in the parent only: a stat of a dead (or our own) mount hangs.
    absolute = Path(os.path.abspath(path))
    target = os.path.join(os.path.realpath(absolute.parent), absolute.name)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            for line in table:
                fields = line.split()
                separator = fields.index("-")
                point = _unescape(fields[4])
                if point == target:
                    found = fields[separator + 1]  # the last mount on a path wins
    except (OSError, ValueError):
        return None
    return found


def _unescape(field: str) -> str:
    """Mount table fields escape space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_info(path: Path) -> dict[str, Any] | None:
    """The live figures of the cachefs mounted at ``path`` (None if it is not one)."""
    stats = path / ".cachefs" / "stats.json"
    if not os.path.ismount(path):
        return None
    try:
        doc: dict[str, Any] = json.loads(stats.read_bytes())
    except (OSError, ValueError):
        return None
    return doc


def resolve_store(path: Path) -> Path:
    """A store path, or the store of the cachefs mounted at ``path``."""
    info = mount_info(path)
    return Path(info["store"]) if info else path


def control(mountpoint: Path, command: str) -> dict[str, Any]:
    """Run a command in the daemon of a mount (``/.cachefs/control``)."""
    path = mountpoint / ".cachefs" / "control"
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.write(fd, command.encode())
            pieces: list[bytes] = []
            while piece := os.pread(fd, 1 << 16, sum(map(len, pieces))):
                pieces.append(piece)
        finally:
            os.close(fd)
        answer: dict[str, Any] = json.loads(b"".join(pieces))
    except OSError as exc:
        raise CachefsError(
            f"cannot talk to the daemon of {mountpoint}: {exc.strerror}",
            hint="this needs root (or the daemon's user)",
        ) from None
    if not answer.get("ok"):
        raise CachefsError(f"the daemon of {mountpoint} refused {command!r}: {answer.get('error')}")
    return answer


def umount(mountpoint: Path, *, timeout: float = 120.0) -> None:
    """Unmount a cachefs mount and wait until its daemon has exited."""
    mountpoint = mountpoint.absolute()
    # The mount table first: a dead mount's root cannot even be stat'ed (ENOTCONN).
    if mounted_fstype(mountpoint) is None and not os.path.lexists(mountpoint):
        raise NotFoundError(f"{mountpoint} does not exist")
    info = mount_info(mountpoint)
    if info is None and mounted_fstype(mountpoint) == f"fuse.{FSNAME}":
        # A cachefs mount whose daemon died (kill -9, crash): detach it.
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, check=False)
        if mounted_fstype(mountpoint) is None:
            log.warning("%s was a dead cachefs mount (its daemon was gone): detached", mountpoint)
            return
    if info is None:
        raise ConfigError(
            f"{mountpoint} is not a cachefs mount",
            hint="give the directory the store is mounted on",
        )
    pid = int(info["pid"])
    result = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        hint = "check that no process uses it"
        if "busy" in reason.lower():
            hint = f"close the files and programs using it (`fuser -vm {mountpoint}`), then retry"
        raise MountError(f"cannot unmount {mountpoint}: {reason}", hint=hint)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise MountError(
                f"{mountpoint} is unmounted but its daemon (pid {pid}) is still running",
                hint=f"it may still be publishing data; see {info['store']}/{LOG_NAME}",
            )
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours (in tests) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
