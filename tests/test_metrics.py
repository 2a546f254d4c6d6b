"""Prometheus metrics: ``--metrics`` on a mount and a server, the names as
documented, the shipped rules (promtool), and a real Prometheus scraping both.

The Prometheus and promtool binaries come from Debian's ``prometheus``
package (``scripts/bootstrap.sh`` installs it); under ``CI=true`` a test that
cannot find them fails instead of skipping.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cachefs.metrics import NAMES, RULES_FILE, FiguresCollector, parse_samples
from tests.mounting import cachefs, live_stats, mounted
from tests.reapi import free_port, serving, unavailable

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: The suffixes the exposition adds to a family's samples, by kind.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed (Debian package prometheus; scripts/bootstrap.sh)")
    return path


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text: str = response.read().decode()
    return text


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    total = 0.0
    for have, number in parse_samples(text).get(name, {}).items():
        if set(labels.items()) <= set(have):
            total += number
    return total


def check_names(text: str) -> set[str]:
    """Every family in ``text`` is one of NAMES, with its documented kind and
    labels; returns the families seen."""
    seen = set()
    for family in text_string_to_metric_families(text):
        name = family.name
        if name.endswith("_info") and family.type == "gauge":  # an info in format 0.0.4
            name = name.removesuffix("_info")
            assert NAMES[name].kind == "info", f"{family.name}: documented as {NAMES[name]}"
        assert name in NAMES, f"{name} is not in cachefs.metrics.NAMES (nor the README)"
        spec = NAMES[name]
        kind = "gauge" if spec.kind == "info" else spec.kind
        assert family.type == kind, f"{name}: {family.type}, documented {spec.kind}"
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == set(spec.labels), f"{sample.name}: labels {sorted(labels)}"
            assert sample.name.removeprefix(name) in SUFFIXES[spec.kind], sample.name
        seen.add(name)
    return seen


# --- the documented list -------------------------------------------------------------------


def test_readme_lists_every_metric_with_its_labels() -> None:
    """The README's table is NAMES: same names, kinds and labels."""
    rows = re.findall(r"^\| `(cachefs_\w+)` \| (\w+) \| ([^|]*) \|", README.read_text(), re.M)
    documented = {
        name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows
    }
    exposed = {_exposed(name, spec.kind): (spec.kind, spec.labels) for name, spec in NAMES.items()}
    assert documented == exposed


def _exposed(name: str, kind: str) -> str:
    """A family's name as a user queries it (the README's spelling)."""
    return name + {"counter": "_total", "info": "_info"}.get(kind, "")


# --- the rules --------------------------------------------------------------------------------


def test_rules_pass_promtool_and_are_what_the_command_prints(tmp_path: Path) -> None:
    promtool = require("promtool")
    printed = cachefs("metrics", "rules").stdout
    assert printed == RULES_FILE.read_text()
    rules = tmp_path / "cachefs.rules.yml"
    rules.write_text(printed)
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


