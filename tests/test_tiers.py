"""Tiers: a store's objects pushed from its durable queue and fetched by
another store, as chunks plus a chunk list, through a remote in memory and
through real ones (SeaweedFS's S3 gateway, a ``cachefs serve``, BuildGrid)."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import lmdb
import pytest
import trio
import trio.testing

from cachefs.engine import (
    ROOT_INODE,
    CachefsError,
    CorruptDataError,
    Digest,
    DigestMismatchError,
    FsError,
    KnownChunks,
    ObjectNotFoundError,
    Store,
    StoreOptions,
    _ingest,
    check_store,
    collect_garbage,
    drop_held,
    scrub_store,
)
from cachefs.errors import ConfigError, RemoteError, StoreFullError
from cachefs.format.digest import SHA256
from cachefs.fs import Filesystem
from cachefs.protocol import re_pb2
from cachefs.remote import (
    Pusher,
    Tier,
    TierOptions,
    Tiers,
    _tiers,
    _transfer,
    load_tiers,
    open_remote,
    read_config,
    verified,
)
from cachefs.remote._lists import (
    SharedEntry,
    entry_result,
    list_key,
    pack_list,
    parse_entry,
    unpack_list,
)
from tests import clients
from tests.conftest import SMALL_CONFIG, flip_first_chunk
from tests.mounting import cachefs, content_digest, kill, live_stats, mounted, start
from tests.reapi import Client, buildgrid, free_port, serving
from tests.seaweed import Seaweed, seaweed, seaweed_cluster
from tests.test_cli import flip_byte_of
from tests.test_remote import Memory

PUSHING = StoreOptions(push=True, fsync=False)


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One SeaweedFS for the module's tests (each uses a prefix of its own)."""
    with seaweed(tmp_path_factory.mktemp("weed")) as server:
        yield server


def fetch_into(store: Store, tiers: Tiers, digest: Digest) -> bytes:
    """Fetch an object through ``tiers`` into ``store``, and read it back."""
    got = store.put(tiers.fetch(digest), expect=digest)
    assert got == digest
    return store.read(digest)


def drain(pusher: Pusher) -> None:
    while pusher.queue.depth()[0]:
        assert pusher.drain_once()


def test_objects_go_as_chunks_and_a_list_and_come_back(tmp_path: Path) -> None:
    remote = Memory("mem")
    # Seeded: how many chunks a change re-cuts depends on the bytes (now and
    # then more than two for random ones), so the count below does not vary.
    data = random.Random(12).randbytes(3 << 20)
    # A cuts smaller chunks than B would: B keeps A's (its own cut would differ).
    with Store.open(tmp_path / "a", create=True, config=SMALL_CONFIG, options=PUSHING) as a:
        tiers = Tiers(a, [Tier(remote)])
        digest = a.put(data)
        assert a.pushes is not None and a.pushes.depth()[0] == 1
        drain(Pusher(tiers))
        chunks = a.recipe(digest)
        assert len(chunks) > 4
        assert {Digest(d, n) for d, n in chunks} <= set(remote.blobs)
        assert digest not in remote.blobs  # whole objects only for tiers that want them
        assert list_key(SHA256, digest) in remote.actions
        # A changed file sends only its new chunks.
        before = len(remote.blobs)
        changed = data[:1000] + b"changed" + data[1000:]
        second = a.put(changed)
        drain(Pusher(tiers))
        new = len(remote.blobs) - before
        assert 1 <= new <= 3, new  # one or two chunks, and the list
        assert a.pushes.depth() == (0, 0.0)
        # An object of one chunk is that chunk's blob: no list, no entry.
        small = a.put(b"one chunk" * 100)
        drain(Pusher(tiers))
        assert small in remote.blobs and list_key(SHA256, small) not in remote.actions
        tiers.close()
    with Store.open(tmp_path / "b", create=True, options=StoreOptions(fsync=False)) as b:
        tiers = Tiers(b, [Tier(remote)])
        assert isinstance(tiers.fetch(digest), KnownChunks)  # stored with no cut again
        assert fetch_into(b, tiers, digest) == data
        assert b.recipe(digest) == chunks
        fetched = tiers.counts["fetched_chunks"]
        assert fetched == len({d for d, _ in chunks})
        # The second object shares all but its changed chunks with the first.
        assert fetch_into(b, tiers, second) == changed
        assert tiers.counts["fetched_chunks"] - fetched <= 2
        calls = remote.calls
        assert fetch_into(b, tiers, small) == b"one chunk" * 100
        assert remote.calls == calls + 1  # one request
        with pytest.raises(ObjectNotFoundError):
            tiers.fetch(Digest(SHA256.hash(b"nowhere"), 7))
        tiers.close()


def test_a_chunk_another_ingest_has_not_published_is_fetched(tmp_path: Path) -> None:
    """A chunk that an ingest running meanwhile appended, but has not published
    yet, cannot be read from this store: the fetch takes it from the tier."""
    remote = Memory("mem")
    data = os.urandom(1 << 20)
    with Store.open(tmp_path / "a", create=True, config=SMALL_CONFIG, options=PUSHING) as a:
        tiers = Tiers(a, [Tier(remote)])
        digest = a.put(data)
        # As many chunks as the other ingest gives its workers at once.
        firsts = [(d, bytes(a.read_chunk(d))) for d, _ in a.recipe(digest)[: _ingest._TASK_CHUNKS]]
        drain(Pusher(tiers))
        tiers.close()
    with Store.open(tmp_path / "b", create=True, options=StoreOptions(fsync=False)) as b:
        release = threading.Event()

        def stalled() -> Iterator[tuple[bytes, bytes | memoryview]]:
            yield from firsts
            release.wait(30)
            raise OSError(errno.EIO, "the source of the other ingest failed")

        other = ThreadPoolExecutor(1).submit(b.put, KnownChunks(stalled()))
        first = firsts[0][0]
        pending = b.chunks.segments.shard(first).pending
        wait_for(lambda: first in pending, 10)
        tiers = Tiers(b, [Tier(remote)])
        try:
            assert fetch_into(b, tiers, digest) == data
        finally:
            release.set()
            tiers.close()
        with pytest.raises(OSError):
            other.result(30)
        assert b.read(digest) == data
        assert check_store(b).clean


def test_shared_entries_carry_small_files() -> None:
    """A shared entry round-trips through its ActionResult; a small file's
    bytes ride along, and bytes that cannot be the file's are dropped (the
    digest is fetched then; stored bytes are checked against it anyway)."""
    data = b"a small file"
    digest = Digest(SHA256.hash(data), len(data))
    entry = SharedEntry("d/f.o", digest, 0o755, 123, data)
    assert parse_entry(entry_result(entry), "d/f.o", "here") == entry
    short = entry_result(SharedEntry("d/f.o", digest, 0o644, 0, data[:-1]))
    assert parse_entry(short, "d/f.o", "here").contents is None
    with pytest.raises(RemoteError, match="malformed"):
        parse_entry(entry_result(entry), "d/other.o", "here")
    directory = parse_entry(entry_result(SharedEntry("d", None)), "d", "here")
    assert directory.digest is None and directory.contents is None


