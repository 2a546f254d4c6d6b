"""``cachefs top``: a live view of a daemon's Prometheus metrics (CLI layer).

Three parts, kept apart:

* **Reading** -- :func:`parse_exposition` turns one ``/metrics`` answer (the
  Prometheus text format, version 0.0.4) into a :class:`Scrape`: every
  sample by name and labels, and when it was read.  :func:`scrape` fetches
  one, :func:`metrics_url` finds where (a mount, a served store, an address).
  The parsing is prometheus_client's (``cachefs.metrics.parse_samples``).
* **Computing** -- :func:`compute` turns two scrapes into a :class:`Frame`:
  rates are the increase of a counter between the scrapes divided by the time
  between them (a counter that went down was reset, by a restart: its
  increase is its new value), ratios are hits over hits and misses, over the
  interval and since the daemon started.  Pure functions, no I/O.
* **Showing** -- :func:`render` turns a frame into ``rich`` tables;
  :func:`command` scrapes once per ``--interval`` and redraws
  (``rich.live.Live``), or prints one frame (``--once``, ``--json``).

An endpoint that cannot be read at the start is an error; one that goes away
later is shown on the screen and read again at every interval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import click
from rich import box
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cachefs.daemon import mount_info
from cachefs.errors import CachefsError, ConfigError
from cachefs.metrics import METRICS_PORT, Labels, parse_samples
from cachefs.server import parse_address

from .common import human_bytes, json_option

# --- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One exposition: every sample by name (``cachefs_cache_hits_total``,
    ``..._count``) and labels, and when it was read (``time.monotonic()``)."""

    at: float
    samples: dict[str, dict[Labels, float]]

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def value(self, name: str) -> float | None:
        """The sum of the samples ``name`` (None if there are none)."""
        found = self.series(name)
        return sum(found.values()) if found else None

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """The samples ``name`` summed by the values of the labels ``keys``."""
        return _grouped(self.series(name), keys)


def parse_exposition(text: str, at: float) -> Scrape:
    """The samples of a Prometheus text exposition read at ``at`` (ValueError
    if it is not one)."""
    return Scrape(at, parse_samples(text))


def _grouped(series: dict[Labels, float], keys: Iterable[str]) -> dict[tuple[str, ...], float]:
    keys = tuple(keys)
    out: dict[tuple[str, ...], float] = {}
    for labels, value in series.items():
        have = dict(labels)
        key = tuple(have.get(k, "") for k in keys)
        out[key] = out.get(key, 0.0) + value
    return out


def metrics_url(target: str) -> str:
    """Where TARGET's metrics are: ``http://HOST:PORT/metrics``.

    TARGET is a URL, a mount point or a store that ``cachefs serve`` serves
    (their daemon says where, if it was started with ``--metrics``), or an
    address as ``--metrics`` takes it (``HOST:PORT``, ``:PORT``, ``HOST``).
    """
    if target.startswith(("http://", "https://")):
        scheme, _, rest = target.partition("://")
        host, _, where = rest.partition("/")
        return f"{scheme}://{host}/{where or 'metrics'}"
    path = Path(target)
    if path.exists() or "/" in target:
        info = mount_info(path)
        if info is None:
            raise ConfigError(
                f"{target} is neither a cachefs mount nor a store that `cachefs serve` serves",
                hint="name a mount point, a served store, or the HOST:PORT of its --metrics",
            )
        address = info.get("metrics")
        if not address:
            how = "cachefs mount STORE MOUNTPOINT" if os.path.ismount(path) else "cachefs serve"
            raise ConfigError(
                f"the daemon of {target} serves no metrics",
                hint=f"start it with `{how} ... --metrics ADDR`, e.g. --metrics 127.0.0.1:9464",
            )
        return f"http://{address}/metrics"
    return f"http://{parse_address(target, METRICS_PORT)}/metrics"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(url: str, timeout: float) -> Scrape:
    """Read ``url`` once (CachefsError if it cannot be read or parsed)."""
    request = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
    hint = (
        "is the daemon running, with --metrics?  `cachefs stats --json MOUNT` says where "
        "it serves them (metrics)"
    )
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise CachefsError(f"{url} answered {exc.code} {exc.reason}", hint=hint) from None
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
        raise CachefsError(f"cannot read metrics from {url}: {reason}", hint=hint) from None
    except (OSError, ValueError) as exc:  # timeouts, resets, a bad URL
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise CachefsError(f"cannot read metrics from {url}: {reason}", hint=hint) from None
    try:
        return parse_exposition(text, time.monotonic())
    except ValueError as exc:
        raise CachefsError(
            f"{url} did not answer with Prometheus metrics: {exc}",
            hint="name the address of a daemon's --metrics",
        ) from None


