"""Ordinary tools inside a real mount (kernel FUSE): git, tar, cp -a, rsync.

These are the programs build scripts run every day; each test drives one of
them over a tree and checks the result against the same tree on the native
file system.  A missing tool skips its test, except under ``CI=true``, where
it fails (CI must have them: see scripts/bootstrap.sh).
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount, mounted

ROOT = Path(__file__).resolve().parent.parent
#: Fixed timestamps (with nanoseconds) that cp -a and rsync -a must carry over.
T0 = 1_600_000_000_123_456_789


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI needs it: see scripts/bootstrap.sh)")
        pytest.skip(f"{name} is not installed")
    return path


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a tool; fail the test with its output if it fails."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def diff_clean(a: Path, b: Path) -> None:
    """``diff -r`` (and ``--no-dereference`` where diff has it) finds no difference.

    Plain ``diff -r`` follows symlinks, so it cannot open the dangling one:
    it skips that name, which ``--no-dereference`` then compares as a link."""
    run("diff", "-r", "--exclude=dangling", a, b)
    if "--no-dereference" in run("diff", "--help"):
        run("diff", "-r", "--no-dereference", a, b)


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("tools")
    with mounted(base / "store", base / "mnt") as m:
        yield m


@pytest.fixture
def d(mount: Mount, request: pytest.FixtureRequest) -> Path:
    name: str = request.node.name
    path = mount.path / name
    path.mkdir()
    return path


def ignore_caches(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", ".pytest_cache", ".mypy_cache")]


def make_tree(root: Path) -> Path:
    """A small tree with what cp -a, tar and rsync must carry over: modes, mtimes
    with nanoseconds, symlinks (relative, absolute, dangling, to a directory),
    hard links (in one directory and across directories), empty files, a file of
    several chunks, nested directories with their own modes and mtimes."""
    rng = random.Random(7)
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a.txt").write_text("hello\n" * 1000)
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(rng.randbytes(3 << 20) + b"tail" * 100_000)
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "private").write_bytes(rng.randbytes(10_000))
    (root / "sub" / "deeper" / "x.c").write_text("int main(void) { return 0; }\n")
    # Hard links: a pair in one directory, and one reaching into another directory.
    (root / "linked").write_bytes(rng.randbytes(70_000))
    os.link(root / "linked", root / "linked-too")
    os.link(root / "a.txt", root / "sub" / "deeper" / "a-hardlink.txt")
    # Symlinks.
    os.symlink("a.txt", root / "rel-link")
    os.symlink("../a.txt", root / "sub" / "up-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("sub/deeper", root / "dir-link")
    os.symlink(str(root / "a.txt"), root / "abs-link")
    # Modes.
    (root / "script.sh").chmod(0o755)
    (root / "sub" / "private").chmod(0o600)
    (root / "a.txt").chmod(0o640)
    (root / "empty-dir").chmod(0o700)
    # Times last, deepest first, so that no later change touches them.
    paths = [*sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True), root]
    for i, path in enumerate(paths):
        t = T0 + i * 1_000_000_007
        os.utime(path, ns=(t, t), follow_symlinks=False)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What cp -a / rsync -a preserve, per relative path (inode numbers aside)."""
    out: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = str(path.relative_to(root))
        kind = stat.S_IFMT(st.st_mode)
        what: object
        if stat.S_ISLNK(st.st_mode):
            what = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = path.read_bytes()
        else:
            what = None
        # Directory mtimes are set by cp/rsync after filling them; symlink
        # times too (utimensat AT_SYMLINK_NOFOLLOW).
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, what)
    return out


def hard_link_groups(root: Path) -> set[frozenset[str]]:
    """Sets of relative paths that share an inode (only those of two or more)."""
    groups: dict[int, set[str]] = {}
    for path in root.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            groups.setdefault(st.st_ino, set()).add(str(path.relative_to(root)))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


EXPECTED_LINKS = {
    frozenset({"linked", "linked-too"}),
    frozenset({"a.txt", "sub/deeper/a-hardlink.txt"}),
}


def check_links(root: Path) -> None:
    assert hard_link_groups(root) == EXPECTED_LINKS
    for group in EXPECTED_LINKS:
        for rel in group:
            assert (root / rel).lstat().st_nlink == 2, rel


# --- git ---------------------------------------------------------------------------------