@pytest.mark.parametrize("documents", [True, False], ids=["bucket", "action-cache"])
def test_shared_entries_are_found_with_few_requests(
    tmp_path: Path, documents: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a tier keeps documents (a bucket), a directory's entries are under
    one prefix: a file's entry is read by its key, and the first name missing
    there lists the directory, which then answers every lookup in it (absent
    names, directories: known without a thread); a name no tier has is not
    asked about again for a second, wherever entries are kept."""
    remote = Memory("mem", documents=documents)
    data = b"x" * 100
    digest = Digest(SHA256.hash(data), len(data))
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def requests(fn: Callable[[], bool]) -> int:
        """The requests ``fn`` made; ``fn`` must answer right."""
        calls = remote.calls
        assert fn()
        return remote.calls - calls

    f_o, g_o = SharedEntry("a/b/f.o", digest, 0o640, 5), SharedEntry("a/b/g.o", digest, 0o644, 6)
    with Store.open(tmp_path / "s", create=True, options=StoreOptions(fsync=False)) as store:
        tiers = Tiers(store, [Tier(remote)])
        tiers.push_entry("team", f_o)
        tiers.push_entry("team", g_o)
        assert bool(remote.docs) == documents and bool(remote.actions) != documents
        if documents:
            assert all(k.startswith("shares/") for k in remote.docs)
        assert tiers.known_entry("team", "a/b/f.o") == (False, None)
        assert requests(lambda: tiers.find_entry("team", "a/b/f.o") == f_o) == 1
        # A tool's temporary files: the first lists the directory.
        assert tiers.known_entry("team", "a/b/f.o.tmp.XYZ") == (False, None)
        assert requests(lambda: tiers.find_entry("team", "a/b/f.o.tmp.XYZ") is None) == (
            2 if documents else 1
        )
        assert tiers.known_entry("team", "a/b/lock") == (documents, None)
        assert requests(lambda: tiers.find_entry("team", "a/b/lock") is None) == (
            0 if documents else 1
        )
        assert tiers.known_entry("team", "a/b/g.o") == (False, None)  # a file: its entry
        assert requests(lambda: tiers.find_entry("team", "a/b/g.o") == g_o) == 1
        # No tier had it a moment ago: known, wherever entries are kept.
        assert tiers.known_entry("team", "a/b/lock") == (True, None)
        assert requests(lambda: tiers.find_entry("team", "a/b/lock") is None) == 0
        assert tiers.find_entry("team", "a/b") == SharedEntry("a/b", None)
        assert tiers.find_entry("team", "a") == SharedEntry("a", None)
        if documents:
            assert tiers.known_entry("team", "a/b") == (True, SharedEntry("a/b", None))
        assert tiers.find_entry("team", "a/nowhere") is None
        assert tiers.find_entry("other", "a/b/f.o") is None  # shares are apart
        clock[0] += 1.5  # a name another machine put there is found a moment later
        lock = SharedEntry("a/b/lock", digest, 0o600, 7)
        tiers.push_entry("team", lock)
        assert tiers.known_entry("team", "a/b/lock") == (False, None)
        assert requests(lambda: tiers.find_entry("team", "a/b/lock") == lock) == 1
        if documents:  # a directory too large to list is asked about by name
            monkeypatch.setattr(_tiers, "LISTING_MAX", 1)
            clock[0] += 1.5
            tiers.push_entry("team", SharedEntry("a/b/c/h.o", digest, 0o644, 8))
            directory = SharedEntry("a/b/c", None)
            # The entry, the listing (too long), the directory's entry.
            assert requests(lambda: tiers.find_entry("team", "a/b/c") == directory) == 3
            assert requests(lambda: tiers.find_entry("team", "a/b/none") is None) == 2
            assert requests(lambda: tiers.find_entry("team", "a/b/g.o") == g_o) == 1
            remote.docs[next(k for k in remote.docs if k.endswith(b"g.o".hex()))] = b"\xff"
            assert tiers.find_entry("team", "a/b/g.o") is None  # not an ActionResult: a miss
        # A name that was a file and is now a directory is a directory.
        clock[0] += 400
        tiers.push_entry("team", SharedEntry("a/x", digest, 0o644, 9))
        tiers.push_entry("team", SharedEntry("a/x/y", digest, 0o644, 9))
        assert tiers.find_entry("team", "a/x") == SharedEntry("a/x", None)
        tiers.close()


def test_a_listing_answers_for_its_directories_longer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing answers lookups of absent names for a second, and of the
    directories it shows for ten (entries leave a tier only by its lifecycle):
    a tool that looks up ``x/y`` after ``x/z`` makes no request."""
    remote = Memory("mem", documents=True)
    data = b"x" * 100
    digest = Digest(SHA256.hash(data), len(data))
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with Store.open(tmp_path / "s", create=True, options=StoreOptions(fsync=False)) as store:
        tiers = Tiers(store, [Tier(remote)])
        for path in ("x/y/f.o", "x/z/f.o"):
            tiers.push_entry("team", SharedEntry(path, digest, 0o644, 1, data))
        calls = remote.calls
        assert tiers.find_entry("team", "x/y") == SharedEntry("x/y", None)
        assert remote.calls - calls == 2  # the file's entry it is not, the listing of x
        clock[0] += _tiers.LISTING_TTL + 0.5
        calls = remote.calls
        assert tiers.known_entry("team", "x/z") == (True, SharedEntry("x/z", None))
        assert tiers.find_entry("team", "x/z") == SharedEntry("x/z", None)
        assert remote.calls == calls
        # Absent names are not answered from it any more, nor files.
        assert tiers.known_entry("team", "x/new") == (False, None)
        assert tiers.known_entry("team", "x/y/f.o") == (False, None)
        clock[0] += _tiers.LISTED_DIRECTORY_TTL
        assert tiers.known_entry("team", "x/z") == (False, None)
        assert tiers.find_entry("team", "x/z") == SharedEntry("x/z", None)
        assert remote.calls > calls
        tiers.close()


def test_directories_found_listed_are_not_put_again_until_they_are_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine that found a shared directory in a bucket's listing takes
    its entry for put when it was written: a file it pushes below puts only
    its own entry (no PUT and DELETE of each directory above), until the
    directory's entry is ``DIRECTORY_REFRESH`` old, as with one it put."""

    class Counting(Memory):
        def __init__(self) -> None:
            super().__init__("mem", documents=True)
            self.puts: list[str] = []
            self.deletes = 0

        def put_document(self, key: str, data: bytes) -> None:
            super().put_document(key, data)
            self.puts.append(key)

        def delete_document(self, key: str) -> None:
            super().delete_document(key)
            self.deletes += 1

    remote = Counting()
    data = b"x" * 100
    digest = Digest(SHA256.hash(data), len(data))
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    options = StoreOptions(fsync=False)

    def pushed(tiers: Tiers, path: str) -> tuple[int, int]:
        """(PUTs, DELETEs) of pushing a file's entry at ``path``."""
        puts, deletes = len(remote.puts), remote.deletes
        tiers.push_entry("team", SharedEntry(path, digest, 0o644, 1, data))
        return len(remote.puts) - puts, remote.deletes - deletes

    with (
        Store.open(tmp_path / "a", create=True, options=options) as a,
        Store.open(tmp_path / "b", create=True, options=options) as b,
    ):
        first, second = Tiers(a, [Tier(remote)]), Tiers(b, [Tier(remote)])
        assert pushed(first, "x/y/f.o") == (3, 2)  # x, x/y and the file
        assert pushed(first, "x/y/g.o") == (1, 0)  # put lately by this machine
        # The other machine finds them by lookups that list x's parent and x.
        assert second.find_entry("team", "x") == SharedEntry("x", None)
        assert second.find_entry("team", "x/y") == SharedEntry("x/y", None)
        assert pushed(second, "x/y/stats") == (1, 0)
        # Directories it did not see listed are put as before.
        assert pushed(second, "x/z/stats") == (2, 1)
        # Once old, a directory's entry is put again (the lifecycle may expire it).
        clock[0] += _tiers.DIRECTORY_REFRESH + 1
        assert pushed(second, "x/y/h.o") == (3, 2)
        # A listing that finds an old entry: put again at once.
        third = Tiers(b, [Tier(remote)])
        old = time.time() - _tiers.DIRECTORY_REFRESH - 60
        remote.written = dict.fromkeys(remote.written, old)
        assert third.find_entry("team", "x/y") == SharedEntry("x/y", None)
        assert pushed(third, "x/y/i.o") == (3, 2)
        # A name that is a file's and a directory's: the directory is put, the file goes.
        z = next(k for k in remote.docs if k.endswith("/d" + b"z".hex()))
        remote.put_document(z.rpartition("/")[0] + "/f" + b"z".hex(), b"")
        fourth = Tiers(b, [Tier(remote)])
        remote.written = dict.fromkeys(remote.written, time.time())
        assert fourth.find_entry("team", "x") == SharedEntry("x", None)  # lists x's parent
        assert fourth.find_entry("team", "x/q") is None  # lists x
        assert pushed(fourth, "x/y/j.o") == (1, 0)
        assert pushed(fourth, "x/z/j.o") == (2, 1)
        # Written further "in the future" than clocks differ: not taken, put.
        fifth = Tiers(b, [Tier(remote)])
        remote.written = dict.fromkeys(remote.written, time.time() + 3600)
        assert fifth.find_entry("team", "x") == SharedEntry("x", None)
        assert fifth.find_entry("team", "x/q") is None
        assert pushed(fifth, "x/y/k.o") == (3, 2)
        # A directory too large to list: nothing taken from it.
        monkeypatch.setattr(_tiers, "LISTING_MAX", 1)
        sixth = Tiers(b, [Tier(remote)])
        remote.written = dict.fromkeys(remote.written, time.time())
        assert sixth.find_entry("team", "x/q") is None
        assert pushed(sixth, "x/y/l.o") == (3, 2)
        # What a read-only tier's listing shows says nothing of a write tier.
        other = Counting()
        other.name = other.key = "another bucket"
        seventh = Tiers(b, [Tier(remote, "read-only"), Tier(other, "write-only")])
        monkeypatch.setattr(_tiers, "LISTING_MAX", 4000)
        assert seventh.find_entry("team", "x") == SharedEntry("x", None)
        assert seventh.find_entry("team", "x/q") is None
        seventh.push_entry("team", SharedEntry("x/y/m.o", digest, 0o644, 1, data))
        assert len(other.puts) == 3 and other.deletes == 2
        for tiers in (first, second, third, fourth, fifth, sixth, seventh):
            tiers.close()


def test_whole_objects_for_tiers_that_want_them(tmp_path: Path) -> None:
    remote = Memory("mem")
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as a:
        tiers = Tiers(a, [Tier(remote, whole=True)])
        digest = a.put(b"x" * 100_000)
        drain(Pusher(tiers))
        assert remote.blobs[digest] == b"x" * 100_000
        # Without a list, a reader takes the whole blob.
        remote.actions.clear()
        with Store.open(tmp_path / "b", create=True, options=StoreOptions(fsync=False)) as b:
            other = Tiers(b, [Tier(remote)])
            assert fetch_into(b, other, digest) == b"x" * 100_000
            other.close()
        tiers.close()


def test_the_queue_survives_a_reopen_and_drops_what_went(tmp_path: Path) -> None:
    remote = Memory("mem")
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as a:
        kept = a.put(b"kept" * 1000)
        gone = a.put(b"gone" * 1000)
        a.unref(gone)
    with Store.open(tmp_path / "a", options=StoreOptions()) as a:
        assert a.pushes is None  # opened without tiers: nothing queued ...
        a.put(b"not queued")
    with Store.open(tmp_path / "a", options=PUSHING) as a:
        assert a.pushes is not None
        assert [p.digest for p in a.pushes.peek(10)] == [kept, gone]  # ... the rest kept
        tiers = Tiers(a, [Tier(remote)])
        drain(Pusher(tiers))
        tiers.close()
    assert {Digest(d, n) for d, n in [(SHA256.hash(b"kept" * 1000), 4000)]} <= set(remote.blobs)


def test_an_item_refused_for_good_does_not_block_the_queue(tmp_path: Path) -> None:
    """A tier that refuses one object for what it is (not because it is down):
    that object leaves the queue with an error in the log, the others go."""

    class Refusing(Memory):
        def write(self, digest: Digest, data: bytes) -> None:
            if data.startswith(b"refused"):
                error = RemoteError(f"{self.name}: writing blob {digest}: INVALID_ARGUMENT")
                error.permanent = True
                raise error
            super().write(digest, data)

    remote = Refusing("mem")
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        store.put(b"refused" * 100)
        kept = store.put(b"accepted" * 100)
        pusher = Pusher(Tiers(store, [Tier(remote)]))
        drain(pusher)
        assert pusher.dropped == 1 and kept.hash in {d.hash for d in remote.blobs}
        pusher.tiers.close()


def test_a_failing_tier_keeps_the_queue(tmp_path: Path) -> None:
    remote = Memory("mem")
    remote.down = True
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as a:
        one, two = a.put(b"one" * 1000), a.put(b"two" * 1000)
        pusher = Pusher(Tiers(a, [Tier(remote)]))
        with pytest.raises(RemoteError):
            pusher.drain_once()
        assert a.pushes is not None and a.pushes.depth()[0] == 2
        remote.down = False
        drain(pusher)
        assert {one, two} <= set(remote.blobs)  # small: each one chunk, its own blob
        pusher.tiers.close()


class Verifying(Memory):
    """A remote in memory that checks what it hands back, as real ones do."""

    def read(self, digest: Digest) -> bytes:
        return verified(self.name, SHA256, digest, super().read(digest))


def test_wrong_bytes_from_a_tier_are_never_stored(tmp_path: Path) -> None:
    remote = Verifying("mem")
    data = os.urandom(1 << 20)
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as a:
        tiers = Tiers(a, [Tier(remote, whole=True)])
        digest = a.put(data)
        drain(Pusher(tiers))
        tiers.close()
    # A list that names the wrong chunks: each chunk is fine, the whole is not.
    other = Digest(SHA256.hash(b"other" * 100), 500)
    remote.blobs[other] = b"other" * 100
    bad = pack_list([(other.hash, 500)])
    with pytest.raises(RemoteError, match="does not add up"):
        unpack_list(bad, digest, "mem")
    with Store.open(tmp_path / "b", create=True, options=StoreOptions(fsync=False)) as b:
        tiers = Tiers(b, [Tier(remote)])
        # A chunk damaged on the remote.
        chunk = next(d for d in remote.blobs if d != digest and d.size > 1000)
        remote.blobs[chunk] = os.urandom(chunk.size)
        with pytest.raises(RemoteError, match="not blob"):
            b.put(tiers.fetch(digest), expect=digest)
        assert not b.contains(digest)
        # A whole blob with wrong bytes is refused by the digest it is stored under.
        remote.actions.clear()
        remote.blobs[digest] = os.urandom(digest.size)
        with pytest.raises((RemoteError, DigestMismatchError)):
            b.put(tiers.fetch(digest), expect=digest)
        assert not b.contains(digest)
        tiers.close()


def test_config_files(tmp_path: Path) -> None:
    config = tmp_path / "cachefs.toml"
    config.write_text(
        """
[remote]
timeout = 3

[[tier]]
url = "grpc://127.0.0.1:1/main"
direction = "read-only"

[[tier]]
replicas = 2
endpoints = [
  { url = "http://127.0.0.1:2", weight = 1 },
  { url = "http://127.0.0.1:3", weight = 2.5 },
]
"""
    )
    tiers = load_tiers(["grpc://127.0.0.1:4"], read_config(config), SHA256)
    try:
        assert [t.direction for t in tiers] == ["read-only", "read-write", "read-write"]
        assert [t.whole for t in tiers] == [True, True, True]
        assert tiers[1].remote.name.startswith("group(")
    finally:
        for tier in tiers:
            tier.remote.close()
    for text, why in [
        ("[[tier]]\nurl = 'grpc://h'\ndirection = 'sideways'\n", "direction"),
        ("[[tier]]\nurl = 'grpc://h'\ntimout = 3\n", "unknown key 'timout'"),
        ("[[tier]]\nreplicas = 2\nendpoints = [{ url = 'grpc://h' }]\n", "cannot keep 2"),
        ("[[tier]]\n", "either url or endpoints"),
        ("[remote]\ntimeout = -1\n", "positive number"),
        ("[[tier]\n", "not valid TOML"),
        ("[tiers]\n", "unknown key 'tiers'"),
        ("tier = 5\n", "are \\[\\[tier\\]\\] tables"),
        ("tier = [1]\n", "are \\[\\[tier\\]\\] tables"),
        ("remote = 5\n", "is a table"),
        ("[[tier]]\nurl = 'grpc://h'\nreplicas = 2\n", "replicas needs endpoints"),
        ("[[tier]]\nendpoints = []\n", "endpoints is a list of"),
        ("[[tier]]\nendpoints = 'grpc://h'\n", "endpoints is a list of"),
        ("[[tier]]\nendpoints = ['grpc://h']\n", "an endpoint is"),
        ("[[tier]]\nendpoints = [{ url = 'grpc://h' }]\nreplicas = 1.5\n", "whole number"),
        ("[[tier]]\nendpoints = [{ url = 'grpc://h' }]\nreplicas = true\n", "whole number"),
        ("[[tier]]\nurl = 'grpc://h'\ndurable = 'yes'\n", "durable are true or false"),
    ]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_tiers([], read_config(config), SHA256)
    # The [trust] table, and the options checked before a store is opened.
    for text, why in [
        ("trust = 5\n", "\\[trust\\] is a table"),
        ("[trust]\ntrust = 5\n", "trust is a path or a list of paths"),
        ("[trust]\nsign_key = ['a', 3]\n", "sign_key is a path or a list of paths"),
        ("[trust]\nrevoked = 'abc'\n", "revoked is a list of key ids"),
        ("[trust]\nmax_age = -1\n", "positive number"),
        ("[trust]\nkeys = []\n", "unknown key 'keys'"),
    ]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=why):
            TierOptions.parse([], config)
    config.write_text("[[tier]]\nurl = 's3://b?endpoint=http://127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match="local or remote"):
        TierOptions.parse([], config, durability="somewhere")
    with pytest.raises(ConfigError, match="more than 0 bytes"):
        TierOptions.parse([], config, local_max_size=0)
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(tmp_path / "missing.toml")


def _round_trip(tmp_path: Path, url: str, *, whole: bool) -> dict[str, Any]:
    """Push a large and a small object to ``url``, fetch them into another
    store; what the pushing tiers counted."""
    data = os.urandom(2 << 20) + b"tail"
    a = Store.open(tmp_path / "a", create=True, options=PUSHING)
    try:
        tiers = Tiers(a, [Tier(open_remote(url, SHA256), whole=whole)])
        digest = a.put(data)
        small = a.put(b"small file")
        drain(Pusher(tiers))
        tiers.close()
        pushing = dict(tiers.counts)
    finally:
        a.close()
    with Store.open(tmp_path / "b", create=True, options=StoreOptions(fsync=False)) as b:
        tiers = Tiers(b, [Tier(open_remote(url, SHA256))])
        try:
            assert fetch_into(b, tiers, digest) == data
            assert fetch_into(b, tiers, small) == b"small file"
        finally:
            tiers.close()
    return dict(tiers.counts) | {"pushing": pushing}


def test_through_seaweedfs(tmp_path: Path, weed: Seaweed) -> None:
    _round_trip(tmp_path, weed.url("cachefs", tmp_path.name), whole=False)


def test_through_a_cachefs_serve(tmp_path: Path) -> None:
    data = os.urandom(2 << 20) + b"tail"
    with serving(tmp_path / "server") as server:
        counts = _round_trip(tmp_path / "grpc", f"grpc://{server.grpc}/team", whole=True)
        # cachefs serve offers SpliceBlob: the large object was spliced from
        # its chunks, not sent again; its clients read it whole.
        assert counts["pushing"]["spliced_objects"] == 1
        _round_trip(tmp_path / "http", f"http://{server.http}/team", whole=True)
        with Store.open(tmp_path / "c", create=True, options=PUSHING) as c:
            tiers = Tiers(c, [Tier(open_remote(f"grpc://{server.grpc}/team", SHA256), whole=True)])
            c.put(data)
            drain(Pusher(tiers))
            assert tiers.counts["spliced_objects"] == 1
            tiers.close()
        with Client(server.grpc, SHA256, "team") as client:
            assert client.read(client.digest(data)) == data


def test_through_buildgrid(tmp_path: Path) -> None:
    with buildgrid(tmp_path / "bgd") as server:
        _round_trip(tmp_path, f"grpc://{server.grpc}", whole=True)


# --- a mount with tiers -----------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.1)


def test_a_mount_pushes_from_a_queue_that_survives_kill_9(tmp_path: Path, weed: Seaweed) -> None:
    """A mount whose remote is down queues what it publishes; killed, then
    mounted again with the remote up, it drains the queue; another store
    then fetches every file from the remote."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    files = {f"f{i}": os.urandom(50_000 + i * 70_000) for i in range(12)}
    dead = f"grpc://127.0.0.1:{free_port()}"
    mount = start(store, mnt, "--remote", dead)
    try:
        for name, data in files.items():
            with open(mnt / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        digests = {name: Digest.parse(content_digest(mnt / name)) for name in files}
        remote = live_stats(mnt)["remote"]
        assert remote["queue"] >= len(files), remote
        assert remote["tiers"][0]["remote"] == dead
        shown = cachefs("stats", str(mnt)).stdout
        assert "push queue" in shown and f"{remote['queue']} waiting" in shown
    finally:
        kill(mount)
    url = weed.url("cachefs", "mount")
    with mounted(store, mnt, "--remote", url):
        wait_for(lambda: live_stats(mnt)["remote"]["queue"] == 0)
        assert live_stats(mnt)["remote"]["pushed_objects"] >= len(files)
    with Store.open(tmp_path / "other", create=True, options=StoreOptions(fsync=False)) as b:
        tiers = Tiers(b, [Tier(open_remote(url, SHA256))])
        try:
            for name, data in files.items():
                assert fetch_into(b, tiers, digests[name]) == data
        finally:
            tiers.close()


# --- shared cache directories -------------------------------------------------------


@contextmanager
def two_mounts(tmp_path: Path, url: str, *shared: str) -> Iterator[tuple[Path, Path]]:
    """Two mounts of two stores with the remote ``url``, each with the shared
    cache directories ``shared``: two machines of a team."""
    one, two = tmp_path / "one", tmp_path / "two"
    with (
        mounted(tmp_path / "s1", one, "--remote", url),
        mounted(tmp_path / "s2", two, "--remote", url),
    ):
        for mnt in (one, two):
            for name in shared:
                (mnt / name).mkdir()
                out = cachefs("cache", "set", str(mnt / name), "--max-size", "1G", "--shared")
                assert f"shared as {name}" in out.stdout and "warning" not in out.stderr
        yield one, two


def settled(mnt: Path) -> bool:
    remote = live_stats(mnt)["remote"]
    return bool(remote["queue"] == 0 and remote["shared_settling"] == 0)


@contextmanager
def a_remote(kind: str, directory: Path, weed: Seaweed) -> Iterator[str]:
    """A remote of each kind, running for the test: its URL."""
    if kind == "s3":
        yield weed.url("cachefs", directory.name)
    elif kind == "buildgrid":
        with buildgrid(directory / "bgd") as server:
            yield f"grpc://{server.grpc}"
    else:
        with serving(directory / "server") as server:
            yield f"grpc://{server.grpc}/team" if kind == "grpc" else f"http://{server.http}/team"


def test_files_written_just_before_an_unmount_are_shared(tmp_path: Path, weed: Seaweed) -> None:
    """A CI runner writes its cache and unmounts at once, before the files
    have settled: their entries are queued at the unmount (in the store),
    pushed at the latest when it is mounted again, and another machine then
    finds the files."""
    url = weed.url("cachefs", tmp_path.name)
    one, two = tmp_path / "one", tmp_path / "two"
    files = {f"d{n}/obj{n}.o": os.urandom(50_000 + n) for n in range(3)}
    with mounted(tmp_path / "s1", one, "--remote", url):
        (one / "cc").mkdir()
        cachefs("cache", "set", str(one / "cc"), "--max-size", "1G", "--shared")
        for path, data in files.items():
            (one / "cc" / path).parent.mkdir()
            (one / "cc" / path).write_bytes(data)
    with mounted(tmp_path / "s1", one, "--remote", url):
        wait_for(lambda: settled(one))
    with mounted(tmp_path / "s2", two, "--remote", url):
        (two / "cc").mkdir()
        cachefs("cache", "set", str(two / "cc"), "--max-size", "1G", "--shared")
        for path, data in files.items():
            assert (two / "cc" / path).read_bytes() == data, path


def test_a_shared_file_larger_than_the_cache_here_is_a_miss(tmp_path: Path, weed: Seaweed) -> None:
    """A file the tiers have that is larger than this machine's budget for
    the directory is not fetched (nothing could be evicted to hold it): the
    lookup misses and says why in the log; smaller ones are fetched."""
    url = weed.url("cachefs", tmp_path.name)
    big, small = os.urandom(3 << 20), os.urandom(1000)
    with two_mounts(tmp_path, url, "cc") as (one, two):
        (one / "cc" / "big.o").write_bytes(big)
        (one / "cc" / "small.o").write_bytes(small)
        wait_for(lambda: settled(one))
        cachefs("cache", "set", str(two / "cc"), "--max-size", "1M", "--shared")
        assert not (two / "cc" / "big.o").exists()
        assert (two / "cc" / "small.o").read_bytes() == small
        log = (tmp_path / "s2" / "cachefs.log").read_text()
        assert "big.o" in log and "larger than the cache's budget" in log


@pytest.mark.parametrize("kind", ["s3", "grpc", "http", "buildgrid"])
def test_a_shared_directory_across_two_mounts(tmp_path: Path, kind: str, weed: Seaweed) -> None:
    """Files written in a shared cache directory of one mount (as a tool
    does: a temporary name, then a rename) are found by name through the
    other mount, byte-identical, with their mode and mtime; a name that is
    nowhere misses; deleting is local.  Through SeaweedFS's S3 gateway, a
    ``cachefs serve`` over gRPC and over HTTP, and BuildGrid."""
    files = {
        "a/0/obj1.o": os.urandom(200_000),
        "a/1/obj2.o": os.urandom(3_000_000),
        "b/stats": b"x" * 100,
        "empty": b"",
        os.fsdecode(b"caf\xe9-latin1.o"): b"a name that is not UTF-8",
    }
    with a_remote(kind, tmp_path, weed) as url, two_mounts(tmp_path, url, "cc") as (one, two):
        for path, data in files.items():
            target = one / "cc" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(target.name + ".tmp")
            with open(temporary, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            os.chmod(temporary, 0o640)
            os.rename(temporary, target)
        os.utime(one / "cc" / "b/stats", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
        wait_for(lambda: settled(one))
        assert live_stats(one)["remote"]["shared_entries_queued"] >= len(files)
        for path, data in files.items():
            there = two / "cc" / path
            assert there.read_bytes() == data, path
            assert there.stat().st_mode & 0o777 == 0o640
        assert (two / "cc" / "b/stats").stat().st_mtime_ns == 1_600_000_000 * 10**9
        assert not (two / "cc" / "a/0/obj1.o.tmp").exists()  # the temporary name was not pushed
        with pytest.raises(FileNotFoundError):
            (two / "cc" / "a/0/nowhere.o").read_bytes()
        stats = live_stats(two)
        assert stats["remote"]["shared_fetches"] == len(files)
        assert stats["remote"]["queue"] == 0  # what came from the tiers is not pushed back
        assert stats["remote"]["pushed_objects"] == 0
        if kind == "s3":  # small files came inside their entries: two fetched
            assert stats["remote"]["fetched_objects"] == 2, stats["remote"]
            assert stats["remote"]["tiers"][0]["fetched_objects"] == 2
            # A fetched file changed here is shared again; a file open for
            # writing is not shared until it is closed (never half a file).
            (two / "cc" / "b/stats").write_bytes(b"y" * 100)
            with open(one / "cc" / "growing", "wb") as f:
                f.write(b"first half")
                f.flush()
                os.fsync(f.fileno())
                time.sleep(2.5)
                assert live_stats(one)["remote"]["shared_settling"] == 1
                f.write(b", second half")
            wait_for(lambda: settled(one) and settled(two))
            assert live_stats(two)["remote"]["pushed_entries"] == 1
            time.sleep(1.1)  # the kernel's negative entry
            assert (two / "cc" / "growing").read_bytes() == b"first half, second half"
        cache = next(c for c in stats["caches"] if c["path"] == "/cc")
        assert cache["shared"] == "cc" and cache["files"] == len(files)
        # Local files now: deleting one is local, reading it again fetches it again.
        stats_now = (two / "cc" / "b/stats").read_bytes()  # (changed above for s3)
        (two / "cc" / "b/stats").unlink()
        time.sleep(1.1)  # the kernel's negative entry
        assert (two / "cc" / "b/stats").read_bytes() == stats_now
        # A directory that is not shared does not look.
        (two / "plain").mkdir()
        assert not (two / "plain" / "a").exists()


def test_ccache_and_bazel_share_a_cache_across_two_mounts(tmp_path: Path, weed: Seaweed) -> None:
    """A tool's own cache directory is a team cache with no change to the
    tool: ``CCACHE_DIR`` and Bazel's ``--disk_cache`` in shared directories
    of two mounts of one S3 remote; a build on the first, then the same build
    (sources elsewhere) on the second hits for every object, outputs identical."""
    clients.require_ccache()
    clients.require_bazel()
    url = weed.url("cachefs", "team")
    with two_mounts(tmp_path, url, "ccache", "bazel") as (one, two):
        src_one = clients.c_project(tmp_path / "src1")
        first = clients.ccache_build(src_one, one / "ccache")
        assert first.misses > 30 and first.hits == 0 and not first.errors
        workspace = clients.bazel_workspace(tmp_path / "ws1")
        built = clients.bazel_build(workspace, one / "bazel", tmp_path / "out1")
        assert built.hits == 0 and built.spawns == 33
        wait_for(lambda: settled(one), timeout=120)
        src_two = clients.c_project(tmp_path / "src2")
        second = clients.ccache_build(src_two, two / "ccache")
        assert second.hits == first.misses and second.misses == 0, second.stats
        assert not second.errors and second.outputs == first.outputs
        clients.smoke_test(src_two)
        workspace = clients.bazel_workspace(tmp_path / "ws2")
        again = clients.bazel_build(workspace, two / "bazel", tmp_path / "out2")
        assert again.hits == again.spawns == 33
        assert again.outputs == built.outputs
        assert live_stats(two)["remote"]["shared_fetches"] > first.misses


# --- self-heal ------------------------------------------------------------------------


def test_a_damaged_chunk_heals_from_a_tier(tmp_path: Path) -> None:
    remote = Verifying("mem")
    data = os.urandom(1 << 20)
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote)])
        digest = store.put(data)
        drain(Pusher(tiers))
        store.chunks.cache.clear()
        flip_first_chunk(store, digest)
        assert store.read(digest) == data  # healed, not EIO
        assert tiers.counts["healed_chunks"] == 1
        assert tiers.by_tier["mem"]["healed_chunks"] == 1  # and by the tier it came from
        assert store.corruptions == 0 and not store.needs_fsck
        assert store.read(digest) == data  # the fresh copy, read as any other
        assert tiers.counts["healed_chunks"] == 1
        tiers.close()
        report = check_store(store)
        assert report.clean, report.problems
        # Without a tier that has it, damage is damage.
        other = store.put(os.urandom(100_000))
        flip_first_chunk(store, other)
        store.chunks.cache.clear()
        healing = Tiers(store, [Tier(Verifying("empty"))])
        with pytest.raises(CorruptDataError):
            store.read(other)
        assert store.needs_fsck
        healing.close()


def test_scrub_heals_what_it_finds(tmp_path: Path) -> None:
    """A scrub of a store with tiers heals the damage it finds instead of
    recording it; without tiers it records it, as ever."""
    remote = Verifying("mem")
    data = os.urandom(1 << 20)
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote)])
        digest = store.put(data)
        drain(Pusher(tiers))
        flip_first_chunk(store, digest)
        report = scrub_store(store)
        assert report.clean, report.problems
        assert any("healed" in note for note in report.notes)
        assert tiers.counts["healed_chunks"] == 1 and not store.needs_fsck
        tiers.close()
        flip_first_chunk(store, digest)
        assert not scrub_store(store).clean
        assert store.needs_fsck


def test_a_record_that_cannot_be_rebuilt_heals_as_a_fresh_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the damaged record's bytes cannot be rebuilt (another codec), the
    chunk is stored again and the index points at the copy: reads are right
    from then on, and fsck --repair drops the dead damaged record."""
    monkeypatch.setattr("cachefs.engine._heal._rewrite", lambda *args: False)
    remote = Verifying("mem")
    data = os.urandom(1 << 20)
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote)])
        digest = store.put(data)
        drain(Pusher(tiers))
        chunk = store.recipe(digest)[0][0]
        with store.index.read() as txn:
            before = store.index.get_chunk(txn, chunk)
        flip_first_chunk(store, digest)
        store.chunks.cache.clear()
        assert store.read(digest) == data
        with store.index.read() as txn:
            after = store.index.get_chunk(txn, chunk)
        assert before is not None and after is not None
        assert (after.segment_id, after.offset) != (before.segment_id, before.offset)
        assert tiers.counts["healed_chunks"] == 1 and not store.needs_fsck
        store.chunks.cache.clear()
        assert store.read(digest) == data and tiers.counts["healed_chunks"] == 1
        tiers.close()
        assert not check_store(store, repair=True).lost_objects
        assert check_store(store).clean
        assert store.read(digest) == data


