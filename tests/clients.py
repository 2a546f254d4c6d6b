"""Real build-cache clients for tests: ccache building a real C project, and Bazel with
``--disk_cache``, each pointed at a directory that a test chooses (in a mount or not).

ccache
    ``c_project(tmp_path)`` unpacks the upstream sources of a small Debian source package
    (zstd by default: ``make -C programs zstd``, 43 C files, about 30 s with ``make -j2``
    on 2 cores when ccache misses, 1-2 s when it hits; lz4 and Lua 5.4 are the
    others ``C_PROJECTS`` knows).  The tarball is fetched once per
    machine with ``apt-get source --download-only`` (a private apt configuration with
    deb-src entries made from the machine's own apt sources; the system's apt setup is
    not touched; the newest listed version whose files download) into SOURCE_CACHE,
    the directory scripts/bench_mount.py uses too, and reused offline afterwards.
    ``ccache_build(src, ccache_dir)`` runs a clean build with ``CC="ccache gcc"`` and
    returns ccache's counters for that build (``ccache -z`` before, ``ccache
    --print-stats`` after) and the digests of what it built.

Bazel
    ``bazel_build(workspace, disk_cache, output_root)`` builds the genrule-only workspace
    of tests/data/bazel (copy it first with ``bazel_workspace(tmp_path)``) offline, with
    Debian's bazel-bootstrap (Bazel 4.2.3), and returns the spawns that were cache hits
    (from ``--execution_log_json_file``) and the digests of the outputs.

Commands that fail fail the test (``pytest.fail``) with the tail of their output; a
fetch that fails skips it instead (fails it under CI).
``require_ccache()`` / ``require_bazel()`` skip a test when the tool is missing, and fail
it under CI (``CI`` set), where scripts/bootstrap.sh installs both.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

DATA = Path(__file__).resolve().parent / "data"
BAZEL_WORKSPACE = DATA / "bazel"
BAZEL_WORKSPACE_NAME = "cachefs_bazel"  # as in tests/data/bazel/WORKSPACE

#: Where upstream tarballs are kept between runs (shared with scripts/bench_mount.py).
SOURCE_CACHE = Path("/var/cache/cachefs-bench")

#: Seconds before a build (or a fetch) is taken as hung: under pytest-timeout's 300 s, so
#: a hang fails with the command's output.
BUILD_TIMEOUT = 240.0
FETCH_TIMEOUT = 240.0


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _attempt(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = BUILD_TIMEOUT,
) -> tuple[int | None, str]:
    """Run a command; its exit status (None if it did not finish in ``timeout``
    seconds) and its output (stdout and stderr)."""
    try:
        result = subprocess.run(
            cmd,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode()
        return None, out
    return result.returncode, result.stdout


def _run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = BUILD_TIMEOUT,
    unavailable: bool = False,
) -> str:
    """Run a command; return its output (stdout and stderr).  On error, fail the test;
    with ``unavailable``, skip it instead (but still fail it under CI)."""
    give_up = _unavailable if unavailable else pytest.fail
    status, out = _attempt(cmd, cwd=cwd, env=env, timeout=timeout)
    if status is None:
        give_up(f"{' '.join(cmd)} did not finish in {timeout:.0f}s:\n{out[-4000:]}")
    if status != 0:
        give_up(f"{' '.join(cmd)} exited {status}:\n{out[-4000:]}")
    return out


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, by path relative to it."""
    digests: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(root).as_posix()
                digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(digests.items()))


