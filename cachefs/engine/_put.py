"""Storing many files at once: ``Store.put_files`` (storage engine layer).

Files go to worker threads in tasks of ``FILES_PER_TASK`` (a hand-over between
threads costs more than ingesting a small file does); what they ingested is
published about ``batch_bytes`` at a time, and each file is told in the order
given once its batch is published.

With ``processes``, small files (up to ``PREPARE_MAX`` bytes) are prepared in
worker processes instead: each reads a task's files, cuts and digests them,
encodes the chunks that the store's index (opened read-only in each worker)
does not have (``_ingest.prepare``) and sends the records back; this process
then only appends the chunks the store lacks (``Ingest.store_prepared``) and
publishes.  A chunk the index had when the worker looked but that is gone when
the file is stored here (gc cannot take it meanwhile: the caller holds the
maintenance lock; damage found meanwhile can) makes that file ingested again
here.  On small files the threads' work per file is Python that holds the
GIL, so that two threads keep about 1.6 of 2 cores busy; processes keep both
(the artifact mix of ``scripts/bench_engine.py``, 300 MiB on tmpfs, 2 cores,
three sittings of 8 alternations: 1.04-1.15x as fast to ingest, 1.21-1.25x to
put again; each worker takes about 65 MiB).  The pool starts after
``START_AFTER`` small files or ``START_AFTER_BYTES`` of them (starting it
takes about 0.14 s: a put of a few files never pays for it); larger files
stay with the threads, which read them in buffers and never hold one whole.
Nothing the workers do needs undoing when they fail: they only read, and only
the file the parent looked at (its device, inode and size: a file replaced or
resized since, a name such as ``/dev/fd/N`` that means another file in
another process, or one they cannot open is given back and ingested here).  They are forked from
multiprocessing's fork server, not from this process and its threads; they
ignore SIGINT (Ctrl-C stops the put, which stops them) and exit when this
process does, however it ends.  A pool that cannot start (no ``/dev/shm``, a
temporary directory whose path is too long for the fork server's socket) is
logged and the threads do the work.  Like every ``multiprocessing`` child the
workers import the program's main module, which must keep its work under
``if __name__ == "__main__":``; the fork server stays for the rest of the
program.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from cachefs.engine._chunker import Chunker
from cachefs.engine._index import Index
from cachefs.engine._ingest import Ingest, PreparedChunk, prepare
from cachefs.engine._publish import PendingObject
from cachefs.errors import CachefsError, from_oserror
from cachefs.format.codec import ChunkCodec
from cachefs.format.digest import Digest, DigestFunction
from cachefs.format.header import ChunkingParams, CompressionParams
from cachefs.format.schema import held_remotely

log = logging.getLogger(__name__)

#: Files ingested by one task of the threads.
FILES_PER_TASK = 16
#: Files of at most this many bytes are prepared in processes, in tasks of at
#: most ``TASK_FILES`` files and about ``TASK_BYTES`` bytes.
PREPARE_MAX = 16 << 20
TASK_FILES, TASK_BYTES = 32, 8 << 20
#: Small files (or bytes of them) ingested by the threads before the
#: processes start: a put of a few files does not start them.
START_AFTER, START_AFTER_BYTES = 256, 16 << 20


#: Worker processes at most unless told (each takes about 65 MiB).
DEFAULT_MAX = 4


def default_processes() -> int:
    """Worker processes a put uses unless told: one per CPU this process may
    run on, at most ``DEFAULT_MAX``; none on one CPU."""
    cpus = min(len(os.sched_getaffinity(0)), DEFAULT_MAX)
    return cpus if cpus > 1 else 0


#: A file for a process: its path, and the size, device and inode the parent
#: saw (a worker reads no other file, and no more than that).
Wanted = tuple[str, int, int, int]
#: A file prepared in a process: its digest and chunks; or None: it could not
#: be read there, or is not the file the parent saw (replaced, resized, or a
#: name that means another file in another process, such as ``/dev/fd/N``),
#: and the parent ingests it (or names its error).
Prepared = tuple[Digest, list[PreparedChunk]] | None
#: What a task gives back for each of its files, in order.
Result = PendingObject | CachefsError

#: A worker process's tools (set when it starts): the chunker, the digest
#: function, the codec, and the store's index opened read-only (None: it could
#: not be; every chunk is then encoded).
_tools: list[tuple[Chunker, DigestFunction, ChunkCodec, Index | None]] = []


def _start_worker(
    chunking: ChunkingParams, function: DigestFunction, codec: CompressionParams, store: Path
) -> None:
    # Ctrl-C reaches the whole process group: the put stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed (SIGKILL, the OOM killer) cannot stop them: they go when
    # it does, not wait for work forever holding the index and its pipes.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    index = None
    with contextlib.suppress(CachefsError):
        index = Index(store, readonly=True)
    _tools[:] = [(Chunker(chunking), function, ChunkCodec(codec), index)]


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _present(index: Index, digests: list[bytes]) -> set[bytes]:
    """Which chunks the index has (not held remotely): they need no payload.
    One the parent finds missing after all costs the file a second ingest there."""
    with index.read() as txn:
        found = index.chunks.get_many(txn, digests)
    return {d for d, raw in zip(digests, found, strict=True) if raw and not held_remotely(raw)}


def prepare_files(wanted: list[Wanted]) -> list[Prepared]:
    """The work of a worker process: each file read whole and prepared."""
    ((chunker, function, codec, index),) = _tools  # set by _start_worker
    have = None if index is None else functools.partial(_present, index)
    out: list[Prepared] = []
    for path, size, device, inode in wanted:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                same = (st.st_dev, st.st_ino) == (device, inode)
                data = f.read(size + 1) if same else b""
        except OSError:  # the parent reads it, and names its error
            same = False
        if not same or len(data) != size:
            out.append(None)
            continue
        out.append(prepare(chunker, function, codec, memoryview(data), have))
    return out


class _Tasks:
    """Paths grouped into tasks, each for the threads or for the processes
    (``processes`` 0, or set to 0 on the way: the rest for the threads), in
    the order given."""

    def __init__(self, paths: Iterable[Path], processes: int) -> None:
        self.paths = iter(paths)
        self.processes = processes
        self.small = self.small_bytes = 0

    def __iter__(self) -> Iterator[tuple[list[Path], list[Wanted] | None]]:
        """``(paths, wanted)``: ``wanted``, what a task for the processes reads."""
        if not self.processes:
            while some := list(itertools.islice(self.paths, FILES_PER_TASK)):
                yield some, None
            return
        group: list[Path] = []
        wanted: list[Wanted] | None = None
        size = 0
        for path in self.paths:
            small = self._small(path)
            started = self.small >= START_AFTER or self.small_bytes >= START_AFTER_BYTES
            if small is not None and started and self.processes:
                if wanted is None or len(group) == TASK_FILES or size + small[1] > TASK_BYTES:
                    if group:
                        yield group, wanted
                    group, wanted, size = [], [], 0
                wanted.append(small)
                size += small[1]
            elif wanted is not None or len(group) == FILES_PER_TASK:
                if group:
                    yield group, wanted
                group, wanted = [], None
            if small is not None:
                self.small += 1
                self.small_bytes += small[1]
            group.append(path)
        if group:
            yield group, wanted

    @staticmethod
    def _small(path: Path) -> Wanted | None:
        """What a process reads of it, if it is a file for the processes (one
        that cannot be looked at goes to the threads, whose error names it)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > PREPARE_MAX:
            return None
        return (str(path), st.st_size, st.st_dev, st.st_ino)


