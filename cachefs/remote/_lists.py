"""Chunk lists and shared entries: how names reach a remote (remote layer).

A tier holds an object as its chunks (blobs, by their digests) plus its chunk
list, so that a changed file sends only its new chunks and a reader on another
machine fetches only the chunks it lacks.  The chunk list is a blob too::

    LIST_MAGIC (8 bytes: b"CFSLIST1"), then per chunk, in order:
    LIST_ENTRY = chunk hash 32s, raw length Q (little-endian)

(a hole of a sparse object is an all-zero hash with the hole's length), and it
is found by an action cache entry: the key is the digest of
``LIST_DOMAIN + object hash + object size (Q, big-endian)`` (``list_key``); the
entry is an ``ActionResult`` with one output file, ``LIST_PATH``, whose digest
is the list blob's.  Every REAPI server, Bazel HTTP cache and bucket keeps such
entries, and to other clients it is an action result like any other.
Shared directories put their entries on the tiers the same way: the entry of
relative path ``PATH`` in share ``SHARE`` is the action cache entry under the
digest of ``SHARE_DOMAIN + SHARE + NUL + PATH`` (``entry_key``).  A file's is
an ``ActionResult`` with one output file: its path, its content's digest, and
its mode and mtime in the file's ``node_properties``, and for a file of at
most ``INLINE_MAX`` bytes its bytes in ``contents`` (one request fetches it;
a server that drops them leaves the digest to fetch by); a directory's (made for
each directory above a file) has no outputs and ``execution_metadata.worker``
= ``DIRECTORY_MARK``.

A remote that keeps documents (an S3 bucket, ``Documents`` in ``_blobs.py``)
keeps shared entries there instead, the same ``ActionResult`` bytes, one
directory's under one prefix so that a single listing answers every lookup
in it (a tool's temporary and lock files cost no request)::

    shares/<hex of the digest of SHARE_DIRECTORY_DOMAIN + SHARE + NUL + DIRECTORY>/
        f<hex of the name's bytes>      a file's entry
        d<hex of the name's bytes>      a directory's entry

(``DIRECTORY`` is the parent's relative path, empty at the top of the
share; ``entry_document``, ``listed_names``).

Nothing in a list is trusted: each chunk is verified as a blob, and the object
assembled from them is verified against its own digest before it is stored.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cachefs.errors import RemoteRecordError
from cachefs.format.digest import Digest, DigestFunction
from cachefs.format.schema import INODE_TIMES
from cachefs.protocol import re_pb2

LIST_MAGIC = b"CFSLIST1"
LIST_ENTRY = struct.Struct("<32sQ")
LIST_DOMAIN = b"cachefs chunk list 1\0"
LIST_PATH = "cachefs-chunk-list"
SHARE_DOMAIN = b"cachefs share entry 1\0"
SHARE_DIRECTORY_DOMAIN = b"cachefs share directory 1\0"
DIRECTORY_MARK = "cachefs-directory"
#: Files of at most this many bytes travel inside their shared entries.
INLINE_MAX = 64 << 10
_SIZE = struct.Struct(">Q")
_HOLE = bytes(32)


def list_key(function: DigestFunction, digest: Digest) -> Digest:
    """The action cache key of an object's chunk list."""
    document = LIST_DOMAIN + digest.hash + _SIZE.pack(digest.size)
    return Digest(function.hash(document), len(document))


def pack_list(chunks: list[tuple[bytes, int]]) -> bytes:
    """A chunk list blob of a recipe's (chunk digest, length) entries
    (a hole's digest is empty)."""
    return LIST_MAGIC + b"".join(LIST_ENTRY.pack(d or _HOLE, n) for d, n in chunks)


def unpack_list(data: bytes, digest: Digest, where: str) -> list[tuple[bytes, int]]:
    """The entries of a chunk list blob of object ``digest`` (holes with an
    empty digest); RemoteRecordError if it is not one, or does not add up."""
    body = memoryview(data)[len(LIST_MAGIC) :]
    if not data.startswith(LIST_MAGIC) or len(body) % LIST_ENTRY.size:
        raise RemoteRecordError(f"{where}: the chunk list of object {digest} is malformed")
    chunks = [(b"" if d == _HOLE else d, n) for d, n in LIST_ENTRY.iter_unpack(body)]
    if sum(n for _, n in chunks) != digest.size:
        raise RemoteRecordError(
            f"{where}: the chunk list of object {digest} does not add up to its size"
        )
    return chunks


def list_result(blob: Digest) -> re_pb2.ActionResult:
    """The action cache entry that names a chunk list blob."""
    return re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(
                path=LIST_PATH, digest=re_pb2.Digest(hash=blob.hex, size_bytes=blob.size)
            )
        ]
    )


def listed_blob(result: re_pb2.ActionResult, where: str) -> Digest:
    """The chunk list blob an entry names (RemoteRecordError if it names none)."""
    for output in result.output_files:
        if output.path == LIST_PATH:
            try:
                return Digest(bytes.fromhex(output.digest.hash), output.digest.size_bytes)
            except ValueError:
                break
    raise RemoteRecordError(f"{where}: an action cache entry is not a chunk list")