def combined_digest(digests: Mapping[str, str]) -> str:
    """One sha256 over a ``{path: digest}`` map (order independent)."""
    h = hashlib.sha256()
    for path, digest in sorted(digests.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


# --- sources of a real C project ------------------------------------------------------


@dataclass(frozen=True)
class CProject:
    package: str  # Debian source package
    tarball: str  # glob of its upstream tarball in SOURCE_CACHE / "src"
    subdir: str  # where make runs, relative to the top of the sources
    target: str  # the make target (a program in ``subdir``)


C_PROJECTS = {
    # 43 compiled C files (and one .S); about 30 s with make -j2 on 2 cores.
    "zstd": CProject("libzstd", "libzstd_*.orig.tar.*", "programs", "zstd"),
    # 9 C files; about 16 s.
    "lz4": CProject("lz4", "lz4_*.orig.tar.*", "programs", "lz4"),
    # 33 C files (liblua.a, then the interpreter); about 2.5 s, the build issue 15 names.
    "lua": CProject("lua5.4", "lua5.4_*.orig.tar.*", "src", "lua"),
}
DEFAULT_C_PROJECT = "zstd"

_DEB_LINE = re.compile(
    r"^deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s*(?P<comps>.*)$"
)


def apt_sources() -> str:
    """deb-src entries (deb822) made from the machine's own ``deb`` apt sources."""
    stanzas: list[str] = []
    parts = Path("/etc/apt/sources.list.d")
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            lines = [ln for ln in stanza.splitlines() if ln.strip() and not ln.startswith("#")]
            fields = dict(ln.split(":", 1) for ln in lines if ":" in ln and ln[0] != " ")
            enabled = fields.get("Enabled", "yes").strip().lower() != "no"
            if enabled and "deb" in fields.get("Types", "").split():
                body = [f"{k}:{v}" for k, v in fields.items() if k not in ("Types", "Enabled")]
                stanzas.append("\n".join(["Types: deb-src", *body]))
    lists = sorted(parts.glob("*.list")) if parts.is_dir() else []
    for path in [Path("/etc/apt/sources.list"), *lists]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = _DEB_LINE.match(line.strip())
            if m is None:
                continue
            opts = dict(o.split("=", 1) for o in (m["opts"] or "").split() if "=" in o)
            entry = ["Types: deb-src", f"URIs: {m['uri']}", f"Suites: {m['suite']}"]
            entry.append(f"Components: {m['comps']}")
            if "signed-by" in opts:
                entry.append(f"Signed-By: {opts['signed-by']}")
            stanzas.append("\n".join(entry))
    return "\n\n".join(stanzas) + "\n"


def fetch_source(package: str, dest: Path, cache: Path = SOURCE_CACHE) -> None:
    """``apt-get source --download-only PACKAGE=VERSION`` into ``dest``, with a private
    apt configuration under ``cache / "apt"``.

    The versions that ``apt-cache showsrc`` lists are tried newest first until one
    downloads: a mirror may list a candidate whose files it no longer serves (a
    security update's sources answering 404 while the release's are there)."""
    if shutil.which("apt-get") is None:
        _unavailable(f"no apt-get to fetch the {package} sources with")
    apt = cache / "apt"
    for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list.d" / "deb-src.sources").write_text(apt_sources())
    (apt / "sources.list").write_text("")
    options = [
        f"-oDir::Etc::SourceList={apt / 'sources.list'}",
        f"-oDir::Etc::SourceParts={apt / 'sources.list.d'}",
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
        "-qq",
    ]
    _run(["apt-get", *options, "update"], timeout=FETCH_TIMEOUT, unavailable=True)
    listed = _run(
        ["apt-cache", *options, "showsrc", package], timeout=FETCH_TIMEOUT, unavailable=True
    )
    versions = newest_first({m[1] for m in re.finditer(r"^Version:\s*(\S+)", listed, re.MULTILINE)})
    if not versions:
        _unavailable(f"apt-cache showsrc lists no version of {package}")
    dest.mkdir(parents=True, exist_ok=True)
    failures = []
    for version in versions:
        command = ["apt-get", *options, "source", "--download-only", f"{package}={version}"]
        status, out = _attempt(command, cwd=dest, timeout=FETCH_TIMEOUT)
        if status == 0:
            return
        why = f"no answer in {FETCH_TIMEOUT:.0f}s" if status is None else out.strip()[-1000:]
        failures.append(f"{package}={version}: {why}")
    _unavailable("no listed version of the sources downloads:\n" + "\n".join(failures))


def newest_first(versions: set[str]) -> list[str]:
    """Debian version strings, newest first (``dpkg --compare-versions`` decides)."""

    def compare(a: str, b: str) -> int:
        if a == b:
            return 0
        newer = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False)
        return 1 if newer.returncode == 0 else -1

    return sorted(versions, key=functools.cmp_to_key(compare), reverse=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (so parallel test processes fetch once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def source_tarball(name: str = DEFAULT_C_PROJECT, cache: Path = SOURCE_CACHE) -> Path:
    """The upstream tarball of C_PROJECTS[name], fetched on first use."""
    spec = C_PROJECTS[name]
    src_dir = cache / "src"

    def found() -> list[Path]:
        paths = sorted(src_dir.glob(spec.tarball)) if src_dir.is_dir() else []
        return [p for p in paths if not p.name.endswith(".asc")]

    if not found():
        with _locked(cache / "fetch.lock"):
            if not found():
                fetch_source(spec.package, src_dir, cache)
    tarballs = found()
    if not tarballs:
        pytest.fail(f"no {spec.tarball} in {src_dir} after apt-get source {spec.package}")
    return tarballs[-1]


def c_project(tmp_path: Path, name: str = DEFAULT_C_PROJECT) -> Path:
    """Fresh sources of C_PROJECTS[name] unpacked in ``tmp_path`` (a new directory in it
    on every call); returns the top directory of the sources."""
    tarball = source_tarball(name)
    dest = tmp_path / f"src-{name}"
    for n in range(1, 1000):
        if not dest.exists():
            break
        dest = tmp_path / f"src-{name}-{n}"
    dest.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    (top,) = list(dest.iterdir())
    return top


# --- ccache ---------------------------------------------------------------------------


def ccache_available() -> bool:
    return shutil.which("ccache") is not None and shutil.which("gcc") is not None


def require_ccache() -> None:
    if not ccache_available():
        _unavailable("ccache (and gcc) are not installed")


@dataclass(frozen=True)
class CcacheBuild:
    hits: int  # compilations served from the cache (direct + preprocessed)
    misses: int  # compilations that ran the compiler and stored the result
    stats: dict[str, int]  # the counters this build bumped (ccache's stats log)
    outputs: dict[str, str]  # sha256 of the built program and objects, by relative path
    seconds: float  # wall clock of the build (make only)
    log: str  # make's output

    @property
    def checksum(self) -> str:
        return combined_digest(self.outputs)

    @property
    def errors(self) -> dict[str, int]:
        """Counters that mean ccache failed at something (all zero when it worked)."""
        bad = (
            "internal_error",
            "bad_output_file",
            "missing_cache_file",
            "remote_storage_error",
            "error_hashing_extra_file",
            "could_not_find_compiler",
        )
        return {k: self.stats[k] for k in bad if self.stats.get(k)}


def ccache_env(ccache_dir: Path, src: Path | None = None) -> dict[str, str]:
    """The environment for ccache with its cache in ``ccache_dir``: no size limit in
    practice (100G), no CCACHE_* variable of the caller's, and paths under ``src`` hashed
    relative to it (so the same sources unpacked elsewhere still hit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCACHE_")}
    env.update(
        CCACHE_DIR=str(ccache_dir),
        CCACHE_MAXSIZE="100G",
        CCACHE_MAXFILES="0",
        LC_ALL="C",
    )
    if src is not None:
        env["CCACHE_BASEDIR"] = str(src)
    return env


def ccache_log_stats(log: Path) -> dict[str, int]:
    """Counters from a ccache stats log (``CCACHE_STATSLOG``): one ``# SOURCE``
    line per compilation, then the names of the counters it bumped.

    The log, unlike ccache's own ``stats`` files, lives outside the cache
    directory: a cache directory with a budget may evict those like any file."""
    stats: Counter[str] = Counter()
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if line and not line.startswith("#"):
                stats[line.strip()] += 1
    return dict(stats)


def ccache_build(
    src: Path,
    ccache_dir: Path,
    *,
    name: str = DEFAULT_C_PROJECT,
    jobs: int = 2,
    env: Mapping[str, str] | None = None,
    timeout: float = BUILD_TIMEOUT,
) -> CcacheBuild:
    """A clean build of C_PROJECTS[name] in ``src`` (from ``c_project``) with
    ``CC="ccache gcc"`` and the cache in ``ccache_dir`` (created if missing).

    ``make clean`` runs first, and the counts come from a stats log of this build
    alone.  ``env`` adds to (or overrides) the environment."""
    spec = C_PROJECTS[name]
    ccache_dir.mkdir(parents=True, exist_ok=True)
    full_env = ccache_env(ccache_dir, src)
    if env is not None:
        full_env.update(env)
    workdir = src / spec.subdir
    stats_log = src.parent / f"ccache-stats-{time.time_ns()}.log"
    full_env["CCACHE_STATSLOG"] = str(stats_log)
    _run(["make", "clean"], cwd=workdir, env=full_env, timeout=timeout)
    start = time.monotonic()
    log = _run(
        ["make", f"-j{jobs}", spec.target, "CC=ccache gcc"],
        cwd=workdir,
        env=full_env,
        timeout=timeout,
    )
    seconds = time.monotonic() - start
    stats = ccache_log_stats(stats_log)
    outputs = {
        k: v for k, v in tree_digests(workdir).items() if k == spec.target or k.endswith(".o")
    }
    if spec.target not in outputs:
        pytest.fail(f"make {spec.target} did not produce {workdir / spec.target}:\n{log}")
    return CcacheBuild(
        hits=stats.get("direct_cache_hit", 0) + stats.get("preprocessed_cache_hit", 0),
        misses=stats.get("cache_miss", 0),
        stats=stats,
        outputs=outputs,
        seconds=seconds,
        log=log,
    )


def smoke_test(src: Path, name: str = DEFAULT_C_PROJECT) -> None:
    """Run the built compressor: a round trip of a few hundred KB must give them back."""
    spec = C_PROJECTS[name]
    program = src / spec.subdir / spec.target
    data = b"".join(p.read_bytes() for p in sorted((src / spec.subdir).glob("*.c")))
    packed = subprocess.run(
        [str(program), "-q", "-c"], input=data, capture_output=True, check=True, timeout=60
    ).stdout
    unpacked = subprocess.run(
        [str(program), "-q", "-d", "-c"], input=packed, capture_output=True, check=True, timeout=60
    ).stdout
    assert len(packed) < len(data), f"{program} did not compress"
    assert unpacked == data, f"{program} did not give back what it compressed"


# --- Bazel ----------------------------------------------------------------------------

#: Startup options.  The system bazelrc (/etc/bazel/bazelrc of bazel-bootstrap) is kept:
#: it points --install_base at /usr/share/bazel, without which Bazel cannot start.
BAZEL_STARTUP = ("--batch", "--nohome_rc", "--noworkspace_rc")

#: Build options: offline, no sandbox (spawns run as plain local processes), a fixed
#: PATH in the actions (so the action keys do not depend on the caller's PATH), no
#: bazel-* symlinks in the workspace, quiet.
BAZEL_BUILD = (
    "--spawn_strategy=local",
    "--incompatible_strict_action_env",
    "--symlink_prefix=/",
    "--noshow_progress",
    "--color=no",
    "--curses=no",
    "--show_timestamps=no",
)


def bazel_available() -> bool:
    return shutil.which("bazel") is not None


def require_bazel() -> None:
    if not bazel_available():
        _unavailable("bazel is not installed (Debian: bazel-bootstrap)")


def bazel_workspace(tmp_path: Path) -> Path:
    """A copy of tests/data/bazel in ``tmp_path`` (Bazel must not write in the source
    tree)."""
    dest = tmp_path / "bazel-ws"
    shutil.copytree(BAZEL_WORKSPACE, dest)
    return dest


@dataclass(frozen=True)
class BazelBuild:
    spawns: int  # actions that ran a process (or would have): every genrule
    hits: int  # spawns served from the disk cache
    summary: dict[str, int]  # "INFO: N processes: ..." as {"remote cache hit": 33, ...}
    outputs: dict[str, str]  # sha256 of every output under bazel-bin, by relative path
    seconds: float  # wall clock of the whole `bazel build` (JVM start included)
    log: str  # Bazel's output

    @property
    def executed(self) -> int:
        return self.spawns - self.hits

    @property
    def checksum(self) -> str:
        return combined_digest(self.outputs)


def _bazel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("USE_BAZEL_VERSION", None)
    env["LC_ALL"] = "C.UTF-8"
    return env


def _jvm_tmp(output_root: Path) -> str:
    """A startup option giving Bazel's JVM a temporary directory under ``output_root``:
    Bazel 4 writes the raw log behind ``--execution_log_json_file`` to ``java.io.tmpdir``
    (``/tmp/exec*.log``) and leaves it there."""
    tmp = output_root / "jvm-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return f"--host_jvm_args=-Djava.io.tmpdir={tmp}"


def bazel_clean(
    workspace: Path,
    output_root: Path,
    *,
    timeout: float = BUILD_TIMEOUT,
    startup: tuple[str, ...] = (),
) -> None:
    """``bazel clean``: the outputs and the local action cache go; the disk cache stays."""
    _run(
        [
            "bazel",
            *BAZEL_STARTUP,
            *startup,
            _jvm_tmp(output_root),
            f"--output_user_root={output_root}",
            "clean",
        ],
        cwd=workspace,
        env=_bazel_env(),
        timeout=timeout,
    )


def _spawns(log_file: Path) -> list[dict[str, object]]:
    """The spawns of an --execution_log_json_file (concatenated JSON objects)."""
    text = log_file.read_text()
    decoder = json.JSONDecoder()
    spawns: list[dict[str, object]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return spawns
        obj, pos = decoder.raw_decode(text, pos)
        spawns.append(obj)


def _bazel_bin(output_root: Path) -> Path:
    bins = sorted(output_root.glob(f"*/execroot/{BAZEL_WORKSPACE_NAME}/bazel-out/*-fastbuild/bin"))
    if len(bins) != 1:
        pytest.fail(f"expected one bazel-bin under {output_root}, found {bins}")
    return bins[0]


def bazel_build(
    workspace: Path,
    disk_cache: Path | None,
    output_root: Path,
    *,
    clean: bool = False,
    targets: tuple[str, ...] = ("//...",),
    extra: tuple[str, ...] = (),
    timeout: float = BUILD_TIMEOUT,
    startup: tuple[str, ...] = (),
) -> BazelBuild:
    """``bazel build //...`` of ``workspace`` (from ``bazel_workspace``) with
    ``--disk_cache=disk_cache`` (or none: a remote cache in ``extra``) and its
    outputs under ``output_root``.

    A fresh ``output_root`` makes a clean build; ``clean`` runs ``bazel clean`` first
    (a second JVM start, about 3 s).  Hits are counted from the execution log: a spawn
    whose ``remoteCacheHit`` is true came from the disk cache (Bazel 4 calls the disk
    cache a remote cache; its summary line says "N remote cache hit")."""
    if clean and output_root.exists():
        bazel_clean(workspace, output_root, timeout=timeout, startup=startup)
    output_root.mkdir(parents=True, exist_ok=True)
    exec_log = output_root / f"exec-{time.time_ns()}.json"
    cmd = [
        "bazel",
        *BAZEL_STARTUP,
        *startup,
        _jvm_tmp(output_root),
        f"--output_user_root={output_root}",
        "build",
        *BAZEL_BUILD,
        *([] if disk_cache is None else [f"--disk_cache={disk_cache}"]),
        f"--execution_log_json_file={exec_log}",
        *extra,
        *targets,
    ]
    start = time.monotonic()
    log = _run(cmd, cwd=workspace, env=_bazel_env(), timeout=timeout)
    seconds = time.monotonic() - start
    spawns = _spawns(exec_log)
    summary: dict[str, int] = {}
    m = re.search(r"INFO: \d+ process(?:es)?: (.*?)\.?$", log, re.MULTILINE)
    if m is not None:
        for part in m.group(1).split(","):
            count, _, kind = part.strip().partition(" ")
            if count.isdigit():
                summary[kind] = int(count)
    return BazelBuild(
        spawns=len(spawns),
        hits=sum(1 for s in spawns if s.get("remoteCacheHit") is True),
        summary=summary,
        outputs=tree_digests(_bazel_bin(output_root)),
        seconds=seconds,
        log=log,
    )


def disk_cache_files(disk_cache: Path) -> dict[str, tuple[int, int]]:
    """``{"ac": (files, bytes), "cas": (files, bytes)}`` of a Bazel disk cache."""
    counts: dict[str, tuple[int, int]] = {}
    for sub in ("ac", "cas"):
        files = size = 0
        for dirpath, _dirs, names in os.walk(disk_cache / sub):
            for name in names:
                files += 1
                size += (Path(dirpath) / name).stat().st_size
        counts[sub] = (files, size)
    return counts
