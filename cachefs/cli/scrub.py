"""``cachefs scrub``: verify every record and index entry, and record the damage."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cachefs.daemon import control, mount_info, resolve_store
from cachefs.engine import FsckReport, Store, scrub_store
from cachefs.errors import StoreLockedError

from .common import ProgressBar, json_option, positive_size, store_argument


@click.command("scrub")
@store_argument
@click.option(
    "--rate",
    metavar="SIZE",
    default=None,
    help="Read at most SIZE bytes a second (e.g. 50M; default: as fast as it goes).",
)
@json_option
def command(store: Path, rate: str | None, as_json: bool) -> None:
    """Verify every segment record and every index entry of a store.

    What fsck checks, without repairing: but what is found is recorded in the
    store's health (`cachefs stats`: needs_fsck, corruptions, the last damage),
    and a mount whose index is found damaged turns read-only.  STORE may be the
    mount point of a mounted store: its daemon scrubs.  Exits 0 when the store
    is clean, 1 when damage was found (then `cachefs fsck --repair STORE`).
    The cachefs-scrub@.timer unit runs it weekly.
    """
    limit = None if rate is None else positive_size(rate, "--rate")
    if mount_info(store) is not None:
        doc = control(store, "scrub" if limit is None else f"scrub {limit}")["report"]
        problems = doc["problems"]
    else:
        bar = ProgressBar("scrubbing")
        path = resolve_store(store)
        try:
            opened = Store.open(path)
        except StoreLockedError:  # a `cachefs serve` holds it: check, not record
            opened = Store.open(path, readonly=True)
        try:
            report: FsckReport = scrub_store(opened, rate=limit, progress=bar)
        finally:
            bar.close()
            opened.close()
        if opened.readonly and not report.clean:
            report.notes.append("another process holds the store: the damage is not recorded")
        doc = report.as_dict()
        problems = doc["problems"]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for problem in problems:
            click.echo(f"DAMAGE  {problem['kind']}: {problem['message']}")
        for note in doc["notes"]:
            click.echo(f"note    {note}")
        summary = (
            f"{doc['segments_checked']} segments, {doc['records_checked']} records, "
            f"{doc['chunks_checked']} chunks, {doc['objects_checked']} objects, "
            f"{doc['inodes_checked']} inodes scrubbed: "
        )
        if problems:
            click.echo(summary + f"{len(problems)} problems; run `cachefs fsck --repair`")
        else:
            click.echo(summary + "clean")
    if problems:
        raise click.exceptions.Exit(1)
