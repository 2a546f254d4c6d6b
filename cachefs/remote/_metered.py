"""Remote requests measured and traced (remote layer).

:func:`measure` puts a :class:`Metered` in front of every endpoint of a
store's tiers (each member of a shard group, so that each is measured on its
own) when the process has metrics or traces: every request's latency,
whether it failed, and the bytes of blobs that crossed; each request is a
client span (``remote read``, ``remote find_missing``, ...) under the span in
progress.  A miss (NotFoundError, an absent entry) is an answer, not a
failure.  Without either nothing is wrapped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from cachefs import tracing
from cachefs.errors import NotFoundError
from cachefs.format.digest import Digest
from cachefs.protocol import re_pb2
from cachefs.remote._blobs import Documents, Remote
from cachefs.remote._packs import RUN_BYTES, SYNC_PUSH, PackRecord, Packs, PackStore
from cachefs.remote._shards import ShardGroup
from cachefs.remote._tiers import Tier

if TYPE_CHECKING:
    from cachefs.metrics import RemoteMeter

T = TypeVar("T")


class _Timed:
    """Runs requests to one endpoint, measured and traced:
    ``call(operation, fn, sent=, received=)``."""

    def __init__(self, meter: RemoteMeter | None, tier: str, endpoint: str) -> None:
        self.meter = meter
        self.attributes = {"cachefs.tier": tier, "cachefs.endpoint": endpoint}

    def call(
        self,
        operation: str,
        fn: Callable[[], T],
        *,
        sent: int = 0,
        received: Callable[[T], int] | None = None,
    ) -> T:
        miss: NotFoundError | None = None
        with tracing.span(f"remote {operation}", kind="client", attributes=self.attributes) as span:
            start = time.perf_counter()
            try:
                result = fn()
            except NotFoundError as exc:  # a miss is an answer
                miss = exc
                tracing.set_attribute(span, "cachefs.found", False)
            except BaseException:
                self._count(operation, start, failed=True)
                raise
        if miss is not None:
            self._count(operation, start, failed=False, sent=sent)
            raise miss
        got = received(result) if received is not None else 0
        self._count(operation, start, failed=False, received=got, sent=sent)
        return result

    def _count(
        self, operation: str, start: float, *, failed: bool, received: int = 0, sent: int = 0
    ) -> None:
        if self.meter is not None:
            seconds = time.perf_counter() - start
            self.meter.request(operation, seconds, failed=failed, received=received, sent=sent)


class Metered:
    """A remote whose every request is measured (see the module doc)."""

    def __init__(self, remote: Remote, meter: RemoteMeter | None, tier: str) -> None:
        self.inner = remote
        self.name = remote.name
        self.key = remote.key
        self.streams = remote.streams
        self._timed = _Timed(meter, tier, remote.name)
        documents = remote.documents
        self._documents = None if documents is None else MeteredDocuments(documents, self._timed)
        packs = remote.packs
        self._packs = None if packs is None else MeteredPacks(packs, self._timed)

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return self._timed.call("find_missing", lambda: self.inner.find_missing(digests))

    def read(self, digest: Digest) -> bytes:
        return self._timed.call("read", lambda: self.inner.read(digest), received=len)

    def write(self, digest: Digest, data: bytes) -> None:
        self._timed.call("write", lambda: self.inner.write(digest, data), sent=len(data))

    def write_stream(
        self, digest: Digest, pieces: Callable[[], Iterable[bytes | memoryview]]
    ) -> None:
        self._timed.call("write", lambda: self.inner.write_stream(digest, pieces), sent=digest.size)

    @property
    def splices(self) -> bool:
        return self.inner.splices

    def splice(self, digest: Digest, chunks: Sequence[Digest]) -> None:
        self._timed.call("splice", lambda: self.inner.splice(digest, chunks))

    def get_action(self, key: Digest) -> re_pb2.ActionResult | None:
        return self._timed.call(
            "get_action",
            lambda: self.inner.get_action(key),
            received=lambda r: 0 if r is None else r.ByteSize(),
        )

    def update_action(self, key: Digest, result: re_pb2.ActionResult) -> None:
        self._timed.call(
            "update_action", lambda: self.inner.update_action(key, result), sent=result.ByteSize()
        )

    @property
    def documents(self) -> Documents | None:
        return self._documents

    @property
    def packs(self) -> PackStore | None:
        return self._packs

    def close(self) -> None:
        self.inner.close()


class MeteredDocuments:
    """A remote's documents (shared-directory entries), measured."""

    def __init__(self, documents: Documents, timed: _Timed) -> None:
        self.inner = documents
        self._timed = timed

    def get_document(self, key: str) -> bytes | None:
        return self._timed.call(
            "get_document",
            lambda: self.inner.get_document(key),
            received=lambda d: 0 if d is None else len(d),
        )

    def put_document(self, key: str, data: bytes) -> None:
        self._timed.call("put_document", lambda: self.inner.put_document(key, data), sent=len(data))

    def list_documents(self, prefix: str, limit: int) -> dict[str, float] | None:
        return self._timed.call("list_documents", lambda: self.inner.list_documents(prefix, limit))

    def delete_document(self, key: str) -> None:
        self._timed.call("delete_document", lambda: self.inner.delete_document(key))


class MeteredPacks:
    """A remote's packs, measured (what only asks the index here is not a
    request; a sync's requests are measured by the packs themselves)."""

    def __init__(self, packs: PackStore, timed: _Timed) -> None:
        self.inner = packs
        self._timed = timed
        if isinstance(packs, Packs):  # a sync's listing and index reads
            packs.measure = timed.call

    def missing(self, digests: Sequence[Digest], age: float = SYNC_PUSH) -> list[Digest]:
        return self.inner.missing(digests, age)

    def placed(self, digest: Digest, age: float | None = None) -> bool:
        return self.inner.placed(digest, age)

    def run(self, digests: Sequence[Digest], limit: int = RUN_BYTES) -> int:
        return self.inner.run(digests, limit)

    def read_run(self, digests: Sequence[Digest]) -> list[memoryview]:
        return self._timed.call(
            "read_pack", lambda: self.inner.read_run(digests), received=lambda c: sum(map(len, c))
        )

    def put_pack(self, blobs: Sequence[tuple[Digest, bytes | memoryview]]) -> PackRecord:
        sent = sum(len(data) for _, data in blobs)
        return self._timed.call("write_pack", lambda: self.inner.put_pack(blobs), sent=sent)

    def put_index(self, records: Sequence[PackRecord]) -> None:
        self._timed.call("write_pack_index", lambda: self.inner.put_index(records))


def measure(tiers: Sequence[Tier], meter: Callable[[str, str], RemoteMeter] | None = None) -> None:
    """Measure (with ``meter(tier, endpoint)``, the instruments of one) and
    trace every endpoint of ``tiers``; a tier is named by its remote's name.
    Nothing is wrapped when there is neither a meter nor tracing."""
    if meter is None and not tracing.active():
        return

    def metered(remote: Remote, tier: str) -> Metered:
        return Metered(remote, None if meter is None else meter(tier, remote.name), tier)

    for tier in tiers:
        remote = tier.remote
        if isinstance(remote, ShardGroup):
            for member in remote.members:
                member.remote = metered(member.remote, remote.name)
        else:
            tier.remote = metered(remote, remote.name)


__all__ = ["Metered", "MeteredDocuments", "MeteredPacks", "measure"]
