#!/usr/bin/env bash
# Line and branch coverage of the whole test suite, the processes it starts
# (mount daemons, `cachefs serve`, the CLI) included: coverage.py measures
# every Python subprocess (`patch = subprocess` in pyproject.toml) and the
# data files are combined at the end.  Processes killed with SIGKILL (the
# crash suites kill daemons on purpose) leave no data: their lines count as
# run only if another process ran them.
#
#     scripts/coverage.sh                  # the whole suite
#     scripts/coverage.sh tests/test_x.py  # some tests (pytest arguments)
#
# Prints the report of cachefs/format/ and a summary line for the package;
# HTML in .coverage-data/html/.
set -euo pipefail
cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
rm -rf .coverage-data
mkdir -p .coverage-data
export COVERAGE_RCFILE="$PWD/pyproject.toml"
status=0
"$PY" -m coverage run -m pytest -p no:cacheprovider "$@" || status=$?
"$PY" -m coverage combine -q
"$PY" -m coverage html -q -d .coverage-data/html
echo "--- cachefs/format/ ---"
"$PY" -m coverage report --include='cachefs/format/*' --show-missing
package=$("$PY" -m coverage report --format=total)
format=$("$PY" -m coverage report --include='cachefs/format/*' --format=total)
echo "coverage: cachefs ${package}%, cachefs/format ${format}% (lines and branches; tests exited ${status})"
exit "$status"