@dataclass(frozen=True)
class SharedEntry:
    """A shared directory's entry as a tier keeps it."""

    path: str
    #: The file's content (None: a directory).
    digest: Digest | None
    mode: int = 0o644
    mtime_ns: int = 0
    #: A small file's bytes, carried in the entry (``INLINE_MAX``): one
    #: request fetches it.  Checked against ``digest`` where it is used.
    contents: bytes | None = None


def _wire(path: str) -> str:
    """A path as a protobuf string (UTF-8): bytes of a name that are not
    UTF-8 as ``\\xNN`` escapes (the key is made of the bytes themselves)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def entry_key(function: DigestFunction, share: str, path: str) -> Digest:
    """The action cache key of the entry ``path`` of share ``share``."""
    document = SHARE_DOMAIN + share.encode() + b"\0" + os.fsencode(path)
    return Digest(function.hash(document), len(document))


def directory_prefix(function: DigestFunction, share: str, directory: str) -> str:
    """The document prefix of the entries in ``directory`` of share ``share``."""
    document = SHARE_DIRECTORY_DOMAIN + share.encode() + b"\0" + os.fsencode(directory)
    return f"shares/{function.hash(document).hex()}"


def entry_document(function: DigestFunction, share: str, path: str, directory: bool) -> str:
    """The document key of the entry ``path`` of share ``share``."""
    parent, _, name = path.rpartition("/")
    kind = "d" if directory else "f"
    return f"{directory_prefix(function, share, parent)}/{kind}{os.fsencode(name).hex()}"


def listed_names(keys: Mapping[str, float]) -> tuple[dict[str, bool], dict[str, float]]:
    """The names a directory's listing (key -> when it was written) holds,
    and whether each is a directory (a name that is both counts as a file);
    and when the entry of each directory was written.  Other keys are ignored."""
    names: dict[str, bool] = {}
    written: dict[str, float] = {}
    for key, at in keys.items():
        kind, hexed = key[:1], key[1:]
        if kind not in ("d", "f"):
            continue
        try:
            name = os.fsdecode(bytes.fromhex(hexed))
        except ValueError:
            continue
        names[name] = names.get(name, True) and kind == "d"
        if kind == "d":
            written[name] = at
    return names, {name: at for name, at in written.items() if names[name]}


def entry_result(entry: SharedEntry) -> re_pb2.ActionResult:
    """The action cache entry that holds a shared directory's entry."""
    if entry.digest is None:
        return re_pb2.ActionResult(
            execution_metadata=re_pb2.ExecutedActionMetadata(worker=DIRECTORY_MARK)
        )
    properties = re_pb2.NodeProperties()
    properties.unix_mode.value = entry.mode & 0o7777
    properties.mtime.FromNanoseconds(entry.mtime_ns)
    output = re_pb2.OutputFile(
        path=_wire(entry.path),
        digest=re_pb2.Digest(hash=entry.digest.hex, size_bytes=entry.digest.size),
        is_executable=bool(entry.mode & 0o111),
        node_properties=properties,
    )
    if entry.contents is not None:
        output.contents = entry.contents
    return re_pb2.ActionResult(output_files=[output])


def parse_entry(result: re_pb2.ActionResult, path: str, where: str) -> SharedEntry:
    """The shared entry an action cache entry holds (RemoteRecordError if it
    holds none: no file or directory, a wrong digest, a time that is not one
    or that a file's times cannot hold)."""
    if result.execution_metadata.worker == DIRECTORY_MARK and not result.output_files:
        return SharedEntry(path, None)
    if len(result.output_files) == 1 and result.output_files[0].path == _wire(path):
        output = result.output_files[0]
        try:
            digest = Digest(bytes.fromhex(output.digest.hash), output.digest.size_bytes)
        except ValueError:
            digest = None
        properties = output.node_properties
        if digest is not None and len(digest.hash) == 32 and digest.size >= 0:
            mode = properties.unix_mode.value if properties.HasField("unix_mode") else 0o644
            try:
                mtime = properties.mtime.ToNanoseconds() if properties.HasField("mtime") else 0
            except ValueError:  # not a Timestamp (seconds past year 9999)
                mtime = INODE_TIMES.stop
            # A server may drop inlined bytes; only a whole copy is any use.
            contents = output.contents if len(output.contents) == digest.size > 0 else None
            if mtime in INODE_TIMES:  # what a file's inode can hold
                return SharedEntry(path, digest, mode & 0o7777, mtime, contents)
    raise RemoteRecordError(f"{where}: the shared entry {path!r} is malformed")


__all__ = [
    "INLINE_MAX",
    "SharedEntry",
    "directory_prefix",
    "entry_document",
    "entry_key",
    "entry_result",
    "list_key",
    "list_result",
    "listed_blob",
    "listed_names",
    "pack_list",
    "parse_entry",
    "unpack_list",
]
