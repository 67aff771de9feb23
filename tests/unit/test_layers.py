"""The house's layers (ARCHITECTURE.md): every module of treeguard imports only from its own
layer or the ones below, and no import cycle exists (lazy imports inside functions and
imports for type checking count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "treeguard"

#: Lowest first. A module may import from its own layer and every layer below it.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"errors", "_report", "_types", "_drive", "_finalizers", "_version", "_jsonshape"}),
    ("kernel", {"procfs", "_checks", "_ptrace", "_subreaper", "_signames", "_proc_events"}),
    (
        "facts",
        {"_thaw", "_tree", "_mounts", "_delegation", "_journal", "_cgroupfs", "_cgroupfiles"},
    ),
    (
        "backends",
        {
            "_backends",
            "_backends._base",
            "_backends._pidfds",
            "_backends._holds",
            "_backends._proof",
            "_backends._known",
            "_backends._relays",
            "_backends._signal",
            "_backends._cgroup",
            "_backends._freezers",
            "_backends._freezer_base",
            "_backends._freezer_v1",
            "_backends._freezer_v2",
            "_backends._census",
            "_backends._target",
            "_backends._kept",
            "_backends._order",
            "_backends._hold",
            "_backends._tracer",
            "_backends._ptrace",
            "_backends._auto",
        },
    ),
    (
        "services",
        {
            "_watchdog",
            "_helper",
            "_records",
            "_snapshot",
            "_snapshot_read",
            "_describe",
            "_workers",
            "_storms",
            "_doctor",
        },
    ),
    ("core", {"_guard"}),
    (
        "faces",
        {
            "_token",
            "_async",
            "_freezethaw",
            "_child_processes",
            "pytest_plugin",
            "_demo",
            "cgroup",
            "_cgroup_members",
            "_statefile",
        },
    ),
    ("cli", {"_cli", "_cli_freeze", "_cli_pause", "_cli_status", "_cli_doctor", "__main__", ""}),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The treeguard modules ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = parts[: len(parts) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("treeguard"):
                target = node.module.removeprefix("treeguard").lstrip(".")
            else:
                continue
            subs = {f"{target}.{a.name}".lstrip(".") for a in node.names}
            subs &= set(MODULES)
            found |= subs
            if len(subs) < len(node.names) and target in MODULES:
                found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("treeguard"):
                    target = alias.name.removeprefix("treeguard").lstrip(".")
                    if target in MODULES:
                        found.add(target)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
LAYER_OF = {module: i for i, (_, members) in enumerate(LAYERS) for module in members}


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) == set(LAYER_OF), "add the module to LAYERS and ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_only(module: str) -> None:
    upward = {
        dep: LAYERS[LAYER_OF[dep]][0] for dep in GRAPH[module] if LAYER_OF[dep] > LAYER_OF[module]
    }
    assert not upward, (
        f"{module or 'treeguard'} ({LAYERS[LAYER_OF[module]][0]}) imports up: {upward}"
    )


def test_no_import_cycle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(m or "treeguard" for m in cycle))
        if module in done:
            return
        for dep in sorted(GRAPH[module]):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_imports_are_read() -> None:
    # A check of the reader itself: edges that exist, lazy and relative ones included.
    assert {"_backends", "_checks", "_drive"} <= GRAPH["_guard"]
    assert "_backends._freezers" in GRAPH["_helper"]  # imported inside a method
    assert "_ptrace" in GRAPH["_backends._auto"]  # ``from .. import _ptrace``
    assert "_cli" in GRAPH["__main__"]
    assert "_guard" in GRAPH["pytest_plugin"]  # imported inside the fixture
    assert {"_guard", "_async", "errors", "cgroup"} <= GRAPH[""]  # for type checking only
