"""Where chunk bytes come from: the seam for storage tiers (storage engine layer).

Objects are read as the chunks of their recipes, and ingest asks which chunks
it must store; both go through a :class:`ChunkBackend`.  The local segment store
(``LocalChunks``) is the first implementation.  Remote tiers (an S3 bucket, a
REAPI CAS, a Bazel HTTP cache) are further implementations, and the features
that combine them (a fast tier in front of a slow one, shard groups, replicas)
are backends that hold other backends, as Buildbarn's ``BlobAccess`` wrappers
do.  Every implementation verifies what it returns, or the read fails
(``CorruptDataError``): the local store by each record's checksum and the
digest written in it, a backend that fetches from elsewhere by hashing what it
got.  The store reads objects through its backend (``ObjectReader``); ingest
asks the local one which chunks it must store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol


class ChunkBackend(Protocol):
    """Chunk bytes by digest (raw chunk digests of the store's digest function)."""

    def find_missing(self, digests: Sequence[bytes]) -> set[bytes]:
        """The digests of ``digests`` whose chunks this backend cannot serve."""
        ...

    def read_chunks(self, digests: Sequence[bytes]) -> Iterator[bytes | memoryview]:
        """The verified bytes of each chunk, in order.  The backend may fetch or
        decode the later ones while the caller consumes the first; a caller that
        stops early closes the iterator."""
        ...

    def read_into(self, wanted: Sequence[tuple[bytes, int, memoryview]]) -> list[bool]:
        """For each (digest, start, buffer): bytes ``[start, start + len(buffer))``
        of the chunk copied into ``buffer``, verified, if this backend can do
        it without a copy of its own (a raw chunk stored here); whether each
        was.  What a buffer holds where the answer is False means nothing:
        the caller reads those chunks with :meth:`read_chunks`, which says
        why any cannot be read."""
        ...


__all__ = ["ChunkBackend"]
