"""Remote requests measured (remote layer).

:func:`measure` puts a :class:`Metered` in front of every endpoint of a
store's tiers (each member of a shard group, so that each is measured on its
own) when the process has metrics: every request's latency, whether it
failed, and the bytes of blobs that crossed.  A miss (NotFoundError,
an absent entry) is an answer, not a failure.  Without metrics nothing is
wrapped and nothing is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from cachefs.errors import NotFoundError
from cachefs.format.digest import Digest
from cachefs.protocol import re_pb2
from cachefs.remote._blobs import Documents, Remote
from cachefs.remote._shards import ShardGroup
from cachefs.remote._tiers import Tier

if TYPE_CHECKING:
    from cachefs.metrics import RemoteMeter

T = TypeVar("T")


class _Timed:
    """Runs requests through a meter: ``call(operation, fn, sent=)``."""

    def __init__(self, meter: RemoteMeter) -> None:
        self.meter = meter

    def call(
        self,
        operation: str,
        fn: Callable[[], T],
        *,
        sent: int = 0,
        received: Callable[[T], int] | None = None,
    ) -> T:
        start = time.perf_counter()
        try:
            result = fn()
        except NotFoundError:  # a miss is an answer
            self.meter.request(operation, time.perf_counter() - start, failed=False, sent=sent)
            raise
        except BaseException:
            self.meter.request(operation, time.perf_counter() - start, failed=True)
            raise
        got = received(result) if received is not None else 0
        self.meter.request(
            operation, time.perf_counter() - start, failed=False, received=got, sent=sent
        )
        return result


class Metered:
    """A remote whose every request is measured (see the module doc)."""

    def __init__(self, remote: Remote, meter: RemoteMeter) -> None:
        self.inner = remote
        self.name = remote.name
        self.key = remote.key
        self.streams = remote.streams
        self._timed = _Timed(meter)
        documents = remote.documents
        self._documents = None if documents is None else MeteredDocuments(documents, self._timed)

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

    def list_documents(self, prefix: str, limit: int) -> list[str] | None:
        return self._timed.call("list_documents", lambda: self.inner.list_documents(prefix, limit))

    def delete_document(self, key: str) -> None:
        self._timed.call("delete_document", lambda: self.inner.delete_document(key))


def measure(tiers: Sequence[Tier], meter: Callable[[str, str], RemoteMeter]) -> None:
    """Measure every endpoint of ``tiers``; ``meter(tier, endpoint)`` gives the
    instruments of one (a tier is named by its remote's name)."""
    for tier in tiers:
        remote = tier.remote
        if isinstance(remote, ShardGroup):
            for member in remote.members:
                member.remote = Metered(member.remote, meter(remote.name, member.remote.name))
        else:
            tier.remote = Metered(remote, meter(remote.name, remote.name))


__all__ = ["Metered", "MeteredDocuments", "measure"]
