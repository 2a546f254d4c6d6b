"""Options and helpers shared by the subcommands (CLI layer).

The options of the commands that run a daemon holding a store (``mount``,
``serve``) are in ``daemon_options``: they bring the servers and the file
system, which the other commands do without.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cachefs.errors import ConfigError

store_argument = click.argument(
    "store", type=click.Path(file_okay=False, path_type=Path), metavar="STORE"
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON (stable keys)."
)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count such as ``1048576``, ``64K``, ``256M``, ``1G`` or ``1.5GiB``."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise ConfigError(
            f"not a size: {text!r}", hint="write a byte count such as 65536, 64K, 256M or 1G"
        ) from None
    if number < 0:
        raise ConfigError(f"a size must not be negative: {text!r}")
    return int(number * _UNITS[unit])


def positive_size(text: str, option: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise ConfigError(f"{option} {text} must be more than nothing", hint="e.g. 20M")
    return size


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressBar:
    """A progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self._bar is None:
            self._bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(max(0, done - self._done))
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
