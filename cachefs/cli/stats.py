"""``cachefs stats``: what the store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cachefs.daemon import mount_info, resolve_store
from cachefs.engine import Store

from .common import human_bytes, json_option, store_argument


@click.command("stats")
@store_argument
@json_option
def command(store: Path, as_json: bool) -> None:
    """Show objects, logical and stored bytes, chunks, dedup and compression ratios.

    \b
    --json keys (stable): files, objects, logical_bytes, stored_bytes, chunks,
    chunk_bytes, dedup_ratio, compression_ratio, segments, segment_bytes,
    live_ratio, segments_below_gc_threshold, segment_live_histogram, store,
    needs_fsck, corruptions (damaged reads since the last fsck), recent_damage
    (the last few: time, message, path, offset), failsafe (why a mount went
    read-only, or null); kept in the store until `cachefs fsck --repair`.
    Given a mount point, or a store that `cachefs serve` serves, also: caches
    (one object per cache directory: path, max_size, policy, files, bytes,
    hits, misses, hit_ratio, evictions, bytes_evicted, throttled,
    throttled_seconds, and since_start: those counters since the daemon
    started), max_store_size, quota_stuck, throttle_waits, memory_limit,
    rss_bytes, pid (the daemon's), servers (grpc and http: where they listen,
    or null), metrics (where --metrics serves them, if it does), and with
    remote tiers remote: tiers (each with remote, direction, failing, skipped
    and why, a shard group's endpoints, and what came from it:
    fetched_objects, fetched_chunks, fetched_bytes, healed_chunks), queue and
    oldest_seconds
    (what waits to be pushed), pushed_objects, pushed_chunks, pushed_bytes,
    pushed_entries, push_failures, last_error, fetched_objects,
    fetched_chunks, fetched_bytes, fetch_misses, fetch_errors,
    healed_chunks, spliced_objects, early_chunks (of pushed_chunks: sent while
    their file was written), shared_entries_queued, shared_settling,
    shared_fetches, shared_misses, and under --local-max-size local_max_size
    and dropped_chunks.
    Works beside a running writer.
    """
    live = mount_info(store)
    with Store.open(resolve_store(store), readonly=True) as opened:
        stats = opened.stats()
        doc: dict[str, Any] = stats.as_dict() | {"store": str(opened.path)}
        health = opened.health.as_dict()
        doc |= {
            "needs_fsck": health["needs_fsck"],
            "corruptions": health["corruptions"],
            "recent_damage": health["recent"],
            "failsafe": health["failsafe"],
        }
        config = opened.config
    if live is not None:
        # The daemon's own figures: cache directories, quota, memory, servers.
        keys = (
            "caches",
            "max_store_size",
            "throttle_waits",
            "memory_limit",
            "rss_bytes",
            "pid",
            "servers",
            "metrics",
            "remote",
            "signatures",
            "tenants",
        )
        for key in keys:
            if key in live:
                doc[key] = live[key]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    rows = [
        ("store", str(doc["store"])),
        ("digest function", config.digest_function),
        ("objects", f"{stats.objects}"),
        ("files (references)", f"{stats.files}"),
        ("logical bytes", f"{human_bytes(stats.logical_bytes)} ({stats.logical_bytes})"),
        ("unique chunk bytes", f"{human_bytes(stats.chunk_bytes)} ({stats.chunk_bytes})"),
        ("stored bytes", f"{human_bytes(stats.stored_bytes)} ({stats.stored_bytes})"),
        ("chunks", f"{stats.chunks}"),
        ("dedup ratio", f"{stats.dedup_ratio:.2f}x"),
        ("compression ratio", f"{stats.compression_ratio:.2f}x"),
        ("segments", f"{stats.segments} ({human_bytes(stats.segment_bytes)})"),
        ("live ratio", f"{stats.live_ratio:.1%}"),
        ("segments below gc threshold", f"{stats.segments_below_threshold}"),
        ("health", _health(doc)),
    ]
    caches: list[dict[str, Any]] = doc.get("caches", [])
    for cache in caches:
        rows.append(
            (
                f"cache {cache['path']}",
                f"{human_bytes(cache['bytes'])} of {human_bytes(cache['max_size'])}, "
                f"{cache['policy']}, hit ratio {cache['hit_ratio']:.1%}, "
                f"{cache['evictions']} evicted"
                + (f", shared as {cache['shared']}" if cache.get("shared") else ""),
            )
        )
    remote: dict[str, Any] | None = doc.get("remote")
    if remote is not None:
        tiers = ", ".join(
            t["remote"] + (f" (skipped: {t['skipped']})" if t.get("skipped") else "")
            for t in remote["tiers"]
        )
        rows.append(("remote tiers", tiers))
        if "queue" in remote:
            rows.append(
                (
                    "push queue",
                    f"{remote['queue']} waiting (oldest {remote['oldest_seconds']:.0f} s), "
                    f"{remote['pushed_objects']} pushed"
                    + (f", last error: {remote['last_error']}" if remote["last_error"] else ""),
                )
            )
        rows.append(
            (
                "fetched",
                f"{remote['fetched_objects']} objects ({human_bytes(remote['fetched_bytes'])}), "
                f"{remote['healed_chunks']} chunks healed",
            )
        )
        if "local_max_size" in remote:
            rows.append(
                (
                    "local max size",
                    f"{human_bytes(remote['local_max_size'])}, {remote['dropped_chunks']} chunks "
                    "dropped here (held by the tiers)",
                )
            )
    signatures: dict[str, int] | None = doc.get("signatures")
    if signatures is not None:
        refused = ", ".join(f"{n} {k}" for k, n in signatures.items() if k != "accepted" and n)
        rows.append(
            ("signed entries", f"{signatures['accepted']} accepted; refused: {refused or 'none'}")
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _health(doc: dict[str, Any]) -> str:
    if not doc["needs_fsck"]:
        return "no damage recorded"
    text = f"NEEDS FSCK: {doc['corruptions']} damaged reads"
    if doc["recent_damage"]:
        last = doc["recent_damage"][-1]
        text += f"; last {last['time']}: {last['message']}"
    if doc["failsafe"]:
        text += f"; read-only since: {doc['failsafe']}"
    return text + "; run `cachefs fsck --repair`"
