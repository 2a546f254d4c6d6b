"""``cachefs fsck``: verify (and repair) a store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cachefs.daemon import resolve_store
from cachefs.engine import Store, StoreOptions, check_store
from cachefs.errors import CachefsError, ConfigError, IndexCorruptError
from cachefs.remote import TierOptions, Tiers

from .common import ProgressBar, json_option, store_argument


@click.command("fsck")
@store_argument
@click.option(
    "--repair",
    is_flag=True,
    help="Drop what cannot be recovered and fix counts (needs the store's writer lock).",
)
@click.option(
    "--remote",
    "remotes",
    multiple=True,
    metavar="URL",
    help="With --repair: a remote tier to heal damaged chunks from (repeatable; as mount's).",
)
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="With --repair: the TOML file of the store's tiers to heal from (as mount's).",
)
@json_option
def command(
    store: Path, repair: bool, remotes: tuple[str, ...], config: Path | None, as_json: bool
) -> None:
    """Verify every record checksum, index entry and reference count.

    Exits 0 only when the store is clean; 1 when damage was found (also when
    --repair fixed it: run fsck again to confirm); 4 when the index cannot be
    read for damage to its structure; 128+N when the check was stopped by
    signal N (Ctrl-C: 130; SIGTERM and SIGHUP sent to fsck are passed on to
    the check).  With --repair, lists the
    objects that lost data.  Without --repair the store is only read, and this
    works beside a running writer.  With --repair and the store's remote tiers
    (--remote, --config), damaged chunks that a tier holds are fetched,
    verified and written again first: only what no tier holds is dropped.
    --repair also makes whole again what the index lost that the rest shows
    (exit 1, repaired): a lost segments or counters table, a lost schema
    version; for any other damage to its structure (exit 4), restore
    index.lmdb from a backup.
    """
    if os.environ.get(_CHILD) is None:
        _check_in_a_child(store)
    try:
        _check(store, repair, remotes, config, as_json)
    except KeyboardInterrupt:  # Ctrl-C: what was repaired so far is committed
        raise _stopped(store, signal.SIGINT) from None


def _check(
    store: Path, repair: bool, remotes: tuple[str, ...], config: Path | None, as_json: bool
) -> None:
    if (remotes or config) and not repair:
        raise ConfigError(
            "fsck takes --remote and --config with --repair only (to heal from the tiers)"
        )
    options = TierOptions.parse(remotes, config)
    bar = ProgressBar("checking")
    with Store.open(
        resolve_store(store), readonly=not repair, options=StoreOptions(recover_index=repair)
    ) as opened:
        tiers = Tiers(opened, options.open(opened.digest_function) if repair else [])
        try:
            report = check_store(opened, repair=repair, progress=bar)
        finally:
            bar.close()
            tiers.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.problems:
            click.echo(f"DAMAGE  {problem}")
        for note in report.notes:
            click.echo(f"note    {note}")
        for digest in report.lost_objects:
            verb = "removed" if report.repaired else "damaged"
            click.echo(f"LOST    object {digest} ({verb}: its data is gone)")
        summary = (
            f"{report.segments_checked} segments, {report.records_checked} records, "
            f"{report.chunks_checked} chunks, {report.objects_checked} objects, "
            f"{report.inodes_checked} inodes checked: "
        )
        if report.clean:
            click.echo(summary + "clean")
        elif report.repaired:
            click.echo(summary + f"{len(report.problems)} problems repaired")
        else:
            click.echo(summary + f"{len(report.problems)} problems; run with --repair to fix")
    if not report.clean:
        raise click.exceptions.Exit(1)


#: Set in the process that runs the check (see ``_check_in_a_child``).
_CHILD = "CACHEFS_FSCK_CHILD"
#: Signals that this process passes on to the check's (``timeout``, ``kill``
#: and a closed terminal reach this process alone; the check then stops too,
#: instead of running on, perhaps repairing, with the store's lock).
PASSED_ON = (signal.SIGTERM, signal.SIGHUP)


class _PassingOn:
    """While this process waits for the check's: ``PASSED_ON`` signals go to
    that process (one that comes before it is known, once it is), and Ctrl-C,
    which reaches it too (it stops and says so), is not taken here (this
    process waits for it rather than leave it running).  The caller reaps the
    check's process only after the block: never a signal to a pid reused."""

    def __init__(self) -> None:
        self._send: Callable[[int], None] | None = None
        self._pending: list[int] = []
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _PassingOn:
        if threading.current_thread() is threading.main_thread():  # else: signals stay as they are
            try:
                for signum in PASSED_ON:
                    self._saved[signum] = signal.signal(signum, self._pass_on)
            except BaseException:
                self.__exit__()
                raise
        return self

    def started(self, send: Callable[[int], None]) -> None:
        """The check's process is running: ``send`` signals it."""
        self._send = send
        for signum in self._pending:
            self._pass_on(signum, None)
        if threading.current_thread() is threading.main_thread():
            self._saved[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _pass_on(self, signum: int, frame: object) -> None:
        if self._send is None:
            self._pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            self._send(signum)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)


