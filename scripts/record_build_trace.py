"""Record a file-access trace of real builds for ``scripts/bench_cache.py``.

A C project (zstd's command-line program, fetched as the tests fetch it:
``tests/clients.py``) is built again and again with ccache, its
``CCACHE_DIR`` inside a cachefs mount started with ``--trace``: the trace
holds every open, miss, create, write, rename and unlink of ccache's files.
The cache directory has no budget while recording (the replay simulates
budgets), and ccache's own limit is far away.

The builds follow a day of work on several branches with several
configurations: ``main`` and three feature branches (each adds a
declaration of its own to a few source files, so their objects differ),
built as release (``-O2``), debug (``-O0 -g``) and size (``-Os``), in an
order that comes back to earlier combinations at different distances, the
way a developer switches between branches.

Run from the repository root::

    .venv/bin/python scripts/record_build_trace.py build-trace.jsonl
    .venv/bin/python scripts/bench_cache.py build-trace.jsonl

Options: ``--rounds N`` (2: how many times the schedule repeats), ``--dir
DIR`` (scratch space; default the system temp dir).  About 20 builds; most
miss at first, so it takes several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import clients

CACHEFS = [sys.executable, "-m", "cachefs"]

#: Compiler flags of each configuration.
CONFIGS = {"release": "-O2", "debug": "-O0 -g", "size": "-Os"}

#: Which source files each branch touches (indexes into the sorted list of
#: the program's own .c files and the library's common files).
BRANCHES = {"main": (), "feature-a": (0, 1), "feature-b": (2, 3, 4), "fix-c": (5,)}

#: One round of work: (branch, configuration) in the order they are built.
SCHEDULE = [
    ("main", "release"),
    ("main", "debug"),
    ("feature-a", "debug"),
    ("feature-a", "debug"),
    ("main", "debug"),
    ("feature-b", "debug"),
    ("feature-a", "release"),
    ("main", "release"),
    ("fix-c", "debug"),
    ("main", "size"),
    ("feature-b", "release"),
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checkout(src: Path, files: list[Path], branch: str) -> None:
    """Make the tree look like ``branch``: its files get a declaration of
    their own (the compiled code changes, so ccache misses on them)."""
    touched = {files[i % len(files)] for i in BRANCHES[branch]}
    symbol = branch.replace("-", "_")
    for path in files:
        text = path.read_text(errors="surrogateescape")
        base = text.split("\n/* branch: ", 1)[0]
        if path in touched:
            base += (
                f"\n/* branch: {branch} */\n"
                f"const char *cachefs_branch_{symbol}_{path.stem.replace('-', '_')} = "
                f'"{branch}";\n'
            )
        if base != text:
            path.write_text(base, errors="surrogateescape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="where to write the trace (JSON lines)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    clients.require_ccache()
    trace = args.trace.absolute()
    trace.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="build-trace-") as tmp:
        base = Path(tmp)
        src = clients.c_project(base)
        spec = clients.C_PROJECTS[clients.DEFAULT_C_PROJECT]
        files = sorted((src / spec.subdir).glob("*.c")) + sorted((src / "lib/common").glob("*.c"))
        store, mnt = base / "store", base / "mnt"
        mnt.mkdir()
        subprocess.run([*CACHEFS, "mount", str(store), str(mnt), "--trace", str(trace)], check=True)
        try:
            ccache_dir = mnt / "ccache"
            ccache_dir.mkdir()
            start = time.monotonic()
            for round_ in range(args.rounds):
                for branch, config in SCHEDULE:
                    checkout(src, files, branch)
                    build = clients.ccache_build(src, ccache_dir, env={"CFLAGS": CONFIGS[config]})
                    log(
                        f"round {round_ + 1}: {branch:<10} {config:<8} "
                        f"{build.hits:3d} hits {build.misses:3d} misses "
                        f"{build.seconds:5.1f} s"
                    )
            log(f"{time.monotonic() - start:.0f} s of builds")
        finally:
            subprocess.run([*CACHEFS, "umount", str(mnt)], check=True)
    lines = sum(1 for _ in trace.open())
    log(f"{trace}: {lines} records")


if __name__ == "__main__":
    main()
