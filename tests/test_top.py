"""``cachefs top``: the figures computed from two hand-made expositions (rates,
hit ratios, the busiest cache directories, families that are not there), the
parser held to prometheus_client's, and the live screen driven in tmux over a
real mount and over an endpoint that goes away and comes back.

tmux is a Debian package (``scripts/bootstrap.sh``); under ``CI=true`` a test
that cannot find it fails instead of skipping.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from cachefs.cli.top import (
    SERVER_REQUESTS,
    Frame,
    Scrape,
    compute,
    metrics_url,
    parse_exposition,
    render,
)
from cachefs.errors import ConfigError
from tests.mounting import CACHEFS, cachefs, live_stats, mounted
from tests.reapi import free_port, unavailable

ROOT = Path(__file__).resolve().parent.parent

# --- two hand-made scrapes, 2 s apart (SERVER_REQUESTS: the long name of server requests) ---

BEFORE = """\
# HELP cachefs_build_info The cachefs version and Python
# TYPE cachefs_build_info gauge
cachefs_build_info{python="3.11.7",version="0.1.0"} 1.0
cachefs_store_info{digest_function="sha256",role="mount",store="/srv/store"} 1.0
cachefs_fuse_request_duration_seconds_count{operation="write"} 10.0
cachefs_fuse_request_duration_seconds_count{operation="read"} 100.0
cachefs_fuse_read_bytes_total 0.0
cachefs_fuse_written_bytes_total 1000.0
cachefs_fuse_errors_total{errno="ENOENT",operation="lookup"} 100.0
SERVER_REQUESTS{method="GetActionResult",protocol="grpc",status="OK"} 5.0
SERVER_REQUESTS{method="GetActionResult",protocol="grpc",status="NOT_FOUND"} 5.0
SERVER_REQUESTS{method="GET /cas",protocol="http",status="200"} 10.0
cachefs_server_received_bytes_total{protocol="grpc"} 100.0
cachefs_remote_request_duration_seconds_count{endpoint="http://e1",operation="get",tier="t1"} 1.0
cachefs_remote_received_bytes_total{endpoint="http://e1",tier="t1"} 1000.0
cachefs_cache_hits_total{cache="/a"} 10.0
cachefs_cache_misses_total{cache="/a"} 0.0
cachefs_cache_hits_total{cache="/gone"} 50.0
cachefs_internal_errors_total 1.0
"""

AFTER = """\
# a comment, and a blank line

