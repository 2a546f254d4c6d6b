"""The daemon process: detaching from the caller, and where it logs (daemon layer).

``detach`` forks: the child becomes a daemon of its own session and runs the
service, and tells the parent through a pipe once it is ready (or why it
failed), so that the command returns only once the service can be used and
fails with the daemon's own error.  The daemon logs to ``STORE/cachefs.log``
and, in the foreground, to stderr (which systemd sends to the journal).
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachefs.daemon._mounts import LOG_NAME
from cachefs.engine import StoreOptions
from cachefs.errors import CachefsError, leaves
from cachefs.remote import TierOptions

log = logging.getLogger(__name__)


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


def settle_heap() -> None:
    """Once the daemon is up: collect what starting it left behind, then put
    every object there is now (modules, classes, the protocols' descriptors,
    the store's long-lived state) out of the cyclic garbage collector's way
    (``gc.freeze``).  A full collection, which a request that makes many
    objects sets off, then walks only what was made since: a server's first
    FindMissingBlobs of 10,000 digests went from 152,000 to 246,000 digests/s."""
    gc.collect()
    gc.freeze()


def unwrap_group(exc: BaseExceptionGroup[Any]) -> BaseException:
    """The one cachefs error that a group of errors holds (trio's nurseries
    group what their tasks raise), so that it is reported as itself; the
    group otherwise."""
    inner = leaves(exc)
    if len(inner) == 1 and isinstance(inner[0], CachefsError):
        return inner[0]
    return exc


def detach(run: Callable[[Callable[[], None]], None]) -> None:
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
                f"the daemon exited before it was ready (status {status})",
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
            os.write(write_fd, f"1 unexpected error in the daemon: {exc!r}".encode())
        log.exception("unexpected error in the daemon")
    finally:
        logging.shutdown()
        os._exit(code)


def store_options(
    cache_size: int | None, tiers: TierOptions, audit_dir: Path | None = None
) -> StoreOptions:
    """How a daemon opens its store: with a push queue when a tier takes
    writes, and its audit log where ``--audit-log`` says (None: in the store)."""
    if cache_size is None:
        return StoreOptions(push=tiers.writes, audit_dir=audit_dir)
    return StoreOptions(cache_size=cache_size, push=tiers.writes, audit_dir=audit_dir)