def segment_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "segments").rglob("*") if p.is_file())


def test_chunks_a_tier_holds_are_dropped_here_and_fetched_back(tmp_path: Path) -> None:
    """drop_held makes the chunks a read-write tier holds held remotely,
    coldest first, never one that is not pushed; reads fetch them back
    (verified), fsck is clean at every step, and gc reclaims their records."""
    remote = Verifying("mem")
    files = [os.urandom(1 << 20) for _ in range(6)]
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote, durable=True)])
        digests = [store.put(data) for data in files]
        lost = store.put(os.urandom(1 << 20))
        drain(Pusher(tiers))
        for chunk, size in store.recipe(lost):  # the tier lost these: they stay
            del remote.blobs[Digest(chunk, size)]
        unpushed = store.put(os.urandom(300_000))  # never pushed: it stays
        # A tier that evicts (not durable) holds nothing to drop for.
        tiers.close()
        evicting = Tiers(store, [Tier(remote)])
        assert drop_held(store, 0, evicting.held).chunks == 0
        evicting.close()
        tiers = Tiers(store, [Tier(remote, durable=True)])
        report = drop_held(store, 0, tiers.held)
        assert report.chunks > 0 and report.bytes_reclaimed > 0
        assert check_store(store).clean
        for digest in digests:
            assert store.reader.held_remotely(digest, 0, digest.size) == [
                (c, n) for c, n in store.recipe(digest)
            ]
        for digest in (lost, unpushed):
            assert not store.reader.held_remotely(digest, 0, digest.size)
        assert store.stored_bytes() > unpushed.size + lost.size
        assert store.stored_bytes() < unpushed.size + lost.size + (100 << 10)
        store.chunks.cache.clear()
        before = segment_bytes(tmp_path / "a")
        for digest, data in zip(digests, files, strict=True):
            assert store.read(digest) == data
        assert tiers.counts["fetched_chunks"] >= sum(len(store.recipe(d)) for d in digests) // 2
        described: Any = tiers.figures()["tiers"]
        assert described[0]["fetched_chunks"] == tiers.counts["fetched_chunks"]
        assert described[0]["fetched_bytes"] == tiers.counts["fetched_bytes"]
        assert segment_bytes(tmp_path / "a") > before
        assert check_store(store).clean and store.corruptions == 0
        # Dropped again; a put of the same bytes stores them here again.
        drop_held(store, 0, tiers.held)
        assert store.put(files[0]) == digests[0]
        assert not store.reader.held_remotely(digests[0], 0, digests[0].size)
        # Dropped, then deleted: gc forgets them.
        drop_held(store, 0, tiers.held)
        for digest in digests[1:]:
            store.unref(digest)
        collect_garbage(store)
        assert check_store(store).clean
        tiers.close()
        # Without its tiers, a dropped chunk is an error that says so, not damage.
        with pytest.raises(RemoteError, match="held only by the store's remote tiers"):
            store.read(digests[0])
        assert not store.needs_fsck


