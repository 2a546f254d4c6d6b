"""``cachefs cat``: write a stored object to stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cachefs.engine import Digest, Store

from .common import store_argument

#: Objects up to this size are read and verified whole before anything is written.
_VERIFY_FIRST = 64 << 20


@click.command("cat")
@store_argument
@click.argument("digest", metavar="DIGEST")
def command(store: Path, digest: str) -> None:
    """Write the object DIGEST (`<hex>/<size>`) to stdout.

    Exits non-zero if the object is missing or damaged.  Objects up to 64 MiB
    are verified whole before the first byte is written, so nothing at all is
    written for a damaged one; larger objects stream, chunk by verified chunk,
    and stop at the first damaged chunk.  Works beside a running writer.
    """
    wanted = Digest.parse(digest)
    out = sys.stdout.buffer
    with Store.open(store, readonly=True) as opened:
        if wanted.size <= _VERIFY_FIRST:
            out.write(opened.read(wanted))
        else:
            for piece in opened.iter_object(wanted):
                out.write(piece)
    out.flush()
