"""Writes logged by reference to a named spool (``FILE_WRITE_SPOOLED``): a file
that streams keeps its bytes in its spool only, and a daemon killed mid-file
comes back with every byte written from the spool that the journal names.

A child process writes through ``Filesystem`` (running, so that files stream)
and kills itself with SIGKILL before anything is published; the parent opens
the store again, which replays the journal.  No FUSE needed (the FUSE case is
in ``test_streams.py``).
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cachefs.engine import ROOT_INODE, Store, check_store
from cachefs.format import journal as fmt
from cachefs.fs import Filesystem
from tests.conftest import SMALL_CONFIG

SEED = 4
DATA = random.Random(SEED).randbytes(1 << 20)
PIECE = 64 * 1024

#: Writes per scenario (argv[2]), then dies.  Files stream from 256 KiB on.
CHILD = textwrap.dedent(
    """
    import os, random, signal, stat, sys
    import trio
    from cachefs.engine import ROOT_INODE, Store
    from cachefs.fs import Filesystem, _journal, _streams

    _streams.STREAM_MIN = 256 * 1024
    PIECE = 64 * 1024

    async def main(path, scenario, data):
        store = Store.open(path)
        fs = Filesystem(store, log_limit=1 << 20)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)

            async def create(name):
                inode = fs.create(ROOT_INODE, name, stat.S_IFREG | 0o644, 0, 0)
                fh, _ = await fs.open(inode.ino, os.O_RDWR)
                return inode.ino, fh

            async def stream(fh, data):
                for at in range(0, len(data), PIECE):
                    await fs.write(fh, at, data[at : at + PIECE])
                    await trio.sleep(0)  # let the stream start and read

            ino, fh = await create(b"f")
            if scenario == "published emptied":
                # Published in this journal's life, then emptied by a new open
                # with O_TRUNC: its state has no changes when it is emptied.
                await fs.write(fh, 0, data[:PIECE])
                await fs.fsync(fh)
                await fs.release(fh)
                fh = (await fs.open(ino, os.O_WRONLY | os.O_TRUNC))[0]
            elif scenario == "carried":
                # A file in the journal that is larger than the streamed one:
                # the journal passes its limit, that file is published and
                # the streamed one carried over into the new journal.
                other, ofh = await create(b"big")
                for at in reversed(range(0, 960 * 1024, PIECE)):  # never streams
                    await fs.write(ofh, at, data[at : at + PIECE])
                await stream(fh, data[: 512 * 1024])
                for _ in range(200):
                    if fs.files.get(other).base is not None:
                        break
                    await trio.sleep(0.01)
                else:
                    raise SystemExit("the journal was not carried over")
            elif scenario == "small emptied":
                await fs.write(fh, 0, data[:PIECE])
            else:
                await stream(fh, data)
            if scenario == "truncated":
                await fs.truncate(ino, 700_000)
                await fs.write(fh, 800_000, b"tail")
            if scenario.endswith("emptied") or scenario == "restarted":
                await fs.truncate(ino, 0)
            if scenario == "restarted":
                # Emptied (its spool keeps its name), the journal restarts
                # (which drops the names), then the file streams again.
                _journal.RESTART_SIZE = 0
                fs.io.journal.restart(fs.files)
                await stream(fh, data[: 512 * 1024])
            state = fs.files.get(ino)
            if scenario == "restarted" and not fs.io.journal.naming:
                raise SystemExit("one file's spool named twice turned naming off")
            if not scenario.endswith(("emptied", "restarted")) and state.spool_id is None:
                raise SystemExit("the spool has no name")
            nursery.cancel_scope.cancel()  # nothing published, nothing closed
        if scenario == "closed":
            # The daemon's end after an error, with no flush (its finally).
            fs.close()
            store.close()
        os.kill(os.getpid(), signal.SIGKILL)

    trio.run(main, sys.argv[1], sys.argv[2], random.Random(SEED).randbytes(1 << 20))
    """
)


def crash(store_path: Path, scenario: str) -> Path:
    Store.open(store_path, create=True, config=SMALL_CONFIG).close()
    result = subprocess.run(
        [sys.executable, "-c", CHILD.replace("SEED", str(SEED)), str(store_path), scenario],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    return store_path


def kinds(store_path: Path) -> list[int]:
    raw = (store_path / fmt.DIRECTORY / fmt.FILE_NAME).read_bytes()
    _, found, _ = fmt.parse(raw, "journal")
    return [record.kind for record in found]


def spools(store_path: Path) -> list[Path]:
    directory = store_path / fmt.DIRECTORY / fmt.SPOOLS
    return sorted(directory.iterdir()) if directory.exists() else []


def replayed(store_path: Path) -> dict[bytes, bytes]:
    """Open the store (replaying the journal); the files' contents."""
    store = Store.open(store_path)
    fs = Filesystem(store)
    try:
        out = {}
        for name, inode in fs.namespace.entries(ROOT_INODE):
            out[name] = b"" if inode.digest is None else store.read(inode.digest)
        assert (store_path / fmt.DIRECTORY / fmt.FILE_NAME).stat().st_size == fmt.HEADER.size
        assert spools(store_path) == []  # gone with the records that named them
        assert check_store(store).clean
        return out
    finally:
        fs.close()
        store.close()


