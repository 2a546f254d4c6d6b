"""Signed entries: Ed25519 signatures of what maps a key to content (layer 1).

Content needs no signature (its digest is checked); the mapping from a key to
it does: whoever can write an action cache entry or a shared directory's entry
decides what other machines use.  A producer with ``--sign-key FILE`` signs
the entries it publishes; a consumer with ``--trust FILE.pub`` takes only
entries signed by a key it trusts, and treats any other as a miss.

Keys (``cachefs key generate FILE``): FILE is the private key, PEM (PKCS #8,
unencrypted), mode 0600; ``FILE.pub`` the public key, PEM
(SubjectPublicKeyInfo).  A key's id is the first 8 bytes of the SHA-256 of its
raw 32-byte public key, written as 16 hex digits.

An entry is an ``ActionResult`` under a key (a ``Digest``: the action's, or
``entry_key`` of a shared entry).  Its signature is an ``EntrySignature``
(``protos/cachefs/trust/v1/signature.proto``) packed as a
``google.protobuf.Any`` in ``execution_metadata.auxiliary_metadata``, where
other REAPI clients ignore it.  What is signed, the statement::

    b"cachefs entry signature 1\\0"
    the key's hash (its bytes; not its size, which HTTP's /ac/<hex> does not name)
    SHA-256 of the ActionResult without its EntrySignatures and without
      inlined bytes (output files' contents, stdout_raw, stderr_raw: servers
      may drop them, and they are checked against the digests beside them),
      serialized deterministically (the fields in number order)
    key id (8 bytes), signed_at_ns (8 bytes, big-endian, signed)

An entry is accepted when one of its signatures is by a trusted key that is
not revoked, verifies, is not dated more than CLOCK_SKEW in the future and
(with a maximum age) is recent enough.  What is refused is named
(``REASONS``), logged and counted by the caller.  A signed entry stays valid
for its key: an older signed entry put back under the same key is accepted
(a maximum age bounds how old).
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cachefs.errors import ConfigError, from_oserror
from cachefs.format.digest import Digest
from cachefs.fsutil import atomic_write
from cachefs.protocol import re_pb2, signature_pb2

DOMAIN = b"cachefs entry signature 1\0"
TYPE_URL = "type.googleapis.com/cachefs.trust.v1.EntrySignature"
_WHEN = struct.Struct(">q")
#: Why an entry is refused (the counts' keys).
REASONS = ("unsigned", "unknown key", "revoked key", "tampered", "expired", "from the future")
#: Seconds a signature may seem to come from the future (clocks differ).
CLOCK_SKEW = 300.0


def key_id(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8]


def generate_key(path: Path) -> str:
    """Write a new private key to ``path`` (0600) and its public key to
    ``path.pub``; the key's id (hex).  An existing file is not overwritten."""
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise ConfigError(f"{existing} exists", hint="choose another name, or remove it")
    private = Ed25519PrivateKey.generate()
    try:
        atomic_write(
            path,
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
        atomic_write(
            public_path,
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    except OSError as exc:
        raise from_oserror(exc, f"writing the key {path}") from None
    return key_id(private.public_key()).hex()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise from_oserror(exc, f"reading the {what} {path}") from None


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key", hint="make one: cachefs key generate")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def _unsigned(result: re_pb2.ActionResult) -> tuple[re_pb2.ActionResult, list[bytes]]:
    """The result without its EntrySignatures, and their serialized bytes."""
    stripped = re_pb2.ActionResult()
    stripped.CopyFrom(result)
    metadata = stripped.execution_metadata.auxiliary_metadata
    signatures = [a.value for a in metadata if a.type_url == TYPE_URL]
    if signatures:
        kept = [a for a in metadata if a.type_url != TYPE_URL]
        del metadata[:]
        metadata.extend(kept)
        if not kept and stripped.execution_metadata == re_pb2.ExecutedActionMetadata():
            stripped.ClearField("execution_metadata")
    return stripped, signatures


def _statement(key: Digest, result: re_pb2.ActionResult, kid: bytes, when: int) -> bytes:
    canonical = re_pb2.ActionResult()
    canonical.CopyFrom(result)
    for output in canonical.output_files:  # inlined bytes: a server may drop them
        output.ClearField("contents")
    canonical.ClearField("stdout_raw")
    canonical.ClearField("stderr_raw")
    if canonical.execution_metadata == re_pb2.ExecutedActionMetadata():
        canonical.ClearField("execution_metadata")  # present but empty: as if absent
    body = hashlib.sha256(canonical.SerializeToString(deterministic=True)).digest()
    return DOMAIN + key.hash + body + kid + _WHEN.pack(when)


class Signer:
    """Signs entries with one private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def load(cls, path: Path) -> Signer:
        return cls(load_private(path))

    def sign(self, key: Digest, result: re_pb2.ActionResult) -> re_pb2.ActionResult:
        """A copy of ``result`` carrying this key's signature (and no other)."""
        stripped, _ = _unsigned(result)
        when = time.time_ns()
        signature = self.private.sign(_statement(key, stripped, self.key_id, when))
        signed = re_pb2.ActionResult()
        signed.CopyFrom(stripped)
        packed = signed.execution_metadata.auxiliary_metadata.add()
        packed.type_url = TYPE_URL
        packed.value = signature_pb2.EntrySignature(
            key_id=self.key_id, signed_at_ns=when, signature=signature
        ).SerializeToString()
        return signed


@dataclass
class Verifier:
    """Accepts entries signed by trusted keys (see the module doc); counts
    what it refuses, by reason."""

    trusted: dict[bytes, Ed25519PublicKey]
    revoked: frozenset[bytes] = frozenset()
    max_age: float | None = None
    refused: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, keys: list[Path], revoked: list[str], max_age: float | None = None) -> Verifier:
        trusted = {}
        for path in keys:
            public = load_public(path)
            trusted[key_id(public)] = public
        ids = set()
        for text in revoked:
            try:
                raw = bytes.fromhex(text)
            except ValueError:
                raw = b""
            if len(raw) != 8:
                raise ConfigError(f"a revoked key id is 16 hex digits, not {text!r}")
            ids.add(raw)
        if max_age is not None and max_age <= 0:
            raise ConfigError("a maximum age of signatures must be more than 0 seconds")
        return cls(trusted, frozenset(ids), max_age)

    def check(self, key: Digest, result: re_pb2.ActionResult) -> str | None:
        """None if the entry is accepted; else why not (one of REASONS, counted)."""
        reason = self._reason(key, result)
        with self._lock:
            if reason is None:
                self.accepted += 1
            else:
                self.refused[reason] += 1
        return reason

    def _reason(self, key: Digest, result: re_pb2.ActionResult) -> str | None:
        stripped, signatures = _unsigned(result)
        if not signatures:
            return "unsigned"
        reason = "unknown key"
        for raw in signatures:
            signature = signature_pb2.EntrySignature()
            try:
                signature.ParseFromString(raw)
            except Exception:
                reason = "tampered"
                continue
            if signature.key_id in self.revoked:
                reason = "revoked key"
                continue
            public = self.trusted.get(signature.key_id)
            if public is None:
                continue
            statement = _statement(key, stripped, signature.key_id, signature.signed_at_ns)
            try:
                public.verify(signature.signature, statement)
            except InvalidSignature:
                reason = "tampered"
                continue
            age = (time.time_ns() - signature.signed_at_ns) / 1e9
            if age < -CLOCK_SKEW:
                reason = "from the future"
                continue
            if self.max_age is not None and age > self.max_age:
                reason = "expired"
                continue
            return None
        return reason

    def figures(self) -> dict[str, int]:
        with self._lock:
            return {"accepted": self.accepted, **{r: self.refused[r] for r in REASONS}}


@dataclass(frozen=True)
class TrustOptions:
    """What the command line says of signing: the key to sign with, the keys
    to trust, revoked key ids (hex) and the oldest signature taken (seconds)."""

    sign_key: Path | None = None
    trusted: tuple[Path, ...] = ()
    revoked: tuple[str, ...] = ()
    max_age: float | None = None

    def load(self) -> tuple[Signer | None, Verifier | None]:
        """The signer and the verifier (None: not asked for); ConfigError for
        a key that does not load or options that do not go together."""
        signer = None if self.sign_key is None else Signer.load(self.sign_key)
        if not self.trusted:
            if self.revoked or self.max_age is not None:
                raise ConfigError("--revoked-key and --max-signature-age go with --trust")
            return signer, None
        return signer, Verifier.load(list(self.trusted), list(self.revoked), self.max_age)