# --- computing ---------------------------------------------------------------------------

FUSE_REQUESTS = "cachefs_fuse_request_duration_seconds_count"
SERVER_REQUESTS = "cachefs_server_request_duration_seconds_count"
REMOTE_REQUESTS = "cachefs_remote_request_duration_seconds_count"

#: Byte counters shown as throughput: (row, sample name).
FLOWS = (
    ("FUSE read", "cachefs_fuse_read_bytes_total"),
    ("FUSE write", "cachefs_fuse_written_bytes_total"),
    ("server in", "cachefs_server_received_bytes_total"),
    ("server out", "cachefs_server_sent_bytes_total"),
    ("remote in", "cachefs_remote_received_bytes_total"),
    ("remote out", "cachefs_remote_sent_bytes_total"),
)

#: Server requests that are cache lookups: (protocol, method) -> the status
#: of a hit and of a miss.
LOOKUPS = {
    ("grpc", "GetActionResult"): ("OK", "NOT_FOUND"),
    ("http", "GET /ac"): ("200", "404"),
    ("http", "GET /cas"): ("200", "404"),
}

#: FUSE errnos that mean trouble (damage, a full store, the failsafe), shown
#: even when there are none.  Others (ENOENT of a lookup) are a mount's daily life.
SERIOUS_ERRNOS = ("EIO", "ENOSPC", "EROFS")


@dataclass(frozen=True)
class RequestRate:
    """Requests of one kind per second: ``kind`` is fuse, server or remote."""

    kind: str
    name: str
    per_second: float


@dataclass(frozen=True)
class Flow:
    """Bytes per second through one way in or out (:data:`FLOWS`)."""

    name: str
    bytes_per_second: float


@dataclass(frozen=True)
class CacheTraffic:
    """One cache directory: its lookups over the interval, its hit ratio over
    the interval and since the daemon started (None: no lookups), its size."""

    cache: str
    lookups_per_second: float
    hits_per_second: float
    misses_per_second: float
    hit_ratio: float | None
    hit_ratio_since_start: float | None
    files: int | None
    bytes: int | None
    budget_bytes: int | None


@dataclass(frozen=True)
class LookupTraffic:
    """Server lookups of one kind (:data:`LOOKUPS`): hits and misses."""

    name: str
    hits_per_second: float
    misses_per_second: float
    hit_ratio: float | None
    hit_ratio_since_start: float | None


@dataclass(frozen=True)
class ErrnoCount:
    """FUSE requests answered with one errno: per second, and since start."""

    errno: str
    per_second: float
    total: int
    serious: bool


@dataclass(frozen=True)
class Health:
    """Memory, damage and the remote tiers' state: gauges as read last, None
    where the daemon has no such figure."""

    rss_bytes: int | None
    memory_limit_bytes: int | None
    internal_errors: int | None
    internal_errors_per_second: float
    corruptions: int | None
    needs_fsck: bool | None
    failsafe: bool | None
    push_queue_items: int | None
    push_queue_oldest_seconds: float | None
    breakers: int
    breakers_open: list[str]


