"""Mounting a store (daemon layer).

``mount`` checks what can be checked before anything changes (the mount point,
``/dev/fuse``, ``fusermount3``), then, unless in the foreground, detaches
(``_process.detach``): the daemon opens the store, mounts, and the command
returns once the mount can be used (the kernel's INIT is answered; as root,
the daemon raises the kernel's read-ahead in the mount to a FUSE request's
largest, ``READ_AHEAD_KB``, just before).  Under systemd (``Type=notify``)
readiness is also sent to ``$NOTIFY_SOCKET``.

With ``--grpc``/``--http`` the daemon also serves the store to build tools
(``cachefs.server``), since one process owns a store; with ``--metrics`` it
serves Prometheus metrics (``_metrics.py``).

On SIGTERM or SIGINT, or when the file system is unmounted from outside, the
daemon stops its servers, publishes every unpublished write, syncs the store,
unmounts if still mounted and exits 0.

``umount`` is in ``_mounts.py``: it needs none of this.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from cachefs.daemon._metrics import DaemonMetrics
from cachefs.daemon._mounts import FSNAME, mounted_fstype
from cachefs.daemon._options import DaemonOptions, running_filesystem
from cachefs.daemon._process import detach, settle_heap, unwrap_group
from cachefs.daemon._systemd import sd_notify
from cachefs.errors import MountError
from cachefs.format.header import read_header
from cachefs.fs import DEFAULT_PUBLISH_THRESHOLD, Filesystem, check_outside
from cachefs.fuse import Operations
from cachefs.server import ServeOptions, check_addresses, run_servers

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
#: The kernel's read-ahead in the mount (KiB): a FUSE read request's largest
#: (256 pages, ``fs.fuse.max_pages_limit``'s default).  The kernel's default of
#: 128 KiB cuts a sequential read into 8 times as many requests, each a round
#: trip through this daemon: reading 512 MiB took 0.53 s that way, 0.30 s so.
READ_AHEAD_KB = 1024


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


def serve(
    store_path: Path,
    mountpoint: Path,
    fuse_options: set[str],
    options: DaemonOptions,
    *,
    ready: Callable[[], None],
    foreground: bool,
    publish_threshold: int = DEFAULT_PUBLISH_THRESHOLD,
    trace: Path | None = None,
    servers: ServeOptions | None = None,
    scrub_rate: int | None = None,
) -> None:
    """Open the store, mount it, serve until unmounted or signalled (and with
    ``servers``, serve it over gRPC and HTTP too; with ``options.metrics``, an
    address, Prometheus metrics)."""
    with running_filesystem(
        store_path,
        options,
        role="mount",
        foreground=foreground,
        publish_threshold=publish_threshold,
    ) as (fs, observed):
        fs.control.info = {"mountpoint": str(mountpoint), "mount_options": sorted(fuse_options)}
        if trace is not None:
            fs.start_trace(trace)
        operations = Operations(fs, None if observed is None else observed.metrics.fuse)
        try:
            pyfuse3.init(operations, str(mountpoint), fuse_options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mountpoint}: {exc}") from None
        log.info("mounted %s on %s (pid %d)", fs.store.path, mountpoint, os.getpid())
        # Worker threads (ingest) must not keep the request loop waiting for
        # the GIL for the default 5 ms at a time.
        sys.setswitchinterval(0.0005)
        try:
            trio.run(_main, fs, mountpoint, ready, servers or ServeOptions(), scrub_rate, observed)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
        finally:
            # Not os.path.ismount(): a stat of our own mount would wait for
            # an answer that nobody is left to give.
            pyfuse3.close(unmount=mounted_fstype(mountpoint) is not None)
            sd_notify("STOPPING=1")
    log.info("unmounted %s; store closed cleanly", mountpoint)


def raise_read_ahead(mountpoint: Path, device: int) -> None:
    """Let the kernel read ahead ``READ_AHEAD_KB`` in the mount of ``device``
    (its root's ``st_dev``), where its default for a FUSE mount is 128 KiB
    (``/sys/class/bdi/MAJOR:MINOR``, which only root may change: others keep
    the default).  Only once the kernel's INIT is answered: its answer sets
    the read-ahead again."""
    setting = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        setting.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.info("read-ahead of %s left at the kernel's default: %s", mountpoint, exc)


async def _ready_when_answering(mountpoint: Path, ready: Callable[[], None]) -> None:
    """Say the mount is ready once the kernel's INIT is answered (a stat of
    its root waits for that, and is then answered by the request loop);
    raise its read-ahead first."""
    try:
        root = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except OSError as exc:
        log.warning("the new mount %s does not answer: %s", mountpoint, exc)
    else:
        raise_read_ahead(mountpoint, root.st_dev)
    settle_heap()
    ready()
    sd_notify("READY=1")


async def _main(
    fs: Filesystem,
    mountpoint: Path,
    ready: Callable[[], None],
    options: ServeOptions,
    scrub_rate: int | None,
    observed: DaemonMetrics | None,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        if scrub_rate is not None:
            nursery.start_soon(functools.partial(fs.scrubber.run, scrub_rate))
        await nursery.start(_stop_on_signal)  # before READY: a SIGTERM then stops cleanly
        metrics = None
        if observed is not None:
            fs.control.info["metrics"] = await nursery.start(observed.run, fs, "mount")
            metrics = observed.metrics
        async with trio.open_nursery() as servers:
            if options.any:
                listening = await servers.start(
                    functools.partial(run_servers, fs, options, metrics=metrics)
                )
                fs.control.info["servers"] = listening.as_dict()
            servers.start_soon(_ready_when_answering, mountpoint, ready)
            await pyfuse3.main()
            # The servers stop first: their calls in flight need the filesystem.
            servers.cancel_scope.cancel()
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
    options: DaemonOptions | None = None,
    *,
    foreground: bool,
    publish_threshold: int = DEFAULT_PUBLISH_THRESHOLD,
    trace: Path | None = None,
    servers: ServeOptions | None = None,
    scrub_rate: int | None = None,
) -> None:
    """``cachefs mount``: returns once the mount is ready (or raises why not)."""
    options = options or DaemonOptions()
    mountpoint = check_mountpoint(mountpoint)
    check_fuse()
    store = store.absolute()
    if store.exists() and any(store.iterdir()):
        read_header(store)  # a newer or foreign store fails here, untouched
    fuse_options = mount_options(store, extra_options)
    if servers is not None:
        check_addresses(servers)
    options.check()
    run = functools.partial(
        serve,
        store,
        mountpoint,
        fuse_options,
        options,
        foreground=foreground,
        publish_threshold=publish_threshold,
        trace=None if trace is None else check_outside(trace, mountpoint),
        servers=servers,
        scrub_rate=scrub_rate,
    )
    if foreground:
        run(ready=lambda: None)
        return
    detach(lambda ready: run(ready=ready))