def test_a_restore_takes_from_each_tier_what_the_ones_before_lacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks dropped here, a cache that evicted some of them before the
    bucket they were dropped for: each tier in turn is asked for what the
    ones before did not give, in order, and what comes is stored as it
    comes (several publications, each told), not chunk by chunk at the end.
    A restore that fails here (a full disk) leaves the tier's breaker able to
    admit requests (a retry that the store failed is no failure of the tier)."""
    monkeypatch.setattr(_tiers, "RESTORE_BATCH", 256 << 10)
    cache, bucket = Verifying("cache"), Verifying("bucket")
    data = os.urandom(3 << 20)
    with Store.open(tmp_path / "s", create=True, config=SMALL_CONFIG, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(bucket, durable=True)])
        digest = store.put(data)
        drain(Pusher(tiers))
        tiers.close()
        recipe = store.recipe(digest)
        cache.blobs = dict(bucket.blobs)
        evicted = {Digest(*recipe[i]) for i in (10, len(recipe) // 2)}
        for chunk in evicted:
            del cache.blobs[chunk]
        now = [1000.0]
        first = Tier(cache, direction="read-only")
        first.breaker.clock = lambda: now[0]
        tiers = Tiers(store, [first, Tier(bucket, durable=True)])
        try:
            assert drop_held(store, 0, tiers.held).chunks == len(set(recipe))
            landed: list[int] = []
            bucket.calls = cache.calls = 0
            assert tiers.restore(recipe, landed.append) == len(set(recipe))
            assert store.read(digest) == data
            assert len(landed) >= 6 and sum(landed) == len(set(recipe))
            # The cache up to its first miss (and what was in flight then),
            # the bucket from there on: each chunk from one tier.
            assert 11 <= cache.calls <= 11 + _transfer.FETCH_AHEAD
            assert bucket.calls == len(recipe) - 10
            # (what came from the cache after its miss is fetched again: counted)
            fetched = tiers.counts["fetched_chunks"]
            assert len(recipe) <= fetched <= len(recipe) + _transfer.FETCH_AHEAD
            # The cache's breaker opened; its retry meets a full disk here.
            drop_held(store, 0, tiers.held)
            for _ in range(5):
                first.breaker.failed("blip")
            now[0] += 3600
            full = StoreFullError("no space left on device")
            monkeypatch.setattr(_tiers, "restore_chunks", Mock(side_effect=full))
            with pytest.raises(StoreFullError):
                tiers.restore(recipe)
            monkeypatch.undo()
            assert first.breaker.admit() and not first.breaker.open
        finally:
            tiers.close()


async def test_lookups_in_a_shared_directory_follow_a_moved_directory(tmp_path: Path) -> None:
    """A lookup that misses in a shared directory asks the tiers by the path
    relative to it (kept per directory, never by a path the directory had
    before it moved); a directory made from the tiers' entry is known by
    its path at once."""
    remote = Memory("mem", documents=True)
    data = b"from elsewhere"
    digest = Digest(SHA256.hash(data), len(data))
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        try:
            tiers = fs.remote.tiers
            dir_mode = stat.S_IFDIR | 0o755
            top = fs.create(ROOT_INODE, b"cc", dir_mode, 0, 0).ino
            fs.setxattr(top, b"user.cachefs.cache", b"max_size=1000000 shared=team")
            old = fs.create(top, b"old", dir_mode, 0, 0).ino
            for path in ("old/f", "made/deep/f"):
                tiers.push_entry("team", SharedEntry(path, digest, 0o644, 1, data))
            moved = b"under its new name"
            tiers.push_entry(
                "team",
                SharedEntry("new/f", Digest(SHA256.hash(moved), len(moved)), 0o644, 1, moved),
            )
            assert await fs.shared.resolve(old, b"f")  # "old/f"
            assert fs.namespace.lookup(old, b"f")
            fs.unlink(old, b"f")
            fs.rename(top, b"old", top, b"new", 0)
            assert await fs.shared.resolve(old, b"f")  # now "new/f"
            ino = fs.namespace.lookup(old, b"f")
            fh, _ = await fs.open(ino, os.O_RDONLY)
            assert bytes(await fs.read(fh, 0, 100)) == moved
            await fs.release(fh)
            assert await fs.shared.resolve(top, b"made")
            made = fs.namespace.lookup(top, b"made")
            assert fs.shared._paths[top, made] == b"made"
            assert await fs.shared.resolve(made, b"deep")
            deep = fs.namespace.lookup(made, b"deep")
            assert await fs.shared.resolve(deep, b"f")
            assert not await fs.shared.resolve(deep, b"nothing")
        finally:
            fs.close()


async def test_lookups_of_one_name_at_once_fetch_it_once(tmp_path: Path) -> None:
    """Lookups of a name that another lookup is fetching wait for it: one
    fetch for all of them, and each finds the file."""
    with one_shared_file(tmp_path, Memory("mem", documents=True)) as (fs, top, data):
        found: list[bool] = []

        async def look(name: bytes) -> None:
            found.append(await fs.shared.resolve(top, name))

        async with trio.open_nursery() as nursery:
            for name in (b"f", b"f", b"f", b"absent", b"absent"):
                nursery.start_soon(look, name)
        assert sorted(found) == [False, False, True, True, True]
        await fetched_once(fs, top, data)


async def test_files_inside_their_entries_arrive_in_one_hop_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that comes inside its shared entry is stored by the thread hop
    that found it while it fits in the cache; once the cache is full, room
    is made first (eviction) and the budget holds.  Bytes inside an entry
    that are not its content are never stored."""
    remote = Memory("mem", documents=True)
    files = [os.urandom(30_000) for _ in range(6)]
    fetch_hops: list[str] = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "") == "_fetch":
            fetch_hops.append(args[1].decode())
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(fs.run)
                top = fs.create(ROOT_INODE, b"cc", stat.S_IFDIR | 0o755, 1234, 5678).ino
                fs.setxattr(top, b"user.cachefs.cache", b"max_size=160000 shared=team")
                cache = fs.caches.cache_of(top)
                assert cache is not None
                for i, data in enumerate(files):
                    digest = Digest(SHA256.hash(data), len(data))
                    fs.remote.tiers.push_entry("team", SharedEntry(f"f{i}", digest, 0o640, 1, data))
                other = bytes(20)
                wrong = Digest(SHA256.hash(b"x" * 20), 20)  # the entry's bytes are not these
                fs.remote.tiers.push_entry("team", SharedEntry("bad", wrong, 0o644, 1, other))
                for i, data in enumerate(files):
                    assert await fs.shared.resolve(top, f"f{i}".encode())
                    inode = fs.namespace.get(fs.namespace.lookup(top, f"f{i}".encode()))
                    assert (inode.mode, inode.uid, inode.gid) == (stat.S_IFREG | 0o640, 1234, 5678)
                    fh, _ = await fs.open(inode.ino, os.O_RDONLY)
                    assert bytes(await fs.read(fh, 0, len(data))) == data
                    await fs.release(fh)
                    assert cache.usage <= cache.max_size
                # While a file of up to INLINE_MAX fit, one hop each; then room
                # was made first (f5's by evicting).
                assert fetch_hops == ["f4", "f5"]
                assert cache.counters["evictions"] >= 1
                objects = store.stats().objects
                assert not await fs.shared.resolve(top, b"bad")
                with pytest.raises(FsError) as err:
                    fs.namespace.lookup(top, b"bad")
                assert err.value.errno == errno.ENOENT
                assert store.stats().objects == objects
                nursery.cancel_scope.cancel()
        finally:
            fs.close()


