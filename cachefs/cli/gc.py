"""``cachefs gc``: reclaim unreferenced chunks and compact segments."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cachefs.daemon import control, mount_info
from cachefs.engine import GcReport, Store, collect_garbage

from .common import ProgressBar, human_bytes, json_option, store_argument


@click.command("gc")
@store_argument
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Compact segments whose live fraction is below this (default 0.5).",
)
@json_option
def command(store: Path, threshold: float | None, as_json: bool) -> None:
    """Remove chunks nothing refers to and compact sparse segments.

    Safe to interrupt at any point: a crash leaves the store consistent.
    STORE may be the mount point of a mounted store: its daemon runs the gc.
    """
    if mount_info(store) is not None:
        # A mounted store: its daemon holds the writer lock and runs gc itself.
        command = "gc" if threshold is None else f"gc {threshold}"
        doc = control(store, command)["report"]
    else:
        bar = ProgressBar("compacting")
        with Store.open(store) as opened:
            try:
                report = collect_garbage(opened, threshold=threshold, progress=bar)
            finally:
                bar.close()
            opened.audit.record("gc", via="cli", **report.as_dict())
        doc = report.as_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    report = GcReport.from_dict(doc)
    click.echo(
        f"removed {report.chunks_removed} unreferenced chunks, compacted "
        f"{report.segments_compacted} segments ({report.records_moved} records moved), "
        f"deleted {report.segments_deleted} empty segments; "
        f"reclaimed {human_bytes(report.bytes_reclaimed)}"
    )
    for reason in report.skipped:
        click.echo(f"skipped {reason}", err=True)
