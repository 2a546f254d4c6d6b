"""Putting many files: small files prepared in worker processes (``engine/_put.py``)
store what the threads store, in the order given, errors included."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cachefs.cli import cli
from cachefs.engine import Store, _put
from cachefs.engine._ingest import prepare
from cachefs.errors import CachefsError, NotFoundError
from cachefs.format.digest import BLAKE3, Digest
from cachefs.format.header import StoreConfig
from tests.conftest import SMALL_CONFIG, compressible
from tests.test_store import check_invariants

REPO = Path(__file__).resolve().parent.parent


def rand(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def contents() -> list[bytes]:
    """Sizes around the chunker's: empty, one byte, below the minimum, one
    chunk, many; random and compressible."""
    small = SMALL_CONFIG.chunking
    sizes = [0, 1, small.min_size - 1, small.min_size, small.max_size, small.max_size + 1]
    out = [rand(n, seed=n) for n in sizes]
    out += [rand(i * 9000, seed=i) + compressible(i * 4000, seed=i) for i in range(1, 9)]
    out.append(out[-1])  # a duplicate
    return out


@pytest.mark.parametrize("config", [SMALL_CONFIG, StoreConfig(digest_function=BLAKE3.name)])
def test_prepared_chunks_are_those_of_an_ingest(tmp_path: Path, config: StoreConfig) -> None:
    """``prepare`` cuts and digests as ``Ingest.ingest`` does; what it encoded
    reads back as the bytes."""
    with (
        Store.open(tmp_path / "a", create=True, config=config) as a,
        Store.open(tmp_path / "b", create=True, config=config) as b,
    ):
        ingest = b.ingest
        for data in contents():
            pending = a.ingest.ingest(data)
            digest, chunks = prepare(ingest.chunker, ingest.digest_function, ingest.codec,
                                     memoryview(data))  # fmt: skip
            assert digest == pending.digest
            assert [(c[0], c[1]) for c in chunks] == pending.chunks
            prepared = ingest.store_prepared(digest, chunks)
            assert prepared is not None and prepared.chunks == pending.chunks
            b.publisher.publish([prepared], durable=True)
            assert b.read(digest) == data
        check_invariants(b)


def test_prepared_chunks_appended_are_told_as_an_ingest_tells_them(tmp_path: Path) -> None:
    """A pusher's early push hears of the chunks a large object appends
    (``on_appended``), whether the object was cut here or in a worker."""
    told: dict[str, list[tuple[bytes, int]]] = {"a": [], "b": []}
    with (
        Store.open(tmp_path / "a", create=True, config=SMALL_CONFIG) as a,
        Store.open(tmp_path / "b", create=True, config=SMALL_CONFIG) as b,
    ):
        a.ingest.on_appended = told["a"].extend
        b.ingest.on_appended = told["b"].extend
        ingest = b.ingest
        tools = (ingest.chunker, ingest.digest_function, ingest.codec)
        for data in (rand(3 << 20, seed=7), rand(50_000, seed=8), rand(3 << 20, seed=7)):
            pending = a.ingest.ingest(data)
            a.publisher.publish([pending], durable=True)
            prepared = ingest.store_prepared(*prepare(*tools, memoryview(data)))
            assert prepared is not None
            b.publisher.publish([prepared], durable=True)
        # The large one, once: small objects go untold, and a second time appends nothing.
        assert told["b"] == told["a"] == a.recipe(pending.digest)


def test_chunks_the_store_has_are_not_encoded(store: Store) -> None:
    """With ``have``, a chunk the store has comes without a payload; if the
    store lacks it after all, nothing is appended and the caller ingests again."""
    ingest = store.ingest
    tools = (ingest.chunker, ingest.digest_function, ingest.codec)
    old = rand(200_000, seed=3)
    store.put(old)
    data = old + rand(50_000, seed=4)
    asked: list[list[bytes]] = []

    def have(digests: list[bytes]) -> set[bytes]:
        asked.append(digests)
        return set(digests) - store.chunks.find_missing(digests)

    digest, chunks = prepare(*tools, memoryview(data), have)
    assert asked and [c[0] for c in chunks] == asked[0]
    skipped = [c for c in chunks if c[3] is None]
    assert skipped and len(skipped) < len(chunks)  # the old file's chunks but the last
    before = store.stats().stored_bytes
    pending = ingest.store_prepared(digest, chunks)
    assert pending is not None
    store.publisher.publish([pending], durable=True)
    assert store.read(digest) == data
    # A chunk said to be there that is not: nothing appended, None.
    _, lying = prepare(*tools, memoryview(rand(90_000, seed=5)), set)
    assert ingest.store_prepared(Digest(b"\0" * 32, 90_000), lying) is None
    assert not any(shard.pending for shard in store.segments.shards)
    assert store.stats().stored_bytes > before
    check_invariants(store)


def tree(directory: Path, count: int) -> list[Path]:
    directory.mkdir()
    paths: list[Path] = []
    for i, data in enumerate(contents() * (count // len(contents()) + 1)):
        if len(paths) == count:
            break
        path = directory / f"f{i:03d}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_put_files_with_processes_stores_what_threads_store(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the pool started at once and a small limit (the parent's), small
    files go to the processes, a large one to the threads, errors stay in
    place; digests, order and the store's counts are those of the threads."""
    monkeypatch.setattr(_put, "START_AFTER", 3)
    monkeypatch.setattr(_put, "PREPARE_MAX", 40_000)
    monkeypatch.setattr(_put, "TASK_FILES", 4)
    paths = tree(tmp_path / "tree", 30)
    large = tmp_path / "tree" / "large"
    large.write_bytes(rand(200_000, seed=7))
    missing = tmp_path / "tree" / "missing"
    paths[10:10] = [large, missing, tmp_path / "tree"]  # a directory is no file either

    threads = list(store.put_files(paths))
    started = []
    start = _put._processes

    def spied(*args: Any) -> Any:
        started.append(args)
        return start(*args)

    monkeypatch.setattr(_put, "_processes", spied)
    with Store.open(tmp_path / "other", create=True, config=SMALL_CONFIG) as other:
        processes = list(other.put_files(paths, processes=2, batch_bytes=50_000))
        assert [p for p, _ in processes] == paths
        assert len(started) == 1  # the processes did prepare files
        assert [str(r) if isinstance(r, Digest) else type(r) for _, r in processes] == [
            str(r) if isinstance(r, Digest) else type(r) for _, r in threads
        ]
        assert isinstance(dict(processes)[missing], NotFoundError)
        assert "missing" in str(dict(processes)[missing])
        for path, digest in processes:
            if isinstance(digest, Digest):
                assert other.read(digest) == path.read_bytes()
        assert other.stats().chunk_bytes == store.stats().chunk_bytes
        assert other.stats().objects == store.stats().objects
        # Again: the processes find every chunk in the index and encode none.
        stored = other.stats().stored_bytes
        again = list(other.put_files(paths, processes=2))
        assert [str(r) for _, r in again] == [str(r) for _, r in processes]
        assert other.stats().stored_bytes == stored
        check_invariants(other)


