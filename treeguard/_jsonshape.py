"""Checks a JSON document against a JSON Schema shipped in ``treeguard/schemas/``, so that
a reader refuses what the published schema refuses without a copy of its rules in code.

Only the keywords these schemas use are understood (:data:`KEYWORDS`; a test keeps the
shipped schemas within them). Two choices are stricter than JSON Schema, because the value
must become a Python ``int`` or ``float`` a reader can use: an ``integer`` is an ``int``
(not ``1.0``, never ``True``), and a ``number`` must be a finite float (``NaN``,
``Infinity``, ``1e999`` that :func:`json.loads` turns into ``inf``, and integers too large
for a float are refused). One choice is looser, on request: ``open_objects`` lets objects
carry members the schema does not name, so that a document written by a later treeguard
(whose schema only ever adds members) still reads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["KEYWORDS", "check", "schema"]

#: The JSON Schema keywords :func:`check` understands; annotations are ignored.
KEYWORDS = frozenset(
    {
        "type",
        "const",
        "enum",
        "minimum",
        "maximum",
        "pattern",
        "anyOf",
        "$ref",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
    }
)
ANNOTATIONS = frozenset({"$schema", "$defs", "title", "description"})


@cache
def schema(name: str) -> dict[str, Any]:
    """The shipped schema ``name`` (``"snapshot-1"``), as the package installs it."""
    from importlib import resources  # (here: 8 ms to import, for the few that need it)

    text = resources.files("treeguard").joinpath(f"schemas/{name}.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    _understood(loaded)
    return loaded


def _understood(node: Any) -> None:
    """Fail on a keyword :func:`check` does not know: it would be silently not checked."""
    if isinstance(node, list):
        for item in node:
            _understood(item)
        return
    if not isinstance(node, dict):
        return
    unknown = set(node) - KEYWORDS - ANNOTATIONS
    if unknown:  # a schema this checker cannot read faithfully: a bug of the package
        raise RuntimeError(f"schema keyword(s) not understood: {sorted(unknown)}")
    for key, value in node.items():
        if key in ("properties", "$defs"):
            for inner in value.values():
                _understood(inner)
        elif key not in ("enum", "const", "required"):
            _understood(value)


class _Mismatch(Exception):
    """A wrong value; ``where`` is completed on the way up (no path is built for a value
    that is right, which is nearly every value)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.where = ""
        self.problem = problem


def check(
    value: object, name: str, *, what: str, ref: str = "#", open_objects: bool = False
) -> None:
    """Check ``value`` against the part ``ref`` of the shipped schema ``name``.

    :raises InvalidArgumentError: named ``what``, saying which member is wrong and how.
    """
    root = schema(name)
    try:
        _check(value, _resolve(root, ref), root, open_objects)
    except _Mismatch as err:
        where = f"{err.where.lstrip('.')}: " if err.where else ""
        raise InvalidArgumentError(what, f"{where}{err.problem}") from None


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#").strip("/").split("/"):
        if part:
            node = node[part]
    resolved: dict[str, Any] = node
    return resolved


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is(kind: str, value: object) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an integer beyond the largest float
            return False
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict | Mapping)
    raise ValueError(f"unknown JSON Schema type {kind!r}")


def _kind(kind: str) -> str:
    return "finite number" if kind == "number" else kind


def _same(value: object, allowed: object) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    return type(value) is type(allowed) and value == allowed


def _check(value: Any, node: dict[str, Any], root: dict[str, Any], open_: bool) -> None:
    if "$ref" in node:
        _check(value, _resolve(root, node["$ref"]), root, open_)
    if "anyOf" in node:
        failures: list[_Mismatch] = []
        for branch in node["anyOf"]:
            try:
                _check(value, branch, root, open_)
                break
            except _Mismatch as err:
                failures.append(err)
        else:
            # Report the branch of the value's own type (a wrong pid, not "not null").
            typed = (
                [f for f, b in zip(failures, node["anyOf"], strict=True) if _is(b["type"], value)]
                if all("type" in b for b in node["anyOf"])
                else []
            )
            if typed:
                raise typed[0]
            kinds = " or ".join(_kind(b.get("type", "?")) for b in node["anyOf"])
            raise _Mismatch(f"expected {kinds}, not {_shown(value)}")
    if "type" in node and not _is(node["type"], value):
        raise _Mismatch(f"expected {_kind(node['type'])}, not {_shown(value)}")
    if "const" in node and not _same(value, node["const"]):
        raise _Mismatch(f"{_shown(value)} is not {node['const']!r}")
    if "enum" in node and not any(_same(value, v) for v in node["enum"]):
        raise _Mismatch(f"{_shown(value)} is not one of {node['enum']}")
    if (
        ("minimum" in node or "maximum" in node)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):  # an integer beyond the float range too: 10**400 is above every maximum
        if value < node.get("minimum", value):
            raise _Mismatch(f"{_shown(value)} is below the minimum {node['minimum']}")
        if value > node.get("maximum", value):
            raise _Mismatch(f"{_shown(value)} is above the maximum {node['maximum']}")
    if "pattern" in node and isinstance(value, str) and not re.search(node["pattern"], value):
        raise _Mismatch(f"{_shown(value)} does not match {node['pattern']}")
    if isinstance(value, list):
        _check_array(value, node, root, open_)
    elif isinstance(value, dict | Mapping):  # dict first: the ABC's check is slow
        _check_object(value, node, root, open_)


def _check_object(
    value: Mapping[Any, Any], node: dict[str, Any], root: dict[str, Any], open_: bool
) -> None:
    for key in node.get("required", ()):
        if key not in value:
            raise _Mismatch(f"missing member {key!r}")
    properties = node.get("properties", {})
    for key, member in value.items():
        if key in properties:
            _inside(f".{key}", member, properties[key], root, open_)
        elif node.get("additionalProperties", True) is False and not open_:
            raise _Mismatch(f"unknown member {_shown(key)}")


def _check_array(value: list[Any], node: dict[str, Any], root: dict[str, Any], open_: bool) -> None:
    if len(value) < node.get("minItems", 0):
        raise _Mismatch(f"expected at least {node['minItems']} item(s), not {len(value)}")
    if "maxItems" in node and len(value) > node["maxItems"]:
        raise _Mismatch(f"expected at most {node['maxItems']} item(s), not {len(value)}")
    prefix = node.get("prefixItems", [])
    for i, item in enumerate(value):
        if i < len(prefix):
            _inside(f"[{i}]", item, prefix[i], root, open_)
        elif "items" in node:
            _inside(f"[{i}]", item, node["items"], root, open_)


def _inside(step: str, value: Any, node: dict[str, Any], root: dict[str, Any], open_: bool) -> None:
    """:func:`_check` of a member or item, whose place ``step`` is put in front of the
    place of a mismatch found inside it."""
    try:
        _check(value, node, root, open_)
    except _Mismatch as err:
        err.where = step + err.where
        raise
