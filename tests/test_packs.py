"""Pack files on a bucket: a large push goes up as a few packs and an index,
its chunks stay blobs by digest for dedup, fetch and heal, and a pack that is
damaged or gone is a miss, never wrong bytes (``cachefs/remote/_packs.py``)."""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import obstore
import pytest
from obstore.store import MemoryStore, S3Store

from cachefs.engine import Digest, ObjectNotFoundError, Store, StoreOptions, drop_held
from cachefs.errors import RemoteError
from cachefs.format.digest import SHA256
from cachefs.remote import (
    ObjectRemote,
    Pusher,
    Tier,
    Tiers,
    _transfer,
    load_tiers,
    measure,
    open_remote,
)
from cachefs.remote import _tiers as _tiers_module
from cachefs.remote._early import INDEX_WITHIN, EarlyPush
from cachefs.remote._packs import (
    MAGIC,
    PACK_BYTES,
    RUN_BYTES,
    PackRecord,
    Packs,
    index_bytes,
    pack_groups,
    parse_index,
)
from tests.seaweed import Seaweed, seaweed
from tests.test_tiers import PUSHING, drain, fetch_into


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    with seaweed(tmp_path_factory.mktemp("weed")) as server:
        yield server


class Requests:
    """A meter of remote requests that counts them by operation."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def request(
        self, operation: str, seconds: float, *, failed: bool, received: int = 0, sent: int = 0
    ) -> None:
        self.counts[operation] += 1


def _tiers(store: Store, url: str) -> tuple[Tiers, Requests]:
    requests = Requests()
    tiers = Tiers(store, [Tier(open_remote(url, SHA256))])
    measure(tiers.tiers, lambda tier, endpoint: requests)  # type: ignore[arg-type,return-value]
    return tiers, requests


def _keys(remote: ObjectRemote, prefix: str) -> list[str]:
    return [m["path"] for page in obstore.list(remote.store, prefix) for m in page]


def _inner(tiers: Tiers) -> ObjectRemote:
    remote = tiers.tiers[0].remote
    inner = getattr(remote, "inner", remote)
    assert isinstance(inner, ObjectRemote)
    return inner


def _push(
    path: Path, url: str, *objects: bytes
) -> tuple[list[Digest], dict[str, int], Counter[str]]:
    """Put ``objects`` in a fresh store and push them: digests, counts, requests."""
    with Store.open(path, create=True, options=PUSHING) as store:
        tiers, requests = _tiers(store, url)
        try:
            digests = [store.put(data) for data in objects]
            drain(Pusher(tiers))
        finally:
            tiers.close()
    return digests, dict(tiers.counts), requests.counts


def test_an_index_says_where_chunks_are_and_a_damaged_one_is_refused() -> None:
    records = [
        PackRecord(b"p" * 16, (Digest(b"a" * 32, 5), Digest(b"b" * 32, 70_000))),
        PackRecord(b"q" * 16, (Digest(b"c" * 32, 1),)),
    ]
    data = index_bytes(records)
    assert parse_index(data) == records
    assert parse_index(index_bytes([])) == []

    def sealed(body: bytes) -> bytes:
        return body + hashlib.sha256(body).digest()

    body = data[:-32]
    flipped = bytearray(data)
    flipped[len(MAGIC) + 40] ^= 0x01  # a size
    for damaged, why in [
        (b"garbage" + data, "magic"),
        (data[:-3], "checksum"),
        (bytes(flipped), "checksum"),
        (sealed(body.replace(b"Pq", b"Xq")), "starts with"),
        (sealed(body[:-5]), "ends inside"),
        (sealed(body[: len(MAGIC) + 10]), "ends inside"),
        (sealed(MAGIC + b"P" + b"r" * 16 + (1).to_bytes(4, "little") + b"d" * 32 + bytes(8)),
         "out of bounds"),
        (sealed(MAGIC + b"P" + b"r" * 16 + (1).to_bytes(4, "little") + b"d" * 32
                + (1 << 40).to_bytes(8, "little")), "out of bounds"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_index(damaged)


def _digested(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).digest(), len(data))


def test_an_index_met_twice_is_placed_once_and_forgotten_once() -> None:
    """A sync may list a push's index before the push adds it itself: the
    chunks are placed once, and forgotten when the index expires."""
    store = MemoryStore()
    with ThreadPoolExecutor(4) as pool:
        packs = Packs(store, "mem", SHA256, pool)  # type: ignore[arg-type]
        blobs = [random.Random(n).randbytes(1000 + n) for n in range(5)]
        chunks = [_digested(b) for b in blobs]
        record = packs.put_pack(list(zip(chunks, blobs, strict=True)))
        key = "index/" + "1" * 32
        obstore.put(store, key, index_bytes([record]))
        packs.sync(0)  # listed by a sync first ...
        packs._add(key, [record])  # ... then its writer adds it: nothing twice
        assert packs.missing(chunks, 1e9) == []
        assert packs.run(chunks) == 5
        assert [bytes(c) for c in packs.read_run(chunks)] == blobs
        obstore.delete(store, key)
        assert packs.missing(chunks, 0) == chunks  # expired: every chunk is pushed again


def test_a_bucket_that_cannot_list_asks_chunk_by_chunk(caplog: pytest.LogCaptureFixture) -> None:
    """A sync that fails is logged, not raised, and not tried again at once."""
    dead = S3Store(
        "b", endpoint="http://127.0.0.1:9", region="us-east-1", skip_signature=True,
        client_options={"allow_http": True}, retry_config={"max_retries": 0},
    )  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        packs = Packs(dead, "dead", SHA256, pool)
        chunk = _digested(b"x" * 100)
        with caplog.at_level(logging.WARNING):
            assert packs.missing([chunk], 0) == [chunk]
            assert not packs.placed(chunk, 60)  # no second try within the minute
        assert caplog.text.count("listing the pack indexes") == 1


def test_a_large_push_writes_an_index_every_so_many_packs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_transfer, "INDEX_PACKS", 2)
    store = MemoryStore()
    with (
        Store.open(tmp_path / "a", create=True, options=StoreOptions(fsync=False)) as local,
        ThreadPoolExecutor(4) as pool,
    ):
        data = random.Random(3).randbytes(12 << 20)
        digest = local.put(data)
        chunks = list(dict.fromkeys(Digest(h, n) for h, n in local.recipe(digest)))
        packs = Packs(store, "mem", SHA256, pool)  # type: ignore[arg-type]
        _transfer.push_packed(pool, local, packs, chunks)
        written = len(pack_groups(chunks))
        keys = [m["path"] for page in obstore.list(store, "index") for m in page]
        assert written >= 6 and len(keys) == math.ceil(written / 2)
        fresh = Packs(store, "mem", SHA256, pool)  # type: ignore[arg-type]
        assert fresh.missing(chunks, 0) == []


def test_members_of_a_shard_group_keep_no_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    url = "s3://bucket?endpoint=http://127.0.0.1:9"
    alone = open_remote(url, SHA256)
    assert alone.packs is not None
    alone.close()
    config = {
        "tier": [{"endpoints": [{"url": url}, {"url": "s3://other?endpoint=http://127.0.0.1:9"}]}]
    }
    (tier,) = load_tiers([], config, SHA256)
    try:
        assert tier.remote.packs is None
        assert all(m.remote.packs is None for m in tier.remote.members)  # type: ignore[attr-defined]
    finally:
        tier.remote.close()


def test_chunks_are_cut_into_packs_in_order() -> None:
    sizes = [PACK_BYTES // 3] * 7 + [PACK_BYTES * 2, 10]
    digests = [Digest(bytes([n]) * 32, size) for n, size in enumerate(sizes)]
    groups = pack_groups(digests)
    assert [d for group in groups for d in group] == digests
    assert [len(g) for g in groups] == [3, 3, 1, 1, 1]  # a chunk above the size: a pack alone
    assert all(sum(d.size for d in g) <= PACK_BYTES for g in groups if len(g) > 1)


def test_a_large_push_goes_up_in_packs_and_comes_back_in_runs(
    tmp_path: Path, weed: Seaweed
) -> None:
    url = weed.url("cachefs", tmp_path.name)
    data = random.Random(7).randbytes(5 << 20)
    (digest,), counts, requests = _push(tmp_path / "a", url, data)
    chunks = counts["pushed_chunks"]
    assert chunks > 40 and counts["pushed_bytes"] == len(data)
    packs = math.ceil(len(data) / PACK_BYTES)
    # A few packs and one index, not a PUT per chunk (the chunk list is a blob of its own).
    assert packs <= requests["write_pack"] <= packs + 1
    assert requests["write_pack_index"] == 1 and requests["write"] == 1
    with Store.open(tmp_path / "b", create=True, options=StoreOptions(fsync=False)) as b:
        tiers, got = _tiers(b, url)
        try:
            remote = _inner(tiers)
            assert len(_keys(remote, "packs")) == requests["write_pack"]
            assert len(_keys(remote, "index")) == 1
            assert len(_keys(remote, "cas")) == 1  # the list alone
            assert fetch_into(b, tiers, digest) == data
        finally:
            tiers.close()
    assert tiers.counts["fetched_chunks"] == chunks
    assert RUN_BYTES >= PACK_BYTES
    assert got.counts["read_pack"] == requests["write_pack"]  # a whole pack in one request
    assert got.counts["list_pack_indexes"] >= 1 and got.counts["read_pack_index"] == 1

    # Another store with the same bytes sends nothing; an insertion sends its new chunks only.
    changed = data[: 3 << 20] + b"inserted" + data[3 << 20 :]
    _, counts, requests = _push(tmp_path / "c", url, data, changed)
    assert 1 <= counts["pushed_chunks"] <= 3 and requests["write_pack"] == 0


def test_a_pack_that_is_damaged_or_gone_is_a_miss_never_wrong_bytes(
    tmp_path: Path, weed: Seaweed, caplog: pytest.LogCaptureFixture
) -> None:
    url = weed.url("cachefs", tmp_path.name)
    data = random.Random(8).randbytes(3 << 20)
    (digest,), _, _ = _push(tmp_path / "a", url, data)

    def fetch_fresh(name: str) -> None:
        """Fetch the object into a fresh store (nothing of it may be stored)."""
        with Store.open(tmp_path / name, create=True, options=StoreOptions(fsync=False)) as b:
            tiers = Tiers(b, [Tier(open_remote(url, SHA256))])
            try:
                b.put(tiers.fetch(digest), expect=digest)
            finally:
                tiers.close()
                assert not b.contains(digest)

    remote = open_remote(url, SHA256)
    assert isinstance(remote, ObjectRemote) and isinstance(remote.packs, Packs)
    try:
        (index,) = _keys(remote, "index")
        records = parse_index(bytes(obstore.get(remote.store, index).bytes()))
        # An index object that is not one is left out, with a warning.
        obstore.put(remote.store, "index/" + "0" * 32, b"not an index")
        pack = records[0]
        key = f"packs/{pack.name.hex()}"
        flipped = bytearray(obstore.get(remote.store, key).bytes())
        flipped[len(flipped) // 2] ^= 0x40
        obstore.put(remote.store, key, bytes(flipped))
        with caplog.at_level(logging.WARNING), pytest.raises(RemoteError, match="not blob"):
            fetch_fresh("b")
        assert "is not a pack index, left out" in caplog.text

        obstore.delete(remote.store, key)
        with pytest.raises(ObjectNotFoundError, match="is gone"):
            fetch_fresh("c")
        # The chunks of a pack that is gone are missing again: a push sends them anew.
        everything = [d for record in records for d in record.chunks]
        assert remote.packs.missing(everything, 0) == []  # the index still names them
        with pytest.raises(ObjectNotFoundError, match="is gone"):
            remote.packs.read_run(pack.chunks[:1])
        assert remote.packs.missing(everything) == list(pack.chunks)
        # A chunk of a pack that is gone is still read from an object of its own.
        lost = pack.chunks[1]
        with Store.open(tmp_path / "a", options=PUSHING) as a:
            obstore.put(remote.store, f"cas/{lost.hex}", bytes(a.read_chunk(lost.hash)))
        remote.packs._add("index/again", [pack])  # placed again, in the pack that is gone
        assert hashlib.sha256(remote.read(lost)).digest() == lost.hash
        # An index that expired (a lifecycle rule) takes its packs' chunks with it.
        obstore.delete(remote.store, index)
        assert remote.packs.missing(everything, 0) == everything
    finally:
        remote.close()


def test_chunks_dropped_here_come_back_in_whole_packs(
    tmp_path: Path, weed: Seaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks dropped here (``--local-max-size``) that a read wants come back
    as they lie in the bucket: a pack in one request, not a request per chunk,
    and are stored in publications of ``RESTORE_BATCH`` bytes, each told."""
    monkeypatch.setattr(_tiers_module, "RESTORE_BATCH", 1 << 20)
    url = weed.url("cachefs", tmp_path.name)
    data = random.Random(9).randbytes(5 << 20)
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        requests = Requests()
        tiers = Tiers(store, [Tier(open_remote(url, SHA256), durable=True)])
        measure(tiers.tiers, lambda tier, endpoint: requests)  # type: ignore[arg-type,return-value]
        try:
            digest = store.put(data)
            drain(Pusher(tiers))
            packs = requests.counts["write_pack"]
            assert drop_held(store, 0, tiers.held).chunks > 40
            recipe = store.recipe(digest)
            assert store.reader.held_remotely(digest, 0, digest.size) == recipe
            landed: list[int] = []
            assert tiers.restore(recipe, landed.append) == len(recipe)
            assert not store.reader.held_remotely(digest, 0, digest.size)
            assert store.read(digest) == data
            assert packs <= requests.counts["read_pack"] <= packs + 1
            assert sum(landed) == len(recipe) and len(landed) >= 4
            assert tiers.counts["fetched_chunks"] == len(recipe)
        finally:
            tiers.close()


