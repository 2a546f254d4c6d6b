"""A scrub (or any read-only check) in a process that holds the store open for
writing, beside a write transaction: the mount's scrubber, `cachefs scrub
MOUNTPOINT`, the background `--scrub-rate` pass.  Opening a table with no
transaction on a writable LMDB environment began a write transaction that
waited for the writer's lock holding the GIL, while the writer waited for the
GIL: the whole process hung."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.mounting import CACHEFS, kill, start, stop

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import sys, threading, time
    from cachefs.engine import Store, scrub_store
    from tests.conftest import SMALL_CONFIG
    store = Store.open(sys.argv[1], create=True, config=SMALL_CONFIG)
    store.put(b"some content" * 1000)
    inside = threading.Event()

    def writer():  # a write transaction with Python work in it (the mount's loop)
        with store.index.write() as txn:
            inside.set()
            time.sleep(0.5)  # the GIL is let go, as between any two calls
            store.index.add(txn, "files", 0)

    thread = threading.Thread(target=writer)
    thread.start()
    inside.wait()
    if sys.argv[2] == "scrub":
        scrub_store(store)
    else:
        store.index.open_optional(b"chunks", create=False)
    thread.join()
    store.close()
    print("done")
    """
)


@pytest.mark.parametrize("what", ["scrub", "open_table"])
def test_a_check_beside_a_write_transaction_goes_on(tmp_path: Path, what: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "store"), what],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        out, err = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("the process hung: killed after 30 s")
    assert out.strip() == "done", err


def test_a_scrub_of_a_busy_mount_answers(tmp_path: Path) -> None:
    mount = start(tmp_path / "store", tmp_path / "mnt")
    done = threading.Event()

    def churn() -> None:
        i = 0
        while not done.is_set():
            i += 1
            path = mount.path / f"f{i % 20}"
            try:
                path.write_bytes(os.urandom(20_000))
                if i % 3 == 0:
                    path.unlink()
            except OSError:
                return

    writer = threading.Thread(target=churn, daemon=True)
    try:
        writer.start()
        time.sleep(0.3)
        for _ in range(5):
            scrub = subprocess.Popen(
                [*CACHEFS, "scrub", str(mount.path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                _, err = scrub.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                kill(mount)  # a hung daemon: only its end frees the scrub's request
                scrub.kill()
                scrub.communicate()
                pytest.fail("cachefs scrub of a busy mount hung")
            assert scrub.returncode == 0, err
    finally:
        done.set()
        writer.join(timeout=10)
    assert stop(mount) == 0