def test_a_streamed_file_is_replayed_from_its_named_spool(store_path: Path) -> None:
    crash(store_path, "streamed")
    logged = kinds(store_path)
    assert fmt.FILE_WRITE_SPOOLED in logged
    assert logged.count(fmt.FILE_WRITE) < 8  # the writes before the stream began
    (spool,) = spools(store_path)
    assert spool.stat().st_size == len(DATA)
    assert replayed(store_path) == {b"f": DATA}


def test_a_spool_cut_shorter_reads_as_zeros_until_the_truncation(store_path: Path) -> None:
    crash(store_path, "truncated")
    expected = DATA[:700_000] + bytes(100_000) + b"tail"
    assert replayed(store_path) == {b"f": expected}


def test_a_streamed_file_is_carried_over_by_reference(store_path: Path) -> None:
    crash(store_path, "carried")
    logged = kinds(store_path)
    assert logged[0] == fmt.FILE_BASE  # a new journal, the streamed file carried over
    assert fmt.FILE_WRITE_SPOOLED in logged
    assert replayed(store_path) == {b"f": DATA[: 512 * 1024], b"big": DATA[: 960 * 1024]}


def test_a_file_that_streams_again_after_a_restart_is_logged_whole(store_path: Path) -> None:
    """Its spool's name went with the restart's checkpoint, and a spool made
    with O_TMPFILE cannot be linked twice: its bytes are logged again."""
    crash(store_path, "restarted")
    assert fmt.FILE_WRITE_SPOOLED not in kinds(store_path)
    assert replayed(store_path) == {b"f": DATA[: 512 * 1024]}


def test_a_file_closed_unpublished_keeps_its_named_spool(store_path: Path) -> None:
    crash(store_path, "closed")
    assert len(spools(store_path)) == 1
    assert replayed(store_path) == {b"f": DATA}


@pytest.mark.parametrize("scenario", ["emptied", "small emptied", "published emptied"])
def test_a_file_emptied_after_its_writes_stays_empty(
    store_path: Path, scenario: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Truncated to nothing (its content dropped at once), then killed: the
    writes logged before are not replayed over the empty file."""
    crash(store_path, scenario)
    with caplog.at_level(logging.WARNING):
        assert replayed(store_path) == {b"f": b""}
    assert "spool" not in caplog.text


def test_a_lost_spool_loses_only_its_file_writes(
    store_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crash(store_path, "streamed")
    for spool in spools(store_path):
        spool.unlink()
    with caplog.at_level(logging.ERROR):
        assert replayed(store_path) == {b"f": b""}  # its content as last published
    assert "the spool of inode" in caplog.text
