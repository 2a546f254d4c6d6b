"""Cache directories on a real mount: budgets, what is never evicted, hits and
misses, settings across remounts, the store quota, traces."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from cachefs.engine import Digest, Store
from cachefs.format.schema import ROOT_INODE
from cachefs.fs import Filesystem, _eviction
from cachefs.fs._files import OpenFile
from tests.mounting import apparent_size, as_user, cachefs, live_stats, mounted

XATTR = "user.cachefs.cache"
NOBODY = 65534
KIB = 1024
MIB = 1 << 20


stats = live_stats


def cache_figures(mnt: Path, path: str) -> dict[str, Any]:
    for cache in stats(mnt)["caches"]:
        if cache["path"] == path:
            return dict(cache)
    raise AssertionError(f"no cache {path} in {stats(mnt)['caches']}")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def evicted_down_to(directory: Path, files: int) -> bool:
    return len(os.listdir(directory)) <= files


def content(name: str, size: int) -> bytes:
    """Incompressible bytes that tell which file they belong to."""
    seed = hashlib.sha256(name.encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def mark(directory: Path, max_size: int, policy: str = "lru") -> None:
    os.setxattr(directory, XATTR, f"max_size={max_size} policy={policy}".encode())


def check_whole(directory: Path, names: list[str], size: int) -> list[str]:
    """The names still present; each must hold exactly its content."""
    present = []
    for name in names:
        try:
            data = (directory / name).read_bytes()
        except FileNotFoundError:
            continue
        assert data == content(name, size), f"{name} is not whole"
        present.append(name)
    return present


def test_set_ls_unset_and_remount(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        (mnt / "cc").mkdir()
        (mnt / "plain").mkdir()
        cachefs("cache", "set", str(mnt / "cc"), "--max-size", "3M", "--policy", "arc")
        assert os.getxattr(mnt / "cc", XATTR) == b"max_size=3145728 policy=arc"
        assert XATTR in os.listxattr(mnt / "cc")
        with pytest.raises(OSError) as info:
            os.getxattr(mnt / "plain", XATTR)
        assert info.value.errno == errno.ENODATA
        listed = json.loads(cachefs("cache", "ls", str(mnt), "--json").stdout)
        assert [(c["path"], c["max_size"], c["policy"]) for c in listed] == [
            ("/cc", 3 << 20, "arc")
        ]
        assert "arc" in cachefs("cache", "ls", str(mnt)).stdout
        everywhere = json.loads(cachefs("cache", "ls", "--json").stdout)  # every mount
        assert {"mountpoint": str(mnt), **listed[0]} in everywhere
        # A new budget keeps the policy and the sharing, unless told otherwise.
        cc = str(mnt / "cc")
        cachefs("cache", "set", cc, "--max-size", "4M")
        assert os.getxattr(mnt / "cc", XATTR) == b"max_size=4194304 policy=arc"
        out = cachefs("cache", "set", cc, "--max-size", "4M", "--shared", "--share-name", "t/cc")
        assert out.stdout.strip().endswith("cache of 4.0 MiB, arc, shared as t/cc")
        assert f"the mount {mnt} has no remote tier" in out.stderr  # said, not refused
        assert cachefs("cache", "ls", str(mnt)).stdout.rstrip().endswith("shared as t/cc")
        (line,) = [x for x in cachefs("stats", str(mnt)).stdout.splitlines() if "cache /cc" in x]
        assert line.endswith("of 4.0 MiB, arc, hit ratio 0.0%, 0 evicted, shared as t/cc")
        cachefs("cache", "set", cc, "--max-size", "3M")
        assert os.getxattr(mnt / "cc", XATTR) == b"max_size=3145728 policy=arc shared=t/cc"
        cachefs("cache", "set", cc, "--max-size", "3M", "--share-name", "t/cc2")
        assert os.getxattr(mnt / "cc", XATTR).endswith(b" shared=t/cc2")
        cachefs("cache", "set", cc, "--max-size", "3M", "--no-shared", "--policy", "arc")
        assert os.getxattr(mnt / "cc", XATTR) == b"max_size=3145728 policy=arc"
        bad = cachefs("cache", "set", cc, "--max-size", "3M", "--share-name", "x", check=False)
        assert bad.returncode == 2 and "--share-name goes with --shared" in bad.stderr
        (mnt / "cc" / "f").write_bytes(b"x" * 1000)
        (mnt / "cc" / "f").read_bytes()
        # Errors are one line with the remedy.
        bad = cachefs("cache", "set", str(tmp_path), "--max-size", "1M", check=False)
        assert bad.returncode == 8 and "not inside a mounted cachefs store" in bad.stderr
        bad = cachefs("cache", "set", str(mnt / "cc"), "--max-size", "lots", check=False)
        assert bad.returncode == 2 and "not a size" in bad.stderr
        bad = cachefs("cache", "unset", str(mnt / "plain"), check=False)
        assert bad.returncode == 3 and "not a cache directory" in bad.stderr
        bad = cachefs("cache", "set", str(mnt / "cc" / "f"), "--max-size", "1M", check=False)
        assert bad.returncode == 3 and "is not a directory" in bad.stderr
        bad = cachefs("cache", "set", str(mnt / "cc"), "--max-size", "0", check=False)
        assert bad.returncode == 2 and "more than 0 bytes" in bad.stderr
        bad = cachefs("cache", "ls", str(tmp_path), check=False)
        assert bad.returncode == 8 and "is not a mounted cachefs store" in bad.stderr
        # A trace recorded from the command line (as --trace at mount does).
        bad = cachefs("cache", "trace", str(mnt), check=False)
        assert bad.returncode == 2 and "either FILE" in bad.stderr
        trace = tmp_path / "trace.jsonl"
        cachefs("cache", "trace", str(mnt), str(trace))
        (mnt / "cc" / "g").write_bytes(b"g")
        (mnt / "cc" / "g").unlink()
        assert cachefs("cache", "trace", str(mnt), "--stop").stdout.strip().endswith("records")
        assert trace.read_text().strip()
        with pytest.raises(OSError) as info:
            os.setxattr(mnt / "plain", XATTR, b"max_size=-1")
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError) as info:
            os.setxattr(mnt / "cc" / "f", XATTR, b"max_size=10")
        assert info.value.errno == errno.ENOTDIR
    with mounted(store, mnt):
        assert os.getxattr(mnt / "cc", XATTR) == b"max_size=3145728 policy=arc"
        figures = cache_figures(mnt, "/cc")
        assert (figures["files"], figures["bytes"], figures["hits"]) == (1, 1000, 1)
        out = json.loads(cachefs("stats", str(mnt), "--json").stdout)
        assert out["caches"][0]["path"] == "/cc"
        cachefs("cache", "unset", str(mnt / "cc"))
        assert stats(mnt)["caches"] == []
        assert cachefs("cache", "ls", str(mnt)).stdout.strip() == "no cache directories"
    with mounted(store, mnt):
        assert stats(mnt)["caches"] == []
        assert (mnt / "cc" / "f").read_bytes() == b"x" * 1000


def test_budget_holds_and_evicted_files_go_whole(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    size, budget = 64 * KIB, 2 * MIB
    with mounted(store, mnt):
        cache, outside = mnt / "cache", mnt / "outside"
        cache.mkdir()
        outside.mkdir()
        mark(cache, budget)
        kept = [f"keep{i}" for i in range(40)]
        for name in kept:  # far more than any budget, but not in a cache
            (outside / name).write_bytes(content(name, size))
        names = []
        for i in range(200):
            sub = cache / f"{i % 8:02x}"
            sub.mkdir(exist_ok=True)
            name = f"{i % 8:02x}/f{i}"
            (cache / name).write_bytes(content(name, size))
            names.append(name)
            assert cache_figures(mnt, "/cache")["bytes"] <= budget
        wait_for(lambda: cache_figures(mnt, "/cache")["bytes"] <= 0.95 * budget, "eviction")
        figures = cache_figures(mnt, "/cache")
        present = check_whole(cache, names, size)
        assert 0 < len(present) * size == figures["bytes"] <= budget
        assert apparent_size(cache) - 9 * 4096 <= budget  # the directories count too
        assert figures["evictions"] == len(names) - len(present)
        assert figures["bytes_evicted"] == figures["evictions"] * size
        # LRU: the survivors are the most recently written.
        assert set(present) == set(names[-len(present) :])
        assert check_whole(outside, kept, size) == kept
    cachefs("fsck", str(store))


def test_open_and_unpublished_files_are_never_evicted(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    size, budget = 128 * KIB, 1 * MIB
    with mounted(store, mnt):
        cache = mnt / "cache"
        cache.mkdir()
        mark(cache, budget)
        (cache / "reader").write_bytes(content("reader", size))
        reader = open(cache / "reader", "rb")  # noqa: SIM115
        first = reader.read(1000)
        # A file being written: its writes are unpublished until it is closed.
        writer = open(cache / "writer", "wb")  # noqa: SIM115
        writer.write(content("writer", size))
        writer.flush()
        names = [f"f{i}" for i in range(30)]
        for name in names:
            (cache / name).write_bytes(content(name, size))
        wait_for(lambda: cache_figures(mnt, "/cache")["evictions"] >= 20, "eviction")
        # The reader, the oldest file of all, stayed while open: it reads to the end.
        rest = reader.read()
        assert first + rest == content("reader", size)
        assert (cache / "reader").exists() and (cache / "writer").exists()
        writer.write(b"tail")
        writer.close()
        assert (cache / "writer").read_bytes() == content("writer", size) + b"tail"
        reader.close()
        for name in names[-2:]:  # more writes: now the reader may go
            (cache / name).unlink()
        for name in [f"g{i}" for i in range(12)]:
            (cache / name).write_bytes(content(name, size))
        wait_for(lambda: not (cache / "reader").exists(), "the closed reader's eviction")
        assert cache_figures(mnt, "/cache")["bytes"] <= budget


def test_enospc_when_nothing_is_evictable(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache = mnt / "cache"
        cache.mkdir()
        mark(cache, 1 * MIB)
        fd = os.open(cache / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.write(fd, b"a" * (900 * KIB)) == 900 * KIB
            with pytest.raises(OSError) as info:
                for _ in range(10):  # the kernel may split a write: a short one first
                    os.write(fd, b"b" * (200 * KIB))
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        # Nothing stored was lost, and the cache works again once room is made.
        assert (cache / "big").stat().st_size >= 900 * KIB
        (cache / "big").unlink()
        (cache / "next").write_bytes(b"c" * (500 * KIB))
        assert (cache / "next").read_bytes() == b"c" * (500 * KIB)


def test_hits_misses_and_policy_order(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    size = 100 * KIB
    with mounted(store, mnt):
        survivors = {}
        for policy in ("lru", "lfu", "arc"):
            cache = mnt / policy
            cache.mkdir()
            mark(cache, 10 * size, policy)
            for i in range(8):
                (cache / f"f{i}").write_bytes(content(f"f{i}", size))
            for _ in range(4):  # f0 is popular (but LRU forgets: it is old)
                (cache / "f0").read_bytes()
            for i in range(1, 8):
                (cache / f"f{i}").read_bytes()
            assert not (cache / "missing").exists()
            figures = cache_figures(mnt, f"/{policy}")
            # Creating a file looks its name up first: each was a miss.
            assert (figures["hits"], figures["misses"]) == (11, 9)
            assert figures["hit_ratio"] == pytest.approx(11 / 20)
            for i in range(8, 12):
                (cache / f"f{i}").write_bytes(content(f"f{i}", size))
            wait_for(functools.partial(evicted_down_to, cache, 9), f"eviction in {policy}")
            survivors[policy] = "f0" in os.listdir(cache)
        assert survivors == {"lru": False, "lfu": True, "arc": True}


def test_moves_in_and_out_of_a_cache(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache, outside = mnt / "cache", mnt / "outside"
        cache.mkdir()
        (outside / "tree").mkdir(parents=True)
        mark(cache, 10 * MIB)
        (cache / "a").write_bytes(b"a" * 1000)
        (outside / "tree" / "b").write_bytes(b"b" * 2000)
        assert cache_figures(mnt, "/cache")["bytes"] == 1000
        os.rename(cache / "a", outside / "a")
        assert cache_figures(mnt, "/cache")["bytes"] == 0
        os.rename(outside / "tree", cache / "tree")
        assert cache_figures(mnt, "/cache")["bytes"] == 2000
        os.link(outside / "a", cache / "a-link")
        assert cache_figures(mnt, "/cache")["bytes"] == 3000
        (cache / "inner").mkdir()
        (cache / "inner" / "c").write_bytes(b"c" * 500)
        mark(cache / "inner", 1 * MIB)  # nested: its files are its own
        assert cache_figures(mnt, "/cache")["bytes"] == 3000
        assert cache_figures(mnt, "/cache/inner")["bytes"] == 500
        os.removexattr(cache / "inner", XATTR)
        assert cache_figures(mnt, "/cache")["bytes"] == 3500
        os.unlink(cache / "tree" / "b")
        assert cache_figures(mnt, "/cache")["bytes"] == 1500


def test_store_quota(tmp_path: Path) -> None:
    """Past the quota caches are evicted; ENOSPC only when nothing is evictable;
    deleting files makes room again; fsck is clean."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    size = 256 * KIB
    with mounted(store, mnt, "--max-store-size", "6M"):
        cache, outside = mnt / "cache", mnt / "outside"
        cache.mkdir()
        outside.mkdir()
        mark(cache, 100 * MIB)
        names = [f"c{i}" for i in range(60)]  # 15 MiB through a 6 MiB store
        for name in names:
            (cache / name).write_bytes(content(name, size))
        wait_for(lambda: stats(mnt)["stored_bytes"] <= 6 * MIB, "the quota to hold")
        assert cache_figures(mnt, "/cache")["evictions"] > 0
        assert check_whole(cache, names, size)
        # Outside the cache nothing is evictable: the writer gets ENOSPC.
        written = []
        with pytest.raises(OSError) as info:
            for i in range(60):
                name = f"o{i}"
                with open(outside / name, "wb") as f:
                    f.write(content(name, size))
                    os.fsync(f.fileno())
                written.append(name)
        assert info.value.errno == errno.ENOSPC
        assert written and check_whole(outside, written, size) == written
        assert not os.listdir(cache)  # everything evictable went first
        for name in written[: len(written) // 2]:
            (outside / name).unlink()
        (outside / "again").write_bytes(content("again", size))
        assert (outside / "again").read_bytes() == content("again", size)
    with mounted(store, mnt):
        assert stats(mnt)["max_store_size"] == 6 * MIB  # kept in the store
    cachefs("fsck", str(store))


def test_trace_recording(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    trace = tmp_path / "trace.jsonl"
    with mounted(store, mnt, "--trace", str(trace)):
        cache = mnt / "cache"
        cache.mkdir()
        mark(cache, 10 * MIB)
        (cache / "a").write_bytes(b"a" * 100)
        (cache / "a").read_bytes()
        assert not (cache / "b").exists()
        os.rename(cache / "a", cache / "b")
        (cache / "b").unlink()
        assert stats(mnt)["tracing"] == str(trace)
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    seen = [(r["op"], r["path"], r["size"]) for r in records]
    # Every create and rename looks the new name up first: misses.
    assert seen == [
        ("miss", "cache", 0),
        ("miss", "cache/a", 0),
        ("create", "cache/a", 0),
        ("write", "cache/a", 100),
        ("open", "cache/a", 100),
        ("miss", "cache/b", 0),
        ("miss", "cache/b", 0),
        ("rename", "cache/a", 0),
        ("unlink", "cache/b", 100),
    ]
    assert records[7]["dest"] == "cache/b"
    assert all(r["cache"] == "cache" for r in records[1:])
    assert all(isinstance(r["t"], float) for r in records)


def test_links_exchange_and_oversized_growth(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with mounted(store, mnt):
        cache, outside = mnt / "cache", mnt / "outside"
        (cache / "sub").mkdir(parents=True)
        outside.mkdir()
        mark(cache, 1 * MIB)

        def usage() -> int:
            return int(cache_figures(mnt, "/cache")["bytes"])

        # Published the way git does: link the temporary name, unlink it.
        (cache / "tmp").write_bytes(b"t" * 1000)
        os.link(cache / "tmp", cache / "final")
        os.unlink(cache / "tmp")
        assert usage() == 1000
        (outside / "x").write_bytes(b"x" * 300)
        os.rename(outside / "x", cache / "sub" / "x")
        assert usage() == 1300
        os.rename(cache / "sub", outside / "sub")  # a directory moves out
        assert usage() == 1000
        # A file with a link outside the cache: eviction takes the cache's
        # entries only; the other link keeps the file, whole.
        (cache / "shared").write_bytes(content("shared", 200 * KIB))
        os.link(cache / "shared", outside / "shared")
        for i in range(8):
            (cache / f"f{i}").write_bytes(content(f"f{i}", 200 * KIB))
        wait_for(lambda: not (cache / "shared").exists(), "eviction of the shared file")
        assert (outside / "shared").read_bytes() == content("shared", 200 * KIB)
        assert (outside / "shared").stat().st_nlink == 1
        # One file growing past the whole budget: ENOSPC at once, nothing evicted for it.
        before = cache_figures(mnt, "/cache")
        with open(cache / "huge", "wb") as f, pytest.raises(OSError) as info:
            f.truncate(2 * MIB)
        assert info.value.errno == errno.ENOSPC
        after = cache_figures(mnt, "/cache")
        assert after["evictions"] == before["evictions"]
        assert after["files"] == before["files"] + 1  # huge itself, empty
        # A new policy keeps the files and their usage.
        os.setxattr(cache, XATTR, b"max_size=1048576 policy=arc")
        assert cache_figures(mnt, "/cache")["bytes"] == after["bytes"]
        assert cache_figures(mnt, "/cache")["policy"] == "arc"


def test_only_the_owner_marks_a_directory(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="cachefs-caches-"))  # reachable by others
    base.chmod(0o755)
    try:
        with mounted(tmp_path / "store", base / "mnt") as mount:
            mount.path.chmod(0o755)
            shared = mount.path / "shared"
            shared.mkdir(mode=0o777)
            shared.chmod(0o777)
            command = f"setfattr -n {XATTR} -v max_size=1000 {shared}"
            denied = as_user(NOBODY, NOBODY, command)
            assert denied.returncode != 0 and "not permitted" in denied.stderr
            os.chown(shared, NOBODY, NOBODY)
            allowed = as_user(NOBODY, NOBODY, command)
            assert allowed.returncode == 0, allowed.stderr
            assert os.getxattr(shared, XATTR) == b"max_size=1000 policy=lru"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_parallel_writers_into_a_small_cache(tmp_path: Path) -> None:
    """Files closed but still being published count, and go once published:
    writers wait for them rather than get ENOSPC."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    size, budget = 1 * MIB, 4 * MIB
    with mounted(store, mnt):
        cache = mnt / "cache"
        cache.mkdir()
        mark(cache, budget)
        errors: list[BaseException] = []

        def work(start: int) -> None:
            try:
                for i in range(start, 48, 4):
                    (cache / f"f{i}").write_bytes(content(f"f{i}", size))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        figures = cache_figures(mnt, "/cache")
        assert figures["bytes"] <= budget and figures["evictions"] >= 44
        assert check_whole(cache, [f"f{i}" for i in range(48)], size)


@pytest.mark.parametrize("policy", ["lru", "lfu", "arc"])
def test_a_batch_of_hits_is_the_hits_one_by_one(store: Store, policy: str) -> None:
    """A server tells of a batch of hits at once (``opened_many``, runs of one
    cache directory at a time): each cache's hit count and order of eviction
    are those of the same hits told one by one."""
    fs = Filesystem(store)
    try:
        twins: list[dict[str, tuple[int, dict[int, str]]]] = []
        for twin in ("batched", "single"):
            caches = {}
            for name in ("a", "b"):
                d = fs.create(ROOT_INODE, f"{twin}-{name}".encode(), stat.S_IFDIR | 0o755, 0, 0)
                fs.caches.mark(d.ino, f"max_size=1000000 policy={policy}".encode())
                files = {
                    fs.create(d.ino, f"f{i}".encode(), stat.S_IFREG | 0o644, 0, 0).ino: f"f{i}"
                    for i in range(5)
                }
                caches[name] = (d.ino, files)
            outside = fs.create(ROOT_INODE, f"{twin}-x".encode(), stat.S_IFREG | 0o644, 0, 0)
            twins.append(caches)
            inos = {name: list(files) for name, (_, files) in caches.items()}
            # Runs of one cache, of the other, of a file in none, and repeats.
            order = [
                *inos["a"][3:], inos["b"][0], outside.ino, inos["b"][0], inos["a"][1],
                *inos["b"][2:4], inos["a"][1], outside.ino, inos["a"][0],
            ]  # fmt: skip
            hits = [(ino, 0) for ino in order]
            if twin == "batched":
                fs.caches.opened_many(hits)
            else:
                for ino, size in hits:
                    fs.caches.opened(ino, size)

        def books(caches: dict[str, tuple[int, dict[int, str]]]) -> dict[str, Any]:
            out = {}
            for name, (ino, files) in caches.items():
                cache = fs.caches.dirs[ino]
                victims = [files[v] for v in cache.policy.victims()]
                out[name] = (cache.counters["hits"], victims)
            return out

        batched, single = (books(c) for c in twins)
        assert batched == single
        assert batched["a"][0] == 5 and batched["b"][0] == 4
    finally:
        fs.close()


async def test_a_writer_waiting_for_a_file_being_published_is_woken_when_it_may_go(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write past the budget waits while the closed file that would make
    room is still being published; it goes on as soon as that file is let go
    and evicted, not when the wait for room runs out with ENOSPC (builds
    writing their outputs one after the other into a small cache failed so)."""
    monkeypatch.setattr(_eviction, "THROTTLE_LIMIT", 3600.0)
    size = 600_000
    fs = Filesystem(store)
    published, let_go = trio.Event(), trio.Event()
    publish = fs.publisher.publish

    async def held_publish(state: OpenFile, *, durable: bool) -> None:
        # Held before the publication, and between it and the file's release.
        await published.wait()
        await publish(state, durable=durable)
        await let_go.wait()

    monkeypatch.setattr(fs.publisher, "publish", held_publish)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        cache = fs.create(ROOT_INODE, b"cache", stat.S_IFDIR | 0o755, 0, 0)
        fs.caches.mark(cache.ino, b"max_size=1000000")
        first = fs.create(cache.ino, b"f0", stat.S_IFREG | 0o644, 0, 0)
        fh, _ = await fs.open(first.ino, os.O_WRONLY)
        await fs.write(fh, 0, content("f0", size))
        nursery.start_soon(fs.release, fh)
        await trio.testing.wait_all_tasks_blocked()
        second = fs.create(cache.ino, b"f1", stat.S_IFREG | 0o644, 0, 0)
        fh2, _ = await fs.open(second.ino, os.O_WRONLY)
        written = trio.Event()

        async def write_second() -> None:
            await fs.write(fh2, 0, content("f1", size))
            written.set()

        nursery.start_soon(write_second)
        with trio.fail_after(60):  # the writer and the evictor do not wake each other in turn
            await trio.testing.wait_all_tasks_blocked()
        assert fs.caches.eviction.blocked == 1 and not written.is_set()  # waits for f0
        published.set()
        state = fs.files.get(first.ino)
        assert state is not None
        with trio.fail_after(60):
            while state.publishing or state.changed:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()  # the evictor found f0 still busy
        assert not written.is_set() and fs.files.get(first.ino) is state
        let_go.set()
        with trio.fail_after(60):  # an hour without a wake-up when f0 is let go
            await written.wait()
        await fs.release(fh2)
        assert first.ino not in fs.caches.members  # evicted
        await fs.flush_all()
        nursery.cancel_scope.cancel()
    fs.close()
    assert fs.errors == 0


@pytest.mark.parametrize("told", [True, False], ids=["told", "not-told"])
async def test_a_writer_waits_past_the_limit_while_a_publication_that_makes_room_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch, told: bool
) -> None:
    """The wait for room runs out only when nothing is in flight: a closed file
    whose publication takes longer than the limit (a slow disk's sync) is
    waited for, then evicted, and the write goes on.  Also when the evictor
    has not passed since that publication ended (not told of it, as on a busy
    machine where the writer's wait ran out first): one more pass is made."""
    monkeypatch.setattr(_eviction, "THROTTLE_LIMIT", 0.05)
    if not told:
        monkeypatch.setattr(_eviction.Eviction, "changed", lambda self: None)
    size = 600_000
    fs = Filesystem(store)
    store_content = fs.publisher._store

    async def slow_store(state: OpenFile, *, durable: bool) -> Digest | None:
        await trio.sleep(0.5)  # ten times the limit
        return await store_content(state, durable=durable)

    monkeypatch.setattr(fs.publisher, "_store", slow_store)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        cache = fs.create(ROOT_INODE, b"cache", stat.S_IFDIR | 0o755, 0, 0)
        fs.caches.mark(cache.ino, b"max_size=1000000")
        inos = []
        for n in range(3):
            inode = fs.create(cache.ino, f"f{n}".encode(), stat.S_IFREG | 0o644, 0, 0)
            fh, _ = await fs.open(inode.ino, os.O_WRONLY)
            await fs.write(fh, 0, content(f"f{n}", size))  # f1 and f2 wait for room
            nursery.start_soon(fs.release, fh)
            await trio.testing.wait_all_tasks_blocked()
            inos.append(inode.ino)
        with trio.fail_after(60):
            while fs.files.get(inos[-1]) is not None:
                await trio.sleep(0.01)
        assert [ino in fs.caches.members for ino in inos] == [False, False, True]
        assert fs.caches.eviction.blocked == 2
        await fs.flush_all()
        nursery.cancel_scope.cancel()
    fs.close()
    assert fs.errors == 0