@contextmanager
def one_shared_file(tmp_path: Path, remote: Memory) -> Iterator[tuple[Filesystem, int, bytes]]:
    """A filesystem whose shared directory ``top`` (share "team", owned by
    1234:5678) has the file ``f`` (mode 0640, mtime 1 ns) only on
    ``remote``: ``(fs, top, its bytes)``."""
    data = os.urandom(100_000)  # too large to ride in its entry: a blob to fetch
    digest = Digest(SHA256.hash(data), len(data))
    remote.blobs[digest] = data
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        fs = Filesystem(store, tiers=[Tier(remote)])
        try:
            top = fs.create(ROOT_INODE, b"cc", stat.S_IFDIR | 0o755, 1234, 5678).ino
            fs.setxattr(top, b"user.cachefs.cache", b"max_size=1000000 shared=team")
            fs.remote.tiers.push_entry("team", SharedEntry("f", digest, 0o4640, 1, None))
            yield fs, top, data
        finally:
            fs.close()


async def fetched_once(fs: Filesystem, top: int, data: bytes) -> None:
    """``f`` of ``one_shared_file`` was fetched once, was made with its
    entry's mode (no set-id bits) and mtime and its directory's owner, and
    reads right."""
    assert fs.remote.tiers.counts["fetched_objects"] == 1
    assert fs.shared.counts["shared_fetches"] == 1
    inode = fs.namespace.get(fs.namespace.lookup(top, b"f"))
    assert (inode.mode, inode.uid, inode.gid) == (stat.S_IFREG | 0o640, 1234, 5678)
    assert inode.mtime_ns == 1
    fh, _ = await fs.open(inode.ino, os.O_RDONLY)
    assert bytes(await fs.read(fh, 0, len(data))) == data
    await fs.release(fh)
    assert not fs.shared._resolving


