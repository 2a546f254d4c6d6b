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
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from cachefs.engine import SHA256, CachefsError, CacheRecords, Digest, Namespace, Store
from cachefs.errors import RemoteError
from cachefs.format.schema import ROOT_INODE
from cachefs.fs import Filesystem, _eviction
from cachefs.remote import SharedEntry, Tier
from cachefs.server._cache import RemoteCache
from tests.mounting import cachefs, mounted
from tests.reapi import serving
from tests.test_caches import KIB, MIB, cache_figures, content, mark, wait_for
from tests.test_remote import Memory


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


@pytest.mark.parametrize(
    ("files", "writers", "growth"),
    [(8, 2, 600_000), (9, 10, 131_072)],
    ids=["two-uploads", "ten-writes"],
)
async def test_writers_that_fit_one_at_a_time_each_get_room(
    store: Store, monkeypatch: pytest.MonkeyPatch, files: int, writers: int, growth: int
) -> None:
    """Together they want more than the budget: the evictor makes room for each
    (down to nothing if need be), rather than stopping at its watermark."""
    monkeypatch.setattr(_eviction, "THROTTLE_LIMIT", 0.5)
    fs = Filesystem(store)
    results: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        cache = fs.create(ROOT_INODE, b"cache", stat.S_IFDIR | 0o755, 0, 0)
        fs.caches.mark(cache.ino, b"max_size=1000000")
        await _files(fs, cache.ino, files)
        members = fs.caches.dirs[cache.ino]
        assert members.usage == files * 100_000

        async def writer() -> None:
            try:
                await fs.caches.eviction.make_room(members, growth)
                results.append("ok")
            except CachefsError as exc:
                results.append(str(exc))

        with trio.fail_after(60):
            async with trio.open_nursery() as waiting:
                for _ in range(writers):
                    waiting.start_soon(writer)
        nursery.cancel_scope.cancel()
    fs.close()
    assert results == ["ok"] * writers


async def test_a_file_stored_in_place_of_another_lets_its_room_go_as_it_is_counted(
    tmp_path: Path,
) -> None:
    """An action result (stored under a name of its own, then renamed over the
    old one): never counted beside the room it held, which the evictor would
    see as twice its size."""
    seen: list[tuple[int, int]] = []
    with Store.open(tmp_path / "store", create=True) as store:
        fs = Filesystem(store)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                cache = RemoteCache.open(fs, max_size=1_000_000)
                members = fs.caches.dirs[cache.root]
                put_in_place = cache._put_in_place

                def watched(*args: Any) -> None:
                    put_in_place(*args)
                    seen.append((members.usage, members.reserved))

                cache._put_in_place = watched  # type: ignore[method-assign,assignment]
                key = Digest(SHA256.hash(b"an action"), 9)
                data = os.urandom(300_000)
                await trio.to_thread.run_sync(lambda: cache.put_action("", key, data, by="t"))
                nursery.cancel_scope.cancel()
        finally:
            fs.close()
    assert seen == [(300_000, 0)]


async def _files(fs: Filesystem, top: int, n: int) -> None:
    for i in range(n):  # closed, published: evictable
        inode = fs.create(top, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0)
        fh, _ = await fs.open(inode.ino, os.O_WRONLY)
        await fs.write(fh, 0, content(f"f{i}", 100_000))
        await fs.release(fh)
    await fs.flush_all()
    with trio.fail_after(30):
        while fs.files.get(inode.ino) is not None:
            await trio.sleep(0.01)


