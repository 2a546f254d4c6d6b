"""``cachefs umount``: unmount a store and wait for its daemon."""

from __future__ import annotations

from pathlib import Path

import click

from cachefs import daemon


@click.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path), metavar="MOUNTPOINT")
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    help="Seconds to wait for the daemon to publish what is left and exit.",
)
def command(mountpoint: Path, timeout: float) -> None:
    """Unmount MOUNTPOINT: publish everything, unmount, wait for the daemon to exit.

    Fails (and changes nothing) while files in the mount are in use.
    """
    daemon.umount(mountpoint, timeout=timeout)