def test_misses_in_one_directory_at_once_list_it_once(tmp_path: Path) -> None:
    """Threads that miss names of one directory at once wait for the one
    listing it; if that listing fails, they list it themselves."""

    class Gated(Memory):
        def __init__(self) -> None:
            super().__init__("mem", documents=True)
            self.lists, self.fail = 0, False
            self.gate = threading.Event()

        def list_documents(self, prefix: str, limit: int) -> dict[str, float] | None:
            self.lists += 1
            self.gate.wait(10)
            if self.fail:
                self.fail = False
                raise RemoteError("mem: listing refused")
            return super().list_documents(prefix, limit)

    remote = Gated()
    data = b"a file"
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote)])
        tiers.push_entry("team", SharedEntry("d/f", Digest(SHA256.hash(data), 6), 0o644, 1, data))
        for fail in (False, True):
            remote.lists, remote.fail = 0, fail
            remote.gate.clear()
            tiers._listings.kept.clear()
            tiers._absent.clear()
            with ThreadPoolExecutor(4) as pool:
                found = [pool.submit(tiers.find_entry, "team", f"d/x{i}") for i in range(4)]
                deadline = time.monotonic() + 10
                while remote.lists == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                remote.gate.set()
                answers = [f.exception() or f.result() for f in found]
            # The thread whose listing failed has no answer; the others miss.
            failed = [a for a in answers if isinstance(a, RemoteError)]
            assert len(failed) == fail and answers.count(None) == 4 - fail
            # Once, or a failed listing and then the waiters' own.
            assert remote.lists >= 2 if fail else remote.lists == 1
            assert not tiers._listings.running
            for tier in tiers.tiers:
                tier.breaker.succeeded()
        tiers.close()


class Stalling(Memory):
    """A remote in memory whose first call of ``stalls`` ("get_document": a
    shared entry asked for, or "read": a blob fetched) waits for ``go``,
    then raises ``error`` if there is one; ``counted`` counts both calls."""

    def __init__(self, stalls: str, error: Exception | None) -> None:
        super().__init__("mem", documents=True)
        self.stalls, self.error = stalls, error
        self.counted = {"get_document": 0, "read": 0}
        self.stalled, self.go = threading.Event(), threading.Event()

    def _stall(self, call: str) -> None:
        self.counted[call] += 1
        if call == self.stalls and not self.stalled.is_set():
            self.stalled.set()
            self.go.wait(10)
            if self.error is not None:
                raise self.error

    def get_document(self, key: str) -> bytes | None:
        self._stall("get_document")
        return super().get_document(key)

    def read(self, digest: Digest) -> bytes:
        self._stall("read")
        return super().read(digest)


@pytest.mark.parametrize(
    ("stalls", "error", "leader_ends"),
    [
        # An error nothing expects while it fetches; an interrupted lookup.
        pytest.param("read", ConnectionResetError("mem: reset"), "raised", id="raised"),
        pytest.param("get_document", None, "cancelled", id="cancelled"),
        # A tier that fails once, while it fetches or asks for the entry.
        pytest.param(
            "read", RemoteError("mem: connection reset"), "missed", id="tier-failed-fetching"
        ),
        pytest.param(
            "get_document",
            RemoteError("mem: connection reset"),
            "missed",
            id="tier-failed-asking",
        ),
    ],
)
async def test_lookups_that_waited_for_one_that_failed_ask_again(
    tmp_path: Path, stalls: str, error: Exception | None, leader_ends: str
) -> None:
    """Lookups of a name that wait for another lookup of it which ends with
    no answer ask again: one of them asks the tier (one more request for
    the entry, one fetch in all), the others wait for it, and each finds
    the file (not ENOENT)."""
    remote = Stalling(stalls, error)
    with one_shared_file(tmp_path, remote) as (fs, top, data):
        leader = trio.CancelScope()
        ended: list[str] = []

        async def lead() -> None:
            try:
                with leader:
                    ended.append("found" if await fs.shared.resolve(top, b"f") else "missed")
            except ConnectionResetError:
                ended.append("raised")
            if leader.cancelled_caught:
                ended.append("cancelled")

        def cancel() -> None:
            if leader_ends == "cancelled":
                leader.cancel()  # it ends at its next checkpoint, once the tier answers

        found = await three_wait_for_one(fs, top, remote, lead, cancel)
        assert ended == [leader_ends]
        assert found == [True, True, True]
        assert remote.counted == {"get_document": 2, "read": 1 + (stalls == "read")}
        await fetched_once(fs, top, data)