def _pushed_while_put(
    path: Path, url: str, data: bytes
) -> tuple[Digest, dict[str, int], Counter[str]]:
    """Put ``data`` in a fresh store while a pusher runs (chunks go up as they
    are appended), then drain the queue: digest, counts, requests."""
    with Store.open(path, create=True, options=PUSHING) as store:
        tiers, requests = _tiers(store, url)
        pusher = Pusher(tiers)  # its early push takes what the ingest appends
        try:
            digest = store.put(data)
            drain(pusher)
        finally:
            pusher.stop()
            tiers.close()
    return digest, dict(tiers.counts), requests.counts


def _fetched_fresh(path: Path, url: str, digest: Digest) -> bytes:
    with Store.open(path, create=True, options=StoreOptions(fsync=False)) as b:
        tiers, _ = _tiers(b, url)
        try:
            return fetch_into(b, tiers, digest)
        finally:
            tiers.close()


def test_chunks_go_up_as_they_are_written_and_the_push_sends_only_the_rest(
    tmp_path: Path, weed: Seaweed
) -> None:
    url = weed.url("cachefs", tmp_path.name)
    data = random.Random(11).randbytes(7 << 20)
    digest, counts, requests = _pushed_while_put(tmp_path / "a", url, data)
    # Three packs' worth went up while the put ran; the push sent the rest, no chunk twice.
    assert counts["early_chunks"] > 0 and counts["pushed_bytes"] == len(data)
    assert requests["write_pack"] >= 4 and requests["write_pack_index"] == 2
    assert _fetched_fresh(tmp_path / "b", url, digest) == data


