"""The command line, as users and scripts run it: the installed ``cachefs`` script."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import blake3
import click
import pytest
import zstandard

from cachefs.cli import COMMANDS, SUMMARIES
from cachefs.engine import Store
from cachefs.format.digest import Digest
from cachefs.format.header import HEADER_NAME
from cachefs.format.segment import RECORD_HEADER, segment_path
from tests.conftest import compressible

CACHEFS = Path(sys.executable).parent / "cachefs"
LINE = re.compile(r"^([0-9a-f]{64})/([0-9]+)  (.+)$")


def cachefs(*args: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(CACHEFS), *map(str, args)], capture_output=True, timeout=120, check=False
    )


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int) -> str:
    """Exit ``code``, nothing on stdout, one ``cachefs: error:`` line on stderr."""
    assert result.returncode == code, (result.returncode, err(result))
    assert result.stdout == b""
    text = err(result)
    assert "Traceback" not in text
    assert text.count("\n") == 1 and text.startswith("cachefs: error: "), text
    return text


def assert_usage_error(result: subprocess.CompletedProcess[bytes]) -> None:
    """click's own usage errors: exit 2, a usage hint and an ``Error:`` line."""
    assert result.returncode == 2, (result.returncode, err(result))
    assert result.stdout == b""
    assert "Error: " in err(result) and "Traceback" not in err(result)


def cat(store: Path, digest: str) -> bytes:
    result = cachefs("cat", store, digest)
    assert result.returncode == 0, err(result)
    assert result.stderr == b""
    return result.stdout


def sha256_line(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()}/{len(data)}"


def put_lines(result: subprocess.CompletedProcess[bytes]) -> list[tuple[str, Path]]:
    lines = []
    for line in out(result).splitlines():
        match = LINE.match(line)
        assert match, line
        lines.append((f"{match[1]}/{match[2]}", Path(match[3])))
    return lines


@pytest.fixture
def tree(tmp_path: Path) -> dict[Path, bytes]:
    """Files under tmp_path/tree (created out of order), plus a symlink to skip."""
    root = tmp_path / "tree"
    files = {
        root / "sub" / "deeper" / "e.bin": random.Random(1).randbytes(300_000),
        root / "b.bin": random.Random(2).randbytes(70_000),
        root / "sub" / "c.txt": compressible(20_000, 3),
        root / "empty": b"",
        root / "a.txt": compressible(5_000, 4),
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "link").symlink_to(root / "a.txt")
    return files


