"""Remote tiers (``cachefs.remote``): URLs, every kind of remote against a real
server on 127.0.0.1 (``cachefs serve`` over gRPC and HTTP, SeaweedFS's S3
gateway, BuildGrid), verification of what they answer, rendezvous placement
with weights and replicas, and circuit breakers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import obstore
import pytest

from cachefs.errors import ConfigError, ObjectNotFoundError, RemoteError
from cachefs.format.digest import BLAKE3, SHA256, Digest, DigestFunction
from cachefs.protocol import re_pb2
from cachefs.remote import (
    Breaker,
    ObjectRemote,
    Remote,
    ShardGroup,
    open_remote,
    parse_remote,
    placement,
)
from cachefs.remote._shards import BACKOFF, FAILURES, endpoint_seed
from tests.mounting import cachefs
from tests.reapi import buildgrid, serving, start_serve, stop_serve
from tests.seaweed import seaweed


def blob(data: bytes, function: DigestFunction = SHA256) -> tuple[Digest, bytes]:
    return Digest(function.hash(data), len(data)), data


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("grpc://cache.example:9000/main", ("grpc", "cache.example:9000", "", "", "main")),
        ("grpc://127.0.0.1", ("grpc", "127.0.0.1:9092", "", "", "")),
        ("grpc://[::1]:9/team/linux", ("grpc", "[::1]:9", "", "", "team/linux")),
        ("http://127.0.0.1/prefix/x/", ("http", "http://127.0.0.1:8080", "", "prefix/x/", "")),
        ("https://h:1", ("http", "https://h:1", "", "", "")),
        (
            "s3://bucket/a/b?endpoint=http://127.0.0.1:8333&region=eu-1",
            ("s3", "http://127.0.0.1:8333", "bucket", "a/b/", ""),
        ),
        ("s3://bucket", ("s3", "", "bucket", "", "")),
        ("https://h/p", ("http", "https://h:443", "", "p/", "")),
        ("s3://b?endpoint=https://s3.example/", ("s3", "https://s3.example:443", "b", "", "")),
    ],
)
def test_remote_urls(text: str, fields: tuple[str, str, str, str, str]) -> None:
    url = parse_remote(text)
    assert (url.kind, url.address, url.bucket, url.prefix, url.instance) == fields
    assert url.text == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ftp://host/x", "unknown kind 'ftp'"),
        ("cache.example:9092", "unknown kind"),
        ("", "not a URL"),
        ("grpc://:9092", "no host"),
        ("grpc://host:99999", "port"),
        ("grpc://host/a/../b", "'..'"),
        ("http://user:secret@host/", "credentials"),
        ("http://host/?x=1", "unknown parameter 'x' (token_file)"),
        ("s3:///prefix", "no bucket"),
        ("s3://b?endpoint=ftp://x", "not an http(s) URL"),
        ("s3://b?acl=private", "unknown parameter 'acl'"),
        ("s3://b?sign_payload=maybe", "sign_payload is yes or no"),
        ("grpc://h:0", "port"),
        ("grpc://h:", "port"),
        ("http://h/a%3Fb", "escaping"),
        ("http://[::1", "is not a URL"),
        ("s3://b?endpoint=http://h:99999", "port"),
        ("s3://b?endpoint=http://[::1", "is not a URL"),
    ],
)
def test_bad_remote_urls_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match="remote") as info:
        parse_remote(text)
    assert why in info.value.message
    assert "grpc://HOST" in info.value.hint


def test_s3_bodies_are_signed_where_no_tls_covers_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    for text, unsigned in [
        ("s3://b?endpoint=http://127.0.0.1:1", "false"),
        ("s3://b?endpoint=https://127.0.0.1:1", "true"),
        ("s3://b?endpoint=http://127.0.0.1:1&sign_payload=No", "true"),
        ("s3://b?endpoint=https://127.0.0.1:1&sign_payload=yes", "false"),
    ]:
        remote = open_remote(text, SHA256)
        try:
            assert isinstance(remote, ObjectRemote)
            assert remote.store.config["unsigned_payload"] == unsigned  # type: ignore[union-attr]
        finally:
            remote.close()


def test_s3_without_credentials_says_which_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ConfigError, match="no S3 credentials") as info:
        open_remote("s3://bucket?endpoint=http://127.0.0.1:1", SHA256)
    assert "AWS_ACCESS_KEY_ID" in info.value.hint


# --- every kind, against a real server ------------------------------------------------------


def exercise(remote: Remote, function: DigestFunction = SHA256) -> None:
    """Write, find and read back blobs small and large (batch and streamed
    paths), a missing one, and the empty blob."""
    blobs = [blob(os.urandom(n), function) for n in (1, 1000, (1 << 20) + 1, 3 << 20)]
    empty = blob(b"", function)
    missing = blob(b"never written", function)[0]
    wanted = [d for d, _ in blobs]
    assert remote.find_missing(wanted) == wanted
    for digest, data in [*blobs, empty]:
        remote.write(digest, data)
    assert remote.find_missing([*wanted, missing, empty[0]]) == [missing]
    for digest, data in [*blobs, empty]:
        assert remote.read(digest) == data
    with pytest.raises(ObjectNotFoundError, match="not in"):
        remote.read(missing)
    remote.write(*blobs[0])  # again: harmless


def test_http_remotes_are_sha256_only() -> None:
    with pytest.raises(ConfigError, match="SHA-256"):
        open_remote("http://127.0.0.1:1", BLAKE3)


@pytest.mark.parametrize("function", [SHA256, BLAKE3], ids=["sha256", "blake3"])
def test_a_cachefs_serve_is_a_remote_over_grpc_and_http(
    tmp_path: Path, function: DigestFunction
) -> None:
    store = tmp_path / "store"
    if function == BLAKE3:
        cachefs("init", "--digest-function", "blake3", str(store))
    with serving(store) as server:
        remote = open_remote(f"grpc://{server.grpc}/main", function, timeout=30)
        try:
            exercise(remote, function)
        finally:
            remote.close()
        if function == SHA256:  # the HTTP protocol names blobs by SHA-256 hashes
            assert server.http is not None
            remote = open_remote(f"http://{server.http}/team", function, timeout=30)
            try:
                exercise(remote, function)
            finally:
                remote.close()


def test_buildgrid_is_a_remote(tmp_path: Path) -> None:
    """Any REAPI server: the same calls against BuildGrid."""
    with buildgrid(tmp_path / "bgd") as server:
        remote = open_remote(f"grpc://{server.grpc}", SHA256, timeout=30)
        try:
            exercise(remote)
        finally:
            remote.close()


def test_an_s3_bucket_is_a_remote(tmp_path: Path) -> None:
    """SeaweedFS's S3 gateway; a wrong, short or long object under a blob's
    key is a RemoteError, never data."""
    with seaweed(tmp_path / "weed") as weed:
        remote = open_remote(weed.url("cachefs", "team/ci"), SHA256, timeout=30)
        assert isinstance(remote, ObjectRemote)
        try:
            exercise(remote)
            digest, data = blob(os.urandom(5000))
            for wrong in (b"x" + data[1:], data[:-1], data + b"!"):
                obstore.put(remote.store, f"cas/{digest.hex}", wrong)
                with pytest.raises(RemoteError, match="answered"):
                    remote.read(digest)
            assert remote.find_missing([digest]) == [digest]  # its length is not the blob's
            # Documents (shared entries): by key, listed by prefix under the bucket's.
            documents = remote.documents
            assert documents is not None
            for name in ("f1", "f2", "d3"):
                documents.put_document(f"shares/abc/{name}", name.encode())
            documents.put_document("shares/abcd/f4", b"elsewhere")
            assert documents.get_document("shares/abc/f2") == b"f2"
            assert documents.get_document("shares/abc/f9") is None
            assert sorted(documents.list_documents("shares/abc", 3) or []) == ["d3", "f1", "f2"]
            assert documents.list_documents("shares/abc", 2) is None  # more than that
            assert documents.list_documents("shares/none", 10) == {}
            written = documents.list_documents("shares/abc", 3) or {}
            assert all(abs(at - time.time()) < 600 for at in written.values())  # the store's clock
            documents.delete_document("shares/abc/f1")
            documents.delete_document("shares/abc/f1")  # gone already: fine
            assert sorted(documents.list_documents("shares/abc", 3) or []) == ["d3", "f2"]
            listed = obstore.list(remote.store, "shares/abc").collect()
            assert all(not m["path"].startswith("team/") for m in listed)  # the store's prefix
        finally:
            remote.close()


def test_a_remote_that_is_down_is_a_remote_error(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "store")
    address, http = server.grpc, server.http
    stop_serve(server)
    digest, data = blob(b"data")
    for url in (f"grpc://{address}", f"http://{http}"):
        remote = open_remote(url, SHA256, timeout=2)
        try:
            where = url.split("//")[1]
            with pytest.raises(RemoteError, match=where):
                remote.read(digest)
            with pytest.raises(RemoteError, match=where):
                remote.write(digest, data)
            with pytest.raises(RemoteError):
                remote.find_missing([digest])
        finally:
            remote.close()


# --- placement ----------------------------------------------------------------------------


def digests(n: int, seed: int = 0) -> list[bytes]:
    return [SHA256.hash(f"{seed}/{i}".encode()) for i in range(n)]


def test_rendezvous_placement_is_stable_and_moves_only_the_new_share() -> None:
    """Adding a 5th endpoint to 4 moves the blobs it takes and no other (goal:
    at most 1.1 x 1/5 of them), for the first place and for 2 replicas."""
    names = [f"grpc://10.0.0.{i}:9092" for i in range(5)]
    seeds = [endpoint_seed(n) for n in names]
    keys = digests(20_000)
    for replicas in (1, 2):
        before = [placement(k, seeds[:4], [1.0] * 4)[:replicas] for k in keys]
        after = [placement(k, seeds, [1.0] * 5)[:replicas] for k in keys]
        assert before == [placement(k, seeds[:4], [1.0] * 4)[:replicas] for k in keys]
        moved = sum(set(a) != set(b) for a, b in zip(after, before, strict=True)) / len(keys)
        print(f"replicas {replicas}: {moved:.4f} of the blobs moved (1/5 = 0.2)")
        assert moved <= 1.1 * (replicas / 5)
        # Whatever moved, moved to the new endpoint only.
        for a, b in zip(after, before, strict=True):
            assert set(a) - set(b) <= {4}


def test_weights_give_shares() -> None:
    seeds = [endpoint_seed(f"e{i}") for i in range(3)]
    firsts = [placement(k, seeds, [1.0, 2.0, 1.0])[0] for k in digests(40_000, seed=1)]
    shares = [firsts.count(i) / len(firsts) for i in range(3)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.02)


def test_a_breaker_opens_after_failures_and_backs_off() -> None:
    now = [100.0]
    breaker = Breaker(lambda: now[0])
    for _ in range(FAILURES - 1):
        assert breaker.admit()
        assert not breaker.failed("boom")
    assert not breaker.open
    assert breaker.failed("connection refused")
    assert breaker.open and breaker.reason == "connection refused"
    assert not breaker.admit()
    assert breaker.failed("late failure of a request sent before")  # changes nothing
    assert breaker.backoff == BACKOFF
    now[0] += BACKOFF + 0.01
    assert not breaker.open
    assert breaker.admit()  # one retry goes through ...
    assert not breaker.admit()  # ... and only one
    assert breaker.open
    assert breaker.failed("still refused")
    assert breaker.open and breaker.backoff == 2 * BACKOFF
    now[0] += 2 * BACKOFF + 0.01
    assert breaker.admit()
    breaker.succeeded()
    assert not breaker.open and breaker.failures == 0 and breaker.reason == ""
    assert breaker.admit() and breaker.admit()


class Memory:
    """A remote in memory that can be made to fail; with ``documents``, it keeps
    documents too, as a bucket does."""

    def __init__(self, name: str, documents: bool = False) -> None:
        self.name = self.key = name
        self.blobs: dict[Digest, bytes] = {}
        self.actions: dict[Digest, re_pb2.ActionResult] = {}
        self.docs: dict[str, bytes] = {}
        #: When each document was last put (seconds since the epoch).
        self.written: dict[str, float] = {}
        self.documents = self if documents else None
        self.packs = None
        self.down = False
        self.calls = 0
        self.streams = True

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            raise RemoteError(f"{self.name}: connection refused")

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        self._call()
        return [d for d in digests if d not in self.blobs]

    def read(self, digest: Digest) -> bytes:
        self._call()
        if digest not in self.blobs:
            raise ObjectNotFoundError(f"blob {digest} is not in {self.name}")
        return self.blobs[digest]

    def write(self, digest: Digest, data: bytes) -> None:
        self._call()
        self.blobs[digest] = data

    def write_stream(
        self, digest: Digest, pieces: Callable[[], Iterable[bytes | memoryview]]
    ) -> None:
        self.write(digest, b"".join(pieces()))

    splices = False

    def splice(self, digest: Digest, chunks: Sequence[Digest]) -> None:
        raise RemoteError(f"{self.name}: no splicing")

    def get_action(self, key: Digest) -> re_pb2.ActionResult | None:
        self._call()
        return self.actions.get(key)

    def update_action(self, key: Digest, result: re_pb2.ActionResult) -> None:
        self._call()
        self.actions[key] = result

    def get_document(self, key: str) -> bytes | None:
        self._call()
        return self.docs.get(key)

    def put_document(self, key: str, data: bytes) -> None:
        self._call()
        self.docs[key] = data
        self.written[key] = time.time()

    def delete_document(self, key: str) -> None:
        self._call()
        self.docs.pop(key, None)

    def list_documents(self, prefix: str, limit: int) -> dict[str, float] | None:
        self._call()
        start = len(prefix) + 1
        keys = {k[start:]: self.written[k] for k in sorted(self.docs) if k.startswith(prefix + "/")}
        return keys if len(keys) <= limit else None

    def close(self) -> None:
        pass


def test_a_group_keeps_replicas_and_reads_past_a_dead_endpoint() -> None:
    members = [Memory(f"m{i}") for i in range(3)]
    now = [0.0]
    group = ShardGroup([(m, 1.0) for m in members], replicas=2, clock=lambda: now[0])
    blobs = [blob(os.urandom(64)) for _ in range(300)]
    for digest, data in blobs:
        group.write(digest, data)
    for digest, _ in blobs:
        holders = [m for m in members if digest in m.blobs]
        assert [m.name for m in holders] == sorted(m.remote.name for m in group.order(digest)[:2])
    assert group.find_missing([d for d, _ in blobs]) == []
    members[0].down = True
    for digest, data in blobs:
        assert group.read(digest) == data
    calls = members[0].calls
    assert all(group.read(d) for d, _ in blobs)
    assert members[0].calls == calls  # its breaker is open: not asked
    assert [m.remote.name for m in group.members if m.breaker.open] == ["m0"]
    # New blobs still get two copies, on the endpoints that are up.
    digest, data = blob(b"written while m0 is down")
    group.write(digest, data)
    assert sum(digest in m.blobs for m in members[1:]) == 2
    # Blobs whose replica is down are missing (a push will complete them).
    on_m0 = [d for d, _ in blobs if d in members[0].blobs]
    assert set(group.find_missing([d for d, _ in blobs])) == set(on_m0)
    # A blob that only the skipped endpoint has is a failure, not a miss.
    only_m0 = blob(b"only on m0")
    members[0].blobs[only_m0[0]] = only_m0[1]
    with pytest.raises(RemoteError, match="m0 is skipped"):
        group.read(only_m0[0])
    now[0] += 100  # the back-off is over and m0 is back: read again
    members[0].down = False
    assert group.read(only_m0[0]) == only_m0[1]
    members[1].down = members[2].down = True
    with pytest.raises(RemoteError, match="1 of 2 copies"):
        group.write(*blob(b"one place to go"))


def test_a_blob_placed_before_an_endpoint_was_added_is_still_read() -> None:
    old = [Memory(f"m{i}") for i in range(4)]
    blobs = [blob(os.urandom(64)) for _ in range(200)]
    group = ShardGroup([(m, 1.0) for m in old])
    for digest, data in blobs:
        group.write(digest, data)
    grown = ShardGroup([(m, 1.0) for m in [*old, Memory("m4")]])
    assert all(grown.read(d) == data for d, data in blobs)
    with pytest.raises(ObjectNotFoundError):
        grown.read(blob(b"nowhere")[0])


def test_a_group_of_cachefs_serves_with_a_dead_endpoint(tmp_path: Path) -> None:
    """Three ``cachefs serve`` endpoints, 2 replicas: one killed, every blob
    is still read."""
    servers = [start_serve(tmp_path / f"s{i}", http_on=False) for i in range(3)]
    try:
        remotes = [open_remote(f"grpc://{s.grpc}", SHA256, timeout=5) for s in servers]
        group = ShardGroup([(r, 1.0) for r in remotes], replicas=2)
        try:
            blobs = [blob(os.urandom(2000)) for _ in range(60)]
            for digest, data in blobs:
                group.write(digest, data)
            stop_serve(servers[1])
            assert [group.read(d) for d, _ in blobs] == [data for _, data in blobs]
            assert group.members[1].breaker.open
        finally:
            group.close()
    finally:
        for server in servers:
            stop_serve(server)


def test_group_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="twice"):
        ShardGroup([(Memory("a"), 1.0), (Memory("a"), 2.0)])
    with pytest.raises(ConfigError, match="at least one"):
        ShardGroup([])
    with pytest.raises(ConfigError, match="cannot keep 3 replicas"):
        ShardGroup([(Memory("a"), 1.0), (Memory("b"), 1.0)], replicas=3)
    with pytest.raises(ConfigError, match="positive"):
        ShardGroup([(Memory("a"), 0.0)])
