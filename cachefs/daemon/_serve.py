"""``cachefs serve``: a store served over gRPC and HTTP, with no mount (daemon layer).

The process owns the store, as a mount's daemon does: it opens the store, runs
the filesystem (eviction, the quota, the memory limit) without FUSE, and the
servers (``cachefs.server``) beside it.  In the foreground by default, where
systemd wants it (``Type=notify``: READY=1 once both servers listen); with
``--daemon`` it detaches and the command returns once they do.

A served store has no ``/.cachefs``: its live figures and commands (``cachefs
stats``, ``cachefs gc``, ``cachefs cache ls`` given the store) go through the
control socket ``STORE/control.sock`` (root only), which speaks the commands of
``/.cachefs/control`` plus ``stats``.  It is bound through ``/proc/self/fd`` so
that a long store path does not pass the 108 bytes a socket address may have.

With ``--metrics ADDR`` it serves Prometheus metrics too (``_metrics.py``).

On SIGTERM or SIGINT the servers stop (calls in flight get a grace period),
the filesystem publishes what is left, the store is synced and closed, exit 0.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cachefs.daemon._metrics import DaemonMetrics
from cachefs.daemon._mounts import SOCKET_NAME, socket_address
from cachefs.daemon._options import DaemonOptions, running_filesystem
from cachefs.daemon._process import (
    detach,
    settle_heap,
    unwrap_group,
)
from cachefs.daemon._systemd import sd_notify
from cachefs.errors import ConfigError
from cachefs.format.header import read_header
from cachefs.fs import Filesystem
from cachefs.server import ServeOptions, check_addresses, run_servers

log = logging.getLogger(__name__)

#: The longest command line taken on the control socket.
MAX_COMMAND = 4096


def serve_store(
    store_path: Path,
    options: ServeOptions,
    daemon_options: DaemonOptions,
    *,
    ready: Callable[[], None],
    foreground: bool,
) -> None:
    """Open the store and serve it until signalled (with
    ``daemon_options.metrics``, an address, Prometheus metrics too)."""
    with running_filesystem(store_path, daemon_options, role="serve", foreground=foreground) as (
        fs,
        observed,
    ):
        try:
            trio.run(_main, fs, options, ready, observed)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None
    log.info("stopped serving %s; store closed cleanly", store_path)


async def _main(
    fs: Filesystem,
    options: ServeOptions,
    ready: Callable[[], None],
    observed: DaemonMetrics | None,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        metrics = None
        info: dict[str, Any] = {"pid": os.getpid()}
        if observed is not None:
            info["metrics"] = await nursery.start(observed.run, fs, "serve")
            metrics = observed.metrics
        async with trio.open_nursery() as servers:
            listening = await servers.start(
                functools.partial(run_servers, fs, options, metrics=metrics)
            )
            fs.control.info = info | {"servers": listening.as_dict()}
            await servers.start(_control_socket, fs)
            log.info(
                "serving %s (pid %d): gRPC %s, HTTP %s",
                fs.store.path,
                os.getpid(),
                listening.grpc or "off",
                listening.http or "off",
            )
            settle_heap()
            ready()
            sd_notify("READY=1")
            await _until_signalled()
            sd_notify("STOPPING=1")
            servers.cancel_scope.cancel()
        await fs.flush_all()
        nursery.cancel_scope.cancel()


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: stopping", signum)
            return


async def _control_socket(
    fs: Filesystem, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer commands on ``STORE/control.sock`` until cancelled."""
    path = fs.store.path / SOCKET_NAME
    dirfd = os.open(fs.store.path, os.O_DIRECTORY | os.O_PATH)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A socket left by a process that died: this one holds the store's lock.
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        old = os.umask(0o077)
        try:
            await sock.bind(socket_address(dirfd))
        finally:
            os.umask(old)
        sock.listen()
        listener = trio.SocketListener(sock)
        task_status.started()

        async def answer(stream: trio.SocketStream) -> None:
            await _answer(fs, stream)

        try:
            await trio.serve_listeners(answer, [listener])
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        sock.close()
        os.close(dirfd)


async def _answer(fs: Filesystem, stream: trio.abc.Stream) -> None:
    async with stream:
        try:
            request = b""
            while b"\n" not in request and len(request) <= MAX_COMMAND:
                piece = await stream.receive_some(MAX_COMMAND)
                if not piece:
                    break
                request += piece
            line = request.split(b"\n", 1)[0]
            if line.strip() == b"stats":
                answer = fs.control.render(fs.figures() | fs.control.live())
            else:
                answer = await fs.control.run(line)
            await stream.send_all(answer)
        except trio.BrokenResourceError:
            pass  # the client went away
        except Exception:
            log.exception("control socket: unexpected error")


def serve(
    store: Path,
    options: ServeOptions,
    daemon_options: DaemonOptions | None = None,
    *,
    daemon: bool,
) -> None:
    """``cachefs serve``: serve in the foreground, or detach and return once serving."""
    daemon_options = daemon_options or DaemonOptions()
    if not options.any:
        raise ConfigError("nothing to serve", hint="give --grpc ADDR, --http ADDR or both")
    check_addresses(options)
    daemon_options.check()
    store = store.absolute()
    if store.exists() and any(store.iterdir()):
        read_header(store)  # a newer or foreign store fails here, untouched
    run = functools.partial(serve_store, store, options, daemon_options, foreground=not daemon)
    if daemon:
        detach(lambda ready: run(ready=ready))
    else:
        run(ready=lambda: None)
