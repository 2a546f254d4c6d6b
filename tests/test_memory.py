"""The memory governor: caches sized from the limit, dropped past 75% of it or
under system memory pressure, with a back-off (no mount needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cachefs.fs import MemoryGovernor
from cachefs.fs import _memory as memory

MIB = 1 << 20


class FakeStore:
    def __init__(self) -> None:
        self.limits: list[int] = []
        self.shrinks = 0

    def limit_memory(self, limit: int) -> None:
        self.limits.append(limit)

    def shrink(self) -> None:
        self.shrinks += 1


def governor(
    monkeypatch: pytest.MonkeyPatch, rss: list[int], pressure: Sequence[str | None]
) -> Any:
    monkeypatch.setattr(memory, "resident_bytes", lambda *a, **k: rss[0])
    monkeypatch.setattr(memory, "memory_pressure", lambda: pressure[0])
    store = FakeStore()
    return MemoryGovernor(store, 256 * MIB), store  # type: ignore[arg-type]


def test_caches_drop_past_three_quarters_of_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    rss, pressure = [100 * MIB], [None]
    gov, store = governor(monkeypatch, rss, pressure)
    assert store.limits == [256 * MIB]
    gov.check(0.0)
    assert store.shrinks == 0
    rss[0] = 200 * MIB  # over 192 MiB
    gov.check(1.0)
    assert store.shrinks == 1
    gov.check(2.0)  # still over, but nothing grew: backs off
    assert store.shrinks == 1
    rss[0] = 240 * MIB  # grew by more than an eighth of the limit
    gov.check(3.0)
    assert store.shrinks == 2
    gov.check(40.0)  # the back-off is over
    assert store.shrinks == 3


def test_system_pressure_drops_the_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    rss, pressure = [50 * MIB], ["memory pressure 42% (/proc/pressure/memory)"]
    gov, store = governor(monkeypatch, rss, pressure)
    gov.check(0.0)
    assert store.shrinks == 1 and gov.figures()["memory_shrinks"] == 1


def test_pressure_readings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = {
        "/proc/pressure/memory": "some avg10=55.00 avg60=1.00 avg300=0.00 total=1\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        "/proc/meminfo": "MemTotal: 1000 kB\nMemAvailable: 900 kB\n",
    }
    real_read = Path.read_text

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        return files[str(self)] if str(self) in files else real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert "55.00%" in (memory.memory_pressure() or "")
    files["/proc/pressure/memory"] = "some avg10=0.50 avg60=1.00 avg300=0.00 total=1\n"
    assert memory.memory_pressure() is None
    files["/proc/meminfo"] = "MemTotal: 1000000 kB\nMemAvailable: 10000 kB\n"
    assert "available" in (memory.memory_pressure() or "")
    assert memory.resident_bytes() > 0  # this process, read for real


def test_the_allocator_keeps_some_freed_memory_for_the_next_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The governor tunes glibc's allocator to its limit: requests under 8 MiB
    from the heap, a sixteenth of the limit (at most 32 MiB) of freed heap
    kept; a shrink gives it back."""
    calls: list[tuple[str, tuple[int, ...]]] = []

    class FakeLibc:
        def mallopt(self, *args: int) -> int:
            calls.append(("mallopt", args))
            return 1

        def malloc_trim(self, *args: int) -> int:
            calls.append(("malloc_trim", args))
            return 1

    monkeypatch.setattr(memory, "_libc", FakeLibc)
    gov, _ = governor(monkeypatch, [0], [None])
    assert calls == [("mallopt", (-3, 8 * MIB)), ("mallopt", (-1, 16 * MIB))]
    calls.clear()
    MemoryGovernor(FakeStore(), 4096 * MIB)  # type: ignore[arg-type]
    assert calls == [("mallopt", (-3, 8 * MIB)), ("mallopt", (-1, 32 * MIB))]
    calls.clear()
    gov.shrink("a test")
    assert calls == [("malloc_trim", (0,))]