def _wait_unreaped(pid: int) -> None:
    """Wait until process ``pid`` ends, leaving it to be reaped."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _check_in_a_child(store: Path) -> None:
    """Run the check in a child process, and answer for it: returns in the
    child, exits in this process with the child's status.

    LMDB reads its file through a memory map and trusts the page numbers it
    finds there: an index damaged in its tree structure (not in an entry, which
    the seals catch) can make it read past the end of the file, and the process
    dies of SIGBUS or SIGSEGV, or fail one of LMDB's own consistency assertions,
    which abort (SIGABRT).  The child may die so; this process then says what
    happened instead of vanishing.  The child is a fork when this process runs
    one thread (it is, from the command line): that saves starting Python and
    importing cachefs again.  Otherwise this very command is run again."""
    if threading.active_count() == 1:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None when the descriptor was closed (`>&-`)
                stream.flush()
        # Signals to pass on wait, blocked, until this process can pass them on.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_ON)
        try:
            pid = os.fork()
            if pid == 0:
                return
            with _PassingOn() as passing:
                passing.started(lambda signum: os.kill(pid, signum))
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                _wait_unreaped(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    else:
        # (A blocked mask would outlive exec: the handlers take what comes early.)
        with _PassingOn() as passing:
            child = subprocess.Popen(
                [sys.executable, "-m", "cachefs", *sys.argv[1:]], env={**os.environ, _CHILD: "1"}
            )
            passing.started(child.send_signal)
            _wait_unreaped(child.pid)
        returncode = child.wait()
    if returncode >= 0:
        sys.exit(returncode)
    signame = _signal_name(-returncode)
    hint = "restore STORE/index.lmdb from a backup (the segments hold the chunk data)"
    if -returncode in (signal.SIGBUS, signal.SIGSEGV):
        raise IndexCorruptError(
            f"the index of {store} is damaged in its structure: reading it killed the check "
            f"({signame})",
            hint=hint,
        )
    if -returncode == signal.SIGABRT:
        # LMDB's assertions print "mdb.c:LINE: Assertion '...' failed" first.
        raise IndexCorruptError(
            f"the check of {store} aborted (SIGABRT): the index is likely damaged in its "
            "structure (LMDB aborts on a broken page)",
            hint=f"if an `mdb.c` assertion is printed above, {hint}",
        )
    raise _stopped(store, -returncode)


#: Signals that end a process from within (a bug, not a request to stop).
_CRASHES = (signal.SIGILL, signal.SIGFPE, signal.SIGSYS, signal.SIGTRAP)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal
        return f"signal {signum}"


def _stopped(store: Path, signum: int) -> CachefsError:
    """The error of a check that signal ``signum`` ended: exit code 128+N,
    as a shell reports a command a signal ended (not 1: damage found)."""
    signame = _signal_name(signum)
    if signum in _CRASHES:
        error = CachefsError(
            f"the check of {store} crashed ({signame})",
            hint="please report it, with the output of `cachefs -vv fsck`",
        )
    else:
        error = CachefsError(f"the check of {store} was stopped by {signame}")
    error.exit_code = 128 + signum
    return error