@dataclass(frozen=True)
class Frame:
    """What one screen shows: the figures between two scrapes ``seconds`` apart."""

    seconds: float
    store: str | None
    role: str | None
    version: str | None
    requests: list[RequestRate]
    throughput: list[Flow]
    caches: list[CacheTraffic]
    lookups: list[LookupTraffic]
    errors: list[ErrnoCount]
    health: Health

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def compute(before: Scrape, after: Scrape) -> Frame:
    """The figures between two scrapes of one daemon (``after`` the later)."""
    seconds = after.at - before.at
    if seconds <= 0:
        raise ValueError("the second scrape must be later than the first")

    def increase(name: str, *keys: str) -> dict[tuple[str, ...], float]:
        then = before.series(name)
        grown = {}
        for labels, now in after.series(name).items():
            old = then.get(labels)
            grown[labels] = now if old is None or now < old else now - old  # a reset: from 0
        return _grouped(grown, keys)

    def rates(name: str, *keys: str) -> dict[tuple[str, ...], float]:
        return {key: grown / seconds for key, grown in increase(name, *keys).items()}

    info = next(iter(after.by("cachefs_store_info", "store", "role")), None)
    build = next(iter(after.by("cachefs_build_info", "version")), None)
    role = info[1] if info else None

    requests = [
        *_busiest("fuse", rates(FUSE_REQUESTS, "operation")),
        *_busiest("server", rates(SERVER_REQUESTS, "protocol", "method")),
        *_busiest("remote", rates(REMOTE_REQUESTS, "operation")),
    ]
    throughput = [
        Flow(row, sum(rates(name).values()))
        for row, name in FLOWS
        if name in after.samples and not (role == "serve" and name.startswith("cachefs_fuse"))
    ]

    hits = after.by("cachefs_cache_hits_total", "cache")
    misses = after.by("cachefs_cache_misses_total", "cache")
    new_hits = rates("cachefs_cache_hits_total", "cache")
    new_misses = rates("cachefs_cache_misses_total", "cache")
    held = after.by("cachefs_cache_bytes", "cache")
    files = after.by("cachefs_cache_files", "cache")
    budgets = after.by("cachefs_cache_budget_bytes", "cache")
    caches = []
    for key in {*hits, *misses, *held}:
        hit, miss = new_hits.get(key, 0.0), new_misses.get(key, 0.0)
        caches.append(
            CacheTraffic(
                cache=key[0],
                lookups_per_second=hit + miss,
                hits_per_second=hit,
                misses_per_second=miss,
                hit_ratio=_ratio(hit, miss),
                hit_ratio_since_start=_ratio(hits.get(key, 0.0), misses.get(key, 0.0)),
                files=_int(files.get(key)),
                bytes=_int(held.get(key)),
                budget_bytes=_int(budgets.get(key)) or None,
            )
        )
    caches.sort(key=lambda c: (-c.lookups_per_second, -(c.bytes or 0), c.cache))

    answered = after.by(SERVER_REQUESTS, "protocol", "method", "status")
    recent = rates(SERVER_REQUESTS, "protocol", "method", "status")
    lookups = []
    for (protocol, method), (hit_status, miss_status) in LOOKUPS.items():
        if not any(key[:2] == (protocol, method) for key in answered):
            continue
        hit = recent.get((protocol, method, hit_status), 0.0)
        miss = recent.get((protocol, method, miss_status), 0.0)
        lookups.append(
            LookupTraffic(
                name=f"{protocol} {method}",
                hits_per_second=hit,
                misses_per_second=miss,
                hit_ratio=_ratio(hit, miss),
                hit_ratio_since_start=_ratio(
                    answered.get((protocol, method, hit_status), 0.0),
                    answered.get((protocol, method, miss_status), 0.0),
                ),
            )
        )

    failed = after.by("cachefs_fuse_errors_total", "errno")
    failing = rates("cachefs_fuse_errors_total", "errno")
    errors = [
        ErrnoCount(key[0], failing.get(key, 0.0), int(total), key[0] in SERIOUS_ERRNOS)
        for key, total in failed.items()
    ]
    errors.sort(key=lambda e: (not e.serious, -e.per_second, -e.total, e.errno))

    breakers = after.by("cachefs_remote_breaker_open", "tier", "endpoint")
    health = Health(
        rss_bytes=_int(after.value("cachefs_memory_rss_bytes")),
        memory_limit_bytes=_int(after.value("cachefs_memory_limit_bytes")),
        internal_errors=_int(after.value("cachefs_internal_errors_total")),
        internal_errors_per_second=sum(rates("cachefs_internal_errors_total").values()),
        corruptions=_int(after.value("cachefs_store_corruptions")),
        needs_fsck=_flag(after.value("cachefs_store_needs_fsck")),
        failsafe=_flag(after.value("cachefs_failsafe")),
        push_queue_items=_int(after.value("cachefs_remote_push_queue_items")),
        push_queue_oldest_seconds=after.value("cachefs_remote_push_queue_oldest_seconds"),
        breakers=len(breakers),
        breakers_open=sorted(
            f"{tier} {endpoint}" if endpoint and endpoint != tier else tier
            for (tier, endpoint), value in breakers.items()
            if value >= 1
        ),
    )
    return Frame(
        seconds=seconds,
        store=info[0] if info else None,
        role=role,
        version=build[0] if build else None,
        requests=requests,
        throughput=throughput,
        caches=caches,
        lookups=lookups,
        errors=errors,
        health=health,
    )


