#!/usr/bin/env bash
# The long variants of the suite's tests (marked `slow`, left out of the suite
# that CI runs): a 60-round kill -9 loop of the engine, a 64 GiB sparse file
# copied through a mount (about two minutes each on 2 cores).
#
#     scripts/slow_tests.sh                      # every slow test
#     scripts/slow_tests.sh tests/test_crash.py  # some (pytest arguments)
set -euo pipefail
cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
exec .venv/bin/python -m pytest -p no:cacheprovider -m slow "$@"
