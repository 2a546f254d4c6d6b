"""Cache directories' books and budgets in the cases a review found wrong:
files stored whole at once by a server, a cache over its budget with no writer
waiting (a file moved in while open, a mount stopped mid-eviction), names left
behind by a directory moved out or a cache marked inside another, hard links
of symlinks."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cachefs.engine import CacheRecords, Namespace, Store
from tests.mounting import cachefs, mounted
from tests.reapi import serving
from tests.test_caches import KIB, MIB, cache_figures, content, mark, wait_for


def usage(mnt: Path, path: str) -> tuple[int, int]:
    figures = cache_figures(mnt, path)
    return figures["files"], figures["bytes"]


def test_blobs_stored_at_once_by_a_server_keep_its_budget(tmp_path: Path) -> None:
    blobs = [os.urandom(300_000) for _ in range(16)]
    with serving(tmp_path / "store", "--max-size", "1M", grpc_on=False) as server:
        assert server.http is not None
        host, port = server.http.rsplit(":", 1)

        def put(data: bytes) -> int:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("PUT", f"/cas/{hashlib.sha256(data).hexdigest()}", body=data)
            status = conn.getresponse().status
            conn.close()
            return status

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(put, blobs))
        # Each waits for the room the others hold, then for eviction.
        assert statuses == [200] * len(blobs), statuses
        time.sleep(0.5)
        (cache,) = json.loads(cachefs("stats", "--json", str(server.store)).stdout)["caches"]
        assert cache["bytes"] <= 1 << 20, (statuses, cache)


def test_a_file_moved_in_while_open_is_evicted_once_closed(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache, outside = mnt / "cache", mnt / "outside"
        cache.mkdir()
        outside.mkdir()
        mark(cache, 1 * MIB)
        with open(outside / "big", "wb") as f:
            f.write(content("big", 2 * MIB))
            os.rename(outside / "big", cache / "big")
        wait_for(lambda: usage(mnt, "/cache")[1] <= 1 * MIB, "eviction once closed")


def test_a_cache_over_its_budget_at_mount_is_evicted(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache = mnt / "cache"
        cache.mkdir()
        mark(cache, 10 * MIB)
        for i in range(40):
            (cache / f"f{i}").write_bytes(content(f"f{i}", 100 * KIB))
        ino = cache.stat().st_ino
    # Over its budget with nobody writing, as a mount that stopped while its
    # evictor worked leaves it: the budget lowered behind the mount's back.
    with Store.open(store) as opened:
        records = CacheRecords(Namespace(opened))
        record = records.records()[ino]
        records.put({ino: {**record, "max_size": 1 * MIB}})
    with mounted(store, mnt):
        wait_for(lambda: usage(mnt, "/cache")[1] <= 1 * MIB, "eviction at mount")


def test_a_directory_moved_out_leaves_the_names_that_stay_counted(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache, outside = mnt / "cache", mnt / "outside"
        (cache / "sub").mkdir(parents=True)
        outside.mkdir()
        mark(cache, 10 * MIB)
        (cache / "a").write_bytes(b"a" * 1000)
        os.link(cache / "a", cache / "sub" / "a2")
        assert usage(mnt, "/cache") == (1, 1000)
        os.rename(cache / "sub", outside / "sub")
        assert usage(mnt, "/cache") == (1, 1000)
        os.unlink(cache / "a")
        assert usage(mnt, "/cache") == (0, 0)


def test_a_cache_marked_inside_another_leaves_it_the_files_named_there(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        outer = mnt / "outer"
        (outer / "inner").mkdir(parents=True)
        mark(outer, 10 * MIB)
        (outer / "a").write_bytes(b"a" * 1000)
        os.link(outer / "a", outer / "inner" / "a")
        (outer / "inner" / "b").write_bytes(b"b" * 500)
        mark(outer / "inner", 10 * MIB)
        assert usage(mnt, "/outer/inner") == (1, 500)
        os.unlink(outer / "inner" / "a")
        assert usage(mnt, "/outer") == (1, 1000)
    with mounted(store, mnt):
        assert usage(mnt, "/outer") == (1, 1000)


def test_a_hard_link_of_a_symlink_is_no_file_of_the_cache(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache = mnt / "cache"
        cache.mkdir()
        mark(cache, 10 * MIB)
        os.symlink("x" * 100, cache / "s")
        os.link(cache / "s", cache / "s2", follow_symlinks=False)
        assert usage(mnt, "/cache") == (0, 0)


def test_an_upload_that_stalls_holds_no_room(tmp_path: Path) -> None:
    """Bytes a client has still to send hold no room: a stalled PUT neither
    makes others wait nor has the cache emptied for room it cannot give."""
    with serving(tmp_path / "store", "--max-size", "1M", grpc_on=False) as server:
        assert server.http is not None
        host, port = server.http.rsplit(":", 1)

        def request(method: str, data: bytes, body: bytes | None = None) -> int:
            conn = http.client.HTTPConnection(host, int(port), timeout=15)
            try:
                conn.request(method, f"/cas/{hashlib.sha256(data).hexdigest()}", body=body)
                answer = conn.getresponse()
                answer.read()
                return answer.status
            finally:
                conn.close()

        stored = [os.urandom(100_000) for _ in range(3)]
        assert [request("PUT", b, b) for b in stored] == [200] * 3
        slow = os.urandom(600_000)
        with socket.create_connection((host, int(port))) as stalled:
            stalled.sendall(
                f"PUT /cas/{hashlib.sha256(slow).hexdigest()} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(slow)}\r\n\r\n".encode()
                + slow[:1000]
            )
            time.sleep(0.5)
            blob = os.urandom(500_000)
            assert request("PUT", blob, blob) == 200
            assert [request("GET", b) for b in stored] == [200] * 3
