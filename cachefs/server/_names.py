"""Names in requests: digests, instance names, ByteStream resource names (server layer).

Everything a client names is checked here before it reaches the store: a
digest is lowercase hex of the store's hash length and a size that is not
negative; an instance name becomes one directory name of its own (so that no
name can reach outside its place); a ByteStream resource name is parsed as the
REAPI specifies (``{instance}/blobs/{digest_function/}{hash}/{size}``,
``{instance}/uploads/{uuid}/blobs/...``, ``.../compressed-blobs/{compressor}/...``).
Errors are :class:`BadRequest` (INVALID_ARGUMENT, HTTP 400).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from cachefs.errors import CachefsError, ConfigError
from cachefs.format.digest import Digest, DigestFunction

_HEX = re.compile(r"[0-9a-f]{64}")
#: A size or port: ASCII digits only (``str.isdigit`` takes ``²``, which ``int`` refuses).
_DECIMAL = re.compile(r"[0-9]+")
#: Bytes of a hash: SHA-256 and BLAKE3 alike.
DIGEST_SIZE = 32
#: Names of the path segments an instance name may not have (REAPI).
_RESERVED = {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities"}
_RESERVED_COMPRESSED = "compressed-blobs"
#: The longest directory name (bytes) an instance name may take, encoded.
NAME_MAX = 255
#: The directory of uploads in progress, beside the instances' (``_cache.py``).
UPLOADS_NAME = ".uploads"
#: Compressors of compressed-blobs resource names this server handles.
COMPRESSORS = ("zstd",)


class BadRequest(CachefsError):
    """A request names something malformed: nothing was done."""

    exit_code = 2
    default_hint = ""


class OutOfRange(BadRequest):
    """An offset past the end of a blob, or before its start (OUT_OF_RANGE)."""


def parse_digest(hash_hex: str, size: int, function: DigestFunction) -> Digest:
    """A request's digest, checked: ``hash_hex`` is the lowercase hex of a
    ``function`` digest, ``size`` is not negative."""
    try:
        raw = bytes.fromhex(hash_hex)
    except ValueError:
        raw = b""
    # fromhex takes upper case and spaces too: the raw bytes must give the text back.
    if len(raw) != DIGEST_SIZE or raw.hex() != hash_hex:
        raise BadRequest(f"not a {function.name} digest: {hash_hex!r}")
    if size < 0:
        raise BadRequest(f"a digest's size may not be negative: {size}")
    return Digest(raw, size)


def parse_digests(
    messages: Iterable[tuple[str, int]], function: DigestFunction
) -> list[tuple[bytes, int]]:
    """Many ``(hash_hex, size)`` of a request, each checked as :func:`parse_digest`
    checks one, as ``(hash, size)`` pairs: a request of thousands of digests
    (FindMissingBlobs) is not worth thousands of :class:`Digest` objects."""
    out: list[tuple[bytes, int]] = []
    fromhex = bytes.fromhex
    for hash_hex, size in messages:
        try:
            raw = fromhex(hash_hex)
        except ValueError:
            raw = b""
        if len(raw) != DIGEST_SIZE or raw.hex() != hash_hex or size < 0:
            parse_digest(hash_hex, size, function)  # raises the one error
        out.append((raw, size))
    return out


def parse_hash(text: str) -> bytes:
    """A hash named alone (HTTP paths): 64 lowercase hex digits."""
    if not _HEX.fullmatch(text):
        raise BadRequest(f"not a hash of 64 lowercase hex digits: {text!r}")
    return bytes.fromhex(text)


def instance_directory(instance: str) -> bytes:
    """The directory name of an instance: ``_`` for the empty name, else the
    name percent-encoded (``/`` and every byte but ASCII letters, digits and
    ``-_.~`` escaped), and the two names that would be another's place
    escaped too: ``_`` (the empty name's: ``%5F``) and ``.uploads`` (the
    uploads in progress: ``%2Euploads``), so that names never collide or
    reach outside their place.  ``.`` and ``..`` are refused, and so is a
    name whose directory name would pass 255 bytes."""
    if not instance:
        return b"_"
    if instance in (".", ".."):
        raise BadRequest(f"not an instance name: {instance!r}")
    name = urllib.parse.quote(instance, safe="-~")
    if name == "_":
        name = "%5F"
    elif name == UPLOADS_NAME:
        name = "%2E" + name[1:]
    if len(name) > NAME_MAX:
        raise BadRequest(
            f"instance name {instance[:40]!r}... is too long: its directory name takes "
            f"{len(name)} bytes (at most {NAME_MAX})"
        )
    return name.encode("ascii")


@dataclass(frozen=True)
class Resource:
    """A parsed ByteStream resource name."""

    instance: str
    digest: Digest
    #: ``None``, or the compressor of a compressed-blobs name (``zstd``).
    compressor: str | None = None
    #: The upload's uuid, for a write.
    upload: str | None = None


def parse_resource(name: str, function: DigestFunction, *, write: bool) -> Resource:
    """Parse a ByteStream resource name for a read (``{instance}/blobs/...``) or
    a write (``{instance}/uploads/{uuid}/blobs/...``); ``function`` is the
    store's digest function, named in the path unless it is SHA-256."""
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part in ("blobs", _RESERVED_COMPRESSED):
            kind = i
            break
    else:
        raise BadRequest(f"not a blob resource name: {name!r}")
    head, rest = parts[:kind], parts[kind:]
    upload = None
    if write:
        if len(head) < 2 or head[-2] != "uploads" or not head[-1]:
            raise BadRequest(f"not an upload resource name: {name!r}")
        upload, head = head[-1], head[:-2]
    if any(not part or part in _RESERVED or part in (".", "..") for part in head):
        raise BadRequest(f"bad instance name in {name!r}")
    instance = "/".join(head)
    compressor = None
    if rest[0] == _RESERVED_COMPRESSED:
        if len(rest) < 2 or rest[1] not in COMPRESSORS:
            known = ", ".join(COMPRESSORS)
            raise BadRequest(f"unknown compressor in {name!r}", hint=f"this server speaks {known}")
        compressor, rest = rest[1], rest[2:]
    else:
        rest = rest[1:]
    if rest and rest[0] == function.name:
        rest = rest[1:]
    elif function.name != "sha256":
        raise BadRequest(
            f"{name!r} does not name the digest function of this store ({function.name})"
        )
    # What follows the size is optional metadata, which this server ignores.
    if len(rest) < 2 or not _DECIMAL.fullmatch(rest[1]):
        raise BadRequest(f"no digest in resource name {name!r}")
    digest = parse_digest(rest[0], int(rest[1]), function)
    return Resource(instance, digest, compressor, upload)


def parse_address(text: str, default_port: int) -> str:
    """A server's address: ``HOST:PORT``, ``:PORT``, ``HOST`` or ``[V6]:PORT``,
    as ``HOST:PORT`` (loopback when no host is given, ``default_port`` when no
    port is; port 0 picks a free one)."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port or (host and ":" in host and not host.endswith("]")):
        host, port = text, str(default_port)  # no port, or a bare IPv6 address
    if not _DECIMAL.fullmatch(port) or not 0 <= int(port) < 65536:
        raise ConfigError(
            f"bad port in address {text!r}", hint="write HOST:PORT, e.g. 127.0.0.1:9092"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host or '127.0.0.1'}:{port}"
