"""A package's names imported when first used (PEP 562 ``__getattr__``).

``cachefs.fs`` and ``cachefs.daemon`` name things whose modules bring the
engine, trio, FUSE or the servers; the command lines that only need a light
part of them (``cachefs cache``, ``cachefs umount`` ...) do without those
imports.  Each package sets ``__getattr__ = lazy_names(__name__, {...})``
outside ``TYPE_CHECKING``, and imports the same names under it for mypy
(which then still reports a name the package does not have).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``name`` is taken from the
    module ``modules[name]`` (relative to ``package``: ``"._mount"``)."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(modules[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["lazy_names"]
