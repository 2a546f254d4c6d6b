"""The fuzzed decoders (``scripts/fuzz.py``): a short run, and what fuzzing found.

A decoder of bytes from disk or the network may accept its input or refuse it
with a CachefsError; anything else is a finding, kept here as a regression
test once fixed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.errors import CorruptDataError
from cachefs.format import schema

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("decode", "good"),
    [
        (schema.ChunkEntry.unpack, schema.ChunkEntry(1, 64, 100, 80, 0, 2).pack()),
        (schema.SegmentEntry.unpack, schema.SegmentEntry(3, 4096, 100, 2).pack()),
        (schema.ObjectEntry.unpack, schema.ObjectEntry(10, 1, [(b"\1" * 32, 10)]).pack()),
        (
            lambda raw: schema.Inode.unpack(7, raw),
            schema.Inode(7, 0o100644, 0, 0, 1, 10, 0, 1, 2, 3, b"\2" * 32).pack(),
        ),
    ],
)
def test_an_index_value_of_the_wrong_length_is_corrupt_data(decode: object, good: bytes) -> None:
    """Found by the ``index`` target: a value one byte short (or shorter than
    its fixed part) raised struct.error instead of naming the damage."""
    assert callable(decode)
    decode(good)
    for bad in (good[:-1], good[:5], b""):
        with pytest.raises(CorruptDataError):
            decode(bad)


def test_a_short_fuzzing_run_of_every_target_finds_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--all", "--seconds", "3"],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(line.endswith(" ok") for line in lines), result.stdout
    for line in lines:
        assert int(line.split()[1]) > 0  # every target ran inputs