cachefs_build_info{python="3.11.7",version="0.1.0"} 1.0
cachefs_store_info{digest_function="sha256",role="mount",store="/srv/store"} 1.0
cachefs_fuse_request_duration_seconds_count{operation="write"} 30.0
cachefs_fuse_request_duration_seconds_count{operation="read"} 100.0
cachefs_fuse_request_duration_seconds_count{operation="getattr"} 4.0
cachefs_fuse_read_bytes_total 2097152.0
cachefs_fuse_written_bytes_total 4195304.0
cachefs_fuse_errors_total{errno="ENOENT",operation="lookup"} 110.0
cachefs_fuse_errors_total{errno="EIO",operation="read"} 1.0
SERVER_REQUESTS{method="GetActionResult",protocol="grpc",status="OK"} 9.0
SERVER_REQUESTS{method="GetActionResult",protocol="grpc",status="NOT_FOUND"} 7.0
SERVER_REQUESTS{method="GET /cas",protocol="http",status="200"} 10.0
SERVER_REQUESTS{method="GET /cas",protocol="http",status="404"} 2.0
SERVER_REQUESTS{method="PUT /ac",protocol="http",status="200"} 6.0
cachefs_server_received_bytes_total{protocol="grpc"} 300.0
cachefs_server_received_bytes_total{protocol="http"} 100.0
cachefs_remote_request_duration_seconds_count{endpoint="http://e1",operation="get",tier="t1"} 5.0
cachefs_remote_request_duration_seconds_count{endpoint="http://e2",operation="get",tier="t2"} 2.0
cachefs_remote_received_bytes_total{endpoint="http://e1",tier="t1"} 400.0
cachefs_cache_hits_total{cache="/a"} 20.0
cachefs_cache_misses_total{cache="/a"} 10.0
cachefs_cache_bytes{cache="/a"} 100.0
cachefs_cache_budget_bytes{cache="/a"} 1048576.0
cachefs_cache_files{cache="/a"} 3.0
cachefs_cache_bytes{cache="/b"} 5000.0
cachefs_cache_hits_total{cache="/c"} 40.0
cachefs_cache_hits_total{cache="/d"} 15.0
cachefs_cache_misses_total{cache="/d"} 5.0
cachefs_cache_bytes{cache="/d"} 1000.0
cachefs_internal_errors_total 3.0
cachefs_store_corruptions 2.0
cachefs_store_needs_fsck 1.0
cachefs_failsafe 0.0
cachefs_memory_rss_bytes 5.24288e+07
cachefs_memory_limit_bytes 5.36870912e+08
cachefs_remote_push_queue_items 7.0
cachefs_remote_push_queue_oldest_seconds 3.5
cachefs_remote_breaker_open{endpoint="http://e1",tier="t1"} 1.0
cachefs_remote_breaker_open{endpoint="http://e2",tier="t2"} 0.0
"""
BEFORE, AFTER = (text.replace("SERVER_REQUESTS", SERVER_REQUESTS) for text in (BEFORE, AFTER))


@pytest.fixture
def frame() -> Frame:
    return compute(parse_exposition(BEFORE, 10.0), parse_exposition(AFTER, 12.0))


def test_requests_per_second_by_kind(frame: Frame) -> None:
    requests = {(r.kind, r.name): r.per_second for r in frame.requests}
    assert requests == {
        ("fuse", "write"): 10.0,
        ("fuse", "getattr"): 2.0,  # a series that appeared: all of it is new
        ("fuse", "read"): 0.0,
        ("server", "grpc GetActionResult"): 3.0,  # every status
        ("server", "http GET /cas"): 1.0,
        ("server", "http PUT /ac"): 3.0,
        ("remote", "get"): 3.0,  # every tier and endpoint
    }
    fuse = [r.name for r in frame.requests if r.kind == "fuse"]
    assert fuse == ["write", "getattr", "read"]  # busiest first
    assert list(dict.fromkeys(r.kind for r in frame.requests)) == ["fuse", "server", "remote"]


def test_throughput(frame: Frame) -> None:
    flows = {f.name: f.bytes_per_second for f in frame.throughput}
    assert flows == {
        "FUSE read": 1 << 20,
        "FUSE write": 2 << 20,
        "server in": 150.0,
        # 1000 -> 400: the counter was reset (a restart), so 400 are new.
        "remote in": 200.0,
    }  # no server out, no remote out: not in the scrape, not shown


def test_cache_directories_busiest_first_with_hit_ratios(frame: Frame) -> None:
    caches = [(c.cache, c.lookups_per_second, c.hit_ratio) for c in frame.caches]
    # /a and /d tie at 10 lookups/s: the one that holds more bytes first; /b
    # had no lookups; /gone is no longer scraped.
    assert caches == [("/c", 20.0, 1.0), ("/d", 10.0, 0.75), ("/a", 10.0, 0.5), ("/b", 0.0, None)]
    a = frame.caches[2]
    assert (a.hits_per_second, a.misses_per_second) == (5.0, 5.0)
    assert a.hit_ratio_since_start == pytest.approx(20 / 30)
    assert (a.files, a.bytes, a.budget_bytes) == (3, 100, 1 << 20)
    b = frame.caches[3]
    assert b.hit_ratio_since_start is None
    assert (b.files, b.bytes, b.budget_bytes) == (None, 5000, None)


def test_server_lookups_hit_ratios(frame: Frame) -> None:
    lookups = {
        item.name: (item.hits_per_second, item.misses_per_second, item.hit_ratio)
        for item in frame.lookups
    }
    assert lookups == {
        "grpc GetActionResult": (2.0, 1.0, pytest.approx(2 / 3)),
        "http GET /cas": (0.0, 1.0, 0.0),
    }  # PUT /ac is not a lookup; GET /ac was never asked
    since = {item.name: item.hit_ratio_since_start for item in frame.lookups}
    assert since == {"grpc GetActionResult": 9 / 16, "http GET /cas": 10 / 12}


def test_errors_and_health(frame: Frame) -> None:
    errors = [(e.errno, e.per_second, e.total, e.serious) for e in frame.errors]
    assert errors == [("EIO", 0.5, 1, True), ("ENOENT", 5.0, 110, False)]  # EIO first
    health = frame.health
    assert (health.rss_bytes, health.memory_limit_bytes) == (50 << 20, 512 << 20)
    assert (health.internal_errors, health.internal_errors_per_second) == (3, 1.0)
    assert (health.corruptions, health.needs_fsck, health.failsafe) == (2, True, False)
    assert (health.push_queue_items, health.push_queue_oldest_seconds) == (7, 3.5)
    assert (health.breakers, health.breakers_open) == (2, ["t1 http://e1"])
    assert (frame.store, frame.role, frame.version) == ("/srv/store", "mount", "0.1.0")
    assert frame.seconds == 2.0
    assert json.loads(json.dumps(frame.as_dict()))["caches"][0]["cache"] == "/c"


def test_missing_families_are_left_out() -> None:
    empty = compute(parse_exposition("", 0.0), parse_exposition("# nothing\n", 1.0))
    lists = (empty.requests, empty.throughput, empty.caches, empty.lookups, empty.errors)
    assert all(found == [] for found in lists)
    assert (empty.store, empty.role, empty.version) == (None, None, None)
    health = empty.health
    assert health.rss_bytes is health.needs_fsck is health.push_queue_items is None
    assert (health.breakers, health.breakers_open) == (0, [])
    text = _rendered(empty)
    assert "idle" in text and "No cache directories" in text
    assert "push queue" not in text and "breakers" not in text


def test_a_served_store_shows_no_fuse_figures() -> None:
    served = 'cachefs_store_info{role="serve",store="/s"} 1\ncachefs_fuse_read_bytes_total 0\n'
    frame = compute(parse_exposition(served, 0.0), parse_exposition(served, 1.0))
    assert frame.throughput == []
    assert "FUSE" not in _rendered(frame)


def test_scrapes_must_be_in_order() -> None:
    one = parse_exposition("x 1\n", 5.0)
    with pytest.raises(ValueError, match="later"):
        compute(one, one)


def test_scrape_times_come_from_the_reading() -> None:
    """Rates divide by the time between the readings, whatever the interval asked."""
    before = Scrape(100.0, {"cachefs_fuse_written_bytes_total": {(): 0.0}})
    after = Scrape(104.0, {"cachefs_fuse_written_bytes_total": {(): 4096.0}})
    assert compute(before, after).throughput[0].bytes_per_second == 1024.0


def test_the_screen_shows_the_frame(frame: Frame) -> None:
    text = _rendered(frame, trouble="no answer since 12:00:00")
    assert "no answer since 12:00:00" in text
    assert re.search(r"FUSE write\s+2\.0 MiB/s", text)
    assert re.search(r"/c\s+20\.0/s\s+20\.0/s\s+0\.0/s\s+100\.0%", text)
    assert re.search(r"/a\s.*50\.0%\s+66\.7%\s+3\s+100 B of 1\.0 MiB", text)
    assert re.search(r"grpc GetActionResult\s.*66\.7%\s+56\.[23]%", text)
    assert "EIO 1  ENOSPC 0  EROFS 0" in text
    assert "NEEDS FSCK: 2 damaged reads" in text
    assert "50.0 MiB of 512.0 MiB (10%)" in text
    assert "7 waiting, oldest 4 s" in text
    assert "1 of 2 open" in text
    waiting = _rendered(None)
    assert "measuring" in waiting


def _rendered(frame: Frame | None, trouble: str | None = None) -> str:
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(render(frame, source="http://127.0.0.1:1/metrics", interval=1, trouble=trouble))
    return console.export_text()


# --- the parser ---------------------------------------------------------------------------


def test_parse_reads_labels_escapes_and_special_values() -> None:
    text = (
        "# TYPE a counter\n"
        'a_total{path="C:\\\\x",say="\\"hi\\"",two="l1\\nl2"} 3\n'
        'b{le="+Inf",} NaN\n'
        "c +Inf 1700000000000\n"
        'e{x="1", y="2"} 7\n'
    )
    scrape = parse_exposition(text, 1.0)
    assert scrape.series("a_total") == {
        (("path", "C:\\x"), ("say", '"hi"'), ("two", "l1\nl2")): 3.0
    }
    assert math.isnan(scrape.value("b") or 0.0)
    assert scrape.value("c") == math.inf
    assert scrape.by("e", "y") == {("2",): 7.0}
    assert scrape.value("absent") is None
    assert scrape.by("absent", "x") == {}


@pytest.mark.parametrize("line", ['x{a="b" 1', "x{a=b} 1", "x{} abc"])
def test_parse_refuses_what_is_not_an_exposition(line: str) -> None:
    with pytest.raises(ValueError):
        parse_exposition(f"ok 1\n{line}\n", 0.0)


# --- where the metrics are ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("http://10.0.0.1:9000", "http://10.0.0.1:9000/metrics"),
        ("http://10.0.0.1:9000/", "http://10.0.0.1:9000/metrics"),
        ("https://h:1/prefix/metrics", "https://h:1/prefix/metrics"),
        ("127.0.0.1:9000", "http://127.0.0.1:9000/metrics"),
        (":9000", "http://127.0.0.1:9000/metrics"),
        ("metrics.example", "http://metrics.example:9464/metrics"),
        ("[::1]:9000", "http://[::1]:9000/metrics"),
    ],
)
def test_metrics_url(target: str, url: str) -> None:
    assert metrics_url(target) == url


def test_a_directory_that_no_daemon_holds_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a cachefs mount nor a store"):
        metrics_url(str(tmp_path))
    with pytest.raises(ConfigError, match="neither"):
        metrics_url(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="bad port"):
        metrics_url("x:port")


# --- the command, on a fake endpoint ------------------------------------------------------

GROWING = """\
cachefs_store_info{{role="mount",store="/fake"}} 1
cachefs_fuse_written_bytes_total {written}
cachefs_fuse_request_duration_seconds_count{{operation="write"}} {n}
cachefs_cache_hits_total{{cache="/objects"}} {hits}
cachefs_cache_misses_total{{cache="/objects"}} {n}
cachefs_cache_bytes{{cache="/objects"}} 4096
"""


def growing() -> Callable[[], str]:
    """Answers whose counters grow at each reading: 1 MiB written, 3 hits and
    a miss per reading."""
    counter = itertools.count(1)

    def answer() -> str:
        n = next(counter)
        return GROWING.format(n=n, written=n << 20, hits=3 * n)

    return answer


@contextmanager
def endpoint(answer: Callable[[], str], port: int = 0) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering ``answer()`` to every GET; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answer().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_once_prints_one_frame_and_json(tmp_path: Path) -> None:
    with endpoint(growing()) as port:
        result = cachefs("top", f"127.0.0.1:{port}", "--once", "--interval", "0.2")
        assert "cachefs top  http://127.0.0.1:" in result.stdout
        assert re.search(r"FUSE write\s+\d+\.\d MiB/s", result.stdout), result.stdout
        assert re.search(r"/objects\s.*75\.0%\s+75\.0%", result.stdout), result.stdout
        doc = json.loads(cachefs("top", f"http://127.0.0.1:{port}", "--json").stdout)
    assert doc["role"] == "mount"
    assert doc["throughput"][0]["name"] == "FUSE write"
    assert doc["throughput"][0]["bytes_per_second"] > 0
    assert doc["caches"][0]["hit_ratio"] == pytest.approx(0.75)  # from rates: floats


def test_an_address_nobody_listens_on_is_a_clear_error() -> None:
    port = free_port()
    result = cachefs("top", f"127.0.0.1:{port}", check=False, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"cachefs: error: cannot read metrics from http://127.0.0.1:{port}/metrics: "
        "Connection refused"
    ), result.stderr
    assert "--metrics" in result.stderr and "Traceback" not in result.stderr


def test_the_live_view_needs_a_terminal() -> None:
    with endpoint(growing()) as port:
        result = cachefs("top", f"127.0.0.1:{port}", check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "redraws a terminal" in result.stderr and "--once" in result.stderr


def test_an_answer_that_is_not_metrics_is_a_clear_error() -> None:
    with endpoint(lambda: "<html>hello</html>\n") as port:
        result = cachefs("top", f":{port}", "--once", check=False, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "did not answer with Prometheus metrics: invalid metric name" in result.stderr


def test_help() -> None:
    out = cachefs("top", "--help").stdout
    assert out.startswith("Usage: cachefs top [OPTIONS] TARGET")
    out = " ".join(out.split())  # click wraps the text
    for word in ("--interval", "--once", "--json", "--metrics ADDR", "Ctrl-C", "hit_ratio"):
        assert word in out, word
    assert "top" in cachefs("--help").stdout


# --- the live screen, in tmux -------------------------------------------------------------


class Tmux:
    """A tmux server of our own (its socket in ``tmp_path``) running one
    command in a detached session of a fixed size.  The shell around the
    command writes its exit status to a file (tmux 3.3 does not always record
    a dead pane's status); the pane stays when the command ends, to show what
    it left."""

    def __init__(self, tmp_path: Path, name: str = "top") -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            unavailable("tmux is not installed (Debian package tmux; scripts/bootstrap.sh)")
        self.tmux = tmux
        self.socket = tmp_path / "tmux.sock"
        self.name = name
        self.config = tmp_path / "tmux.conf"
        self.config.write_text("set -g remain-on-exit on\n")
        self.status = tmp_path / "tmux.status"

    def run(self, *args: str, check: bool = True) -> str:
        # Not the process's own environment: GNU readline (pytest loads it)
        # exports COLUMNS and LINES of its terminal there, which the commands
        # would take for the pane's size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        result = subprocess.run(
            [self.tmux, "-S", str(self.socket), "-f", str(self.config), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            env=env,
        )
        if check and result.returncode != 0:
            pytest.fail(f"tmux {' '.join(args)}: {result.stderr}")
        return result.stdout

    def start(self, command: list[str]) -> None:
        self.run(
            "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", "-c", str(ROOT),
            f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.status))}",
        )  # fmt: skip

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name)

    def wait_for(self, shows: Callable[[str], bool], what: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not shows(screen := self.screen()):
            if time.monotonic() > deadline:
                pytest.fail(f"the screen did not show {what} in {timeout} s:\n{screen}")
            time.sleep(0.1)
        return screen

    def exit_status(self, timeout: float = 15) -> int:
        """Wait for the command to end; its exit status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status.read_text() if self.status.exists() else ""
            if status.endswith("\n"):
                return int(status)
            if time.monotonic() > deadline:  # killed by a signal (the shell too), or hung
                pytest.fail(f"the command did not end in {timeout} s:\n{self.screen()}")
            time.sleep(0.1)

    def kill(self) -> None:
        self.run("kill-session", "-t", self.name, check=False)
        self.run("kill-server", check=False)


def write_rate(screen: str) -> float:
    """The FUSE write throughput on the screen, in bytes per second (0 if none)."""
    found = re.search(r"FUSE write\s+([\d.]+) (B|KiB|MiB|GiB)/s", screen)
    if found is None:
        return 0.0
    unit: int = 1024 ** ["B", "KiB", "MiB", "GiB"].index(found[2])
    return float(found[1]) * unit


def cache_row(screen: str, cache: str) -> str:
    """The line of the cache directory ``cache`` ('' if none)."""
    name = re.compile(rf"(?:^|\s){re.escape(cache)}\s")
    rows = (line for line in screen.splitlines() if name.search(line))
    return next(rows, "")


def test_top_follows_a_mount_in_tmux(tmp_path: Path) -> None:
    """A workload on a mount (writes into a cache directory, reads that hit)
    shows on the screen as it happens; Ctrl-C ends the command, cleanly."""
    tmux = Tmux(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(tmp_path / "store", mnt, "--metrics", "127.0.0.1:0"):
        assert live_stats(mnt)["metrics"].startswith("127.0.0.1:")
        (mnt / "build-cache").mkdir()
        cachefs("cache", "set", str(mnt / "build-cache"), "--max-size", "64M")
        try:
            tmux.start([*CACHEFS, "top", str(mnt), "--interval", "0.5"])
            tmux.wait_for(lambda s: "Cache directories" in s, "the first frame")
            data = os.urandom(256 << 10)
            deadline = time.monotonic() + 60
            for n in itertools.count():
                path = mnt / "build-cache" / f"object-{n % 8}"
                path.write_bytes(data + n.to_bytes(4))
                assert path.read_bytes()[-4:] == n.to_bytes(4)  # a hit
                screen = tmux.screen()
                row = cache_row(screen, "/build-cache")
                if write_rate(screen) > 0 and re.search(r"\d+\.\d%", row):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the screen never showed the workload:\n{screen}")
                time.sleep(0.02)
            assert "mount of " in screen
            assert re.search(r"fuse\s+\w+\s+\d+\.\d/s", screen), screen  # FUSE requests/s
            tmux.run("send-keys", "-t", tmux.name, "C-c")
            assert tmux.exit_status() == 0
        finally:
            tmux.kill()


def test_top_shows_an_endpoint_that_went_away_and_came_back(tmp_path: Path) -> None:
    tmux = Tmux(tmp_path)
    answer = growing()
    try:
        with endpoint(answer) as port:
            tmux.start([*CACHEFS, "top", f"127.0.0.1:{port}", "--interval", "0.3"])
            tmux.wait_for(lambda s: write_rate(s) > 0, "a write rate")
        screen = tmux.wait_for(lambda s: "no answer since" in s, "that the endpoint is gone")
        assert f"cannot read metrics from http://127.0.0.1:{port}/metrics" in screen, screen
        assert write_rate(screen) > 0, screen  # the last figures stay
        with endpoint(answer, port):
            tmux.wait_for(lambda s: "no answer" not in s and "answering" not in s, "recovery")
            tmux.run("send-keys", "-t", tmux.name, "C-c")
            assert tmux.exit_status() == 0
    finally:
        tmux.kill()


def test_top_of_a_mount_without_metrics_says_how_to_get_them(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(tmp_path / "store", mnt):
        result = cachefs("top", str(mnt), check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"the daemon of {mnt} serves no metrics" in result.stderr
    assert "cachefs mount STORE MOUNTPOINT ... --metrics ADDR" in result.stderr
