"""Content digests (on-disk format layer).

A digest names bytes by their content.  cachefs uses the Remote Execution API
form ``<lowercase hex>/<size in bytes>`` wherever a digest is shown to a user or
another tool.  Inside the store the raw digest bytes are the key; the digest
function is fixed per store (recorded in the store header).

Digest functions and their on-disk identifiers (also used as the digest bits in
segment record flags, so never renumber them):

=========  ==  ==========
name       id  size
=========  ==  ==========
sha256     1   32 bytes
blake3     2   32 bytes
=========  ==  ==========
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

import blake3

from cachefs.errors import BadDigestError, ConfigError

#: What hashing, compression and checksumming accept without a copy.
BytesLike = bytes | bytearray | memoryview


class Hasher(Protocol):
    def update(self, data: BytesLike, /) -> object: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class DigestFunction:
    name: str
    ident: int

    def new(self) -> Hasher:
        if self.ident == SHA256.ident:
            return hashlib.sha256()
        return blake3.blake3()

    def hash(self, data: BytesLike) -> bytes:
        if self.ident == SHA256.ident:
            return hashlib.sha256(data).digest()
        return blake3.blake3(data).digest()


SHA256 = DigestFunction("sha256", 1)
BLAKE3 = DigestFunction("blake3", 2)
DIGEST_FUNCTIONS = {f.name: f for f in (SHA256, BLAKE3)}


def digest_function(name: str) -> DigestFunction:
    """The digest function called ``name`` (any case); ConfigError if there is none."""
    # Not only str: the name may come from a damaged store header.
    found = DIGEST_FUNCTIONS.get(name.lower()) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(
            f"unknown digest function {name!r}",
            hint=f"choose one of {', '.join(DIGEST_FUNCTIONS)}",
        )
    return found


_DIGEST_RE = re.compile(r"^([0-9a-fA-F]{64})/([0-9]{1,20})$")


@dataclass(frozen=True, order=True)
class Digest:
    """A whole-object digest: raw hash bytes and the size of the content."""

    hash: bytes
    size: int

    @property
    def hex(self) -> str:
        return self.hash.hex()

    def __str__(self) -> str:
        return f"{self.hash.hex()}/{self.size}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse the REAPI form ``<hex>/<size>``."""
        match = _DIGEST_RE.match(text.strip())
        if match is None:
            raise BadDigestError(f"not a digest: {text!r}")
        return cls(bytes.fromhex(match.group(1)), int(match.group(2)))