def _busiest(kind: str, rates: dict[tuple[str, ...], float]) -> list[RequestRate]:
    rows = [RequestRate(kind, " ".join(key), rate) for key, rate in rates.items()]
    return sorted(rows, key=lambda r: (-r.per_second, r.name))


def _ratio(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses > 0 else None


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _flag(value: float | None) -> bool | None:
    return None if value is None else value >= 1


# --- showing -----------------------------------------------------------------------------

#: Rows of each kind of request, and cache directories, a screen shows.
REQUEST_ROWS = 8
CACHE_ROWS = 10
ALARM = "bold white on red"


def render(
    frame: Frame | None, *, source: str, interval: float, trouble: str | None = None
) -> RenderableType:
    """The screen: a header, then the frame's tables (or a word on why there
    are none yet); ``trouble``, if any, says why the figures are old."""
    header = Text.assemble(
        ("cachefs top", "bold"),
        f"  {source}",
        f"  {frame.role or 'daemon'} of {frame.store}" if frame and frame.store else "",
        f"  every {interval:g} s  {time.strftime('%H:%M:%S')}",
    )
    parts: list[RenderableType] = [header]
    if trouble:
        parts.append(Text(trouble, style=ALARM))
    if frame is None:
        parts.append(Text(f"measuring: the first figures come after {interval:g} s"))
        return Group(*parts)
    parts += [
        Columns([_throughput(frame), _requests(frame), _health(frame)], padding=(0, 2)),
        Text(""),
        _caches(frame),
        Text(""),
        Columns(
            [
                *([_lookups(frame)] if frame.lookups or frame.role == "serve" else []),
                *([_errors(frame)] if frame.role != "serve" else []),
            ],
            padding=(0, 2),
        ),
    ]
    return Group(*parts)


def _table(title: str, *columns: str, names: int = 1) -> Table:
    """A table of figures: the first ``names`` columns name, the others count."""
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1),
    )
    for n, column in enumerate(columns):
        table.add_column(column, justify="left" if n < names else "right", no_wrap=True)
    return table


def _rate(value: float) -> str:
    return f"{value:.1f}/s" if value < 100 else f"{value:.0f}/s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _throughput(frame: Frame) -> Table:
    table = _table("Throughput", "", "per second")
    for flow in frame.throughput:
        table.add_row(flow.name, human_bytes(flow.bytes_per_second) + "/s")
    return table


def _requests(frame: Frame) -> Table:
    table = _table("Requests", "kind", "request", "per second", names=2)
    for kind in ("fuse", "server", "remote"):
        rows = [r for r in frame.requests if r.kind == kind and r.per_second > 0]
        for row in rows[:REQUEST_ROWS]:
            table.add_row(kind, row.name, _rate(row.per_second))
        if len(rows) > REQUEST_ROWS:
            table.add_row(kind, f"{len(rows) - REQUEST_ROWS} more", "")
    if not table.row_count:
        table.add_row("idle", "", "")
    return table


