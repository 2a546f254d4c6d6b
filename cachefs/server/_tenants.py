"""Tenants: who may use which instance names, and how much (server layer).

Tenants are named in the ``--config`` file, each with the instance names it
owns (REAPI ``instance_name``, the HTTP path prefix) and an optional quota::

    [tenants.team-a]
    instances = ["team-a", "team-a/linux"]
    quota = "200G"

A token (``cachefs token add ... --tenant team-a``) acts for its tenant: a
request for an instance name its tenant does not own is refused with
PERMISSION_DENIED / 403, before anything is looked up, so that another
tenant's action cache cannot be read, overwritten or asked about.  What an
instance holds lives apart from every other instance (``_cache.py``:
``<instance>/cas/`` and ``<instance>/ac/``), so a tenant sees the blobs it
uploaded and no others: FindMissingBlobs answers for the tenant's own, and a
blob another tenant has must be sent again to become visible -- which costs no
stored bytes, since the store deduplicates underneath (a file of the
namespace, a few hundred bytes, is what the second upload adds).  Users of
``--htpasswd`` and clients known by a certificate alone belong to no tenant and
may use every instance name; with tenants configured, tokens are the way to
give a team its own.

A tenant's quota bounds the logical bytes of its instances (blobs and action
results).  A write that would pass it is refused with RESOURCE_EXHAUSTED / 507
and audited (``tenant.quota``).  What a write brings is known before it
starts (the size in a ByteStream resource name, a batch's bytes, an HTTP
``Content-Length``; an HTTP body of unknown length is let in and counted at
the next walk); what is stored is counted as it is, and the instances are
walked again every RESCAN seconds (eviction and deletions free room there).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachefs.errors import CachefsError, ConfigError
from cachefs.server._names import instance_directory

if TYPE_CHECKING:
    from cachefs.server._cache import RemoteCache

#: Seconds a tenant's measured usage is trusted before its instances are walked again.
RESCAN = 30.0


@dataclass(frozen=True)
class Tenant:
    name: str
    instances: tuple[str, ...]
    quota: int | None = None


def parse_tenants(
    config: dict[str, Any] | None, parse_size: Callable[[str], int]
) -> Tenants | None:
    """The ``[tenants.NAME]`` tables of a parsed config file (None: none)."""
    tables = (config or {}).get("tenants")
    if tables is None:
        return None
    if not isinstance(tables, dict):
        raise ConfigError("the config file's tenants are [tenants.NAME] tables")
    tenants: dict[str, Tenant] = {}
    owners: dict[str, str] = {}
    for name, table in tables.items():
        where = f"[tenants.{name}]"
        if not isinstance(table, dict) or set(table) - {"instances", "quota"}:
            raise ConfigError(f'{where} takes instances = [...] and quota = "SIZE"')
        instances = table.get("instances", [])
        if not isinstance(instances, list) or not all(isinstance(i, str) for i in instances):
            raise ConfigError(f"{where}: instances is a list of instance names")
        for instance in instances:
            try:
                instance_directory(instance)
            except CachefsError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if instance in owners:
                raise ConfigError(
                    f"{where}: instance {instance!r} belongs to tenant {owners[instance]} already"
                )
            owners[instance] = name
        quota = table.get("quota")
        if quota is not None and not isinstance(quota, str | int):
            raise ConfigError(f'{where}: quota is a size ("200G")')
        size = None if quota is None else parse_size(str(quota))
        tenants[name] = Tenant(name, tuple(instances), size)
    return Tenants(tenants)


class Tenants:
    """The tenants, who owns which instance, and each tenant's usage."""

    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self.tenants = tenants
        self.owners = {i: t.name for t in tenants.values() for i in t.instances}
        #: Logical bytes an instance holds (set by the server: ``RemoteCache.instance_bytes``).
        self.measure: Callable[[str], int] = lambda instance: 0
        self._lock = threading.Lock()
        self._usage: dict[str, tuple[int, float]] = {}  # tenant -> (bytes, when measured)
        self.refused: dict[str, int] = dict.fromkeys(tenants, 0)

    def allows(self, tenant: str | None, instance: str) -> bool:
        """Whether an identity of ``tenant`` (None: of no tenant) may use ``instance``."""
        return tenant is None or self.owners.get(instance) == tenant

    def usage(self, tenant: str) -> int:
        now = time.monotonic()
        with self._lock:
            known = self._usage.get(tenant)
            if known is not None and now - known[1] < RESCAN:
                return known[0]
        measured = sum(self.measure(i) for i in self.tenants[tenant].instances)
        with self._lock:
            self._usage[tenant] = (measured, now)
        return measured

    def admit(self, tenant: str | None, incoming: int) -> str | None:
        """None if ``incoming`` more bytes fit the tenant's quota; else why not."""
        if tenant is None or tenant not in self.tenants:
            return None
        quota = self.tenants[tenant].quota
        if quota is None:
            return None
        used = self.usage(tenant)
        if used + incoming <= quota:
            return None
        with self._lock:
            self.refused[tenant] += 1
        return f"tenant {tenant} is over its quota ({used} + {incoming} > {quota} bytes)"

    def added(self, tenant: str | None, size: int) -> None:
        """``size`` more bytes were stored for ``tenant`` (until the next walk)."""
        with self._lock:
            known = None if tenant is None else self._usage.get(tenant)
            if tenant is not None and known is not None:
                self._usage[tenant] = (known[0] + size, known[1])

    def figures(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "instances": list(tenant.instances),
                "quota": tenant.quota,
                "bytes": self.usage(name),
                "quota_refusals": self.refused[name],
            }
            for name, tenant in self.tenants.items()
        }


def instance_bytes(cache: RemoteCache, instance: str) -> int:
    """The logical bytes of the files an instance holds (its blobs and action
    results; uploads in progress are not an instance's)."""
    from cachefs.server._cache import ROOT  # noqa: PLC0415 -- the CLI imports this module

    top = cache.stored.lookup_path([ROOT, instance_directory(instance)])
    if top is None:
        return 0
    total = 0
    directories = [top]
    namespace = cache.stored.namespace
    while directories:
        for _, inode in namespace.entries(directories.pop()):
            if inode.is_dir:
                directories.append(inode.ino)
            elif inode.is_reg:
                total += inode.size
    return total
