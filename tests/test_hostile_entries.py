"""Shared entries that whoever can write a tier made malformed or hostile:
each is a miss (logged), costs the local cache nothing, never makes the mount
read-only, never makes a whole tier be skipped, and a served store never
takes one for a blob it lacks (``cachefs/fs/_shared.py``, ``cachefs/remote``)."""

from __future__ import annotations

import errno
import http.server
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import pytest
import trio

from cachefs.engine import ROOT_INODE, Digest, FsError, Store, StoreOptions
from cachefs.format.digest import SHA256
from cachefs.fs import Filesystem
from cachefs.fs._stored_files import FileAttrs
from cachefs.fuse import Operations
from cachefs.protocol import re_pb2
from cachefs.remote import Tier, Tiers, _objects, open_remote
from cachefs.remote._lists import SharedEntry, entry_document, entry_key, entry_result
from cachefs.server._actions import get_entry
from cachefs.server._cache import RemoteCache
from cachefs.signing import Verifier, generate_key
from tests.test_remote import Memory

PUSHING = StoreOptions(push=True, fsync=False)


def plant(remote: Memory, path: str, result: re_pb2.ActionResult) -> None:
    """An entry's bytes put where a tier keeps it, as anyone who may write there can."""
    if remote.documents is not None:
        remote.put_document(entry_document(SHA256, "team", path, False), result.SerializeToString())
    else:
        remote.actions[entry_key(SHA256, "team", path)] = result


@contextmanager
def shared_fs(tmp_path: Path, remote: Memory) -> Iterator[tuple[Filesystem, int]]:
    """A filesystem whose directory ``cc`` is shared as "team" through ``remote``."""
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        try:
            top = fs.create(ROOT_INODE, b"cc", stat.S_IFDIR | 0o755, 0, 0).ino
            fs.setxattr(top, b"user.cachefs.cache", b"max_size=1000000 shared=team")
            yield fs, top
        finally:
            fs.close()


def file_entry(path: str, data: bytes, *, inline: bool) -> re_pb2.ActionResult:
    digest = Digest(SHA256.hash(data), len(data))
    return entry_result(SharedEntry(path, digest, 0o644, 1, data if inline else None))


async def assert_miss(fs: Filesystem, parent: int, name: bytes) -> None:
    """A lookup of ``name`` is a miss (a negative entry, or ENOENT), and the
    mount is as writable as before."""
    try:
        attr = await Operations(fs).lookup(parent, name, None)  # type: ignore[arg-type]
    except pyfuse3.FUSEError as exc:
        assert exc.errno == errno.ENOENT
    else:
        assert attr.st_ino == 0
    assert fs.failsafe is None
    fs.create(parent, b"still-writable", stat.S_IFREG | 0o644, 0, 0)


@pytest.mark.parametrize("documents", [True, False], ids=["bucket", "reapi"])
@pytest.mark.parametrize(
    ("seconds", "inline"),
    [
        (10**17, True),  # no Timestamp (past the year 9999)
        (10**10, True),  # a Timestamp (2286) past what an inode holds
        (10**10, False),  # the same, the file fetched as a blob
        (-(10**10), True),  # 1653: before what an inode holds
    ],
)
async def test_an_entry_with_a_time_out_of_range_is_a_miss(
    tmp_path: Path, documents: bool, seconds: int, inline: bool
) -> None:
    remote = Memory("mem", documents=documents)
    data = b"hostile" * 3
    remote.blobs[Digest(SHA256.hash(data), len(data))] = data
    result = file_entry("f", data, inline=inline)
    result.output_files[0].node_properties.mtime.seconds = seconds
    plant(remote, "f", result)
    with shared_fs(tmp_path, remote) as (fs, top):
        await assert_miss(fs, top, b"f")
        assert fs.remote.tiers.tiers[0].breaker.open is False