async def three_wait_for_one(
    fs: Filesystem,
    top: int,
    remote: Stalling,
    lead: Callable[[], Awaitable[None]],
    meanwhile: Callable[[], None] = lambda: None,
) -> list[bool]:
    """Run ``lead`` (a lookup of ``f``) until ``remote`` stalls it, then three
    lookups of ``f`` that wait for it; call ``meanwhile`` and let the remote
    go on.  What the three found."""
    found: list[bool] = []

    async def wait() -> None:
        found.append(await fs.shared.resolve(top, b"f"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead)
            assert await trio.to_thread.run_sync(remote.stalled.wait, 10)
            for _ in range(3):
                nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            done, _ = fs.shared._resolving[top, b"f", True]
            assert done.statistics().tasks_waiting == 3
            meanwhile()
            remote.go.set()
    return found


class Failing(Stalling):
    """``Stalling`` whose every call of ``stalls`` raises ``error`` (the first
    once ``go`` is set)."""

    def _stall(self, call: str) -> None:
        first = not self.stalled.is_set()
        super()._stall(call)
        if call == self.stalls and not first and self.error is not None:
            raise self.error


@pytest.mark.parametrize(
    ("remote", "reads"),
    [
        # The tier fails every time: the waiters ask once more, together.
        pytest.param(Failing("read", RemoteError("mem: connection reset")), 2, id="tier-fails"),
        # The tier has the entry but not the content: an answer, asked for once.
        pytest.param(Stalling("read", None), 1, id="content-gone"),
    ],
)
async def test_lookups_that_waited_ask_once_more_at_most(
    tmp_path: Path, remote: Stalling, reads: int
) -> None:
    """Lookups that waited for one that got no answer ask once more, and not
    again: a failure that stays costs two fetches, not one per waiter.  One
    that got an answer (the tier lacks the content) is not asked again."""
    with one_shared_file(tmp_path, remote) as (fs, top, _):
        if reads == 1:
            remote.blobs.clear()
        first: list[bool] = []

        async def lead() -> None:
            first.append(await fs.shared.resolve(top, b"f"))

        assert await three_wait_for_one(fs, top, remote, lead) == [False] * 3
        assert first == [False]
        assert remote.counted["read"] == reads
        assert not fs.shared._resolving


def test_a_skipped_tier_is_no_answer(tmp_path: Path) -> None:
    """While a tier is skipped (its breaker open), a name it may have is not
    answered, and not kept as absent: it is found once the tier is back."""
    remote = Memory("mem", documents=True)
    data = b"a file"
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote)])
        tiers.push_entry("team", SharedEntry("d/f", Digest(SHA256.hash(data), 6), 0o644, 1, data))
        (tier,) = tiers.tiers
        while tier.breaker.admit():
            tier.breaker.failed("down")
        with pytest.raises(RemoteError, match="skipped"):
            tiers.find_entry("team", "d/f")
        assert tiers.known_entry("team", "d/f") == (False, None)
        tier.breaker.succeeded()
        found = tiers.find_entry("team", "d/f")
        assert found is not None and found.contents == data
        tiers.close()


class ListingFailsOnce(Memory):
    """A remote in memory whose first listing fails once ``go`` is set; the
    listings after it wait for ``again``.  ``started`` counts listings begun."""

    def __init__(self) -> None:
        super().__init__("mem", documents=True)
        self.lists = 0
        self.started = threading.Semaphore(0)
        self.go, self.again = threading.Event(), threading.Event()
        self._counting = threading.Lock()

    def list_documents(self, prefix: str, limit: int) -> dict[str, float] | None:
        with self._counting:
            self.lists += 1
            first = self.lists == 1
        self.started.release()
        if first:
            self.go.wait(10)
            raise RemoteError("mem: listing refused")
        self.again.wait(10)
        return super().list_documents(prefix, limit)


class WaitedFor(threading.Event):
    """A listing in progress that counts the threads that wait for it."""

    def __init__(self, listing: threading.Event, waiting: threading.Semaphore) -> None:
        super().__init__()
        self.listing, self.waiting = listing, waiting

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.release()
        return self.listing.wait(timeout)


class Listings(dict[tuple[str, str, str], threading.Event]):
    """``Tiers._listings.running`` that says when threads wait for a listing."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Semaphore(0)

    def __setitem__(self, key: tuple[str, str, str], listing: threading.Event) -> None:
        super().__setitem__(key, WaitedFor(listing, self.waiting))


def test_misses_that_waited_for_a_failed_listing_list_it_once_more(tmp_path: Path) -> None:
    """Threads that miss names of a directory while its listing fails wait
    for it; then one of them lists it again and the others take that
    listing: two listings in all, not one per thread.  Each waiter gets the
    listing's answer; the thread whose listing failed has none."""
    remote = ListingFailsOnce()
    data = b"a file"
    digest = Digest(SHA256.hash(data), len(data))
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        tiers = Tiers(store, [Tier(remote)])
        for path in ("d/f", "d/sub/g"):
            tiers.push_entry("team", SharedEntry(path, digest, 0o644, 1, data))
        listings = tiers._listings.running = Listings()
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(tiers.find_entry, "team", "d/sub")
            assert remote.started.acquire(timeout=10)
            asked = ["d/sub", "d/x", "d/sub"]
            waiters = [pool.submit(tiers.find_entry, "team", path) for path in asked]
            for _ in asked:
                assert listings.waiting.acquire(timeout=10)  # for the first listing
            remote.go.set()
            with pytest.raises(RemoteError):  # its tier failed: no answer (a miss above)
                first.result(10)
            assert remote.started.acquire(timeout=10)  # one waiter lists again...
            for _ in asked[1:]:
                assert listings.waiting.acquire(timeout=10)  # ...and the others wait for it
            remote.again.set()
            directory = SharedEntry("d/sub", None)
            assert [f.result(10) for f in waiters] == [directory, None, directory]
        assert remote.lists == 2
        assert not tiers._listings.running
        assert tiers.known_entry("team", "d/z") == (True, None)  # the listing is kept
        tiers.close()


def test_fsck_repair_with_tiers_meets_a_damaged_index_entry(tmp_path: Path) -> None:
    """fsck --repair with tiers drops damaged index entries first, as without."""
    remote = Verifying("mem")
    with Store.open(tmp_path / "s", create=True, options=PUSHING) as store:
        digest = store.put(os.urandom(1 << 20))
        tiers = Tiers(store, [Tier(remote)])
        drain(Pusher(tiers))
        chunk = store.recipe(digest)[0][0]
        with store.index.write() as txn:  # a flipped bit in the chunk's index entry
            found = txn.get(chunk, db=store.index.chunks.handle)
            assert found is not None
            raw = bytes(found)
            txn.put(chunk, raw[:-1] + bytes([raw[-1] ^ 1]), db=store.index.chunks.handle)
        report = check_store(store, repair=True)
        assert report.repaired and report.problems
        assert check_store(store).clean
        tiers.close()


def test_a_local_store_much_smaller_than_its_remote(tmp_path: Path, weed: Seaweed) -> None:
    """--local-max-size far below the data: the store stays under it (once
    pushed, chunks are dropped here), and every file still reads right,
    fetched back from SeaweedFS; fsck is clean afterwards."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    files = {f"f{i}": os.urandom(3 << 20) for i in range(10)}
    limit = 6 << 20
    url = weed.url("cachefs", "small")
    with mounted(store, mnt, "--remote", url, "--local-max-size", "6M"):
        for name, data in files.items():
            with open(mnt / name, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        wait_for(lambda: settled(mnt) and live_stats(mnt)["stored_bytes"] <= limit)
        wait_for(lambda: segment_bytes(store) <= limit * 1.2)  # gc after each drop
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
        stats = live_stats(mnt)
        assert stats["remote"]["fetched_chunks"] > 0, stats["remote"]
        assert stats["remote"]["dropped_chunks"] > 0
        assert stats["corruptions"] == 0
        shown = cachefs("stats", str(mnt)).stdout
        assert "local max size" in shown and "chunks dropped here" in shown
        wait_for(lambda: live_stats(mnt)["stored_bytes"] <= limit)
        assert (mnt / "f0").read_bytes() == files["f0"]
    result = cachefs("fsck", str(store))
    assert result.stdout.strip().endswith("clean")
    # Without its remote, a file whose chunks are elsewhere fails with EIO
    # (and says why in the log), and the store is not marked damaged.
    with mounted(store, mnt):
        with pytest.raises(OSError) as failed:
            for name in files:
                (mnt / name).read_bytes()
        assert failed.value.errno == errno.EIO
        assert not live_stats(mnt)["needs_fsck"]
    assert "held only by the store's remote tiers" in (store / "cachefs.log").read_text()


def test_a_mount_heals_a_flipped_byte_from_its_remote(tmp_path: Path, weed: Seaweed) -> None:
    """Bytes flipped in a segment of a mounted store whose S3 remote has the
    data: the read returns the right bytes, the damage is counted, fsck is
    clean afterwards."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    data = os.urandom(3 << 20)
    url = weed.url("cachefs", "heal")
    with mounted(store, mnt, "--remote", url):
        (mnt / "f").write_bytes(data)
        digest = content_digest(mnt / "f")
        wait_for(lambda: settled(mnt))
    flip_byte_of(store, digest)
    with mounted(store, mnt, "--remote", url):
        assert (mnt / "f").read_bytes() == data
        stats = live_stats(mnt)
        assert stats["remote"]["healed_chunks"] == 1
        assert stats["corruptions"] == 0 and not stats["needs_fsck"]
    result = cachefs("fsck", str(store))  # fails the test unless it exits 0
    assert result.stdout.strip().endswith("clean")
    # Offline, fsck --repair heals from the tiers it is given: nothing is lost.
    flip_byte_of(store, digest)
    result = cachefs("fsck", str(store), "--repair", "--remote", url)  # exits 0: healed
    assert "LOST" not in result.stdout, result.stdout
    result = cachefs("fsck", str(store))
    assert result.stdout.strip().endswith("clean")
    with Store.open(store, readonly=True) as opened:
        assert opened.read(Digest.parse(digest)) == data
    # Without them, it drops the damaged chunk, and the file is lost.
    flip_byte_of(store, digest)
    result = cachefs("fsck", str(store), "--repair", check=False)
    assert "LOST" in result.stdout


