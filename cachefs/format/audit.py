"""The audit log: security-relevant events as hash-chained JSON lines (format layer).

A store keeps its audit log in ``STORE/audit/`` (or where ``--audit-log`` says),
written by the one process that owns the store (``engine.AuditLog``)::

    audit.log                  the current file, appended to
    audit.log.000000004812     an earlier file: its first line has seq 4812

Every line is one JSON object in UTF-8, with no spaces and sorted keys, ending in
``\\n``.  Every line has these keys, and others that depend on the event::

    seq    the line's number in the whole log: 0, 1, 2, ... with no gaps,
           continuing from file to file
    time   when it was written, UTC, "2026-12-04T15:22:12.123456Z"
    event  what happened ("gc", "fsck.repair", "ac.write", "auth.failed", ...;
           the README lists them)
    prev   the SHA-256, 64 lowercase hex digits, of the previous line's bytes
           (without its newline); for seq 0, 64 zeros (GENESIS)

A file is rotated (renamed to ``audit.log.<seq of its first line, 12 digits>``)
when it passes its size limit, and the next line, in a new ``audit.log``,
carries the hash of the last line of the old one: the chain runs on across
files, so that they are verified in order (:func:`verify`).  Changing,
removing or inserting a line breaks the link of the line after it (or the
sequence); the writer cuts off a torn last line (a crash in the middle of a
write) when it opens the file, and says so in the next line
(``audit.torn_tail``).  Whoever can rewrite the whole file can recompute
the whole chain: keep the head that ``cachefs audit verify`` prints (or the
daemon logs at each rotation and stop) somewhere else to compare against.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The ``prev`` of the first line of a log.
GENESIS = "0" * 64
#: The current file of a log directory; rotated files add ``.<first seq>``.
CURRENT = "audit.log"
ROTATED = re.compile(r"audit\.log\.(\d{12})")
#: The keys every line has (the event's own keys may not use them).
RESERVED = frozenset({"seq", "time", "event", "prev"})


def line_hash(line: bytes) -> str:
    """The hash of a line (without its newline) that the next line names."""
    return hashlib.sha256(line).hexdigest()


def encode(seq: int, prev: str, event: str, fields: dict[str, Any], when: datetime) -> bytes:
    """A line (without its newline)."""
    clash = RESERVED & fields.keys()
    if clash:
        raise ValueError(f"an audit event may not set {sorted(clash)}")
    doc = {
        **fields,
        "seq": seq,
        "time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event": event,
        "prev": prev,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def rotated_name(first_seq: int) -> str:
    return f"{CURRENT}.{first_seq:012d}"


def log_files(directory: Path) -> list[Path]:
    """The files of a log directory, oldest first (rotated ones, then the current)."""
    rotated = sorted(
        (p for p in directory.iterdir() if ROTATED.fullmatch(p.name)), key=lambda p: p.name
    )
    current = directory / CURRENT
    return [*rotated, current] if current.exists() else rotated


@dataclass
class Verdict:
    """What :func:`verify` found: the lines read and, if the chain breaks, where."""

    lines: int = 0
    files: int = 0
    #: seq and hash of the last good line (None: no line).
    head: tuple[int, str] | None = None
    #: Where the chain breaks: (file, line number in it from 1, reason); None: intact.
    broken: tuple[Path, int, str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.broken is None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def _check(raw: bytes, expect_seq: int | None, expect_prev: str | None) -> tuple[int, str]:
    """(seq, reason) of a line that breaks the chain, else (seq, "")."""
    if not raw.endswith(b"\n"):
        return -1, "the line is torn (no newline at its end)"
    try:
        doc = json.loads(raw)
    except ValueError:
        return -1, "the line is not JSON"
    if not isinstance(doc, dict) or not doc.keys() >= RESERVED:
        return -1, f"the line lacks one of {sorted(RESERVED)}"
    seq, prev = doc["seq"], doc["prev"]
    if not isinstance(seq, int) or not isinstance(prev, str):
        return -1, "seq or prev is of the wrong type"
    if expect_seq is not None and seq != expect_seq:
        return seq, f"seq {seq} where {expect_seq} was next (a line removed or inserted)"
    if expect_prev is not None and prev != expect_prev:
        return seq, "its prev is not the hash of the line before: that line was changed, or "
        "a line removed or inserted before this one"
    return seq, ""


def verify(files: Iterable[Path], *, partial: bool = False) -> Verdict:
    """Check the chain through ``files``, in the order given (see the module
    doc).  The first line must be the log's first (seq 0, prev GENESIS)
    unless ``partial``: then it is taken as it is, and the chain checked from
    there."""
    verdict = Verdict()
    expect_seq: int | None = None if partial else 0
    expect_prev: str | None = None if partial else GENESIS
    for path in files:
        verdict.files += 1
        for number, raw in _lines(path):
            seq, reason = _check(raw, expect_seq, expect_prev)
            if reason:
                verdict.broken = (path, number, reason)
                return verdict
            line = raw[:-1]
            verdict.lines += 1
            expect_seq, expect_prev = seq + 1, line_hash(line)
            verdict.head = (seq, expect_prev)
    if partial and verdict.head is not None:
        verdict.notes.append("the first line was taken as given (--partial)")
    return verdict