def _processes(count: int, ingest: Ingest, store: Path) -> ProcessPoolExecutor:
    # A fork of this process would copy its threads' locks in whatever state
    # they are: the workers are forked from a fresh server process instead,
    # which imports this module only (not the program's main module).  Python
    # before 3.12.8 starts it with the current directory first on its path
    # (gh-117378): PYTHONSAFEPATH keeps a file there from being imported.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    saved = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = saved
    tools = (ingest.chunker.params, ingest.digest_function, ingest.codec.params, store)
    return ProcessPoolExecutor(count, mp_context=context, initializer=_start_worker, initargs=tools)


def put_files(
    store: Path,
    ingest: Ingest,
    publish: Callable[[list[PendingObject]], None],
    paths: Iterable[Path],
    workers: int,
    processes: int,
    batch_bytes: int,
) -> Iterator[tuple[Path, Digest | CachefsError]]:
    """``Store.put_files`` (whose caller holds the maintenance lock shared):
    files ingested by ``workers`` threads (and ``processes`` processes),
    published about ``batch_bytes`` at a time."""

    def ingest_group(group: list[Path]) -> list[Result]:
        return [_ingest_file(ingest, path) for path in group]

    pool: ProcessPoolExecutor | None = None
    #: Tasks in flight, in order: (paths, future, what gives their results).
    window: deque[tuple[list[Path], Future[Any], Callable[[], list[Result]]]] = deque()
    ready: list[tuple[Path, Result]] = []
    ready_bytes = 0

    def flush() -> Iterator[tuple[Path, Digest | CachefsError]]:
        nonlocal ready, ready_bytes
        objects = [r for _, r in ready if isinstance(r, PendingObject)]
        if objects:
            publish(objects)
        for path, result in ready:
            yield path, result.digest if isinstance(result, PendingObject) else result
        ready, ready_bytes = [], 0

    def collect(keep: int) -> Iterator[tuple[Path, Digest | CachefsError]]:
        nonlocal ready_bytes
        while len(window) > keep:
            group, _, results = window.popleft()
            for path, result in zip(group, results(), strict=True):
                ready.append((path, result))
                if isinstance(result, PendingObject):
                    ready_bytes += result.digest.size
            if ready_bytes >= batch_bytes or len(ready) >= 4096:
                yield from flush()

    if processes < 0:
        raise ValueError(f"processes must be 0 or more, not {processes}")
    files = ThreadPoolExecutor(workers, thread_name_prefix="cachefs-put")
    tasks = _Tasks(paths, processes)
    try:
        for group, wanted in tasks:
            if wanted is not None and tasks.processes:
                try:
                    if pool is None:
                        pool = _processes(processes, ingest, store)
                    done = pool.submit(prepare_files, wanted)
                except BrokenProcessPool:
                    raise
                except (OSError, EOFError, ImportError, RuntimeError) as exc:
                    # No processes here (a socket path too long for the fork
                    # server, no /dev/shm, ...): the threads do it all.
                    log.warning("worker processes cannot start (%s): using threads only", exc)
                    tasks.processes = 0
                else:
                    window.append((group, done, functools.partial(_stored, ingest, group, done)))
                    yield from collect(2 * max(workers, processes))
                    continue
            fut = files.submit(ingest_group, group)
            window.append((group, fut, fut.result))
            yield from collect(2 * max(workers, processes))
        yield from collect(0)
        yield from flush()
    except BrokenProcessPool:
        raise CachefsError(
            "a worker process preparing files for the store ended unexpectedly or could "
            "not start; the files told of before are stored, the others not",
            hint="see its error above or the system log (killed, out of memory?); put the "
            "rest again, with fewer worker processes or none (`cachefs put --processes 0`)",
        ) from None
    finally:
        for _, fut, _ in window:
            fut.cancel()
        files.shutdown(wait=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _ingest_file(ingest: Ingest, path: Path) -> Result:
    try:
        return ingest.ingest_file(path)
    except OSError as exc:  # this file could not be read; the others go on
        return from_oserror(exc, f"reading {path}")


def _stored(ingest: Ingest, group: list[Path], done: Future[list[Prepared]]) -> list[Result]:
    """A process's work on ``group`` stored here (not published)."""
    results: list[Result] = []
    for path, item in zip(group, done.result(), strict=True):
        if item is None:  # read it here
            results.append(_ingest_file(ingest, path))
        else:
            stored = ingest.store_prepared(*item)
            results.append(_ingest_file(ingest, path) if stored is None else stored)
    return results


__all__ = [
    "PREPARE_MAX",
    "START_AFTER",
    "START_AFTER_BYTES",
    "default_processes",
    "prepare_files",
    "put_files",
]
