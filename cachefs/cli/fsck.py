"""``cachefs fsck``: verify (and repair) a store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cachefs.daemon import resolve_store
from cachefs.engine import Store, check_store

from .common import ProgressBar, json_option, store_argument


@click.command("fsck")
@store_argument
@click.option(
    "--repair",
    is_flag=True,
    help="Drop what cannot be recovered and fix counts (needs the store's writer lock).",
)
@json_option
def command(store: Path, repair: bool, as_json: bool) -> None:
    """Verify every record checksum, index entry and reference count.

    Exits 0 only when the store is clean; 1 when damage was found (also when
    --repair fixed it: run fsck again to confirm).  With --repair, lists the
    objects that lost data.  Without --repair the store is only read, and this
    works beside a running writer.
    """
    bar = ProgressBar("checking")
    with Store.open(resolve_store(store), readonly=not repair) as opened:
        try:
            report = check_store(opened, repair=repair, progress=bar)
        finally:
            bar.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for problem in report.problems:
            click.echo(f"DAMAGE  {problem}")
        for note in report.notes:
            click.echo(f"note    {note}")
        for digest in report.lost_objects:
            verb = "removed" if report.repaired else "damaged"
            click.echo(f"LOST    object {digest} ({verb}: its data is gone)")
        summary = (
            f"{report.segments_checked} segments, {report.records_checked} records, "
            f"{report.chunks_checked} chunks, {report.objects_checked} objects, "
            f"{report.inodes_checked} inodes checked: "
        )
        if report.clean:
            click.echo(summary + "clean")
        elif report.repaired:
            click.echo(summary + f"{len(report.problems)} problems repaired")
        else:
            click.echo(summary + f"{len(report.problems)} problems; run with --repair to fix")
    if not report.clean:
        raise click.exceptions.Exit(1)
