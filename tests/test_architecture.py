"""The shape of ``host/``: data moves one way, no module imports another's private
names, and each module imports alone.

The import graph counts every ``import`` in a module, those under
``if TYPE_CHECKING:`` too: an annotation-only import is still a dependency a
reader has to follow, and a cycle hidden that way is a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("host", "state", "plugins")


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "templates" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {m: p for pkg in PACKAGES for m, p in _modules(pkg).items()}
    graph: dict[str, set[str]] = {m: set() for m in modules if m.startswith("host")}
    for name in graph:
        for module, names, _ in _imports(name, modules[name]):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in graph and target != name and target != "host":
                    graph[name].add(target)
    return graph


def test_no_import_cycle_in_host() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle in host/: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_messages_imports_nobody() -> None:
    """The values that cross between parts live in a leaf every part may import."""
    assert _graph()["host.messages"] == set()


def test_no_private_names_imported_across_modules() -> None:
    offenders = []
    for package in PACKAGES:
        for name, path in _modules(package).items():
            for module, names, line in _imports(name, path):
                if module.split(".")[0] not in PACKAGES or module == name:
                    continue
                for imported in names:
                    if imported.startswith("_") and not imported.startswith("__"):
                        offenders.append(f"{path.relative_to(ROOT)}:{line}: "
                                         f"from {module} import {imported}")
    assert not offenders, "private names imported from another module:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package, below", [("host", "plugins"), ("state", "host"),
                                            ("state", "plugins")])
def test_the_layers_import_downward_only(package: str, below: str) -> None:
    """``state`` is the leaf, ``host`` serves every plugin and knows none: what a
    plugin adds reaches the host through hooks (``world_import``,
    ``map_change_blocked``), never by the host importing it."""
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for name, path in _modules(package).items()
                 for module, _, line in _imports(name, path)
                 if module.split(".")[0] == below]
    assert not offenders, f"{package}/ imports {below}/:\n" + "\n".join(offenders)


def test_only_the_composition_roots_import_the_server() -> None:
    """``host.server`` wires the parts together; the parts never reach back to it."""
    allowed = {"host.server", "host.cli", "host.testing", "host.offline"}
    importers = {m for m, deps in _graph().items() if "host.server" in deps}
    assert importers <= allowed, sorted(importers - allowed)


@pytest.mark.parametrize("module", sorted(m for m in _modules("host") if m != "host.__main__"))
def test_each_module_imports_alone(module: str) -> None:
    """In a fresh interpreter, first thing: a cycle at import time shows as an
    ImportError in some module imported first, whatever the others' order."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
