"""Shard groups: several endpoints that act as one remote (remote layer).

Each blob's place is chosen by rendezvous (highest-random-weight) hashing on
its digest: every endpoint scores the blob with a hash of the pair, scaled by
its weight (``score = -weight / ln(u)``, ``u`` uniform in (0, 1) -- the
weighted form of Thaler and Ravishankar's method), and the blob lives on the
``replicas`` endpoints with the highest scores.  Adding or removing an
endpoint moves only the blobs whose top places it takes or held: about its
share of the weight, nothing else (``tests/test_remote.py`` measures it).

An endpoint that fails is skipped for a while by its :class:`Breaker`: after
``FAILURES`` failures in a row it is left alone for a back-off that doubles
with each failed retry (``BACKOFF`` to ``MAX_BACKOFF``); then one request
tries it again.  Why it is open is kept for stats and logs.

Action cache entries are placed by their key digest as blobs are.  Reads try
the endpoints in the blob's order -- its replicas first, then the
others, where a blob placed before an endpoint was added still is.  Writes go
to the first ``replicas`` endpoints that take them (an open one is passed
over, the next in the blob's order takes its copy).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import xxhash

from cachefs.errors import ConfigError, ObjectNotFoundError, RemoteError, RemoteRecordError
from cachefs.format.digest import Digest
from cachefs.protocol import re_pb2
from cachefs.remote._blobs import Remote

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Failures in a row that open a breaker.
FAILURES = 3
#: Seconds an open breaker waits before its first retry, and at the most.
BACKOFF = 1.0
MAX_BACKOFF = 60.0

_SCALE = 2.0**-53


def score(seed: int, digest: bytes, weight: float) -> float:
    """An endpoint's rendezvous score for a blob (higher: placed there first)."""
    # 53 bits, as many as a float holds: u is in (0, 1), never 1.0 (log 0).
    u = ((xxhash.xxh3_64_intdigest(digest, seed) >> 11) + 0.5) * _SCALE
    return -weight / math.log(u)


def endpoint_seed(name: str) -> int:
    """The hash seed that stands for an endpoint (from its identity -- the
    remote's ``key``: address and instance or prefix, so that two spellings
    of one URL place blobs alike -- stable across runs)."""
    return xxhash.xxh3_64_intdigest(name.encode())


def placement(digest: bytes, seeds: Sequence[int], weights: Sequence[float]) -> list[int]:
    """The endpoints' indices in the blob's order, best first."""
    scores = [score(seed, digest, weight) for seed, weight in zip(seeds, weights, strict=True)]
    return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)


