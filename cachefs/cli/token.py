"""``cachefs token``: bearer tokens for the servers (the file: ``server/_tokens.py``)."""

from __future__ import annotations

from pathlib import Path

import click

from cachefs.server import PERMISSIONS, add_token, read_tokens, remove_token

_FILE = click.argument("file", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE")


@click.group("token")
def command() -> None:
    """Bearer tokens that `cachefs serve --tokens FILE` (and `mount --grpc/--http
    --tokens FILE`) accept.  FILE keeps each token's name, tenant, permission
    and SHA-256, never the token itself; a running server reads it again when
    it changes.

    \b
    Clients send the token as a header:
      bazel build --remote_cache=grpc://HOST:9092 \\
          --remote_header=Authorization="Bearer $TOKEN" //...
      curl -H "Authorization: Bearer $TOKEN" http://HOST:8080/status
    """


@command.command("add")
@_FILE
@click.argument("name")
@click.option("--tenant", required=True, help="The tenant the token acts for.")
@click.option(
    "--permission",
    type=click.Choice(PERMISSIONS),
    required=True,
    help="read: look up and download; read-write: upload and write action results too.",
)
def add_command(file: Path, name: str, tenant: str, permission: str) -> None:
    """Make a token NAME, keep its hash in FILE (made if missing, mode 0600) and
    print it: this is the only time it is shown."""
    click.echo(add_token(file, name, tenant, permission))


@command.command("remove")
@_FILE
@click.argument("name")
def remove_command(file: Path, name: str) -> None:
    """Drop the token NAME from FILE: servers refuse it within seconds."""
    remove_token(file, name)


@command.command("ls")
@_FILE
def ls_command(file: Path) -> None:
    """The tokens of FILE: name, tenant and permission."""
    for identity in sorted(read_tokens(file).values(), key=lambda i: i.name):
        click.echo(f"{identity.name}\t{identity.tenant}\t{identity.permission}")
