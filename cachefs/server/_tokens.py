"""Credential files: bearer tokens, and htpasswd for HTTP basic auth (server layer).

``cachefs token add FILE NAME --tenant T --permission read|read-write`` makes a
token, prints it once and keeps only its hash in FILE, as htpasswd keeps
passwords; servers given ``--tokens FILE`` accept ``Authorization: Bearer
<token>`` (the HTTP header, or the gRPC metadata ``authorization``).

The file is text, one token a line, ``#`` starting a comment::

    # cachefs tokens: NAME TENANT PERMISSION sha256:HEX
    ci-linux team-a read-write sha256:6c1f...e2

NAME and TENANT are made of letters, digits, ``.``, ``_`` and ``-``;
PERMISSION is ``read`` or ``read-write``; HEX is the SHA-256 of the token's
text.  A token is ``cfs_`` and 43 characters of URL-safe base64 (32 random
bytes): too many to guess, so one fast hash keeps it safe (a password of a
person's choosing would need bcrypt).  The file is written with mode 0600.

``--htpasswd FILE`` (as bazel-remote has it) takes Apache's htpasswd format,
``USER:HASH`` a line, with bcrypt hashes only (``htpasswd -B``; ``$2y$``,
``$2b$``, ``$2a$``): a user so named may read and write.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cachefs.errors import ConfigError, from_oserror
from cachefs.fsutil import atomic_write

PERMISSIONS = ("read", "read-write")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HASH = re.compile(r"sha256:([0-9a-f]{64})")
HEADER = "# cachefs tokens: NAME TENANT PERMISSION sha256:HEX (cachefs token add)\n"


@dataclass(frozen=True)
class Identity:
    """Who a request comes from, as its credentials say."""

    name: str
    #: The tenant a token acts for; None for users and certificates (no tenant).
    tenant: str | None
    permission: str
    #: What named it: "token", "user" (htpasswd) or "certificate".
    kind: str = "token"

    @property
    def writes(self) -> bool:
        return self.permission == "read-write"

    def __str__(self) -> str:
        tenant = "" if self.tenant is None else f" (tenant {self.tenant})"
        return f"{self.kind} {self.name}{tenant}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path, what: str, hint: str) -> str:
    """A credential file's text; ConfigError naming it and what is wrong."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no {what} {path}", hint=hint) from None
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise from_oserror(exc, f"reading the {what} {path}") from None


def read_tokens(path: Path) -> dict[str, Identity]:
    """The tokens of a file, by the hash of each; ConfigError naming the line
    that is not of the format."""
    text = _read(path, "token file", "make one with `cachefs token add FILE NAME ...`")
    tokens: dict[str, Identity] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        matched = _HASH.fullmatch(fields[3]) if len(fields) == 4 else None
        if (
            matched is None
            or not _NAME.fullmatch(fields[0])
            or not _NAME.fullmatch(fields[1])
            or fields[2] not in PERMISSIONS
        ):
            raise ConfigError(
                f"{path}:{number}: not a token line (NAME TENANT read|read-write sha256:HEX)",
                hint="tokens are added with `cachefs token add`",
            )
        if fields[0] in names:
            raise ConfigError(f"{path}:{number}: a second token named {fields[0]}")
        names.add(fields[0])
        tokens[matched.group(1)] = Identity(fields[0], fields[1], fields[2])
    return tokens


def add_token(path: Path, name: str, tenant: str, permission: str) -> str:
    """Make a token, keep its hash in ``path`` (made if missing) and return it."""
    for what, value in (("name", name), ("tenant", tenant)):
        if not _NAME.fullmatch(value):
            raise ConfigError(
                f"a token's {what} is letters, digits, '.', '_' and '-': not {value!r}"
            )
    if permission not in PERMISSIONS:
        raise ConfigError(f"a permission is read or read-write, not {permission!r}")
    existing = read_tokens(path) if path.exists() else {}
    if any(identity.name == name for identity in existing.values()):
        raise ConfigError(
            f"{path} has a token named {name} already",
            hint=f"`cachefs token remove {path} {name}` first, or choose another name",
        )
    token = "cfs_" + secrets.token_urlsafe(32)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{name} {tenant} {permission} sha256:{token_hash(token)}\n"
    _write(path, text)
    return token


def remove_token(path: Path, name: str) -> None:
    """Drop the token ``name`` from ``path`` (NotFound: ConfigError)."""
    tokens = read_tokens(path)
    if not any(identity.name == name for identity in tokens.values()):
        raise ConfigError(f"{path} has no token named {name}")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [name]]
    _write(path, "".join(kept))


def _write(path: Path, text: str) -> None:
    try:
        missing = not path.parent.is_dir()
    except OSError:  # it cannot be looked at: writing says why
        missing = False
    if missing:
        raise ConfigError(
            f"cannot write the token file {path}: {path.parent} is not a directory",
            hint=f"create it first (mkdir -p {path.parent}) or name another file",
        )
    try:
        atomic_write(path, text.encode(), mode=0o600)
    except OSError as exc:
        raise from_oserror(exc, f"writing the token file {path}") from None


_BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """The users of an htpasswd file and their bcrypt hashes; ConfigError
    naming a line that is not ``USER:BCRYPT-HASH``."""
    text = _read(path, "htpasswd file", "make one: htpasswd -B -c FILE USER")
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, _, hashed = line.partition(":")
        if not user or not _BCRYPT.fullmatch(hashed):
            raise ConfigError(
                f"{path}:{number}: not USER:BCRYPT-HASH",
                hint="only bcrypt hashes are taken: htpasswd -B FILE USER",
            )
        users[user] = hashed.encode()
    return users
