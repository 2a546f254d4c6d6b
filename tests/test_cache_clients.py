"""Real build caches in cache directories of a mount: ccache and Bazel's disk
cache, with their own limits far above the directory's budget, so that cachefs
does the eviction.  The second builds hit, the results are right, the budget
holds (``tests/clients.py`` has the recipes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tests import clients
from tests.mounting import apparent_size, live_stats, mounted

MIB = 1 << 20


def cache_figures(mnt: Path) -> dict[str, Any]:
    [cache] = live_stats(mnt)["caches"]
    return dict(cache)


def files_size(directory: Path) -> int:
    return sum(
        (Path(root) / name).stat().st_size
        for root, _, names in os.walk(directory)
        for name in names
    )


def test_ccache_in_a_cache_directory(tmp_path: Path) -> None:
    clients.require_ccache()
    src = clients.c_project(tmp_path)
    # Holds the cache of one build with debug information (about 3 MB, and up
    # to 4 MB while ccache's temporary files exist), not two.
    budget = 5 * MIB
    with mounted(tmp_path / "store", tmp_path / "mnt") as mount:
        ccache_dir = mount.path / "ccache"
        ccache_dir.mkdir()
        os.setxattr(ccache_dir, "user.cachefs.cache", f"max_size={budget} policy=lru".encode())
        flags = {"CFLAGS": "-O1 -g"}
        first = clients.ccache_build(src, ccache_dir, env=flags)
        assert first.misses > 30 and first.hits == 0 and not first.errors
        clients.smoke_test(src)
        second = clients.ccache_build(src, ccache_dir, env=flags)
        assert second.hits == first.misses and second.misses == 0 and not second.errors
        assert second.outputs == first.outputs
        figures = cache_figures(mount.path)
        assert figures["hits"] > 0 and figures["evictions"] == 0
        # Other flags: the two builds' caches do not fit together.
        other = {"CFLAGS": "-O2 -g"}
        third = clients.ccache_build(src, ccache_dir, env=other)
        assert third.misses == first.misses and not third.errors
        clients.smoke_test(src)
        figures = cache_figures(mount.path)
        assert figures["evictions"] > 0
        assert figures["bytes"] == files_size(ccache_dir) <= budget
        assert apparent_size(ccache_dir) <= budget + 300 * 4096  # its directories count too
        # The newest build's results stayed: it hits again, with the same output.
        fourth = clients.ccache_build(src, ccache_dir, env=other)
        assert fourth.hits == first.misses and not fourth.errors
        assert fourth.outputs == third.outputs
        assert cache_figures(mount.path)["bytes"] <= budget


def test_bazel_disk_cache_in_a_cache_directory(tmp_path: Path) -> None:
    clients.require_bazel()
    workspace = clients.bazel_workspace(tmp_path)
    budget = 64 * MIB  # one build's disk cache (about 46 MB), not two
    with mounted(tmp_path / "store", tmp_path / "mnt") as mount:
        disk_cache = mount.path / "bazel"
        disk_cache.mkdir()
        os.setxattr(disk_cache, "user.cachefs.cache", f"max_size={budget} policy=arc".encode())
        first = clients.bazel_build(workspace, disk_cache, tmp_path / "out")
        assert first.hits == 0 and first.spawns == 33
        second = clients.bazel_build(workspace, disk_cache, tmp_path / "out", clean=True)
        assert second.hits == second.spawns == 33
        assert second.outputs == first.outputs
        # A changed workspace: every output differs, the disk cache outgrows the budget.
        variant = tmp_path / "variant"
        shutil.copytree(workspace, variant, symlinks=True)
        defs = variant / "defs.bzl"
        defs.write_text(defs.read_text().replace("row %%.0f of", "line %%.0f of"))
        third = clients.bazel_build(variant, disk_cache, tmp_path / "out-variant")
        assert third.spawns == 33 and third.hits < 33
        assert third.outputs != first.outputs
        figures = cache_figures(mount.path)
        assert figures["evictions"] > 0
        assert figures["bytes"] == files_size(disk_cache) <= budget
        # Neither build's blobs all fit: each rebuild is served partly from the
        # cache, Bazel runs the actions whose blobs went, the outputs are right.
        fourth = clients.bazel_build(variant, disk_cache, tmp_path / "out-variant", clean=True)
        assert fourth.hits > 0 and fourth.spawns == 33
        assert fourth.outputs == third.outputs
        again = clients.bazel_build(workspace, disk_cache, tmp_path / "out", clean=True)
        assert again.hits > 0 and again.outputs == first.outputs
        assert cache_figures(mount.path)["bytes"] <= budget