#: Unit tests of the alerts (``promtool test rules``): each fires on the series
#: that mean trouble, and not on those beside it that do not.
ALERT_TESTS = """\
rule_files: [cachefs.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="m", instance="a"}'
        values: '1 1 0x20'
      - series: 'cachefs_build_info{job="m", instance="a", version="0.1.0", python="3.11"}'
        values: '1 1'
      - series: 'up{job="other", instance="c"}'
        values: '0x20'
      - series: 'cachefs_failsafe{job="m", instance="a"}'
        values: '0 0 1 1 1'
      - series: 'cachefs_store_corruptions{job="m", instance="a"}'
        values: '0 0 2x10'
      - series: 'cachefs_store_disk_free_bytes{job="m", instance="a"}'
        values: '1e9x20'
      - series: 'cachefs_store_disk_free_bytes{job="m", instance="b"}'
        values: '1e11x20'
      - series: 'cachefs_store_quota_stuck{job="m", instance="a"}'
        values: '0 0 1x20'
      - series: 'cachefs_store_quota_stuck{job="m", instance="b"}'
        values: '0x20'
      - series: 'cachefs_cache_throttled_seconds_total{job="m", instance="a", cache="/c"}'
        values: '0+60x30'
      - series: 'cachefs_memory_rss_bytes{job="m", instance="a"}'
        values: '990x30'
      - series: 'cachefs_memory_limit_bytes{job="m", instance="a"}'
        values: '1000x30'
      - series: 'cachefs_remote_failing{job="m", instance="a", tier="s3://x", endpoint="x"}'
        values: '0 0 1 1 1 1 1 1 1 1'
      - series: 'cachefs_remote_push_queue_oldest_seconds{job="m", instance="a"}'
        values: '0 600 1200 1800 2400 3000 3600 4200'
      - series: 'cachefs_fuse_request_duration_seconds_count{job="m", instance="a", operation="x"}'
        values: '0+100x20'
      - series: 'cachefs_fuse_errors_total{job="m", instance="a", operation="x", errno="EIO"}'
        values: '0+5x20'
      - series: 'cachefs_fuse_errors_total{job="m", instance="a", operation="y", errno="ENODATA"}'
        values: '0+500x20'
      - series: 'cachefs_fuse_request_duration_seconds_count{job="m", instance="b", operation="x"}'
        values: '0+100x20'
      - series: 'cachefs_fuse_errors_total{job="m", instance="b", operation="y", errno="ENODATA"}'
        values: '0+500x20'
      - series: 'SERVER_REQUESTS{job="m",instance="a",status="OK"}'
        values: '0+100x20'
      - series: 'SERVER_REQUESTS{job="m",instance="a",status="UNKNOWN"}'
        values: '0+5x20'
      - series: 'SERVER_REQUESTS{job="m",instance="b",status="OK"}'
        values: '0+100x20'
      - series: 'SERVER_REQUESTS{instance="b",job="m",status="CANCELLED"}'
        values: '0+50x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: CachefsDown
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
      - eval_time: 3m
        alertname: CachefsFailsafe
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
      - eval_time: 3m
        alertname: CachefsCorruption
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
      - eval_time: 15m
        alertname: CachefsDiskNearlyFull
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
      - eval_time: 15m
        alertname: CachefsQuotaStuck
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
      - eval_time: 20m
        alertname: CachefsWritersThrottled
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a, cache: /c}
      - eval_time: 20m
        alertname: CachefsMemoryNearLimit
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a}
      - eval_time: 8m
        alertname: CachefsRemoteEndpointDown
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a, tier: "s3://x", endpoint: x}
      - eval_time: 4m
        alertname: CachefsRemoteEndpointDown
        exp_alerts: []
      - eval_time: 7m
        alertname: CachefsPushQueueStale
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a}
      - eval_time: 15m
        alertname: CachefsFuseErrors
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
      - eval_time: 15m
        alertname: CachefsServerErrors
        exp_alerts:
          - exp_labels: {severity: critical, job: m, instance: a}
  - interval: 5m
    input_series:
      - series: 'cachefs_store_needs_fsck{job="m", instance="a"}'
        values: '0 1x30'
      - series: 'cachefs_store_disk_free_bytes{job="m", instance="a"}'
        values: '1e11-1e9x100'
      - series: 'cachefs_store_disk_free_bytes{job="m", instance="b"}'
        values: '1e11x100'
      - series: 'cachefs_cache_hits_total{job="m", instance="a", cache="/c"}'
        values: '0+100x288 28800+0x24'
      - series: 'cachefs_cache_misses_total{job="m", instance="a", cache="/c"}'
        values: '0+10x288 2880+200x24'
      - series: 'cachefs_cache_hits_total{job="m", instance="b", cache="/c"}'
        values: '0+100x312'
      - series: 'cachefs_cache_misses_total{job="m", instance="b", cache="/c"}'
        values: '0+10x312'
    alert_rule_test:
      - eval_time: 100m
        alertname: CachefsNeedsFsck
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a}
      - eval_time: 400m
        alertname: CachefsDiskFillingUp
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a}
      - eval_time: 1560m
        alertname: CachefsHitRatioCollapse
        exp_alerts:
          - exp_labels: {severity: warning, job: m, instance: a, cache: /c}
      - eval_time: 1400m
        alertname: CachefsHitRatioCollapse
        exp_alerts: []
""".replace("SERVER_REQUESTS", "cachefs_server_request_duration_seconds_count")