async def test_an_unsigned_entry_with_no_time_is_a_miss_under_trust(tmp_path: Path) -> None:
    """A time that is no Timestamp in an unsigned entry, with ``--trust``: a
    miss (it was read before its signature was looked at)."""
    key = tmp_path / "k"
    generate_key(key)
    remote = Memory("mem", documents=True)
    result = file_entry("f", b"x" * 10, inline=True)
    result.output_files[0].node_properties.mtime.seconds = 10**17
    plant(remote, "f", result)
    with shared_fs(tmp_path, remote) as (fs, top):
        fs.remote.tiers.verifier = Verifier.load([Path(f"{key}.pub")], [])
        await assert_miss(fs, top, b"f")


def test_a_file_is_not_stored_with_a_time_an_inode_cannot_hold(tmp_path: Path) -> None:
    """Refused before its publication, which shares a transaction with
    others' (an error there would fail them all); nothing is stored."""
    with shared_fs(tmp_path, Memory("mem", documents=True)) as (fs, top):
        hostile = FileAttrs(0o644, 0, 0, 10**19)
        with pytest.raises(FsError, match="out of range") as err:
            fs.stored.store_file(top, b"fetched", b"data", attrs=hostile)
        assert err.value.errno == errno.EINVAL
        assert fs.stored.lookup(top, b"fetched") is None
        assert fs.stored.store_file(top, b"innocent", b"data") is not None


async def test_an_entry_whose_content_no_tier_holds_evicts_nothing(tmp_path: Path) -> None:
    """An entry that claims almost the whole budget for content no tier has:
    a miss, and the files of the cache directory stay."""
    remote = Memory("mem", documents=True)
    max_size = 1_000_000
    bogus = Digest(os.urandom(32), max_size - 1)
    plant(remote, "f", entry_result(SharedEntry("f", bogus, 0o644, 1, None)))
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                top = fs.create(ROOT_INODE, b"cc", stat.S_IFDIR | 0o755, 0, 0).ino
                fs.setxattr(top, b"user.cachefs.cache", f"max_size={max_size} shared=team".encode())
                for i in range(5):
                    name = f"local{i}".encode()
                    inode = fs.stored.store_file(top, name, os.urandom(150_000))
                    assert inode is not None
                    fs.stored.added(top, name, inode)
                cache = fs.caches.cache_of(top)
                assert cache is not None
                assert not await fs.shared.resolve(top, b"f")
                assert len(fs.namespace.entries(top)) == 5
                assert cache.counters["evictions"] == 0
                nursery.cancel_scope.cancel()
        finally:
            fs.close()


@contextmanager
def served(tmp_path: Path, remote: Memory) -> Iterator[tuple[Filesystem, RemoteCache]]:
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        try:
            yield fs, RemoteCache.open(fs)
        finally:
            fs.close()


