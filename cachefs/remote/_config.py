"""Which tiers a store has: ``--remote URL`` and the ``--config`` file (remote layer).

The config file is TOML (the README has a full example)::

    [remote]
    timeout = 10            # seconds a request may take (every tier's default)

    [[tier]]                # tiers in order: reads try the first one first
    url = "s3://cachefs/team?endpoint=http://127.0.0.1:8333"
    direction = "read-write"    # or "read-only", "write-only"
    timeout = 20
    whole_objects = false       # upload whole objects too (REAPI/HTTP: true)
    durable = true              # keeps what it is given (S3: true; REAPI/HTTP: false)

    [[tier]]                # a shard group: blobs placed by rendezvous hashing
    replicas = 2
    endpoints = [
      { url = "grpc://10.0.0.1:9092", weight = 1.0 },
      { url = "grpc://10.0.0.2:9092", weight = 2.0 },
    ]

``--remote URL`` (repeatable) adds a read-write tier of one endpoint after the
file's tiers.  Unknown keys are errors (a misspelt key must not be ignored).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachefs.errors import ConfigError
from cachefs.format.digest import DigestFunction
from cachefs.remote import _tiers
from cachefs.remote._blobs import Remote
from cachefs.remote._open import DEFAULT_TIMEOUT, open_remote
from cachefs.remote._shards import ShardGroup
from cachefs.remote._urls import parse_remote
from cachefs.signing import TrustOptions

_TIER_KEYS = {"url", "endpoints", "replicas", "direction", "timeout", "whole_objects", "durable"}
_REMOTE_KEYS = {"timeout"}
_ENDPOINT_KEYS = {"url", "weight"}


def _check_keys(where: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}", hint="known keys: " + ", ".join(sorted(allowed))
        )


def _with_config(
    given: TrustOptions, data: dict[str, Any] | None, path: Path | None
) -> TrustOptions:
    """The command line's signing options and the config file's ``[trust]``
    table together: its keys are trusted besides those of ``--trust``, its
    revoked ids besides ``--revoked-key``; ``--sign-key`` and
    ``--max-signature-age`` win over ``sign_key`` and ``max_age``.  Relative
    paths are the config file's directory's."""
    table = (data or {}).get("trust")
    if table is None or path is None:
        return given
    if not isinstance(table, dict):
        raise ConfigError("the config file's [trust] is a table")
    _check_keys("[trust]", table, {"sign_key", "trust", "revoked", "max_age"})
    here = path.parent

    def paths(key: str) -> list[Path]:
        value = table.get(key, [])
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"[trust]: {key} is a path or a list of paths")
        return [here / v for v in values]

    revoked = table.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
        raise ConfigError("[trust]: revoked is a list of key ids")
    max_age = table.get("max_age")
    if max_age is not None:
        max_age = _number("[trust]", max_age, "max_age")
    sign_key = paths("sign_key")
    return TrustOptions(
        given.sign_key or (sign_key[0] if sign_key else None),
        given.trusted + tuple(paths("trust")),
        given.revoked + tuple(revoked),
        given.max_age if given.max_age is not None else max_age,
    )


def _number(where: str, value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: {name} must be a positive number, not {value!r}")
    return float(value)


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config file (ConfigError naming the problem and the file)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None
    _check_keys(str(path), data, {"remote", "tier", "tenants", "trust"})  # tenants: the servers
    return data


def load_tiers(
    urls: Sequence[str], config: dict[str, Any] | None, function: DigestFunction
) -> list[_tiers.Tier]:
    """The tiers of the config file's ``[[tier]]`` tables, then one per URL."""
    config = config or {}
    remote = config.get("remote", {})
    if not isinstance(remote, dict):
        raise ConfigError("the config file's [remote] is a table")
    _check_keys("[remote]", remote, _REMOTE_KEYS)
    timeout = _number("[remote]", remote.get("timeout", DEFAULT_TIMEOUT), "timeout")
    tables = config.get("tier", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("the config file's tiers are [[tier]] tables")
    tiers: list[_tiers.Tier] = []
    try:
        for n, table in enumerate(tables, 1):
            tiers.append(_tier(f"[[tier]] {n}", table, function, timeout))
        for url in urls:
            remote_ = open_remote(url, function, timeout)
            s3 = parse_remote(url).kind == "s3"
            tiers.append(_tiers.Tier(remote_, whole=not s3, durable=s3))
    except BaseException:
        for tier in tiers:
            tier.remote.close()
        raise
    return tiers


def _tier(
    where: str, table: dict[str, Any], function: DigestFunction, default: float
) -> _tiers.Tier:
    _check_keys(where, table, _TIER_KEYS)
    timeout = _number(where, table.get("timeout", default), "timeout")
    direction = table.get("direction", "read-write")
    if ("url" in table) == ("endpoints" in table):
        raise ConfigError(f"{where}: give either url or endpoints")
    remote: Remote
    if "url" in table:
        if "replicas" in table:
            raise ConfigError(f"{where}: replicas needs endpoints")
        kinds = {parse_remote(str(table["url"])).kind}
        remote = open_remote(str(table["url"]), function, timeout)
    else:
        endpoints = table["endpoints"]
        if not isinstance(endpoints, list) or not endpoints:
            raise ConfigError(f"{where}: endpoints is a list of {{ url = ..., weight = ... }}")
        members: list[tuple[Remote, float]] = []
        kinds = set()
        try:
            for endpoint in endpoints:
                if not isinstance(endpoint, dict) or "url" not in endpoint:
                    raise ConfigError(f"{where}: an endpoint is {{ url = ..., weight = ... }}")
                _check_keys(f"{where} endpoint", endpoint, _ENDPOINT_KEYS)
                weight = _number(where, endpoint.get("weight", 1.0), "weight")
                kinds.add(parse_remote(str(endpoint["url"])).kind)
                members.append(
                    (open_remote(str(endpoint["url"]), function, timeout, False), weight)
                )
            replicas = table.get("replicas", 1)
            if isinstance(replicas, bool) or not isinstance(replicas, int):
                raise ConfigError(f"{where}: replicas must be a whole number")
            remote = ShardGroup(members, replicas)
        except BaseException:
            for member, _ in members:
                member.close()
            raise
    whole = table.get("whole_objects", kinds != {"s3"})
    durable = table.get("durable", kinds == {"s3"})
    if not isinstance(whole, bool) or not isinstance(durable, bool):
        raise ConfigError(f"{where}: whole_objects and durable are true or false")
    try:
        return _tiers.Tier(remote, direction, whole, durable)
    except ConfigError:
        remote.close()
        raise


@dataclass(frozen=True)
class TierOptions:
    """The tiers the command line asks for: ``--remote`` URLs and a config file."""

    urls: tuple[str, ...] = ()
    #: The parsed ``--config`` file (None: none given).
    config: dict[str, Any] | None = None
    #: What an fsync waits for: "local" (the local store) or "remote" (the write tiers).
    durability: str = "local"
    #: Keep the local store's live records under this many bytes (None: no limit).
    local_max_size: int | None = None
    #: Signing what is published, and trusting only what is signed (``cachefs.signing``).
    trust: TrustOptions = field(default_factory=TrustOptions)

    @classmethod
    def parse(
        cls,
        urls: Sequence[str],
        config: Path | None,
        durability: str = "local",
        local_max_size: int | None = None,
        trust: TrustOptions | None = None,
    ) -> TierOptions:
        """Checked as far as can be before the store is open (URLs, the file,
        the keys)."""
        for url in urls:
            parse_remote(url)
        data = None if config is None else read_config(config)
        trust = _with_config(trust or TrustOptions(), data, config)
        trust.load()
        options = cls(tuple(urls), data, durability, local_max_size, trust)
        if durability not in ("local", "remote"):
            raise ConfigError(f"--remote-durability {durability!r}: local or remote")
        if local_max_size is not None and not options.durable_read_write:
            raise ConfigError(
                "--local-max-size needs a durable read-write tier to hold what is dropped "
                "here (REAPI servers and HTTP caches evict what they hold)",
                hint="give --remote s3://... (or a tier with durable = true in --config)",
            )
        if local_max_size is not None and local_max_size <= 0:
            raise ConfigError("--local-max-size must be more than 0 bytes")
        if durability == "remote" and not options.writes:
            raise ConfigError(
                "--remote-durability remote needs a tier that takes writes",
                hint="give --remote URL (or a read-write tier in --config)",
            )
        return options

    @property
    def any(self) -> bool:
        return bool(self.urls or (self.config or {}).get("tier"))

    @property
    def _tables(self) -> list[dict[str, Any]]:
        """The config file's tiers, then one table per ``--remote`` URL."""
        tables = (self.config or {}).get("tier", [])
        given = [t for t in tables if isinstance(t, dict)] if isinstance(tables, list) else []
        return given + [{"url": url} for url in self.urls]

    @property
    def writes(self) -> bool:
        """Whether some tier takes writes (the store then keeps a push queue)."""
        return any(t.get("direction", "read-write") != "read-only" for t in self._tables)

    @property
    def durable_read_write(self) -> bool:
        """Whether some tier is read, written and durable (``durable``, by
        default an S3 bucket: REAPI servers and HTTP caches evict)."""
        for table in self._tables:
            endpoints = table.get("endpoints")
            listed = endpoints if isinstance(endpoints, list) else []
            urls = [table.get("url")] + [e.get("url") for e in listed if isinstance(e, dict)]
            kinds = {parse_remote(str(u)).kind for u in urls if isinstance(u, str)}
            durable = table.get("durable", kinds == {"s3"})
            if table.get("direction", "read-write") == "read-write" and durable is True:
                return True
        return False

    def open(self, function: DigestFunction) -> list[_tiers.Tier]:
        return load_tiers(self.urls, self.config, function)


__all__ = ["TierOptions", "load_tiers", "read_config"]
