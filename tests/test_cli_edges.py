"""Small parts of the command line and the daemon's plumbing that the big
tests pass by: sizes, progress bars on a terminal, what ``put`` skips, and
the systemd notifications."""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.cli.common import human_bytes, parse_size, positive_size
from cachefs.daemon._systemd import sd_notify
from cachefs.errors import ConfigError

CACHEFS = [sys.executable, "-m", "cachefs"]


def test_sizes() -> None:
    assert parse_size("64K") == 64 << 10 and parse_size("1.5M") == 3 << 19
    with pytest.raises(ConfigError, match="must not be negative"):
        parse_size("-1M")
    with pytest.raises(ConfigError, match="must be more than nothing"):
        positive_size("0", "--scrub-rate")
    assert positive_size("20M", "--scrub-rate") == 20 << 20
    assert human_bytes(5 << 40) == "5.0 TiB" and human_bytes(100 << 50) == "102400.0 TiB"


def test_a_progress_bar_is_drawn_on_a_terminal_only(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = tmp_path / "data"
    data.write_bytes(os.urandom(300_000))
    subprocess.run([*CACHEFS, "put", str(store), str(data)], check=True, capture_output=True)
    leader, follower = os.openpty()
    try:
        result = subprocess.run(
            [*CACHEFS, "scrub", str(store)],
            stdout=subprocess.PIPE,
            stderr=follower,
            check=False,
            timeout=120,
        )
        os.close(follower)
        drawn = b""
        while select.select([leader], [], [], 0.5)[0]:
            try:
                piece = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not piece:
                break
            drawn += piece
    finally:
        os.close(leader)
    assert result.returncode == 0, result.stdout
    assert b"scrub" in drawn.lower() and b"100%" in drawn, drawn
    plain = subprocess.run([*CACHEFS, "scrub", str(store)], capture_output=True, check=False)
    assert b"100%" not in plain.stderr


def test_put_skips_what_is_not_a_regular_file(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"kept")
    (tree / "link").symlink_to("file")
    os.mkfifo(tree / "fifo")
    result = subprocess.run(
        [*CACHEFS, "-v", "put", str(tmp_path / "store"), str(tree), "/dev/null"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "/dev/null is not a regular file or directory" in result.stderr
    assert "skipping" in result.stderr and "link: not a regular file" in result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == [str(tree / "file")]


def test_systemd_is_told_when_it_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sd_notify("READY=1")  # not under systemd: nothing to do
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sd_notify("READY=1")
        assert server.recv(100) == b"READY=1"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        name = f"cachefs-test-{os.getpid()}"
        server.bind("\0" + name)  # an abstract socket, as systemd gives "@name"
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        sd_notify("STOPPING=1")
        assert server.recv(100) == b"STOPPING=1"
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    sd_notify("READY=1")
    assert "could not notify systemd" in caplog.text


def test_cat_of_a_large_object_streams_and_stops_quietly_on_a_closed_pipe(
    tmp_path: Path,
) -> None:
    store, data = tmp_path / "store", tmp_path / "data"
    with open(data, "wb") as f:
        for i in range(70):  # past the size up to which cat verifies before writing
            f.write(bytes([i]) * (1 << 20))
    line = subprocess.run(
        [*CACHEFS, "put", str(store), str(data)], check=True, capture_output=True, text=True
    ).stdout
    digest = line.split()[0]
    out = subprocess.run(
        [*CACHEFS, "cat", str(store), digest], check=True, capture_output=True
    ).stdout
    assert out == data.read_bytes()
    script = f"{sys.executable} -m cachefs cat {store} {digest} | head -c 10 >/dev/null; "
    script += 'echo "${PIPESTATUS[0]}"'
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert shell.stdout.strip() == "1" and "Traceback" not in shell.stderr, shell.stderr