async def test_a_stalled_shared_fetch_neither_holds_room_nor_has_the_cache_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared fetch of a chunk-listed object whose chunks still come from the
    tier as it is stored (``Tiers.fetch`` gives a generator) holds no room: a
    stalled tier held it, and a writer that could not fit beside it had every
    file evicted, though it fitted beside them all."""
    monkeypatch.setattr(_eviction, "THROTTLE_LIMIT", 0.5)
    remote = Memory("mem", documents=True)
    big = os.urandom(600_000)
    digest = Digest(SHA256.hash(big), len(big))
    gate = threading.Event()
    reached = threading.Event()

    def stalled_fetch(d: Digest) -> Iterator[bytes]:
        def chunks() -> Iterator[bytes]:
            yield big[:300_000]
            reached.set()
            gate.wait(30)  # a tier that stalls (its request in flight)
            raise RemoteError("mem: timed out")

        return chunks()

    with Store.open(tmp_path / "s", create=True) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        monkeypatch.setattr(fs.remote.tiers, "fetch", stalled_fetch)
        results: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                top = fs.create(ROOT_INODE, b"cc", stat.S_IFDIR | 0o755, 0, 0).ino
                fs.setxattr(top, b"user.cachefs.cache", b"max_size=1000000 shared=team")
                await _files(fs, top, 4)
                cache = fs.caches.cache_of(top)
                assert cache is not None and cache.usage == 400_000
                fs.remote.tiers.push_entry("team", SharedEntry("big", digest, 0o644, 1, None))
                nursery.start_soon(fs.shared.resolve, top, b"big")
                with trio.fail_after(10):
                    while not reached.is_set():
                        await trio.sleep(0.01)
                assert cache.reserved == 0  # its chunks are still coming: no room held

                async def writer() -> None:
                    try:
                        await fs.caches.eviction.make_room(cache, 500_000)
                        results.append("ok")
                    except CachefsError as exc:
                        results.append(str(exc))

                nursery.start_soon(writer)
                await trio.sleep(1.0)  # the evictor's pass, while the tier stalls
                evicted_meanwhile = cache.counters["evictions"]
                gate.set()  # the fetch fails: its room goes, the writer fits
                with trio.fail_after(10):
                    while not results:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            gate.set()
            fs.close()
    assert results == ["ok"]
    # 400 kB used + 500 kB wanted fit in 1 MB: nothing had to go.
    assert evicted_meanwhile == 0, f"{evicted_meanwhile} files evicted for nothing"


async def test_writers_that_fit_one_at_a_time_do_not_empty_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten 128 KiB writers into a 1 MB cache holding 900 kB: each fits once
    usage is at most 868,928 (one file gone); a target of nothing took all nine."""
    monkeypatch.setattr(_eviction, "THROTTLE_LIMIT", 0.5)
    with Store.open(tmp_path / "s", create=True) as store:
        fs = Filesystem(store)
        results: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                top = fs.create(ROOT_INODE, b"cc", stat.S_IFDIR | 0o755, 0, 0).ino
                fs.caches.mark(top, b"max_size=1000000")
                await _files(fs, top, 9)
                cache = fs.caches.dirs[top]

                async def writer() -> None:
                    try:
                        await fs.caches.eviction.make_room(cache, 131_072)
                        results.append("ok")
                    except CachefsError as exc:
                        results.append(str(exc))

                with trio.fail_after(30):
                    async with trio.open_nursery() as waiting:
                        for _ in range(10):
                            waiting.start_soon(writer)
                left = cache.usage
                nursery.cancel_scope.cancel()
        finally:
            fs.close()
    assert results == ["ok"] * 10
    assert left >= 800_000, f"usage {left}: evicted far more than any writer needed"


async def test_a_writer_is_not_kept_waiting_by_held_room_that_never_all_goes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores of bytes in hand that hold room in turn (two at once, each taking
    it again as it lets it go) do not go ahead of a larger writer waiting."""
    monkeypatch.setattr(_eviction, "THROTTLE_LIMIT", 0.5)
    fs = Filesystem(store)
    results: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        top = fs.create(ROOT_INODE, b"cache", stat.S_IFDIR | 0o755, 0, 0).ino
        fs.caches.mark(top, b"max_size=1000000")
        cache = fs.caches.dirs[top]

        async def uploads(delay: float) -> None:
            # A server storing 400 kB blobs in hand, one after another (two at once).
            await trio.sleep(delay)
            while True:
                held = await fs.stored.make_room(top, 400_000)
                await trio.sleep(0.1)  # storing it
                held.release()

        nursery.start_soon(uploads, 0)
        nursery.start_soon(uploads, 0.05)
        await trio.sleep(0.2)
        try:
            with trio.fail_after(5):  # ten times THROTTLE_LIMIT
                await fs.caches.eviction.make_room(cache, 500_000)
            results.append("ok")
        except CachefsError as exc:
            results.append(str(exc))
        except trio.TooSlowError:
            results.append(f"still waiting after 5 s (reserved {cache.reserved})")
        nursery.cancel_scope.cancel()
    fs.close()
    assert results == ["ok"], results
