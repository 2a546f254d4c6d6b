"""The command line (CLI layer): one module per subcommand, errors without tracebacks.

Every command turns a :class:`~cachefs.errors.CachefsError` into one line on
stderr (what went wrong, where, what to do) and the error's exit code; see
``cachefs.errors`` for the table of exit codes.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, NoReturn

import click
import lmdb

# Checks a fault spec in the environment (the fault-injection suite's) on import,
# so that a wrong one stops every command at start: also --help, which imports
# nothing else that has fault points.
import cachefs.faults  # noqa: F401
from cachefs import __version__
from cachefs.errors import CachefsError, from_oserror

#: The subcommands, each defined by the module of its name as ``command``.  A
#: module is imported only when its command is run (``cachefs --help`` lists
#: them from ``SUMMARIES``), so that ``cachefs stats`` does not import the
#: servers and the file system.
COMMANDS = (
    "mount", "umount", "serve", "cache", "init", "put", "cat", "stats", "top", "fsck", "scrub",
    "gc", "metrics", "audit", "token", "key",
)  # fmt: skip


#: The first sentence of each command's help, which ``cachefs --help`` lists:
#: kept here so that listing them imports no command (tests/test_cli.py checks
#: that each lists as its command's own help would).
SUMMARIES = {
    "audit": (
        "The audit log: security-relevant events, one JSON line each, each line carrying"
        " the SHA-256 of the line before it."
    ),
    "cache": "Cache directories: budgets and eviction inside a mounted store.",
    "cat": "Write the object DIGEST (`<hex>/<size>`) to stdout.",
    "fsck": "Verify every record checksum, index entry and reference count.",
    "gc": "Remove chunks nothing refers to and compact sparse segments.",
    "init": "Create an empty STORE.",
    "key": "Signing keys.",
    "metrics": "Prometheus metrics: `mount` and `serve` serve them with --metrics ADDR.",
    "mount": "Mount STORE on MOUNTPOINT (STORE is created if missing).",
    "put": "Store files (directories recursively) and print `DIGEST PATH` for each.",
    "scrub": "Verify every segment record and every index entry of a store.",
    "serve": (
        "Serve STORE to build tools over REAPI v2 (gRPC) and the Bazel HTTP cache protocol,"
        " with no mount (STORE is created if missing)."
    ),
    "stats": "Show objects, logical and stored bytes, chunks, dedup and compression ratios.",
    "token": (
        "Bearer tokens that `cachefs serve --tokens FILE` (and `mount --grpc/--http --tokens"
        " FILE`) accept."
    ),
    "top": "Watch a daemon live: requests, throughput, hit ratios, errors, memory.",
    "umount": "Unmount MOUNTPOINT: publish everything, unmount, wait for the daemon to exit.",
}


def _summary(name: str) -> click.Command:
    """A stand-in for the command ``name`` that has only its summary."""
    return click.Command(name, help=SUMMARIES[name])


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The list of commands, as click makes it, from ``SUMMARIES``."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [(name, _summary(name).get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        command: click.Command = importlib.import_module(f"cachefs.cli.{cmd_name}").command
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CachefsError as exc:
            _fail(ctx, exc)
        except BrokenPipeError:
            # The reader went away (`cachefs cat ... | head`): not our error.  Point
            # stdout at /dev/null so that flushing it at exit cannot fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(1)
        except OSError as exc:  # last resort: an OS error the engine did not classify
            _fail(ctx, from_oserror(exc, "running the command"))
        except lmdb.Error as exc:  # last resort: an index error the engine did not classify
            from cachefs.engine import lmdb_error  # noqa: PLC0415 (heavy: only when needed)

            _fail(ctx, lmdb_error(exc, "reading the index"))


def _fail(ctx: click.Context, exc: CachefsError) -> NoReturn:
    click.echo(f"cachefs: error: {exc}", err=True)
    ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cachefs")
@click.option("-v", "--verbose", count=True, help="Say more (repeat for debug output).")
def cli(verbose: int) -> None:
    """cachefs: a content-addressed build cache.

    Files put into a STORE are cut into content-defined chunks, deduplicated
    against everything already stored, compressed with zstd and checksummed.
    A STORE is a directory; commands that write create it when missing.

    \b
    Exit codes: 0 ok, 1 damage found (fsck, scrub) or failure, 2 usage or
    configuration, 3 not found, 4 corrupt data, 5 store locked by another
    writer, 6 store format too new, 7 no space left, 8 cannot mount or unmount,
    9 a remote tier failed, 128+N fsck's check ended by signal N.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="cachefs: %(message)s", stream=sys.stderr)


def main() -> None:
    cli(prog_name="cachefs")