def test_git_init_add_commit_fsck_log(d: Path, tmp_path: Path) -> None:
    require_tool("git")
    repo = d / "repo"
    shutil.copytree(ROOT / "cachefs", repo / "cachefs", ignore=ignore_caches)
    shutil.copytree(ROOT / "tests", repo / "tests", ignore=ignore_caches)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),  # no user configuration
        "GIT_CONFIG_NOSYSTEM": "1",
        "LC_ALL": "C",
    }
    identity = ["-c", "user.name=Cachefs Test", "-c", "user.email=test@cachefs.invalid"]

    def git(*args: str) -> str:
        return run("git", *identity, *args, cwd=repo, env=env)

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    files = sorted(git("ls-files").splitlines())
    expected = sorted(
        str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts
    )
    assert files == expected
    # A second commit that modifies, removes and renames.
    (repo / "cachefs" / "__init__.py").write_text("# changed in the mount\n")
    git("rm", "-q", "tests/mounting.py")
    git("mv", "cachefs/fuse.py", "cachefs/adapter.py")
    git("commit", "-q", "-a", "-m", "second")
    assert git("status", "--porcelain") == ""
    git("fsck", "--full", "--strict", "--no-progress")
    log = git("log", "--format=%s").split()
    assert log == ["second", "first"]
    # Packing rewrites every object into a pack (mmap'd reads, renames); all still sound.
    git("gc", "-q", "--aggressive", "--prune=now")
    git("fsck", "--full", "--strict", "--no-progress")
    assert git("log", "--format=%s").split() == ["second", "first"]
    # A clone out of the mount checks out the same tree as the working copy.
    clone = tmp_path / "clone"
    run("git", "clone", "-q", repo, clone, env=env)
    run("diff", "-r", "--exclude=.git", repo, clone)


# --- tar -----------------------------------------------------------------------------------


def test_tar_create_and_extract_round_trip(d: Path, tmp_path: Path) -> None:
    require_tool("tar")
    src = make_tree(tmp_path / "src")
    archive = d / "tree.tar"
    # pax format: it keeps mtimes to the nanosecond (the gnu format has seconds).
    run("tar", "--format=pax", "-C", src, "-cf", archive, ".")
    # The archive in the mount equals one written natively (same member order
    # and metadata): compare the listings, then extract inside the mount.
    native = tmp_path / "native.tar"
    run("tar", "--format=pax", "-C", src, "-cf", native, ".")
    assert run("tar", "-tvf", archive) == run("tar", "-tvf", native)
    out = d / "extracted"
    out.mkdir()
    run("tar", "-C", out, "-xpf", archive)
    diff_clean(src, out)
    assert snapshot(out) | {".": None} == snapshot(src) | {".": None}
    check_links(out)
    # And a compressed archive read back through a pipe.
    require_tool("gzip")
    run("tar", "--format=pax", "-C", out, "-czf", d / "tree.tgz", ".")
    again = tmp_path / "again"
    again.mkdir()
    run("tar", "-C", again, "-xzpf", d / "tree.tgz")
    diff_clean(src, again)


# --- cp -a ---------------------------------------------------------------------------------


def test_cp_a_preserves_links_modes_times(d: Path, tmp_path: Path) -> None:
    require_tool("cp")
    src = make_tree(tmp_path / "src")
    dst = d / "copy"
    run("cp", "-a", src, dst)
    assert snapshot(dst) == snapshot(src)
    check_links(dst)
    assert os.readlink(dst / "dangling") == "/nonexistent/target"
    assert (dst / "dir-link" / "x.c").read_text() == "int main(void) { return 0; }\n"
    diff_clean(src, dst)
    # And back out again: the mount as the source of cp -a.
    back = tmp_path / "back"
    run("cp", "-a", dst, back)
    assert snapshot(back) == snapshot(src)
    check_links(back)


# --- rsync -----------------------------------------------------------------------------------


def test_rsync_into_and_out_of_the_mount(d: Path, tmp_path: Path) -> None:
    require_tool("rsync")
    src = make_tree(tmp_path / "src")
    inside = d / "tree"
    # Into the mount: rsync writes temporary files and renames them into place.
    run("rsync", "-aH", f"{src}/", f"{inside}/")
    assert snapshot(inside) == snapshot(src)
    check_links(inside)
    # A second run finds nothing to do, even comparing contents (-c): sizes,
    # modes and mtimes are exactly what rsync set.
    changes = run("rsync", "-aHc", "--dry-run", "--itemize-changes", f"{src}/", f"{inside}/")
    assert changes == ""
    # Out of the mount into a native directory.
    out = tmp_path / "out"
    run("rsync", "-aH", f"{inside}/", f"{out}/")
    diff_clean(src, out)
    diff_clean(inside, out)
    assert snapshot(out) == snapshot(src)
    check_links(out)
    # An update in the mount travels too (delta transfer against the old copy).
    with open(inside / "big.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed in the middle")
    run("rsync", "-aH", "--no-whole-file", f"{inside}/", f"{out}/")
    assert (out / "big.bin").read_bytes() == (inside / "big.bin").read_bytes()
    diff_clean(inside, out)
