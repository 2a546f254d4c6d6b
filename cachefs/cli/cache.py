"""``cachefs cache``: mark directories of a mounted store as caches with a budget."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import click

from cachefs import daemon
from cachefs.errors import ConfigError, FsError, MountError, NotFoundError, from_oserror
from cachefs.fs import CACHE_XATTR, POLICIES, SHARE_NAME, parse_setting

from .common import human_bytes, json_option, parse_size

_XATTR = CACHE_XATTR.decode()


def _mount_root(directory: Path) -> Path:
    """The cachefs mount point that ``directory`` is in."""
    if not directory.is_dir():
        raise NotFoundError(f"{directory} is not a directory")
    current = directory.resolve()
    while True:
        if daemon.mounted_fstype(current) == daemon.FSTYPE:
            return current
        if current.parent == current:
            raise MountError(
                f"{directory} is not inside a mounted cachefs store",
                hint="mount the store (`cachefs mount STORE MOUNTPOINT`) and name a directory "
                "inside the mount",
            )
        current = current.parent


@click.group("cache")
def command() -> None:
    """Cache directories: budgets and eviction inside a mounted store.

    Only files under a directory marked as a cache are ever evicted, whole,
    never while open or being written.  Past 95% of the budget the files the
    policy picks are evicted in the background down to 90%; a write that
    would pass the budget waits for eviction, then fails with ENOSPC.  The
    mark is the xattr user.cachefs.cache on the directory (getfattr shows it).
    """


@command.command("set")
@click.argument("directory", type=click.Path(path_type=Path), metavar="DIR")
@click.option(
    "--max-size", required=True, metavar="SIZE", help="Budget in logical bytes (10G, 512M)."
)
@click.option(
    "--policy",
    type=click.Choice(sorted(POLICIES)),
    help="What to evict first: least recently used, least frequently used (with "
    "aging), or ARC (adapts between recency and frequency).  [default: lru; for a "
    "cache directory already, its policy]",
)
@click.option(
    "--shared/--no-shared",
    default=None,
    help="Share DIR through the mount's remote tiers (--remote): files published in it "
    "are pushed with their names; names missing here are looked for there.  "
    "[default: not shared; for a cache directory already, as it is]",
)
@click.option(
    "--share-name",
    metavar="NAME",
    help="The share's name on the tiers (default: DIR's path in the mount, or the "
    "name it is shared as already); machines that give the same name share the "
    "same entries.",
)
def set_command(
    directory: Path,
    max_size: str,
    policy: str | None,
    shared: bool | None,
    share_name: str | None,
) -> None:
    """Mark DIR (inside a mounted store) as a cache with a budget, or change it.

    Changing a cache directory's budget keeps its policy and its sharing
    unless --policy, --shared or --no-shared says otherwise.

    A shared cache directory is one cache for every machine whose mount has
    the same remote tier: what one builds, the others find (see the README,
    "Sharing it with a team")."""
    size = parse_size(max_size)
    if size <= 0:
        raise ConfigError("the budget must be more than 0 bytes")
    root = _mount_root(directory)
    current = _current_setting(directory)
    if policy is None:
        policy = "lru" if current is None else current[1]
    now_shared = None if current is None else current[2]
    if shared is None:
        shared = now_shared is not None
    if share_name is not None and not shared:
        raise ConfigError("--share-name goes with --shared")
    value = f"max_size={size} policy={policy}"
    if shared:
        name = share_name or now_shared or directory.resolve().relative_to(root).as_posix()
        if name in ("", "."):
            raise ConfigError("the mount's root cannot be shared", hint="share a directory in it")
        if not re.fullmatch(SHARE_NAME, name):
            raise ConfigError(
                f"{name!r} cannot name a share: 1 to 200 of A-Z a-z 0-9 . _ - and /",
                hint="give --share-name NAME",
            )
        value += f" shared={name}"
    try:
        os.setxattr(directory, _XATTR, value.encode())
    except OSError as exc:
        raise from_oserror(exc, f"marking {directory} as a cache") from None
    share = f", shared as {value.rsplit('=', 1)[1]}" if shared else ""
    click.echo(f"{directory}: cache of {human_bytes(size)}, {policy}{share}")
    info = daemon.mount_info(root) if shared else None
    if info is not None and info.get("remote") is None:
        click.echo(
            f"cachefs: warning: the mount {root} has no remote tier: nothing in {directory} "
            "is shared until the store is mounted with --remote URL (or tiers in --config)",
            err=True,
        )


def _current_setting(directory: Path) -> tuple[int, str, str | None] | None:
    """The setting of ``directory`` if it is a cache directory already (one
    whose value this cachefs cannot parse is set anew)."""
    try:
        value = os.getxattr(directory, _XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:  # not a cache directory
            return None
        raise from_oserror(exc, f"reading the cache setting of {directory}") from None
    try:
        return parse_setting(value)
    except FsError:
        return None


@command.command("unset")
@click.argument("directory", type=click.Path(path_type=Path), metavar="DIR")
def unset_command(directory: Path) -> None:
    """Make DIR an ordinary directory again (nothing in it is evicted any more)."""
    _mount_root(directory)
    try:
        os.removexattr(directory, _XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise NotFoundError(f"{directory} is not a cache directory") from None
        raise from_oserror(exc, f"unmarking {directory}") from None


@command.command("ls")
@click.argument("mountpoints", nargs=-1, type=click.Path(path_type=Path), metavar="[MOUNTPOINT]...")
@json_option
def ls_command(mountpoints: tuple[Path, ...], as_json: bool) -> None:
    """List the cache directories of the given mounts (default: every cachefs mount).

    \b
    Columns: usage of the budget, policy, files, hit ratio, evictions, and
    the share's name of a shared one.
    --json: a list of objects with mountpoint, path, max_size, policy, shared
    (the share's name, or null), files, bytes, hits, misses, hit_ratio,
    evictions, bytes_evicted, throttled, throttled_seconds.
    """
    rows: list[dict[str, Any]] = []
    for mountpoint in mountpoints or tuple(daemon.cachefs_mounts()):
        info = daemon.mount_info(mountpoint)
        if info is None:
            raise MountError(f"{mountpoint} is not a mounted cachefs store")
        for cache in info.get("caches", []):
            rows.append({"mountpoint": str(mountpoint), **cache})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no cache directories")
        return
    for row in rows:
        path = Path(row["mountpoint"]) / row["path"].lstrip("/")
        click.echo(
            f"{path}  {human_bytes(row['bytes'])} of {human_bytes(row['max_size'])}"
            f"  {row['policy']}  {row['files']} files  hit ratio {row['hit_ratio']:.1%}"
            f"  {row['evictions']} evicted ({human_bytes(row['bytes_evicted'])})"
            + (f"  shared as {row['shared']}" if row.get("shared") else "")
        )


@command.command("trace")
@click.argument("mountpoint", type=click.Path(path_type=Path), metavar="MOUNTPOINT")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--stop", is_flag=True, help="Stop recording.")
def trace_command(mountpoint: Path, file: Path | None, stop: bool) -> None:
    """Record a file-access trace of MOUNTPOINT to FILE (JSON lines), or --stop.

    The trace is what scripts/bench_cache.py replays through the eviction
    policies.  Recording goes on until --stop or the unmount.
    """
    if stop == (file is not None):
        raise ConfigError("give either FILE to start recording or --stop")
    command = "trace stop" if stop else f"trace start {file.absolute() if file else ''}"
    answer = daemon.control(mountpoint, command)
    if not answer.get("ok"):
        raise MountError(f"{mountpoint}: {answer.get('error')}")
    if stop:
        click.echo(f"{answer['records']} records")