def test_two_mounts_over_a_seaweedfs_cluster_that_fails(tmp_path: Path) -> None:
    """A real cluster (master, three volume servers with replication 001, a
    filer with its S3 gateway) under two mounts' shared directories: files
    written on one are read byte-identical through the other; a volume server
    killed mid-run changes nothing visible; with the whole cluster stopped
    both mounts keep working locally and the queue grows; restarted, the
    queue drains by itself and the second mount finds the files."""

    def write(mnt: Path, name: str, data: bytes) -> None:
        with open(mnt / "cc" / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

    with seaweed_cluster(tmp_path / "cluster") as cluster:
        url = cluster.url("cachefs", "cluster")
        with two_mounts(tmp_path, url, "cc") as (one, two):
            first = {f"first{i}": os.urandom(100_000 * (i + 1)) for i in range(5)}
            for name, data in first.items():
                write(one, name, data)
            wait_for(lambda: settled(one), timeout=120)
            cluster.kill("volume1")  # mid-run: its volumes have a replica elsewhere
            for name, data in first.items():
                assert (two / "cc" / name).read_bytes() == data
            during = {f"during{i}": os.urandom(150_000) for i in range(3)}
            for name, data in during.items():
                write(one, name, data)
            wait_for(lambda: settled(one), timeout=180)
            for name, data in during.items():
                assert (two / "cc" / name).read_bytes() == data
            cluster.stop_all()
            later = {f"later{i}": os.urandom(80_000) for i in range(4)}
            for name, data in later.items():  # local work goes on
                write(one, name, data)
                assert (one / "cc" / name).read_bytes() == data
            (two / "cc" / "local-only").write_bytes(b"two works too")
            wait_for(lambda: live_stats(one)["remote"]["queue"] >= len(later), timeout=30)
            assert not (two / "cc" / "later0").exists()  # a miss, quickly: the remote is down
            cluster.start_all()
            wait_for(lambda: settled(one), timeout=240)
            time.sleep(1.1)  # the kernel's negative entry for later0
            for name, data in later.items():
                assert (two / "cc" / name).read_bytes() == data


# --- cachefs serve with tiers -----------------------------------------------------------


def serve_stats(store: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cachefs("stats", str(store), "--json").stdout)
    return doc


def test_two_serves_share_one_cache_through_s3(tmp_path: Path, weed: Seaweed) -> None:
    """What a client stores in one ``cachefs serve --remote`` (blobs and
    action results) another one with the same remote serves: its misses are
    looked for in the tiers, fetched, verified and kept."""
    url = weed.url("cachefs", "serve")
    with (
        serving(tmp_path / "a", "--remote", url) as a,
        serving(tmp_path / "b", "--remote", url) as b,
    ):
        big, small = os.urandom(3 << 20), b"small output"
        with Client(a.grpc, SHA256, "team") as client:
            client.write(big)
            assert all(r.status.code == 0 for r in client.update_blobs([small]).responses)
            result = re_pb2.ActionResult(
                output_files=[
                    re_pb2.OutputFile(path="out/big", digest=client.digest(big)),
                    re_pb2.OutputFile(path="out/small", digest=client.digest(small)),
                ]
            )
            action = client.digest(b"an action")
            client.ac.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    instance_name="team", action_digest=action, action_result=result
                )
            )

        def settled_a() -> bool:
            remote = serve_stats(tmp_path / "a")["remote"]
            return bool(remote["queue"] == 0 and remote["shared_settling"] == 0)

        wait_for(settled_a)
        with Client(b.grpc, SHA256, "team") as client:
            got = client.ac.GetActionResult(
                re_pb2.GetActionResultRequest(instance_name="team", action_digest=action)
            )
            assert got == result
            assert client.read(client.digest(big)) == big
            batch = client.cas.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(instance_name="team", digests=[client.digest(small)])
            )
            assert [r.data for r in batch.responses] == [small]
            # Another instance is another namespace.
            assert client.find_missing([client.digest(small)], instance="other")
        remote = serve_stats(tmp_path / "b")["remote"]
        assert remote["shared_fetches"] >= 3  # the action result and its two blobs


def test_wait_pushed_follows_the_queue(tmp_path: Path) -> None:
    remote = Memory("mem")
    remote.down = True
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        digest = store.put(b"wanted remotely" * 100)
        queue = store.pushes
        assert queue is not None
        assert not queue.wait_pushed(digest, 0.2)  # nothing pushes it
        pusher = Pusher(Tiers(store, [Tier(remote)]))
        with pytest.raises(RemoteError):
            pusher.drain_once()
        assert not queue.wait_pushed(digest, 0.1)
        remote.down = False
        drain(pusher)
        assert queue.wait_pushed(digest, 0.1)
        assert queue.wait_pushed(Digest(SHA256.hash(b"never queued"), 12), 0.0)
        pusher.tiers.close()


def test_a_publication_that_fails_leaves_nothing_waiting_to_be_pushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a transaction queued and then did not commit is not in the queue,
    and nobody waits for it to be pushed (an fsync with --remote-durability
    remote would wait out its timeout); an entry that cannot be queued is an
    error, and leaves nothing waiting either."""
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        queue = store.pushes
        assert queue is not None
        data = b"never published" * 100
        digest = Digest(SHA256.hash(data), len(data))

        def refuse(*args: object) -> None:
            raise lmdb.MapFullError("told to fail")

        with monkeypatch.context() as patched:
            patched.setattr(store.index, "put_segment", refuse)
            with pytest.raises(CachefsError):
                store.put(data)
        assert queue.wait_pushed(digest, 0.0) and queue.depth()[0] == 0
        published = store.put(data)  # the same, once the index takes it
        assert published == digest and not queue.wait_pushed(digest, 0.0)
        assert queue.depth()[0] == 1
        with monkeypatch.context() as patched:
            patched.setattr(queue.table, "put", refuse)
            with pytest.raises(CachefsError, match="queueing an entry to push"):
                queue.add_entry(digest, b"an entry")
        assert queue.depth()[0] == 1  # the object's own entry only
        queue.done([item.key for item in queue.peek(10)])
        assert queue.wait_pushed(digest, 0.0) and queue.depth()[0] == 0


def test_fsync_waits_for_the_remote_when_asked(tmp_path: Path, weed: Seaweed) -> None:
    data = os.urandom(2 << 20)
    url = weed.url("cachefs", "durable")
    mnt = tmp_path / "mnt"
    with (
        mounted(tmp_path / "store", mnt, "--remote", url, "--remote-durability", "remote"),
        open(mnt / "f", "wb") as f,
    ):
        f.write(data)
        os.fsync(f.fileno())  # returns once S3 has it
        assert live_stats(mnt)["remote"]["queue"] == 0
        digest = Digest.parse(content_digest(mnt / "f"))
        with Store.open(tmp_path / "b", create=True) as other:
            tiers = Tiers(other, [Tier(open_remote(url, SHA256))])
            try:
                assert fetch_into(other, tiers, digest) == data
            finally:
                tiers.close()
    result = cachefs("mount", str(tmp_path / "s"), str(mnt), "--remote-durability", "remote",
                     check=False)  # fmt: skip
    assert result.returncode != 0 and "needs a tier that takes writes" in result.stderr
    config = tmp_path / "tiers.toml"
    config.write_text(f'[[tier]]\nurl = "{url}"\ndirection = "read-only"\n')
    result = cachefs("mount", str(tmp_path / "s"), str(mnt), "--config", str(config),
                     "--local-max-size", "1G", check=False)  # fmt: skip
    assert (
        result.returncode != 0
        and "--local-max-size needs a durable read-write tier" in result.stderr
    )


@pytest.mark.parametrize("kind", ["grpc", "s3"])
def test_large_whole_objects_are_streamed(
    tmp_path: Path, kind: str, weed: Seaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object past WHOLE_MAX goes up whole as a stream (ByteStream, or a
    multipart upload), never whole in memory; a reader finds the whole blob."""
    monkeypatch.setattr("cachefs.remote._tiers.WHOLE_MAX", 1 << 20)
    data = os.urandom(5 << 20) + b"end"
    with a_remote(kind, tmp_path, weed) as url:
        with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
            tiers = Tiers(store, [Tier(open_remote(url, SHA256), whole=True)])
            digest = store.put(data)
            drain(Pusher(tiers))
            tiers.close()
        remote = open_remote(url, SHA256)
        try:
            assert remote.find_missing([digest]) == []
            assert remote.read(digest) == data
        finally:
            remote.close()
