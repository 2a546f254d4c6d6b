"""The shape of the package: layers import only the layers below them, a
package's private ``_x`` modules are imported only inside it, only the FUSE
adapter and the daemon import pyfuse3, only the servers grpcio and hypercorn,
the engine knows no trio, and no class
grows past what one can read (see ``cachefs/__init__.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cachefs"

#: Every part of the package and its layer; a module may import its own layer and
#: the layers below.  ``cachefs`` itself (``__version__``), ``errors`` and
#: ``fsutil`` serve every layer.
LAYERS = {
    "cachefs": 0,
    "cachefs.errors": 0,
    "cachefs.fsutil": 0,
    "cachefs.metrics": 0,
    "cachefs.tracing": 0,
    "cachefs.format": 1,
    "cachefs.protocol": 1,
    "cachefs.signing": 1,
    "cachefs.engine": 2,
    "cachefs.aio": 3,
    "cachefs.remote": 3,
    "cachefs.fs": 4,
    "cachefs.fuse": 5,
    "cachefs.server": 5,
    "cachefs.daemon": 6,
    "cachefs.cli": 7,
    "cachefs.__main__": 7,
}
#: Third-party modules only some parts may import.
RESTRICTED = {
    "pyfuse3": {"cachefs.fuse", "cachefs.daemon"},
    "trio": {
        "cachefs.aio",
        "cachefs.fs",
        "cachefs.fuse",
        "cachefs.server",
        "cachefs.daemon",
        "cachefs.cli",
    },
    "grpc": {"cachefs.protocol", "cachefs.remote", "cachefs.server"},
    "obstore": {"cachefs.remote"},
    "hypercorn": {"cachefs.server"},
    "prometheus_client": {"cachefs.metrics"},
    "opentelemetry": {"cachefs.tracing"},
    "cryptography": {"cachefs.signing"},
}
MAX_CLASS_LINES = 500


def part_of(module: str) -> str:
    """The entry of LAYERS a module belongs to (its longest prefix there)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``source``, at any depth
    (function bodies and ``TYPE_CHECKING`` blocks too), relative ones resolved."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from cachefs import fs`` imports the module cachefs.fs.
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return found


@dataclass(frozen=True)
class Violation:
    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.what}"


def check_module(module: str, source: str, is_package: bool = False) -> list[Violation]:
    part = part_of(module)
    rank = LAYERS[part]
    problems = []
    for line, target in imports(module, source, is_package):
        top = target.split(".")[0]
        if top == "cachefs":
            other = part_of(target)
            private = next((p for p in target.split(".") if p.startswith("_")), None)
            if private not in (None, "__version__", "__main__") and other != part:
                problems.append(
                    Violation(module, line, f"{part} imports {target}, private to {other}")
                )
            if LAYERS[other] > rank:
                problems.append(
                    Violation(
                        module,
                        line,
                        f"{part} (layer {rank}) imports {target} (layer {LAYERS[other]})",
                    )
                )
        elif top in RESTRICTED and part not in RESTRICTED[top]:
            problems.append(Violation(module, line, f"{part} imports {top}"))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_CLASS_LINES:
                problems.append(
                    Violation(module, node.lineno, f"class {node.name} has {length} lines")
                )
    return problems


def test_every_module_keeps_to_its_layer() -> None:
    problems = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40
    for path in modules:
        problems.extend(
            check_module(module_name(path), path.read_text(), path.name == "__init__.py")
        )
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("cachefs.engine._store", "from cachefs.fs import Filesystem\n", "imports cachefs.fs"),
        ("cachefs.format.segment", "from cachefs import engine\n", "imports cachefs.engine"),
        ("cachefs.fs._files", "from ..fuse import Operations\n", "imports cachefs.fuse"),
        (
            "cachefs.engine._gc",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cachefs.cli\n",
            "imports cachefs.cli",
        ),
        ("cachefs.fs._caches", "import pyfuse3\n", "imports pyfuse3"),
        ("cachefs.engine._reads", "def f():\n    import trio\n", "imports trio"),
        ("cachefs.cli.put", "class C:\n" + "    x = 1\n" * 600, "class C has 601 lines"),
        ("cachefs.fs._caches", "from cachefs.engine._index import Index\n", "private to"),
        ("cachefs.cli.gc", "from cachefs.engine import _gc\n", "private to cachefs.engine"),
    ],
)
def test_the_check_finds_what_breaks_the_rules(module: str, source: str, expected: str) -> None:
    assert any(expected in str(v) for v in check_module(module, source)), expected


def test_the_check_accepts_what_the_rules_allow() -> None:
    allowed = [
        ("cachefs.fs._filesystem", "from cachefs.engine import Store\nimport trio\n"),
        ("cachefs.fuse", "import pyfuse3\nfrom cachefs.fs import Filesystem\n"),
        ("cachefs.engine._gc", "from cachefs.engine._store import Store\n"),
        ("cachefs.format.header", "from cachefs import __version__\n"),
        ("cachefs.cli.mount", "from cachefs import daemon\n"),
        ("cachefs.engine._gc", "from cachefs.engine import _store\n"),
    ]
    for module, source in allowed:
        assert check_module(module, source) == [], module


#: Commands that read a store or talk to a daemon: they start without the file
#: system, the servers and FUSE (``cachefs.cli`` imports a command's module when
#: it runs), in about a third of the time ``mount`` takes to import.
LIGHT_COMMANDS = ("umount", "init", "put", "cat", "stats", "scrub", "gc", "metrics", "audit")


@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_a_light_command_imports_no_daemon_machinery(command: str) -> None:
    probe = (
        "import sys\n"
        "from cachefs.cli import cli\n"
        f"cli.get_command(None, {command!r})\n"
        "print(sorted(m for m in ('cachefs.fs', 'cachefs.server', 'pyfuse3', 'trio', 'grpc')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
