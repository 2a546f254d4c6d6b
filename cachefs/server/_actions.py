"""Action results, whichever protocol brought them (server layer).

An action cache entry is the bytes a client stored under an action's digest:
for REAPI clients (gRPC, and Bazel over HTTP) a serialized ``ActionResult``,
for others (ccache's ``layout=bazel`` over HTTP) bytes of their own, served
back as they came.  What is known of an ``ActionResult`` is here, once: the
CAS blobs it names, whether its output paths stay inside the working
directory, and whether an entry is *complete* -- a hit only when every blob it
names is still in the CAS (eviction may have taken some), so that a client
never gets a result it cannot download.
"""

from __future__ import annotations

import posixpath

from google.protobuf.message import DecodeError

from cachefs.engine import CachefsError, Digest, DigestFunction
from cachefs.protocol import re_pb2
from cachefs.server._cache import RemoteCache
from cachefs.server._names import BadRequest, parse_digest


def blobs_of(result: re_pb2.ActionResult) -> list[re_pb2.Digest]:
    """The CAS blobs an action result names."""
    found = [f.digest for f in result.output_files]
    for directory in result.output_directories:
        found.append(directory.tree_digest)
        if directory.HasField("root_directory_digest"):
            found.append(directory.root_directory_digest)
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):
            found.append(getattr(result, field))
    return found


def digests_of(result: re_pb2.ActionResult, function: DigestFunction) -> list[Digest]:
    """The CAS blobs an action result names, checked (BadRequest if malformed)."""
    return [parse_digest(d.hash, d.size_bytes, function) for d in blobs_of(result)]


def check_path(path: str) -> None:
    """An output path: relative, normalized, inside the working directory."""
    if not path or path.startswith("/") or posixpath.normpath(path) != path or path == "..":
        raise BadRequest(f"bad output path {path!r}")
    if path.startswith("../"):
        raise BadRequest(f"output path {path!r} leaves the working directory")


def check_result(result: re_pb2.ActionResult, function: DigestFunction) -> None:
    """An action result a client wants stored: well-formed digests, and output
    paths inside the working directory (BadRequest otherwise)."""
    digests_of(result, function)
    for output_file in result.output_files:
        check_path(output_file.path)
    for links in (
        result.output_symlinks,
        result.output_file_symlinks,
        result.output_directory_symlinks,
    ):
        for link in links:
            check_path(link.path)
    for directory in result.output_directories:
        if directory.path:  # "": the whole working directory
            check_path(directory.path)


def parse_result(data: bytes) -> re_pb2.ActionResult | None:
    """An entry's ``ActionResult``, or None when the bytes are not one."""
    result = re_pb2.ActionResult()
    try:
        result.ParseFromString(data)
    except DecodeError:
        return None
    return result


def complete(cache: RemoteCache, instance: str, result: re_pb2.ActionResult) -> bool:
    """Whether every blob the result names is in the instance's CAS; those
    that are count as used (the policy sees a hit), so that they outlive it."""
    try:
        digests = digests_of(result, cache.digest_function)
    except CachefsError:
        return False
    return cache.touch(instance, digests)


def get_entry(cache: RemoteCache, instance: str, key: Digest) -> bytes | None:
    """The bytes of the action cache entry under ``key``, or None for a miss:
    none is there, or it is an ``ActionResult`` whose blobs are not all in the
    CAS any more.  Bytes that are no ``ActionResult`` are served as they are."""
    data = cache.get_action(instance, key)
    if data is None:
        return None
    result = parse_result(data)
    if result is not None and blobs_of(result) and not complete(cache, instance, result):
        return None
    return data
