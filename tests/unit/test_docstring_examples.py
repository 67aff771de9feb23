"""The sketches in treeguard's docstrings (the ``::`` blocks the API reference shows) call
the API as it is: each block parses as Python, and every call of a public name passes only
keyword arguments that name accepts. The runnable examples of README and the guides are run
by tests/integration/test_examples.py; these sketches name the caller's own functions
(``copy_memory``), so they are checked against the API instead of run."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import treeguard
from treeguard.cgroup import Cgroup
from treeguard.pytest_plugin import FreezeTree

PACKAGE = Path(treeguard.__file__).parent

#: Calls known by the name they are written with in the sketches.
CALLABLES = {
    **{name: getattr(treeguard, name) for name in treeguard.__all__},
    **{f"treeguard.{name}": getattr(treeguard, name) for name in treeguard.__all__},
    "Cgroup.create": Cgroup.create,
    "treeguard_freeze": FreezeTree.__call__,  # the fixture's value, as the sketch names it
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _sketches() -> Iterator[tuple[str, str]]:
    """``(where, code)`` of every ``::`` literal block of the package's modules: the lines
    after it indented deeper than the line that ends with ``::`` (reST's rule)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.rstrip().endswith("::"):
                continue
            base = _indent(line) if line.strip() != "::" or i == 0 else _indent(line)
            block = []
            for after in lines[i + 1 :]:
                if after.strip() and _indent(after) <= base:
                    break
                block.append(after)
            code = textwrap.dedent("\n".join(block)).strip("\n")
            if code:
                yield f"{path.relative_to(PACKAGE.parent)}:{i + 1}", code + "\n"


#: The modules whose docstrings the API reference shows: where each public name is
#: defined, and the public modules. (A class re-exported by the package names the package
#: as its module, so its file is not found this way: _guard, ProcessesGuard's, is named.)
SHOWN = {
    inspect.getfile(obj)
    for obj in CALLABLES.values()
    if inspect.isclass(obj) or inspect.isfunction(obj)
} | {str(PACKAGE / f"{m}.py") for m in ("cgroup", "procfs", "errors", "pytest_plugin", "_guard")}

SKETCHES = {w: c for w, c in _sketches() if str(PACKAGE.parent / w.split(":")[0]) in SHOWN}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _api_calls(code: str, where: str) -> list[ast.Call]:
    tree = ast.parse(code, where)  # a sketch may use await and async with at its top level
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _name(n.func) in CALLABLES]


def test_every_face_has_a_checked_sketch() -> None:
    faces = {w.split(":")[0] for w, code in SKETCHES.items() if _api_calls(code, w)}
    assert faces >= {
        f"treeguard/{m}.py"
        for m in ("_guard", "_async", "_token", "_freezethaw", "cgroup", "pytest_plugin")
    }


@pytest.mark.parametrize("where", sorted(SKETCHES))
def test_sketch_calls_the_api_as_it_is(where: str) -> None:
    code = SKETCHES[where]
    for node in _api_calls(code, where):
        fn = CALLABLES[_name(node.func) or ""]
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        allowed = set(params) | (set(_options()) if takes_any else set())
        for kw in node.keywords:
            assert kw.arg is None or kw.arg in allowed, f"{where}: {_name(node.func)}({kw.arg}=)"


def _options() -> list[str]:
    types = importlib.import_module("treeguard._types")
    return list(types.GuardOptions.__annotations__)
