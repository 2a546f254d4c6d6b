"""``cachefs scrub``: every record and index entry read, damage recorded.

A scrub finds damage that no read met yet, and records it as a damaged read
would: ``needs_fsck`` and the corruption count in the store's health, shown by
``cachefs stats``; damage to the index turns a mount read-only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cachefs.engine import Digest, Store
from tests.conftest import compressible, flip_first_chunk
from tests.mounting import live_stats, mounted


def cachefs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachefs", *args], capture_output=True, text=True, check=False
    )


def test_scrub_of_a_store_records_what_it_finds(tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    with Store.open(store_path, create=True) as store:
        digests = [store.put(compressible(300_000, seed)) for seed in range(4)]
    clean = cachefs("scrub", "--rate", "500M", str(store_path))
    assert clean.returncode == 0 and clean.stdout.rstrip().endswith("clean"), clean
    with Store.open(store_path) as store:
        flip_first_chunk(store, digests[2])
    said = cachefs("scrub", str(store_path))
    assert said.returncode == 1 and "DAMAGE  damaged-record: " in said.stdout
    assert said.stdout.rstrip().endswith("problems; run `cachefs fsck --repair`")
    found = cachefs("scrub", "--json", str(store_path))
    assert found.returncode == 1, found
    report = json.loads(found.stdout)
    assert {p["kind"] for p in report["problems"]} >= {"damaged-record"}
    stats = json.loads(cachefs("stats", "--json", str(store_path)).stdout)
    assert stats["needs_fsck"] and stats["corruptions"] >= 1
    assert "scrub found" in stats["recent_damage"][-1]["message"]
    assert cachefs("fsck", "--repair", str(store_path)).returncode == 1  # repaired
    assert cachefs("scrub", str(store_path)).returncode == 0
    stats = json.loads(cachefs("stats", "--json", str(store_path)).stdout)
    assert not stats["needs_fsck"]


def test_a_store_another_process_holds_is_scrubbed_without_recording(tmp_path: Path) -> None:
    """A store whose writer has no control socket (a `cachefs put` running,
    here this test) is scrubbed read-only: the damage is reported, and the
    report says it was not recorded in the store's health."""
    store_path = tmp_path / "store"
    with Store.open(store_path, create=True) as store:
        digest = store.put(compressible(300_000, 9))
        flip_first_chunk(store, digest)
        held = cachefs("scrub", str(store_path))
    assert held.returncode == 1 and "DAMAGE  damaged-record: " in held.stdout
    assert "note    another process holds the store: the damage is not recorded" in held.stdout
    stats = json.loads(cachefs("stats", "--json", str(store_path)).stdout)
    assert not stats["needs_fsck"] and stats["corruptions"] == 0
    assert cachefs("scrub", str(store_path)).returncode == 1  # found again, recorded now
    assert json.loads(cachefs("stats", "--json", str(store_path)).stdout)["needs_fsck"]


def test_a_bad_rate_is_refused(tmp_path: Path) -> None:
    result = cachefs("scrub", "--rate", "0", str(tmp_path))
    assert result.returncode == 2 and "--rate 0" in result.stderr


def test_a_mount_scrubs_on_request_and_in_the_background(tmp_path: Path) -> None:
    with mounted(tmp_path / "store", tmp_path / "mnt", "--scrub-rate", "200M") as m:
        for n in range(4):
            (m.path / f"f{n}").write_bytes(compressible(200_000, n))
        digest = Digest.parse(os.getxattr(m.path / "f1", "user.cachefs.digest").decode())
        assert cachefs("scrub", str(m.path)).returncode == 0
        with Store.open(tmp_path / "store", readonly=True) as store:
            flip_first_chunk(store, digest)
        # The background pass (10 s after the mount started) finds it ...
        deadline = time.monotonic() + 60
        while not live_stats(m.path)["needs_fsck"]:
            assert time.monotonic() < deadline, "the background scrub found nothing"
            time.sleep(0.2)
        # ... and so does a scrub on request, through the daemon.
        asked = cachefs("scrub", "--json", str(m.path))
        assert asked.returncode == 1
        assert json.loads(asked.stdout)["problems"]
        stats = live_stats(m.path)
        assert stats["corruptions"] >= 2 and stats["failsafe"] is None  # data, not index
