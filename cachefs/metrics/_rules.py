"""The Prometheus rules shipped with cachefs (``rules.yml`` beside this module)."""

from __future__ import annotations

from pathlib import Path

#: The recording and alerting rules (``cachefs metrics rules`` prints them).
RULES_FILE = Path(__file__).with_name("rules.yml")


def rules_text() -> str:
    return RULES_FILE.read_text(encoding="utf-8")


__all__ = ["RULES_FILE", "rules_text"]
