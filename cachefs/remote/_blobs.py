"""What every remote tier does: blobs by digest (remote layer).

A remote holds blobs named by their digests (the store's digest function):
chunks, and the objects and lists made of them.  Whatever a remote answers is
checked against the digest asked for before a byte of it is used
(:func:`verified`): a short, long or wrong reply is a :class:`RemoteError`,
never data.  A blob the remote does not have is ``ObjectNotFoundError``.  A remote also
keeps action cache entries (an ``ActionResult`` under a key digest), which is
how the names of things -- an object's chunk list -- reach other machines.
A remote that can list what it holds by prefix (an S3 bucket) also keeps
documents by key (:class:`Documents`): shared directories keep their entries
there, a directory's under one prefix, so that one listing answers every
lookup in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from google.protobuf.message import DecodeError

from cachefs.errors import RemoteError, RemoteRecordError
from cachefs.format.digest import Digest, DigestFunction
from cachefs.protocol import re_pb2

if TYPE_CHECKING:
    from cachefs.remote._packs import PackStore

B = TypeVar("B", bytes, memoryview)


class Documents(Protocol):
    """Small documents by key, listable by prefix (a bucket's objects)."""

    def get_document(self, key: str) -> bytes | None:
        """The document (None: there is none)."""
        ...

    def put_document(self, key: str, data: bytes) -> None: ...

    def list_documents(self, prefix: str, limit: int) -> dict[str, float] | None:
        """The keys below ``prefix/``, relative to it, and when each was last
        written (seconds since the epoch, the store's clock); None if there
        are more than ``limit``."""
        ...

    def delete_document(self, key: str) -> None:
        """Remove the document, if it is there."""
        ...


class Remote(Protocol):
    """One remote endpoint, or a group of them that acts as one."""

    #: How logs and figures name it (its URL, or the group's name).
    name: str
    #: What it is, whatever the spelling of its URL (placement hashes it).
    key: str

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The digests of ``digests`` whose blobs the remote does not have."""
        ...

    def read(self, digest: Digest) -> bytes:
        """The blob, verified; ObjectNotFoundError if the remote lacks it."""
        ...

    def write(self, digest: Digest, data: bytes) -> None:
        """Store a blob (its bytes must have ``digest``: the caller made sure)."""
        ...

    #: Whether :meth:`write_stream` keeps memory bounded (else it joins the pieces).
    streams: bool

    def write_stream(
        self, digest: Digest, pieces: Callable[[], Iterable[bytes | memoryview]]
    ) -> None:
        """Store a large blob from its pieces (``pieces()`` gives them afresh,
        for each try or copy)."""
        ...

    @property
    def splices(self) -> bool:
        """Whether :meth:`splice` works here (a REAPI server that says so)."""
        ...

    def splice(self, digest: Digest, chunks: Sequence[Digest]) -> None:
        """Make the blob ``digest`` from chunks the remote holds, in order
        (REAPI SpliceBlob; the server checks the result's digest)."""
        ...

    def get_action(self, key: Digest) -> re_pb2.ActionResult | None:
        """The action cache entry under ``key`` (None: there is none).  Its
        blobs are not checked: a caller reads and verifies them as blobs."""
        ...

    def update_action(self, key: Digest, result: re_pb2.ActionResult) -> None:
        """Store an action cache entry (the blobs it names are written first)."""
        ...

    @property
    def documents(self) -> Documents | None:
        """Its documents, if it keeps them (else None: the action cache only)."""
        ...

    @property
    def packs(self) -> PackStore | None:
        """Its packs of chunks, if it keeps them (a bucket: ``_packs.py``)."""
        ...

    def close(self) -> None: ...


def action_result(data: bytes, name: str, what: str) -> re_pb2.ActionResult:
    """``data`` parsed as an ``ActionResult``; RemoteRecordError naming
    ``name`` and ``what`` (the key it was under) if it is not one."""
    result = re_pb2.ActionResult()
    try:
        result.ParseFromString(data)
    except DecodeError:
        raise RemoteRecordError(f"{name}: {what} is not an ActionResult") from None
    return result


def verified(name: str, function: DigestFunction, digest: Digest, data: B) -> B:
    """``data`` if it is the blob of ``digest``; else RemoteError naming ``name``."""
    if len(data) != digest.size:
        raise RemoteError(
            f"{name} answered {len(data)} bytes for blob {digest}",
            hint="the remote's copy is damaged or it is not a cache of this digest function",
        )
    if function.hash(data) != digest.hash:
        raise RemoteError(
            f"{name} answered bytes that are not blob {digest}",
            hint="the remote's copy is damaged or it is not a cache of this digest function",
        )
    return data


__all__ = ["Documents", "Remote", "action_result", "verified"]
