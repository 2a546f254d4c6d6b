"""``cachefs put``: ingest files and print their digests."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import click

from cachefs.engine import Store, default_put_processes
from cachefs.errors import CachefsError, ConfigError, from_oserror

from .common import store_argument

log = logging.getLogger(__name__)


def _walk(paths: tuple[Path, ...], errors: list[CachefsError]) -> Iterator[Path]:
    """Regular files named or found (recursively, sorted) under the paths given."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            err = from_oserror(exc, f"reading {path}")
            click.echo(f"cachefs: error: {err}", err=True)
            errors.append(err)
            continue
        if stat.S_ISREG(mode):
            yield path
        elif stat.S_ISDIR(mode):

            def unreadable(exc: OSError) -> None:
                err = from_oserror(exc, "reading a directory")
                click.echo(f"cachefs: error: {err}", err=True)
                errors.append(err)

            # Walk order: a directory's files by name, then its subdirectories by name.
            for dirpath, dirnames, filenames in os.walk(path, onerror=unreadable):
                dirnames.sort()
                for name in sorted(filenames):
                    child = Path(dirpath) / name
                    if child.is_symlink() or not child.is_file():
                        log.info("skipping %s: not a regular file", child)
                        continue
                    yield child
        else:
            err = ConfigError(
                f"{path} is not a regular file or directory",
                hint="cachefs stores regular files; give files or directories",
            )
            click.echo(f"cachefs: error: {err}", err=True)
            errors.append(err)


def _found(path: Path) -> bool:
    """Whether ``path`` can be looked at (``_walk`` says why not)."""
    try:
        path.stat()
    except OSError:
        return False
    return True


@click.command("put")
@store_argument
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="PATH..."
)
@click.option(
    "--processes",
    type=click.IntRange(min=0),
    default=default_put_processes(),
    show_default="one per CPU, at most 4; 0 on one CPU",
    help="Worker processes that cut, hash and compress the small files (up to 16 MiB) "
    "of a put of more than 256 of them or 16 MiB; 0: threads only.",
)
def command(store: Path, paths: tuple[Path, ...], processes: int) -> None:
    """Store files (directories recursively) and print `DIGEST  PATH` for each.

    DIGEST is the REAPI form `<hex>/<size>`.  A line is printed once the file
    is durably stored.  A directory is walked in order: its files by name, then
    its subdirectories by name; symlinks and special files inside are skipped.
    Creates STORE with default parameters if missing (see `cachefs init`).
    Each put adds a reference to the object.
    """
    errors: list[CachefsError] = []
    if not any(_found(path) for path in paths):  # mistyped paths make no store
        for _ in _walk(paths, errors):
            pass
        if errors:
            raise click.exceptions.Exit(errors[0].exit_code)
    with Store.open(store, create=True) as opened:
        files = _walk(paths, errors)
        for path, result in opened.put_files(files, processes=processes):
            if isinstance(result, CachefsError):
                click.echo(f"cachefs: error: {result}", err=True)
                errors.append(result)
            else:
                click.echo(f"{result}  {path}")
    if errors:
        raise click.exceptions.Exit(errors[0].exit_code)
