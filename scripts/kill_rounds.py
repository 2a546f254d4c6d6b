"""kill -9 of the mount daemon, round after round: the long variant of
``tests/test_mount_crash.py``.

Each round mounts one store, checks everything earlier rounds were told,
runs three writer threads of the mixed workload (create, write in pieces,
fsync, append, rename, unlink: ``tests/crashing.py``) for a random moment
between 0.05 and 0.6 s, and kills the daemon with SIGKILL.  Printed at the
end: fsynced files verified after a kill, files lost (an fsync returned and
the bytes are not there), names resurrected (an unlink or rename returned
and the name is back), and ``cachefs fsck`` of the store.  Goal: 0 lost,
0 resurrected, fsck clean.  Exit status 1 otherwise.

Run from the repository root, as root (it mounts FUSE file systems)::

    .venv/bin/python scripts/kill_rounds.py                 # 1,000 rounds
    .venv/bin/python scripts/kill_rounds.py --rounds 50 --dir /var/tmp

Options: ``--rounds N`` (1000), ``--seed N`` (1), ``--dir DIR`` (where the
store and mount point go, default /dev/shm), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402

from tests.crashing import Rounds, check  # noqa: E402
from tests.mounting import CACHEFS, mounted  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cachefs-kill-", dir=args.dir))
    store, mountpoint = base / "store", base / "mnt"
    rounds = Rounds(store, mountpoint, args.seed)
    model = rounds.model
    began = time.monotonic()
    failure = None
    try:
        for number in range(args.rounds):
            rounds.round()
            if number % 50 == 49:
                print(
                    f"round {number + 1}: {model.verified} verified, {len(model.lost)} lost, "
                    f"{len(model.resurrected)} resurrected, {time.monotonic() - began:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
        with mounted(store, mountpoint):
            check(rounds.root, model)
    except (AssertionError, pytest.fail.Exception) as exc:  # a check, or a mount that failed
        failure = f"round {model.rounds}: {exc}"
    fsck = subprocess.run(
        [*CACHEFS, "fsck", str(store)], capture_output=True, text=True, check=False
    )
    result = {
        "rounds": model.rounds,
        "seconds": round(time.monotonic() - began, 1),
        "fsynced_files_verified": model.verified,
        "files_lost": len(model.lost),
        "names_resurrected": len(model.resurrected),
        "fsck_exit": fsck.returncode,
        "failure": failure,
        "lost": model.lost[:20],
        "resurrected": model.resurrected[:20],
    }
    print(
        f"{model.rounds} kill -9 rounds in {result['seconds']} s: "
        f"{model.verified} fsynced files verified, {len(model.lost)} lost, "
        f"{len(model.resurrected)} resurrected; fsck exit {fsck.returncode}"
    )
    if failure:
        print(f"FAILED: {failure}")
    for line in model.lost[:20] + model.resurrected[:20]:
        print(f"  {line}")
    if fsck.returncode:
        print(fsck.stdout + fsck.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ok = not (failure or model.lost or model.resurrected or fsck.returncode)
    if ok:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"the store is kept for a look: {store}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