def _health(frame: Frame) -> Table:
    health = frame.health
    table = _table("Health", "", "", names=2)
    table.show_header = False
    if health.rss_bytes is not None:
        memory, share = human_bytes(health.rss_bytes), 0.0
        if health.memory_limit_bytes:
            share = health.rss_bytes / health.memory_limit_bytes
            memory += f" of {human_bytes(health.memory_limit_bytes)} ({share:.0%})"
        table.add_row("memory", Text(memory, style=ALARM if share > 1 else ""))
    if frame.role != "serve":
        counts = {e.errno: e.total for e in frame.errors}
        serious = Text()
        for errno in SERIOUS_ERRNOS:
            count = counts.get(errno, 0)
            serious.append(f"{errno} {count}", style=ALARM if count else "")
            serious.append("  ")
        table.add_row("FUSE errors", serious)
    if health.internal_errors is not None:
        style = ALARM if health.internal_errors else ""
        table.add_row("internal errors", Text(f"{health.internal_errors}", style=style))
    if health.needs_fsck:
        damage = f"NEEDS FSCK: {health.corruptions or 0} damaged reads"
        table.add_row("store", Text(damage, style=ALARM))
    elif health.needs_fsck is not None:
        table.add_row("store", "no damage recorded")
    if health.failsafe:
        table.add_row("failsafe", Text("READ-ONLY after damage", style=ALARM))
    if health.push_queue_items is not None:
        queue = f"{health.push_queue_items} waiting"
        if health.push_queue_items and health.push_queue_oldest_seconds is not None:
            queue += f", oldest {health.push_queue_oldest_seconds:.0f} s"
        table.add_row("push queue", queue)
    if health.breakers:
        opened = health.breakers_open
        text = Text(f"{len(opened)} of {health.breakers} open", style=ALARM if opened else "")
        for name in opened[:3]:
            text.append(f"\n{name}")
        table.add_row("breakers", text)
    return table


def _caches(frame: Frame) -> RenderableType:
    if not frame.caches:
        return Text("No cache directories (`cachefs cache set DIR --max-size SIZE` makes one).")
    table = _table(
        "Cache directories, busiest first",
        "directory",
        "lookups",
        "hits",
        "misses",
        "hit ratio",
        "since start",
        "files",
        "size",
    )
    for cache in frame.caches[:CACHE_ROWS]:
        table.add_row(
            cache.cache,
            _rate(cache.lookups_per_second),
            _rate(cache.hits_per_second),
            _rate(cache.misses_per_second),
            _percent(cache.hit_ratio),
            _percent(cache.hit_ratio_since_start),
            "-" if cache.files is None else f"{cache.files}",
            _size(cache),
        )
    if len(frame.caches) > CACHE_ROWS:
        table.caption = f"and {len(frame.caches) - CACHE_ROWS} more"
    return table


def _size(cache: CacheTraffic) -> str:
    size = "-" if cache.bytes is None else human_bytes(cache.bytes)
    if cache.budget_bytes:
        size += f" of {human_bytes(cache.budget_bytes)}"
    return size


def _lookups(frame: Frame) -> Table:
    table = _table("Server lookups", "request", "hits", "misses", "hit ratio", "since start")
    for lookup in frame.lookups:
        table.add_row(
            lookup.name,
            _rate(lookup.hits_per_second),
            _rate(lookup.misses_per_second),
            _percent(lookup.hit_ratio),
            _percent(lookup.hit_ratio_since_start),
        )
    if not frame.lookups:
        table.add_row("none yet", "", "", "", "")
    return table


def _errors(frame: Frame) -> Table:
    table = _table("FUSE errors by errno", "errno", "per second", "since start")
    for error in frame.errors:
        style = ALARM if error.serious and error.total else ""
        table.add_row(Text(error.errno, style=style), _rate(error.per_second), f"{error.total}")
    if not frame.errors:
        table.add_row("none", "", "")
    return table