def without_annotations(rules: str) -> str:
    """The rules without their annotations (``promtool test rules`` would want
    each text spelled out again; ``promtool check rules`` checks their templates)."""
    kept, skip_deeper = [], None
    for line in rules.splitlines(keepends=True):
        depth = len(line) - len(line.lstrip())
        if skip_deeper is not None and (depth > skip_deeper or not line.strip()):
            continue
        skip_deeper = None
        if line.strip() == "annotations:":
            skip_deeper = depth
            continue
        kept.append(line)
    return "".join(kept)


def test_alerts_fire_on_trouble_only(tmp_path: Path) -> None:
    promtool = require("promtool")
    rules = without_annotations(RULES_FILE.read_text())
    assert "summary" not in rules and rules.count("alert:") == 14
    # Every alert has a case above.
    alerts = set(re.findall(r"alert: (\w+)", rules))
    assert alerts == set(re.findall(r"alertname: (\w+)", ALERT_TESTS))
    (tmp_path / "cachefs.rules.yml").write_text(rules)
    (tmp_path / "alerts_test.yml").write_text(ALERT_TESTS)
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- a mount and a server with --metrics ------------------------------------------------------


def test_mount_metrics_move_with_the_workload(tmp_path: Path) -> None:
    promtool = require("promtool")
    mnt = tmp_path / "mnt"
    with mounted(tmp_path / "store", mnt, "--metrics", "127.0.0.1:0") as mount:
        address = live_stats(mount.path)["metrics"]
        before = scrape(address)
        (mnt / "cache").mkdir()
        cachefs("cache", "set", str(mnt / "cache"), "--max-size", "1M")
        data = os.urandom(300_000)
        for n in range(6):  # 1.8 MB into a 1 MiB budget: evictions
            (mnt / "cache" / f"f{n}").write_bytes(data + bytes([n]))
        (mnt / "plain").write_bytes(data)
        assert (mnt / "plain").read_bytes() == data
        for _ in range(3):
            (mnt / "cache" / "f5").read_bytes()  # hits
        assert not (mnt / "cache" / "absent").exists()  # a miss
        # Wait for eviction (background) to catch up.
        deadline = time.monotonic() + 30
        while live_stats(mnt)["caches"][0]["evictions"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = scrape(address)
    seen = check_names(after)
    assert {"cachefs_fuse_request_duration_seconds", "cachefs_cache_hits"} <= seen
    assert value(after, "cachefs_store_info", role="mount") == 1
    written = value(after, "cachefs_fuse_written_bytes_total")
    assert written - value(before, "cachefs_fuse_written_bytes_total") >= 7 * 300_000
    assert value(after, "cachefs_fuse_read_bytes_total") >= len(data)
    assert value(after, "cachefs_fuse_request_duration_seconds_count", operation="write") > 0
    assert value(after, "cachefs_fuse_errors_total", operation="lookup") == 0
    # Files evicted before their publication are never published: at least the
    # plain file and the last of the cache's.
    assert value(after, "cachefs_publish_duration_seconds_count") >= 1  # group commits
    assert value(after, "cachefs_published_objects_total") >= 2
    assert value(after, "cachefs_published_bytes_total") >= 2 * 300_000
    assert value(after, "cachefs_ingest_logical_bytes_total") >= 2 * 300_000
    cache = {"cache": "/cache"}
    assert value(after, "cachefs_cache_budget_bytes", **cache) == 1 << 20
    assert value(after, "cachefs_cache_hits_total", **cache) >= 3
    assert value(after, "cachefs_cache_evictions_total", **cache) >= 1
    assert value(after, "cachefs_cache_evicted_bytes_total", **cache) >= 300_000
    assert value(after, "cachefs_store_needs_fsck") == 0
    assert value(after, "cachefs_memory_rss_bytes") > 0
    assert value(after, "cachefs_store_disk_free_bytes") > 0
    # promtool's lint of a live exposition.
    result = subprocess.run(
        [promtool, "check", "metrics"], input=after, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_close_sends_the_daemon_no_flush(tmp_path: Path) -> None:
    """A file is published at its release, which close(2) does not wait for:
    the daemon answers the first FLUSH with ENOSYS and the kernel sends no
    more, so that a close costs no round trip; the files are all there."""
    mnt = tmp_path / "mnt"
    files = {f"f{n}": os.urandom(n * 1000) for n in range(20)}
    with mounted(tmp_path / "store", mnt, "--metrics", "127.0.0.1:0") as mount:
        address = live_stats(mount.path)["metrics"]
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        assert {name: (mnt / name).read_bytes() for name in files} == files
        after = scrape(address)
    count = "cachefs_fuse_request_duration_seconds_count"
    assert value(after, count, operation="open") + value(after, count, operation="create") >= 40
    assert value(after, count, operation="flush") <= 1
    assert value(after, "cachefs_fuse_errors_total", operation="flush", errno="ENOSYS") <= 1


def test_metrics_address_is_checked_before_anything_starts(tmp_path: Path) -> None:
    result = cachefs(
        "serve", str(tmp_path / "store"), "--http", "127.0.0.1:0", "--metrics", "x:port",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "bad port in address 'x:port'" in result.stderr
    assert not (tmp_path / "store").exists()


def test_metrics_address_taken_is_a_clear_error(tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cachefs(
            "serve", str(tmp_path / "store"), "--http", "127.0.0.1:0",
            "--metrics", f"127.0.0.1:{port}", check=False, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


# --- a real Prometheus -----------------------------------------------------------------------


@contextmanager
def prometheus(tmp_path: Path, targets: dict[str, str]) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``targets`` (job -> address) every
    second; yields the address of its HTTP API."""
    binary = require("prometheus")
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "prometheus.yml"
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs: [{{targets: ['{address}']}}]\n"
        for job, address in targets.items()
    )
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES_FILE}']\nscrape_configs:\n{jobs}"
    )
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    api = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited {process.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://{api}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus was not ready in 60 s: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(api: str, expression: str) -> list[dict[str, Any]]:
    url = f"http://{api}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=30) as response:
        doc = json.load(response)
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


def scalar(api: str, expression: str) -> float:
    result = query(api, expression)
    return sum(float(r["value"][1]) for r in result)


def wait_for(api: str, expression: str, want: float, timeout: float = 60.0) -> float:
    """Query until ``expression`` reaches ``want`` (it is scraped every second)."""
    deadline = time.monotonic() + timeout
    while True:
        got = scalar(api, expression)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_prometheus_scrapes_a_mount_and_a_server(tmp_path: Path) -> None:
    promtool = require("promtool")
    mnt = tmp_path / "mnt"
    with (
        serving(tmp_path / "served", "--metrics", "127.0.0.1:0") as server,
        mounted(
            tmp_path / "store", mnt, "--metrics", "127.0.0.1:0", "--remote",
            f"grpc://{server.grpc}", "--max-store-size", "1G",
        ) as mount,
    ):  # fmt: skip
        served_stats = json.loads(cachefs("stats", "--json", str(tmp_path / "served")).stdout)
        targets = {"mount": live_stats(mount.path)["metrics"], "serve": served_stats["metrics"]}
        with prometheus(tmp_path / "prom", targets) as api:
            assert wait_for(api, 'sum(up{job=~"mount|serve"})', 2) == 2
            # The workload: files into the mount (pushed to the server), a cache
            # directory over its budget (evictions), reads that hit, a lookup that
            # misses; HTTP requests to the server: 2 misses, 1 upload, 3 hits.
            data = [os.urandom(100_000) + bytes([n]) for n in range(4)]
            for n, blob in enumerate(data):
                with open(mnt / f"f{n}", "wb") as f:
                    f.write(blob)
                    os.fsync(f.fileno())
            (mnt / "cache").mkdir()
            cachefs("cache", "set", str(mnt / "cache"), "--max-size", "1M")
            for n in range(6):
                (mnt / "cache" / f"o{n}").write_bytes(os.urandom(300_000))
            for _ in range(3):
                (mnt / "cache" / "o5").read_bytes()
            assert not (mnt / "cache" / "absent").exists()
            assert server.http is not None
            host, port = server.http.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            blob = os.urandom(50_000)
            path = f"/cas/{hashlib.sha256(blob).hexdigest()}"
            statuses = []
            for method, body in [("GET", None), ("HEAD", None), ("PUT", blob)] + [
                ("GET", None)
            ] * 3:
                conn.request(method, path, body=body)
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            conn.close()
            assert statuses == [404, 404, 200, 200, 200, 200]
            written = wait_for(api, 'cachefs_fuse_written_bytes_total{job="mount"}', 2_200_000)
            assert written >= 2_200_000
            cache = '{job="mount",cache="/cache"}'
            assert wait_for(api, f"cachefs_cache_hits_total{cache}", 3) >= 3
            assert wait_for(api, f"cachefs_cache_misses_total{cache}", 1) >= 1
            assert wait_for(api, f"cachefs_cache_evictions_total{cache}", 1) >= 1
            assert scalar(api, f"cachefs_cache_budget_bytes{cache}") == 1 << 20
            assert scalar(api, 'cachefs_store_quota_bytes{job="mount"}') == 1 << 30
            hits = 'cachefs_server_request_duration_seconds_count{job="serve",method="GET /cas"}'
            assert wait_for(api, hits.replace("}", ',status="200"}'), 3) == 3
            assert scalar(api, hits.replace("}", ',status="404"}')) == 1
            assert scalar(api, 'cachefs_server_received_bytes_total{protocol="http"}') >= 50_000
            # The mount pushed its files to the server over gRPC: both sides count.
            pushed = wait_for(api, 'cachefs_remote_pushed_objects_total{job="mount"}', 4)
            assert pushed >= 4
            remote = 'cachefs_remote_request_duration_seconds_count{job="mount"}'
            assert scalar(api, remote) > 0
            assert scalar(api, 'sum(cachefs_remote_errors_total{job="mount"})') == 0
            rpcs = 'cachefs_server_request_duration_seconds_count{job="serve",protocol="grpc"}'
            assert wait_for(api, f"sum({rpcs})", 1) >= 1
            assert scalar(api, 'cachefs_remote_failing{job="mount"}') == 0
            # The rules load and evaluate without error; nothing fires on a healthy pair.
            with urllib.request.urlopen(f"http://{api}/api/v1/rules", timeout=30) as response:
                groups = json.load(response)["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            shipped = RULES_FILE.read_text()
            assert len(rules) == shipped.count("- alert:") + shipped.count("- record:")
            assert all(rule["health"] == "ok" for rule in rules), rules
            assert query(api, 'ALERTS{alertstate="firing"}') == []
        # Between them, the two expositions have every documented family (but
        # what --local-max-size adds), each passing promtool's lint.
        seen: set[str] = set()
        for address in targets.values():
            text = scrape(address)
            seen |= check_names(text)
            result = subprocess.run(
                [promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
        # (and what tenants and --trust add: test_tenants_and_signatures_as_families)
        assert set(NAMES) - seen == {
            "cachefs_remote_dropped_chunks",
            "cachefs_tenant_bytes",
            "cachefs_tenant_quota_bytes",
            "cachefs_tenant_quota_refusals",
            "cachefs_signed_entries",
        }


def test_tenants_and_signatures_as_families() -> None:
    """What a server with tenants and a daemon that trusts signed entries add
    to the figures are families of NAMES, in the text promtool reads."""
    doc = {
        "tenants": {
            "a": {"instances": ["a"], "quota": 1 << 20, "bytes": 5000, "quota_refusals": 2},
            "b": {"instances": ["b"], "quota": None, "bytes": 0, "quota_refusals": 0},
        },
        "signatures": {"accepted": 3, "unsigned": 1, "tampered": 0},
    }
    registry = CollectorRegistry()
    registry.register(
        FiguresCollector(lambda: doc, {"store": "s", "digest_function": "sha256", "role": "serve"})
    )
    text = generate_latest(registry).decode()
    check_names(text)
    samples = parse_samples(text)
    assert samples["cachefs_tenant_bytes"][(("tenant", "a"),)] == 5000
    assert samples["cachefs_tenant_quota_bytes"][(("tenant", "b"),)] == 0
    assert samples["cachefs_tenant_quota_refusals_total"][(("tenant", "a"),)] == 2
    assert samples["cachefs_signed_entries_total"][(("outcome", "unsigned"),)] == 1
