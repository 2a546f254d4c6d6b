"""``cachefs key``: Ed25519 keys that sign entries (``cachefs.signing``)."""

from __future__ import annotations

from pathlib import Path

import click

from cachefs.signing import generate_key


@click.group("key")
def command() -> None:
    """Signing keys.  A producer signs what it publishes (`--sign-key FILE`);
    consumers trust its public key (`--trust FILE.pub`) and treat entries
    that are unsigned, tampered with, or signed by another key as misses."""


@command.command("generate")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE")
def generate_command(path: Path) -> None:
    """Write a new Ed25519 private key to FILE (mode 0600) and its public key to
    FILE.pub, and print the key's id (16 hex digits, as --revoked-key and the
    audit log name it)."""
    click.echo(generate_key(path))
