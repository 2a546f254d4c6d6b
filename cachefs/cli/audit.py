"""``cachefs audit``: check a store's audit log (its format: ``format/audit.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cachefs.errors import NotFoundError, from_oserror
from cachefs.format.audit import log_files, verify

from .common import json_option


@click.group("audit")
def command() -> None:
    """The audit log: security-relevant events, one JSON line each, each line
    carrying the SHA-256 of the line before it.

    A store's log is STORE/audit/ (or the directory --audit-log named):
    audit.log and, once rotated, audit.log.<first seq>.
    """


@command.command("verify")
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FILE..."
)
@click.option(
    "--partial",
    is_flag=True,
    help="The first file need not start the log (rotated files removed): its first "
    "line is taken as it is and the chain checked from there.",
)
@json_option
def verify_command(paths: tuple[Path, ...], partial: bool, as_json: bool) -> None:
    """Check that the hash chain through FILE... (in the order given; a
    directory stands for its log files, oldest first, and a store for its
    audit/ directory) is intact: exit 0 if it is, 1 with the file, line and
    reason where it breaks.

    Prints the head (the last line's seq and SHA-256): keep it elsewhere and
    compare, since whoever can rewrite a whole log can rewrite its chain.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir() and not log_files(path) and (path / "audit").is_dir():
            path = path / "audit"  # a store: its log
        try:
            files.extend(log_files(path) if path.is_dir() else [path])
            if not path.exists():
                raise NotFoundError(f"{path}: no such file", hint="name the audit log's files")
        except OSError as exc:
            raise from_oserror(exc, f"reading {path}") from None
    try:
        verdict = verify(files, partial=partial)
    except OSError as exc:
        raise from_oserror(exc, "reading the audit log") from None
    if as_json:
        doc = {
            "intact": verdict.intact,
            "files": verdict.files,
            "lines": verdict.lines,
            "head": None
            if verdict.head is None
            else {"seq": verdict.head[0], "sha256": verdict.head[1]},
            "broken": None
            if verdict.broken is None
            else {
                "file": str(verdict.broken[0]),
                "line": verdict.broken[1],
                "reason": verdict.broken[2],
            },
            "notes": verdict.notes,
        }
        click.echo(json.dumps(doc, indent=2))
    elif verdict.broken is not None:
        path, line, reason = verdict.broken
        click.echo(f"{path}:{line}: the chain breaks: {reason}", err=True)
    else:
        click.echo(f"intact: {verdict.lines} lines in {verdict.files} files")
        if verdict.head is not None:
            click.echo(f"head: seq {verdict.head[0]} sha256 {verdict.head[1]}")
        for note in verdict.notes:
            click.echo(f"note: {note}")
    if not verdict.intact:
        sys.exit(1)
