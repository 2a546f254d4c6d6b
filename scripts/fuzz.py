"""Fuzz every decoder of bytes that come from disk or from the network (atheris).

Each target feeds the fuzzer's bytes to one decoder; the decoder may accept
them or refuse them with a :class:`~cachefs.errors.CachefsError` (a clear
error naming the problem), and nothing else: any other exception, a hang
(libFuzzer's ``-timeout``) or a crash is a finding.  A finding becomes a
regression test (``tests/test_fuzz.py``) and its input is kept in the target's
corpus.

Targets: ``segment`` (segment header and records), ``journal`` (the journal's
records), ``header`` (the store header, JSON), ``index`` (every LMDB value
decoder, after and without its seal), ``names`` (REAPI resource names and
digests, as the servers get them), ``control`` (``/.cachefs/control``
commands).  The seed corpus is ``tests/data/fuzz/<target>/`` (``--seeds``
writes it again from valid encodings).

    .venv/bin/python scripts/fuzz.py --target journal --seconds 60
    .venv/bin/python scripts/fuzz.py --all --seconds 30      # each target in turn
    .venv/bin/python scripts/fuzz.py --seeds                 # rewrite the seed corpus

Prints, per target, the executions and the time; exits 1 on a finding (the
input is written to ``fuzz-<target>-crash-*`` in the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import atheris  # type: ignore[import-untyped]
import trio

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "fuzz"
sys.path.insert(0, str(ROOT))

from cachefs.errors import CachefsError  # noqa: E402
from cachefs.format import journal, schema  # noqa: E402
from cachefs.format.digest import BLAKE3, SHA256, Digest  # noqa: E402
from cachefs.format.header import HEADER_NAME, StoreConfig, read_header, write_header  # noqa: E402
from cachefs.format.segment import (  # noqa: E402
    TAG_CHUNK,
    encode_record_header,
    encode_segment_header,
    parse_record,
    parse_segment_header,
)
from cachefs.fs._control import ControlTree  # noqa: E402
from cachefs.server._names import parse_resource  # noqa: E402

#: Where the header target writes, once per input (so on tmpfs).  A child of
#: ``run_target`` uses the directory its parent made and removes: libFuzzer
#: ends the child with exit(), past any cleanup of Python's.
SCRATCH_VARIABLE = "CACHEFS_FUZZ_SCRATCH"
_SCRATCH = Path(
    os.environ.get(SCRATCH_VARIABLE) or tempfile.mkdtemp(prefix="cachefs-fuzz-", dir="/dev/shm")
)


def fuzz_segment(data: bytes) -> None:
    view = memoryview(data)
    try:
        header = parse_segment_header(view, "fuzz")
    except CachefsError:
        header = None
    offset = header.header_size if header is not None else 0
    while offset < len(data):
        try:
            record = parse_record(view, offset, len(data), "fuzz")
        except CachefsError:
            return
        if record.size <= 0:
            raise AssertionError("a record of no size")
        offset += record.size


def fuzz_journal(data: bytes) -> None:
    try:
        _, records, _ = journal.parse(data, "fuzz")
    except CachefsError:
        return
    for record in records:
        if record.kind in (journal.FILE_BASE, journal.FILE_WRITE, journal.FILE_TRUNCATE):
            with suppress(CachefsError):
                journal.file_inode(record)


def fuzz_header(data: bytes) -> None:
    (_SCRATCH / HEADER_NAME).write_bytes(data)
    with suppress(CachefsError):
        read_header(_SCRATCH)


_DECODERS: list[Callable[[bytes], object]] = [
    schema.ChunkEntry.unpack,
    schema.ObjectEntry.unpack,
    schema.SegmentEntry.unpack,
    lambda raw: schema.Inode.unpack(7, raw),
    schema.unpack_recipe,
]


def fuzz_index(data: bytes) -> None:
    if not data:
        return
    decode = _DECODERS[data[0] % len(_DECODERS)]
    for value in (data[1:], schema.unseal(b"key", data[1:])):
        if value is None:
            continue
        with suppress(CachefsError):
            decode(value)


def fuzz_names(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    for function in (SHA256, BLAKE3):
        for write in (False, True):
            with suppress(CachefsError):
                parse_resource(text, function, write=write)
    with suppress(CachefsError):
        Digest.parse(text)


class _Scrubber:
    async def scrub(self, rate: int | None = None) -> object:
        raise CachefsError("no scrub in the fuzzer")


class _Commands:
    """What a control command may ask, doing nothing."""

    scrubber = _Scrubber()

    async def flush_all(self) -> None:
        return None

    async def collect_garbage(self, threshold: float | None = None) -> object:
        raise CachefsError("no gc in the fuzzer")

    def start_trace(self, path: Path) -> None:
        raise CachefsError("no trace in the fuzzer")

    def stop_trace(self) -> int:
        return 0


def fuzz_control(data: bytes) -> None:
    tree = ControlTree.__new__(ControlTree)
    tree.commands = _Commands()  # type: ignore[assignment]
    tree.info = {"mountpoint": str(_SCRATCH)}
    answer = trio.run(tree.run, data)
    json.loads(answer)  # always an answer, always JSON


TARGETS: dict[str, Callable[[bytes], None]] = {
    "segment": fuzz_segment,
    "journal": fuzz_journal,
    "header": fuzz_header,
    "index": fuzz_index,
    "names": fuzz_names,
    "control": fuzz_control,
}


def seeds() -> dict[str, list[bytes]]:
    """Valid encodings of every target, to start from."""
    payload = b"chunk payload" * 10
    record = encode_record_header(TAG_CHUNK, 0, len(payload), SHA256.hash(payload), payload)
    segment = encode_segment_header(3, 7) + record + payload
    log = journal.encode_header(1) + journal.encode_record(1, journal.FILE_WRITE, b"x" * 24)
    with tempfile.TemporaryDirectory() as tmp:
        write_header(Path(tmp), StoreConfig())
        header = (Path(tmp) / HEADER_NAME).read_bytes()
    chunk = schema.ChunkEntry(1, 64, 100, 80, 0, 2).pack()
    obj = schema.ObjectEntry(100, 1, [(b"\1" * 32, 60), (schema.HOLE_MARK, 40)]).pack()
    paged = schema.ObjectEntry(2000, 1, [], None, schema.RecipePages(20, 8, [0, 800, 1600]))
    page = schema.pack_recipe([(b"\1" * 32, 60), (schema.HOLE_MARK, 40)])
    seg = schema.SegmentEntry(3, 4096, 100, 2).pack()
    inode = schema.Inode(7, 0o100644, 0, 0, 1, 100, 0, 1, 2, 3, b"\2" * 32).pack()
    values = (chunk, obj, seg, inode, page)
    index = [bytes([n]) + v for n, v in enumerate(values)] + [b"\1" + paged.pack()]
    index += [bytes([n]) + schema.seal(b"key", v) for n, v in enumerate(values)]
    digest = "a" * 64 + "/100"
    return {
        "segment": [segment, encode_segment_header(0, 1)],
        "journal": [log],
        "header": [header],
        "index": index,
        "names": [
            f"blobs/{digest}".encode(),
            f"inst/compressed-blobs/zstd/{digest}".encode(),
            f"uploads/1234/blobs/blake3/{digest}/meta".encode(),
            digest.encode(),
        ],
        "control": [b"sync", b"gc 0.5", b"scrub 1000", b"trace stop", b"trace start /x"],
    }


def write_seeds() -> None:
    for target, inputs in seeds().items():
        directory = CORPUS / target
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for n, data in enumerate(inputs):
            (directory / f"seed-{n}").write_bytes(data)


def run_target(target: str, seconds: float, runs: int | None) -> int:
    """Fuzz one target in a child process (libFuzzer owns its process)."""
    work = Path(tempfile.mkdtemp(prefix=f"cachefs-fuzz-{target}-", dir="/dev/shm"))
    scratch = work / "scratch"  # the child's (see SCRATCH_VARIABLE)
    try:
        scratch.mkdir()
        shutil.copytree(CORPUS / target, work / "corpus")
        args = [
            sys.executable,
            __file__,
            "--child",
            target,
            str(work / "corpus"),
            f"-max_total_time={max(1, int(seconds))}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix=fuzz-{target}-",
            "-print_final_stats=1",
        ]
        if runs is not None:
            args.append(f"-runs={runs}")
        start = time.monotonic()
        env = {**os.environ, SCRATCH_VARIABLE: str(scratch)}
        child = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
        elapsed = time.monotonic() - start
        execs = next(
            (
                line.split(":")[-1].strip()
                for line in child.stderr.splitlines()
                if line.startswith("stat::number_of_executed_units")
            ),
            "?",
        )
        verdict = "ok" if child.returncode == 0 else "FINDING"
        print(f"{target:8}  {execs:>9} executions  {elapsed:6.1f} s  {verdict}", flush=True)
        if child.returncode != 0:
            print(child.stderr[-4000:], file=sys.stderr)
        return child.returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def child(target: str, libfuzzer_args: list[str]) -> None:
    test = TARGETS[target]

    def one_input(data: bytes) -> None:
        test(data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", choices=sorted(TARGETS), help="one target")
    which.add_argument("--all", action="store_true", help="every target in turn")
    which.add_argument("--seeds", action="store_true", help="rewrite the seed corpus")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (60)")
    parser.add_argument("--runs", type=int, default=None, help="stop after N inputs")
    args = parser.parse_args()
    if args.seeds:
        write_seeds()
        return 0
    targets = sorted(TARGETS) if args.all else [args.target]
    failed = [t for t in targets if run_target(t, args.seconds, args.runs) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(_SCRATCH, ignore_errors=True)