class Breaker:
    """Whether an endpoint is worth a request now; shared by threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failures = 0
        self.backoff = BACKOFF
        #: When an open breaker lets one request through (0: closed).
        self.retry_at = 0.0
        #: Why it opened (the last error), for stats and logs.
        self.reason = ""
        self._trying = False
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        """Whether it is open now (a look: :meth:`admit` asks for a request)."""
        with self._lock:
            return self.retry_at > 0.0 and (self._trying or self.clock() < self.retry_at)

    @property
    def tripped(self) -> bool:
        """Whether it opened and no request has succeeded since (open, or
        between its retries: an endpoint that is down, however seldom asked)."""
        with self._lock:
            return self.retry_at > 0.0

    def admit(self) -> bool:
        """Whether a request may go: always when closed; when open, only the
        one retry after the back-off (the others wait for its outcome)."""
        with self._lock:
            if self.retry_at == 0.0:
                return True
            if self._trying or self.clock() < self.retry_at:
                return False
            self._trying = True
            return True

    def succeeded(self) -> None:
        with self._lock:
            self.failures, self.backoff, self.retry_at, self.reason = 0, BACKOFF, 0.0, ""
            self._trying = False

    def failed(self, reason: str) -> bool:
        """Count a failure; True if the breaker opened (or stays open) for it."""
        with self._lock:
            self.failures += 1
            self.reason = reason
            if self.failures < FAILURES and self.retry_at == 0.0:
                return False
            if self._trying:  # the retry failed: wait longer
                self.backoff = min(self.backoff * 2, MAX_BACKOFF)
            elif self.retry_at > 0.0:
                return True  # a request from before it opened: nothing new
            self._trying = False
            self.retry_at = self.clock() + self.backoff
            return True


@dataclass
class Member:
    remote: Remote
    weight: float
    seed: int
    breaker: Breaker = field(default_factory=Breaker)


class ShardGroup:
    """Endpoints that hold blobs by rendezvous hashing, ``replicas`` copies each."""

    def __init__(
        self,
        remotes: Sequence[tuple[Remote, float]],
        replicas: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not remotes:
            raise ConfigError("a shard group needs at least one endpoint")
        if not 1 <= replicas <= len(remotes):
            raise ConfigError(
                f"a shard group of {len(remotes)} endpoints cannot keep {replicas} replicas"
            )
        if any(not (weight > 0 and math.isfinite(weight)) for _, weight in remotes):
            raise ConfigError("a shard group's weights must be positive numbers")
        keys = [remote.key for remote, _ in remotes]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise ConfigError(f"a shard group names endpoint {twice} twice")
        self.members = [
            Member(remote, weight, endpoint_seed(remote.key), Breaker(clock))
            for remote, weight in remotes
        ]
        self.replicas = replicas
        self.name = "group(" + ", ".join(m.remote.name for m in self.members) + ")"
        self.key = "group(" + ",".join(sorted(keys)) + f")x{replicas}"
        self.streams = all(m.remote.streams for m in self.members)
        self.documents = None  # an entry's place would be each listing's too
        self.packs = None  # a chunk's place is its own endpoints, pack by pack
        self._seeds = [m.seed for m in self.members]
        self._weights = [m.weight for m in self.members]

    def order(self, digest: Digest) -> list[Member]:
        """The members in the blob's order, best first."""
        return [self.members[i] for i in placement(digest.hash, self._seeds, self._weights)]

    def _failed(self, member: Member, exc: RemoteError) -> None:
        if member.breaker.failed(exc.message):
            log.warning("remote %s skipped for %.0f s: %s", member.remote.name,
                        member.breaker.backoff, exc.message)  # fmt: skip

    @property
    def splices(self) -> bool:
        return False  # a blob's chunks lie on other endpoints than the blob

    def splice(self, digest: Digest, chunks: Sequence[Digest]) -> None:
        raise RemoteError(f"{self.name}: a shard group cannot splice blobs")

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The blobs that some replica endpoint lacks (or cannot be asked now)."""
        asked: dict[int, list[Digest]] = {}
        for digest in digests:
            for member in self.order(digest)[: self.replicas]:
                asked.setdefault(id(member), []).append(digest)
        missing: set[Digest] = set()
        for member in self.members:
            wanted = asked.get(id(member), [])
            if not wanted:
                continue
            if not member.breaker.admit():
                missing.update(wanted)
                continue
            try:
                missing.update(member.remote.find_missing(wanted))
            except RemoteError as exc:
                self._failed(member, exc)
                missing.update(wanted)
            else:
                member.breaker.succeeded()
        return [d for d in digests if d in missing]

    def read(self, digest: Digest) -> bytes:
        """The blob from the first endpoint in its order that has it; a miss
        (ObjectNotFoundError) only if every endpoint was asked and said so."""
        return self._first(digest, lambda remote: remote.read(digest), f"blob {digest}")

    def get_action(self, key: Digest) -> re_pb2.ActionResult | None:
        def get(remote: Remote) -> re_pb2.ActionResult:
            result = remote.get_action(key)
            if result is None:
                raise ObjectNotFoundError(f"action cache entry {key} is not in {remote.name}")
            return result

        try:
            return self._first(key, get, f"action cache entry {key}")
        except ObjectNotFoundError:
            return None

    def _first(self, digest: Digest, call: Callable[[Remote], T], what: str) -> T:
        failure: RemoteError | None = None
        record: RemoteRecordError | None = None  # an endpoint's copy is no use: not its fault
        skipped: list[str] = []
        for member in self.order(digest):
            if not member.breaker.admit():
                skipped.append(member.remote.name)
                continue
            try:
                found = call(member.remote)
            except ObjectNotFoundError:
                member.breaker.succeeded()
                continue
            except RemoteRecordError as exc:
                member.breaker.succeeded()
                record = exc
                continue
            except RemoteError as exc:
                self._failed(member, exc)
                failure = exc
                continue
            member.breaker.succeeded()
            return found
        if failure is not None:
            raise RemoteError(f"{self.name}: no endpoint could serve {what}: {failure}")
        if skipped:
            raise RemoteError(
                f"{self.name}: {what} is on none of the endpoints asked, and "
                f"{', '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} skipped (failing)"
            )
        if record is not None:
            raise record
        raise ObjectNotFoundError(f"{what} is not in {self.name}")

    def write(self, digest: Digest, data: bytes) -> None:
        self._replicate(digest, lambda remote: remote.write(digest, data), f"blob {digest}")

    def write_stream(
        self, digest: Digest, pieces: Callable[[], Iterable[bytes | memoryview]]
    ) -> None:
        self._replicate(
            digest, lambda remote: remote.write_stream(digest, pieces), f"blob {digest}"
        )

    def update_action(self, key: Digest, result: re_pb2.ActionResult) -> None:
        self._replicate(
            key, lambda remote: remote.update_action(key, result), f"action cache entry {key}"
        )

    def _replicate(self, digest: Digest, call: Callable[[Remote], None], what: str) -> None:
        written, failure = 0, None
        for member in self.order(digest):
            if written == self.replicas:
                return
            if not member.breaker.admit():
                continue
            try:
                call(member.remote)
            except RemoteError as exc:
                self._failed(member, exc)
                failure = exc
                continue
            member.breaker.succeeded()
            written += 1
        if written < self.replicas:
            raise RemoteError(
                f"{self.name}: {what} has {written} of {self.replicas} copies"
                + (f": {failure}" if failure else " (every other endpoint is skipped)")
            )

    def close(self) -> None:
        for member in self.members:
            member.remote.close()


__all__ = ["Breaker", "ShardGroup", "placement", "score"]