async def test_a_blobs_name_made_from_other_content_is_no_hit(tmp_path: Path) -> None:
    """A served store: an entry under blob X's name whose digest is another
    blob Y.  An action result that names X is no hit (X cannot be read), as
    it would be without that entry."""
    remote = Memory("mem", documents=True)
    x, y = os.urandom(5000), os.urandom(5000)
    dx, dy = Digest(SHA256.hash(x), len(x)), Digest(SHA256.hash(y), len(y))
    remote.blobs[dy] = y
    key = Digest(SHA256.hash(b"action"), 6)
    with served(tmp_path, remote) as (fs, cache):
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            fs.remote.tiers.push_entry(
                "remote-cache", SharedEntry(f"_/cas/{dx.hex[:2]}/{dx.hex}", dy, 0o644, 1, None)
            )
            result = re_pb2.ActionResult(
                output_files=[
                    re_pb2.OutputFile(
                        path="out", digest=re_pb2.Digest(hash=dx.hex, size_bytes=dx.size)
                    )
                ]
            )
            await trio.to_thread.run_sync(
                lambda: cache.put_action("", key, result.SerializeToString(), by="test")
            )
            assert await trio.to_thread.run_sync(get_entry, cache, "", key) is None
            assert not await trio.to_thread.run_sync(cache.contains, "", dx)
            # Uploaded, X replaces what was at its name, and the result is a hit.
            assert await trio.to_thread.run_sync(cache.write_blob, "", dx, x)
            assert await trio.to_thread.run_sync(get_entry, cache, "", key) is not None
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("documents", [True, False], ids=["bucket", "reapi"])
async def test_directory_entries_under_a_blobs_or_actions_name_make_nothing(
    tmp_path: Path, documents: bool
) -> None:
    """A served store: a tier's directory entries at an action's and a blob's
    names (whoever may write the tier can put them; directories are not
    signed) make no directory there, so the build's upload of that blob and
    result is stored."""
    remote = Memory("mem", documents=documents)
    x = os.urandom(5000)
    dx = Digest(SHA256.hash(x), len(x))
    key = Digest(SHA256.hash(b"action"), 6)
    with served(tmp_path, remote) as (fs, cache):
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            for path in (f"_/ac/{key.hex[:2]}/{key.hex}", f"_/cas/{dx.hex[:2]}/{dx.hex}"):
                fs.remote.tiers.push_entry("remote-cache", SharedEntry(path, None))
            # A build asks for the result, then the blob: misses.
            assert await trio.to_thread.run_sync(cache.get_action, "", key) is None
            assert not await trio.to_thread.run_sync(cache.contains, "", dx)
            # It runs the action and uploads its output and result.
            assert await trio.to_thread.run_sync(cache.write_blob, "", dx, x)
            assert await trio.to_thread.run_sync(cache.find_missing, "", [(dx.hash, dx.size)]) == []
            await trio.to_thread.run_sync(lambda: cache.put_action("", key, b"\x0a\x00", by="test"))
            assert await trio.to_thread.run_sync(cache.get_action, "", key) is not None
            nursery.cancel_scope.cancel()


class _Cache(http.server.BaseHTTPRequestHandler):
    """A Bazel HTTP cache that answers one action cache key with ``body``
    (``size`` bytes of it, in 1 MiB writes) and holds ``blobs``."""

    protocol_version = "HTTP/1.1"
    bad_key = ""
    body = b""
    size = 0
    blobs: dict[str, bytes] = {}

    def do_GET(self) -> None:
        if self.path.endswith(f"/ac/{self.bad_key}"):
            self._reply(200, self.body, self.size)
        elif (blob := self.blobs.get(self.path.rpartition("/cas/")[2])) is not None:
            self._reply(200, blob, len(blob))
        else:
            self._reply(404, b"", 0)

    do_HEAD = do_GET

    def _reply(self, code: int, body: bytes, size: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            sent = 0
            while sent < size:
                piece = body[: size - sent]
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:
            pass  # the client stopped reading

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("body", ["garbage", "huge"])
def test_a_bad_entry_on_an_http_cache_is_a_miss_and_the_tier_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    """An action cache body that is no ActionResult, or one larger than any
    record of ours (read no further than that): a miss, again and again,
    while the tier's blobs and other entries are still asked for (it is not
    skipped as failing)."""
    monkeypatch.setattr(_objects, "RECORD_MAX", 1 << 20)
    good = os.urandom(1000)
    good_digest = Digest(SHA256.hash(good), len(good))

    class Handler(_Cache):
        bad_key = entry_key(SHA256, "team", "bad.o").hex
        blobs = {good_digest.hex: good}

    Handler.body, Handler.size = (
        (b"\xff\xff\xff garbage", 12) if body == "garbage" else (b"\x0a" * (1 << 20), 64 << 20)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Store.open(tmp_path / "s", create=True, options=StoreOptions(fsync=False)) as store:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            tiers = Tiers(store, [Tier(open_remote(url, SHA256))])
            try:
                for _ in range(5):
                    tiers._absent.clear()  # asked again each time, not answered from memory
                    assert tiers.find_entry("team", "bad.o") is None
                assert not tiers.tiers[0].breaker.open
                assert b"".join(tiers.fetch(good_digest)) == good
                assert tiers.find_entry("team", "other.o") is None
            finally:
                tiers.close()
    finally:
        server.shutdown()
        server.server_close()