def test_an_early_push_that_fails_leaves_its_chunks_to_the_push(
    tmp_path: Path, weed: Seaweed, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = weed.url("cachefs", tmp_path.name)
    data = random.Random(12).randbytes(7 << 20)
    put_pack, refusing = Packs.put_pack, [True]

    def failing(self: Packs, blobs: list[tuple[Digest, bytes]]) -> PackRecord:
        if refusing[0]:  # while the put runs: the early packs
            raise RemoteError("a pack refused")
        return put_pack(self, blobs)

    monkeypatch.setattr(Packs, "put_pack", failing)
    with Store.open(tmp_path / "a", create=True, options=PUSHING) as store:
        tiers, _ = _tiers(store, url)
        pusher = Pusher(tiers)
        try:
            with caplog.at_level(logging.INFO):
                digest = store.put(data)
                chunks = {h for h, _ in store.recipe(digest)}
                tiers.early[id(tiers.tiers[0])].settle(chunks)  # the early packs failed
                refusing[0] = False
                drain(pusher)
        finally:
            pusher.stop()
            tiers.close()
    assert "early push of" in caplog.text and "resting 30 s" in caplog.text
    # The push sent every chunk, and the tier's breaker knows nothing of the early failures.
    assert tiers.counts["pushed_bytes"] == len(data) and tiers.counts["early_chunks"] == 0
    assert tiers.tiers[0].breaker.failures == 0
    assert _fetched_fresh(tmp_path / "b", url, digest) == data


class _Bucket:
    """A bucket's packs in memory (a ``PackStore`` for the early push)."""

    def __init__(self, has: Iterable[Digest] = ()) -> None:
        self.has = set(has)
        self.packs: list[list[Digest]] = []
        self.indexes: list[list[PackRecord]] = []

    def missing(self, digests: Sequence[Digest], age: float = 0) -> list[Digest]:
        return [d for d in digests if d not in self.has]

    def put_pack(self, blobs: Sequence[tuple[Digest, bytes | memoryview]]) -> PackRecord:
        self.packs.append([d for d, _ in blobs])
        return PackRecord(bytes(16), tuple(d for d, _ in blobs))

    def put_index(self, records: Sequence[PackRecord]) -> None:
        self.indexes.append(list(records))
        self.has.update(d for record in records for d in record.chunks)


def _bytes(pack: list[Digest]) -> int:
    return sum(d.size for d in pack)


def _early(
    store: Store, bucket: _Bucket, pool: ThreadPoolExecutor, now: list[float]
) -> tuple[EarlyPush, list[int]]:
    sent: list[int] = []
    early = EarlyPush(
        "mem", bucket, store, pool, lambda: True,  # type: ignore[arg-type]
        lambda chunks, size: sent.append(size), clock=lambda: now[0],
    )  # fmt: skip
    return early, sent


def test_an_early_push_indexes_its_packs_when_needed_never_late_and_never_hangs(
    tmp_path: Path,
) -> None:
    options = StoreOptions(fsync=False)
    with (
        Store.open(tmp_path / "a", create=True, options=options) as store,
        ThreadPoolExecutor(16) as pool,
    ):
        one, two = (random.Random(n).randbytes(5 << 20) for n in (1, 2))
        chunks = [[Digest(h, n) for h, n in store.recipe(store.put(d))] for d in (one, two)]
        told = [[(d.hash, d.size) for d in c] for c in chunks]
        now = [0.0]
        # A bucket that has every chunk: each pack's task ends at once (it
        # used to come back into a lock its caller held), nothing is sent.
        early, sent = _early(store, _Bucket(chunks[0]), pool, now)
        offering = threading.Thread(target=early.offer, args=(told[0],))
        offering.start()
        offering.join(10)
        assert not offering.is_alive()
        early.settle({d.hash for d in chunks[0]})
        early.close()
        assert sent == []

        # The push of an object waits for its packs and indexes them.
        bucket = _Bucket()
        early, sent = _early(store, bucket, pool, now)
        early.offer(told[0])
        early.settle({d.hash for d in chunks[0]})
        # Two packs of at most PACK_BYTES each (a read asks for a whole pack at once).
        assert len(bucket.indexes) == 1 and len(bucket.packs) == 2
        assert all(0 < _bytes(p) <= PACK_BYTES for p in bucket.packs)
        assert sum(sent) > 2 * PACK_BYTES - (1 << 20)
        assert {d for d in chunks[0] if d not in bucket.has} == set(
            bucket.missing(chunks[0])
        )  # the rest: less than a pack, for the push
        assert sum(d.size for d in bucket.missing(chunks[0])) < PACK_BYTES

        # Packs of content nobody pushed are indexed at close, unless it is too late.
        def landed(early: EarlyPush) -> None:
            while early._flying:  # close() would cancel what has not started
                time.sleep(0.01)

        early.offer(told[1])
        landed(early)
        now[0] += INDEX_WITHIN + 1
        early.close()
        assert len(bucket.indexes) == 1 and len(bucket.packs) >= 4
        early, sent = _early(store, bucket, pool, now)
        early.offer(told[1][::-1])  # told afresh (another process)
        landed(early)
        early.close()
        assert len(bucket.indexes) == 2 and sum(sent) > 2 * PACK_BYTES - (1 << 20)
        assert all(0 < _bytes(p) <= PACK_BYTES for p in bucket.packs)


def test_an_early_push_forgets_the_oldest_chunks_it_was_told_past_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks told lately are remembered (a chunk told twice, as an
    abandoned stream's are, is taken once) up to ``TOLD_KEPT``; past it the
    oldest are forgotten, and one told again then is taken again."""
    monkeypatch.setattr("cachefs.remote._early.TOLD_KEPT", 2)
    with (
        Store.open(tmp_path / "a", create=True, options=StoreOptions(fsync=False)) as store,
        ThreadPoolExecutor(2) as pool,
    ):
        early, sent = _early(store, _Bucket(), pool, [0.0])
        one, two, three = (
            (hashlib.sha256(bytes([n])).digest(), 1000 + n) for n in range(3)
        )  # less than a pack: they wait
        early.offer([one, two, one])
        early.offer([two, three])
        assert list(early._told) == [two[0], three[0]]
        early.offer([three, one])  # ``one`` was forgotten: taken again
        assert [d.hash for d in early._waiting] == [one[0], two[0], three[0], one[0]]
        assert early._waiting_bytes == 1000 + 1001 + 1002 + 1000
        early.close()
        assert sent == []


def test_an_early_push_that_rests_or_fails_oddly_never_fails_its_closing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(_Bucket):
        def put_pack(self, blobs: Sequence[tuple[Digest, bytes | memoryview]]) -> PackRecord:
            if not self.packs:  # the first pack fails: the early push rests
                self.packs.append([])
                raise RemoteError("refused")
            return super().put_pack(blobs)

        def put_index(self, records: Sequence[PackRecord]) -> None:
            raise ValueError("a bug")

    options = StoreOptions(fsync=False)
    with (
        Store.open(tmp_path / "a", create=True, options=options) as store,
        ThreadPoolExecutor(1) as pool,  # one pack at a time: the first fails alone
        caplog.at_level(logging.INFO),
    ):
        data = random.Random(3).randbytes(7 << 20)
        told = [(h, n) for h, n in store.recipe(store.put(data))]
        now = [0.0]
        bucket = Broken()
        early, sent = _early(store, bucket, pool, now)
        early.offer(told)
        while early._flying:  # the first pack failed, the others landed
            time.sleep(0.01)
        early.offer(told[::-1])  # resting: not taken
        early.close()  # resting: no index is written at close
        assert "resting 30 s" in caplog.text and len(bucket.packs) > 1
        assert "writing the index" not in caplog.text and sent == []
        now[0] += 31  # rested: packs go, and an index that fails oddly is logged, not raised
        early, sent = _early(store, bucket, pool, now)
        early.offer(told)
        early.settle({h for h, _ in told})
        early.close()
        assert "writing the index of" in caplog.text and sent == []


def test_an_early_push_whose_index_is_refused_rests_and_leaves_the_chunks_to_the_push(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Packs landed but their index refused by the bucket: none of their
    chunks counts as sent (the push sends them), the early push rests, and
    chunks told to it twice go up once."""

    class Unindexed(_Bucket):
        def put_index(self, records: Sequence[PackRecord]) -> None:
            raise RemoteError("the index was refused")

    options = StoreOptions(fsync=False)
    with (
        Store.open(tmp_path / "a", create=True, options=options) as store,
        ThreadPoolExecutor(4) as pool,
        caplog.at_level(logging.INFO),
    ):
        data = random.Random(4).randbytes(5 << 20)
        chunks = [Digest(h, n) for h, n in store.recipe(store.put(data))]
        told = [(d.hash, d.size) for d in chunks]
        bucket = Unindexed()
        early, sent = _early(store, bucket, pool, [0.0])
        early.offer(told)
        early.offer(told)  # told again: nothing more goes
        early.settle({d.hash for d in chunks})
        packed = [d for pack in bucket.packs for d in pack]  # the packs land in any order
        assert len(bucket.packs) == 2 and sorted(packed) == sorted(chunks[: len(packed)])
        assert sent == [] and bucket.missing(chunks) == chunks  # nothing counts as there
        assert "the index of 2 early packs failed" in caplog.text and "resting" in caplog.text
        early.offer(told[::-1])  # resting: not taken
        early.close()
        assert len(bucket.packs) == 2 and sent == []


class _Flying:
    """A remote whose packs hold ``blobs`` in packs of ``PACK_BYTES``
    (``packed``) or that has them one by one, and that counts what a fetch
    asks for at once."""

    name = "slow"

    def __init__(self, blobs: dict[Digest, bytes], packed: bool) -> None:
        self.blobs = blobs
        self.packs = self if packed else None
        self.pack_of = {d: n for n, g in enumerate(pack_groups(list(blobs))) for d in g}
        self.requests = self.bytes = self.most_requests = self.most_bytes = 0
        self.asked = self.planned = 0  # requests made; runs planned (``run`` calls)
        self._lock = threading.Lock()

    def placed(self, digest: Digest, age: float) -> bool:
        return True

    def run(self, digests: Sequence[Digest], limit: int = RUN_BYTES) -> int:
        self.planned += 1
        count, total = 0, 0
        for d in digests:
            if self.pack_of[d] != self.pack_of[digests[0]] or (count and total + d.size > limit):
                break
            count, total = count + 1, total + d.size
        return count

    def read_run(self, digests: Sequence[Digest]) -> list[bytes]:
        return self._flying(digests)

    def read(self, digest: Digest) -> bytes:
        return self._flying([digest])[0]

    def _flying(self, digests: Sequence[Digest]) -> list[bytes]:
        size = sum(d.size for d in digests)
        with self._lock:
            self.asked += 1
            self.requests, self.bytes = self.requests + 1, self.bytes + size
            self.most_requests = max(self.most_requests, self.requests)
            self.most_bytes = max(self.most_bytes, self.bytes)
        time.sleep(0.05)  # long enough for every request allowed to start meanwhile
        with self._lock:
            self.requests, self.bytes = self.requests - 1, self.bytes - size
        return [self.blobs[d] for d in digests]


@pytest.mark.parametrize("packed", [True, False])
def test_a_fetch_keeps_so_many_requests_and_bytes_in_flight(tmp_path: Path, packed: bool) -> None:
    rng = random.Random(5)
    sizes = [rng.randrange(40_000, 120_000) for _ in range(500)] if packed else [4096] * 300
    blobs = {}
    for size in sizes:
        data = rng.randbytes(size)
        blobs[Digest(hashlib.sha256(data).digest(), size)] = data
    remote = _Flying(blobs, packed)
    chunks = [(d.hash, d.size) for d in blobs]
    with (
        Store.open(tmp_path / "s", create=True, options=StoreOptions(fsync=False)) as store,
        ThreadPoolExecutor(32) as pool,
    ):
        got = _transfer.fetch_chunks(pool, store, remote, chunks, lambda *_: None)  # type: ignore[arg-type]
        assert b"".join(bytes(data) for _, data in got) == b"".join(blobs.values())
    if packed:  # whole packs, fewer than FETCH_AHEAD of them: as many as the bytes allow
        # A request that waits for room is planned once, not at every chunk
        # taken meanwhile (that was a core-second per GiB).
        assert remote.planned <= remote.asked + 1
        assert _transfer.FETCH_BYTES + RUN_BYTES < _transfer.FETCH_AHEAD * PACK_BYTES
        assert _transfer.FETCH_BYTES // 2 < remote.most_bytes <= _transfer.FETCH_BYTES
    else:  # small blobs: as many requests as allowed
        assert remote.most_requests == _transfer.FETCH_AHEAD