def snapshot(path: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``path``: mtime and content hash."""
    return {
        str(p.relative_to(path)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def flip_byte_of(store_path: Path, digest: str) -> None:
    """Damage the payload of the first chunk of an object in its segment file."""
    with Store.open(store_path, readonly=True) as store:
        chunk, _ = store.recipe(Digest.parse(digest))[0]
        with store.index.read() as txn:
            entry = store.index.get_chunk(txn, chunk)
            assert entry is not None
            seg = store.index.get_segment(txn, entry.segment_id)
            assert seg is not None
        path = segment_path(store.segments_root, seg.shard, entry.segment_id, store.config.segments)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER.size + entry.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x20]))


# --- put and cat ---------------------------------------------------------------------


def test_put_prints_a_digest_line_per_file(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    single = tmp_path / "single.txt"
    single.write_bytes(b"one file named on its own\n")
    result = cachefs("put", store, single, tmp_path / "tree")
    assert result.returncode == 0, err(result)
    assert err(result) == ""
    assert (store / HEADER_NAME).exists()  # created
    expected = [single, *sorted(tree)]  # the named file, then the tree in sorted order
    assert [path for _, path in put_lines(result)] == expected
    for digest, path in put_lines(result):
        data = single.read_bytes() if path == single else tree[path]
        assert digest == sha256_line(data)
    assert out(result).endswith("\n")

    # Putting again adds references and prints the same lines.
    again = cachefs("put", store, single, tmp_path / "tree")
    assert again.returncode == 0 and again.stdout == result.stdout
    stats = json.loads(out(cachefs("stats", store, "--json")))
    assert stats["files"] == 2 * len(expected) and stats["objects"] == len(expected)


def test_put_of_a_missing_file_stores_the_rest_and_fails(
    tmp_path: Path, tree: dict[Path, bytes]
) -> None:
    store = tmp_path / "store"
    result = cachefs("put", store, tmp_path / "no-such-file", tmp_path / "tree" / "a.txt")
    assert result.returncode == 3
    assert "Traceback" not in err(result) and "no-such-file" in err(result)
    assert put_lines(result) == [
        (sha256_line(tree[tmp_path / "tree" / "a.txt"]), tmp_path / "tree" / "a.txt")
    ]
    # Nothing to put at all (a mistyped path): no store is made for it.
    elsewhere = tmp_path / "new-store"
    result = cachefs("put", elsewhere, tmp_path / "no-such-file", tmp_path / "nor-this")
    assert result.returncode == 3 and err(result).count("No such file or directory") == 2
    assert not elsewhere.exists()
    # A path that cannot even be looked at is an error of its own; the rest go in.
    result = cachefs("put", store, tmp_path / ("x" * 300), tmp_path / "tree" / "a.txt")
    assert result.returncode == 1 and "File name too long" in err(result)
    assert [path for _, path in put_lines(result)] == [tmp_path / "tree" / "a.txt"]


def test_cat_writes_exactly_the_object(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    result = cachefs("put", store, tmp_path / "tree")
    assert result.returncode == 0
    for digest, path in put_lines(result):
        assert cat(store, digest) == path.read_bytes() == tree[path]


def test_cat_of_a_missing_object_exits_3(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    assert cachefs("put", store, tmp_path / "tree").returncode == 0
    missing = sha256_line(b"never stored")
    text = assert_one_line_error(cachefs("cat", store, missing), 3)
    assert missing in text
    # Right hash, wrong size: not the same object.
    digest = sha256_line(tree[tmp_path / "tree" / "a.txt"]).split("/")[0] + "/1"
    assert_one_line_error(cachefs("cat", store, digest), 3)


@pytest.mark.parametrize(
    "digest", ["nothex", "abc/12", "0" * 64, "0" * 63 + "/5", "0" * 64 + "/-1", "g" * 64 + "/1"]
)
def test_cat_of_a_malformed_digest_exits_2(tmp_path: Path, digest: str) -> None:
    store = tmp_path / "store"
    assert cachefs("init", store).returncode == 0
    assert_one_line_error(cachefs("cat", store, digest), 2)


def test_cat_of_a_damaged_object_writes_nothing(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    result = cachefs("put", store, tmp_path / "tree")
    digests = dict((path, digest) for digest, path in put_lines(result))
    damaged = digests[tmp_path / "tree" / "b.bin"]
    flip_byte_of(store, damaged)
    text = assert_one_line_error(cachefs("cat", store, damaged), 4)
    assert "fsck" in text
    # The other objects are unharmed.
    intact = digests[tmp_path / "tree" / "sub" / "deeper" / "e.bin"]
    assert cat(store, intact) == tree[tmp_path / "tree" / "sub" / "deeper" / "e.bin"]


def test_cat_of_a_missing_store_exits_3(tmp_path: Path) -> None:
    text = assert_one_line_error(cachefs("cat", tmp_path / "nowhere", sha256_line(b"x")), 3)
    assert "nowhere" in text
    assert not (tmp_path / "nowhere").exists()


# --- stats ---------------------------------------------------------------------------


def test_stats_of_a_known_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    text = compressible(1000, 5)
    noise = random.Random(6).randbytes(5000)
    files = {"a.txt": text, "copy-of-a.txt": text, "noise.bin": noise}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = cachefs("put", store, *(tmp_path / name for name in files))
    assert result.returncode == 0, err(result)
    packed = zstandard.ZstdCompressor(level=3, write_checksum=False).compress(text)
    assert len(packed) < 0.95 * len(text)  # so the store keeps it compressed
    stored = 2 * RECORD_HEADER.size + len(packed) + len(noise)

    stats = cachefs("stats", store, "--json")
    assert stats.returncode == 0, err(stats)
    doc = json.loads(out(stats))
    assert doc["files"] == 3
    assert doc["objects"] == 2
    assert doc["logical_bytes"] == 7000
    assert doc["chunks"] == 2
    assert doc["chunk_bytes"] == 6000
    assert doc["stored_bytes"] == stored
    assert doc["dedup_ratio"] == round(7000 / 6000, 4)
    assert doc["compression_ratio"] == round(6000 / stored, 4)

    human = cachefs("stats", store)
    assert human.returncode == 0, err(human)
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out(human).splitlines())
    assert rows["objects"] == "2"
    assert rows["files (references)"] == "3"
    assert rows["chunks"] == "2"
    assert rows["dedup ratio"] == f"{7000 / 6000:.2f}x"
    assert rows["digest function"] == "sha256"
    assert rows["logical bytes"].endswith("(7000)")


def test_stats_of_a_missing_store_exits_3(tmp_path: Path) -> None:
    text = assert_one_line_error(cachefs("stats", tmp_path / "nowhere"), 3)
    assert "no store" in text and "nowhere" in text
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "plain").mkdir()
    text = assert_one_line_error(cachefs("stats", tmp_path / "plain"), 3)
    assert "not a cachefs store" in text
    assert list((tmp_path / "plain").iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["stats", "--json"],
        ["put", "FILE"],
        ["cat", "DIGEST"],
        ["fsck"],
        ["fsck", "--repair"],
        ["gc"],
    ],
    ids=" ".join,
)
def test_a_newer_store_is_refused_and_left_alone(
    tmp_path: Path, tree: dict[Path, bytes], command: list[str]
) -> None:
    store = tmp_path / "store"
    result = cachefs("put", store, tmp_path / "tree" / "a.txt")
    digest = put_lines(result)[0][0]
    header = json.loads((store / HEADER_NAME).read_text())
    header["format_version"] = 99
    (store / HEADER_NAME).write_text(json.dumps(header))
    before = snapshot(store)
    args = [
        {"FILE": tmp_path / "tree" / "b.bin", "DIGEST": digest}.get(arg, arg) for arg in command
    ]
    text = assert_one_line_error(cachefs(args[0], store, *args[1:]), 6)
    assert "format version 99" in text
    assert snapshot(store) == before


# --- fsck and gc ---------------------------------------------------------------------


def test_fsck_exit_codes_and_repair(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    digests = {p: d for d, p in put_lines(cachefs("put", store, tmp_path / "tree"))}
    clean = cachefs("fsck", store)
    assert clean.returncode == 0, out(clean)
    assert out(clean).strip().endswith("clean")
    doc = json.loads(out(cachefs("fsck", store, "--json")))
    assert doc["clean"] is True and doc["problems"] == [] and doc["lost_objects"] == []

    damaged = digests[tmp_path / "tree" / "b.bin"]
    flip_byte_of(store, damaged)
    found = cachefs("fsck", store)
    assert found.returncode == 1
    assert any(line.startswith("DAMAGE  ") for line in out(found).splitlines())
    assert f"LOST    object {damaged} (damaged" in out(found)
    as_json = cachefs("fsck", store, "--json")
    assert as_json.returncode == 1
    doc = json.loads(out(as_json))
    assert doc["clean"] is False and doc["problems"] and doc["lost_objects"] == [damaged]

    repair = cachefs("fsck", store, "--repair")
    assert repair.returncode == 1  # damage was found (and repaired)
    lost = [line for line in out(repair).splitlines() if line.startswith("LOST")]
    assert lost == [f"LOST    object {damaged} (removed: its data is gone)"]
    again = cachefs("fsck", store)
    assert again.returncode == 0, out(again)
    assert_one_line_error(cachefs("cat", store, damaged), 3)
    for path, digest in digests.items():
        if digest != damaged:
            assert cat(store, digest) == tree[path]
    # The lost file can be stored again.
    assert cachefs("put", store, tmp_path / "tree" / "b.bin").returncode == 0
    assert cat(store, damaged) == tree[tmp_path / "tree" / "b.bin"]


def test_gc_prints_a_summary(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    digests = {p: d for d, p in put_lines(cachefs("put", store, tmp_path / "tree"))}
    gone = digests[tmp_path / "tree" / "sub" / "deeper" / "e.bin"]
    with Store.open(store) as opened:
        chunk_count = len(opened.recipe(Digest.parse(gone)))
        assert opened.unref(Digest.parse(gone))
    result = cachefs("gc", store)
    assert result.returncode == 0, err(result)
    assert out(result).startswith(f"removed {chunk_count} unreferenced chunks")
    assert "reclaimed" in out(result)
    again = cachefs("gc", store, "--json", "--threshold", "1.0")
    assert again.returncode == 0, err(again)
    doc = json.loads(out(again))
    assert doc["chunks_removed"] == 0
    assert doc["segments_compacted"] + doc["segments_deleted"] > 0
    assert {"bytes_reclaimed", "records_moved", "skipped"} <= set(doc)
    assert cachefs("fsck", store).returncode == 0
    for path, digest in digests.items():
        if digest != gone:
            assert cat(store, digest) == tree[path]
    assert_usage_error(cachefs("gc", store, "--threshold", "2"))


# --- init ------------------------------------------------------------------------------


def test_init_with_blake3(tmp_path: Path, tree: dict[Path, bytes]) -> None:
    store = tmp_path / "store"
    result = cachefs("init", store, "--digest-function", "blake3")
    assert result.returncode == 0, err(result)
    assert "blake3" in out(result)
    lines = put_lines(cachefs("put", store, tmp_path / "tree"))
    assert len(lines) == len(tree)
    for digest, path in lines:
        assert digest == f"{blake3.blake3(tree[path]).hexdigest()}/{len(tree[path])}"
        assert cat(store, digest) == tree[path]
    assert "blake3" in out(cachefs("stats", store))

    before = snapshot(store)
    text = assert_one_line_error(cachefs("init", store), 2)
    assert "already a cachefs store" in text
    assert snapshot(store) == before


def test_init_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert_one_line_error(cachefs("init", tmp_path / "busy"), 2)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    assert_usage_error(cachefs("init", tmp_path / "x", "--digest-function", "md5"))
    assert not (tmp_path / "x").exists()


# --- a second writer ----------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from cachefs.engine import Store
    store = Store.open(sys.argv[1])
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def held_store(tmp_path: Path, tree: dict[Path, bytes]) -> Iterator[tuple[Path, str]]:
    """A store with one object, open for writing by another process."""
    store = tmp_path / "store"
    digest = put_lines(cachefs("put", store, tmp_path / "tree" / "a.txt"))[0][0]
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            yield store, digest
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_a_second_writer_is_refused(held_store: tuple[Path, str], tmp_path: Path) -> None:
    store, digest = held_store
    for command in (["put", tmp_path / "tree" / "b.bin"], ["gc"], ["fsck", "--repair"]):
        text = assert_one_line_error(cachefs(command[0], store, *command[1:]), 5)
        assert "open for writing by another process" in text
    # Read-only commands work beside the writer.
    stats = cachefs("stats", store, "--json")
    assert stats.returncode == 0, err(stats)
    assert json.loads(out(stats))["files"] == 1
    assert cat(store, digest) == (tmp_path / "tree" / "a.txt").read_bytes()
    assert cachefs("fsck", store).returncode == 0


# --- help ------------------------------------------------------------------------------------


HELP = {
    "cachefs": ["put", "cat", "stats", "fsck", "gc", "init", "Exit codes"],
    "put": ["STORE", "PATH...", "DIGEST"],
    "cat": ["STORE", "DIGEST"],
    "stats": ["STORE", "--json", "dedup_ratio"],
    "fsck": ["STORE", "--repair", "--json"],
    "gc": ["STORE", "--threshold", "--json"],
    "init": ["STORE", "--digest-function", "blake3"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_list_of_commands_gives_each_commands_own_help(name: str) -> None:
    """``cachefs --help`` lists the commands from ``SUMMARIES`` (importing them all
    took half a second): each line is the one the command's own help gives."""
    command = importlib.import_module(f"cachefs.cli.{name}").command
    stand_in = click.Command(name, help=SUMMARIES[name])
    for width in range(10, 400):
        assert stand_in.get_short_help_str(width) == command.get_short_help_str(width), width


#: Modules that take long to import (the engine, the file system, trio, gRPC ...).
HEAVY = ("cachefs.engine", "cachefs.fs._filesystem", "trio", "grpc", "hypercorn", "pyfuse3")


@pytest.mark.parametrize(
    "args",
    [["--help"], *(["cli", name, "--help"] for name in ("umount", "cache", "token", "top", "key"))],
    ids=lambda args: " ".join(args[1:-1]) or "cachefs",
)
def test_light_commands_import_nothing_heavy(args: list[str]) -> None:
    """``cachefs --help`` imports no command, and commands that only talk to a
    daemon or edit a file (their --help too) import no engine, trio or gRPC:
    they answer in a twentieth of a second rather than half a second."""
    argv = args[-1:] if args[0] == "--help" else args[1:]
    code = (
        "import sys; from click.testing import CliRunner; from cachefs.cli import cli; "
        f"r = CliRunner().invoke(cli, {argv!r}); assert r.exit_code == 0, r.output; "
        f"print(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=True
    )
    assert result.stdout.decode().strip() == "[]", result.stdout


@pytest.mark.parametrize("command", list(HELP))
def test_help(command: str) -> None:
    result = cachefs(*([] if command == "cachefs" else [command]), "--help")
    assert result.returncode == 0, err(result)
    usage = "Usage: cachefs" + ("" if command == "cachefs" else f" {command}")
    assert out(result).startswith(usage)
    for word in HELP[command]:
        assert word in out(result), word
