"""Kill points for crash tests: child processes get this source and die on cue."""

from __future__ import annotations

import os
import signal
from typing import Any


def die_at(owner: Any, name: str, call: int = 1, after: bool = False) -> None:
    """SIGKILL this process at the ``call``-th call of ``owner.name`` (before it runs,
    or just after it returned)."""
    original = getattr(owner, name)
    calls = 0

    def patched(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == call and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, patched)