# --- the command -------------------------------------------------------------------------


@click.command("top")
@click.argument("target", metavar="TARGET")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Time between two readings; rates are over it.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Print one frame (two readings --interval apart) and exit, for scripts.",
)
@json_option
def command(target: str, interval: float, once: bool, as_json: bool) -> None:
    """Watch a daemon live: requests, throughput, hit ratios, errors, memory.

    TARGET is a mount point or a store that `cachefs serve` serves (started
    with --metrics ADDR: its stats say where), or the address of a /metrics
    endpoint (HOST:PORT, :PORT, HOST or http://HOST:PORT).  The screen is
    redrawn every --interval from two readings of /metrics: requests per
    second (FUSE operations, server requests by protocol and method, remote
    tiers), bytes per second (FUSE read and write, server and remote in and
    out), hit ratios per cache directory (over the interval and since the
    daemon started; busiest first) and of server lookups (gRPC
    GetActionResult, HTTP GET /ac and GET /cas), memory, errors (EIO, ENOSPC
    and EROFS first), damage, the push queue and open circuit breakers.  A
    daemon that stops answering is shown as such and read again until it
    answers.  Ctrl-C quits.

    \b
    --json prints one frame as JSON (implies --once); keys (stable): seconds,
    store, role, version, requests (kind, name, per_second), throughput
    (name, bytes_per_second), caches (cache, lookups_per_second,
    hits_per_second, misses_per_second, hit_ratio, hit_ratio_since_start,
    files, bytes, budget_bytes), lookups (name, hits_per_second,
    misses_per_second, hit_ratio, hit_ratio_since_start), errors (errno,
    per_second, total, serious), health (rss_bytes, memory_limit_bytes,
    internal_errors, internal_errors_per_second, corruptions, needs_fsck,
    failsafe, push_queue_items, push_queue_oldest_seconds, breakers,
    breakers_open); a ratio with no lookups is null.
    """
    url = metrics_url(target)
    timeout = max(2.0, interval)
    try:
        before = scrape(url, timeout)  # an endpoint that cannot be read: the error, now
        if once or as_json:
            time.sleep(interval)
            frame = compute(before, scrape(url, timeout))
            if as_json:
                click.echo(json.dumps(frame.as_dict(), indent=2))
            else:
                # A terminal's width, or (into a pipe) wide enough not to cut figures.
                console = Console(width=None if sys.stdout.isatty() else 160)
                console.print(render(frame, source=url, interval=interval))
            return
        if not sys.stdout.isatty():
            raise ConfigError(
                "cachefs top redraws a terminal, and its output is not one",
                hint="for a pipe or a file use --once, or --json",
            )
        _watch(url, before, interval, timeout)
    except KeyboardInterrupt:
        return


def _watch(url: str, before: Scrape | None, interval: float, timeout: float) -> None:
    """Redraw every ``interval`` until interrupted.  While the endpoint does not
    answer, the last frame stays with a line that says so; once it answers
    again, the next frame is measured from that answer."""
    frame: Frame | None = None
    trouble: str | None = None
    since = ""
    with Live(
        render(None, source=url, interval=interval),
        screen=True,
        auto_refresh=False,
        redirect_stderr=False,
    ) as live:
        tick = time.monotonic()
        while True:
            tick = max(tick + interval, time.monotonic())
            time.sleep(max(0.0, tick - time.monotonic()))
            try:
                after = scrape(url, timeout)
            except CachefsError as exc:
                since = since or time.strftime("%H:%M:%S")
                trouble = f"no answer since {since}, trying every {interval:g} s: {exc.message}"
                before = None
            else:
                if before is not None:
                    frame = compute(before, after)
                    trouble = None
                    since = ""
                elif trouble:
                    trouble = f"answering again since {time.strftime('%H:%M:%S')}: measuring"
                before = after
            live.update(render(frame, source=url, interval=interval, trouble=trouble), refresh=True)