def test_a_worker_process_prepares_reports_and_gives_back_what_changed(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's own function, run here: a file it cannot read is its
    error; one that is not what the parent saw (resized, replaced) is given
    back, and ingested here."""
    ingest = store.ingest
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # not pytest's SIGINT
    _put._start_worker(
        ingest.chunker.params, ingest.digest_function, ingest.codec.params, store.path
    )
    small, grown, other = tmp_path / "small", tmp_path / "grown", tmp_path / "other"
    small.write_bytes(b"x" * 1000)
    grown.write_bytes(rand(5000, seed=1))
    other.write_bytes(b"y" * 10)
    group = [small, tmp_path / "missing", grown, other]
    seen = [os.stat(p) for p in (small, grown, other)]
    wanted = [
        (str(small), 1000, seen[0].st_dev, seen[0].st_ino),
        (str(tmp_path / "missing"), 0, 0, 0),
        (str(grown), 1000, seen[1].st_dev, seen[1].st_ino),  # 1000 bytes when looked at
        (str(other), 10, seen[2].st_dev, seen[0].st_ino),  # another file by then
    ]
    try:
        prepared = _put.prepare_files(wanted)
    finally:
        index = _put._tools[0][3]
        if index is not None:
            index.close()
        _put._tools.clear()
    assert isinstance(prepared[0], tuple)
    assert prepared[1:] == [None, None, None]  # the parent reads them (and names the error)
    # A chunk the index was said to have, gone since: the file is ingested here.
    digest, chunks = prepared[0]
    prepared[0] = (digest, [(d, n, c, None) for d, n, c, _ in chunks])
    done: Future[list[_put.Prepared]] = Future()
    done.set_result(prepared)
    results = _put._stored(ingest, group, done)
    assert isinstance(results[1], NotFoundError)
    made = [results[0], results[2], results[3]]
    store.publisher.publish(made, durable=True)  # type: ignore[arg-type]
    assert "missing" in str(results[1])
    for path, result in zip((small, grown, other), made, strict=True):
        assert not isinstance(result, CachefsError)
        assert store.read(result.digest) == path.read_bytes()


def test_a_pool_that_cannot_start_leaves_it_to_the_threads(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_put, "START_AFTER", 2)
    monkeypatch.setattr(_put, "TASK_FILES", 2)  # several tasks for the processes
    tries = []

    def cannot(*args: Any) -> Any:
        tries.append(args)
        raise OSError(errno.ENAMETOOLONG, "AF_UNIX path too long")

    monkeypatch.setattr(_put, "_processes", cannot)
    paths = tree(tmp_path / "tree", 12)
    results = list(store.put_files(paths, processes=2))
    assert [p for p, _ in results] == paths
    assert all(isinstance(d, Digest) and store.read(d) == p.read_bytes() for p, d in results)
    assert "worker processes cannot start (" in caplog.text
    assert caplog.text.count("cannot start") == 1 and len(tries) == 1
    with pytest.raises(ValueError, match="0 or more"):
        next(store.put_files(paths, processes=-1))


def test_workers_go_when_the_put_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the process that puts: its workers (blocked waiting for
    work, holding the index) do not stay behind."""
    script = tmp_path / "put.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from cachefs.engine import Store, _put

        if __name__ == "__main__":
            with Store.open(Path({str(tmp_path / "store")!r}), create=True) as store:
                pool = _put._processes(2, store.ingest, store.path)
                for done in [pool.submit(_put.prepare_files, []) for _ in range(4)]:
                    done.result()
                print(*pool._processes, flush=True)
                time.sleep(60)
        """)
    )
    child = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the resource tracker's words on leaked semaphores
        text=True,
        cwd=REPO,
    )
    workers: list[int] = []
    with child:
        try:
            assert child.stdout is not None
            workers += [int(pid) for pid in child.stdout.readline().split()]
            assert workers
            child.kill()
            child.wait()
            deadline = time.monotonic() + 20
            while any(map(_running, workers)):
                assert time.monotonic() < deadline, f"workers {workers} outlived the put"
                time.sleep(0.05)
        finally:
            child.kill()
            for pid in workers:
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether the process is there and not a zombie (its parent, the fork
    server, may be gone and leave it to an init that does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _die(paths: list[str]) -> None:
    """A worker that dies (as the kernel's OOM killer would make it)."""
    os._exit(9)


def test_a_worker_process_that_dies_is_an_error_and_loses_nothing_told(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_put, "START_AFTER", 2)
    monkeypatch.setattr(_put, "prepare_files", _die)
    paths = tree(tmp_path / "tree", 6)
    told = []
    with pytest.raises(CachefsError, match="ended unexpectedly"):
        for path, digest in store.put_files(paths, processes=2, batch_bytes=1):
            told.append((path, digest))
    assert [p for p, _ in told] == paths[: len(told)]
    for path, digest in told:
        assert isinstance(digest, Digest) and store.read(digest) == path.read_bytes()
    check_invariants(store)


def test_cli_put_with_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_put, "START_AFTER", 2)
    tree(tmp_path / "tree", 12)
    runner = CliRunner()
    outputs = []
    for processes in ("0", "2"):
        store = tmp_path / f"store-{processes}"
        result = runner.invoke(cli, ["put", str(store), str(tmp_path / "tree"),
                                      "--processes", processes])  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == 12


def test_the_fork_server_imports_nothing_from_the_current_directory(tmp_path: Path) -> None:
    """Python 3.11 starts multiprocessing's fork server with the current
    directory first on its path: a ``json.py`` there ran in it."""
    files = tmp_path / "files"
    files.mkdir()
    for i in range(_put.START_AFTER + 20):
        (files / f"f{i:04d}").write_bytes(rand(3000, seed=i))
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "imported"
    (work / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    command = Path(sys.executable).parent / "cachefs"
    done = subprocess.run(
        [str(command), "put", str(tmp_path / "store"), str(files), "--processes", "2"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == _put.START_AFTER + 20
    assert not marker.exists()
