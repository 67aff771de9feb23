"""Snapshots of a process tree with signal state (issue 5)."""

from __future__ import annotations

from typing import Any


class TreeSnapshot:
    """The tree below a root, one record per process, depth-first pre-order."""


def snapshot(
    root: int | None = None, *, include_root: bool = True, exclude: Any = ()
) -> TreeSnapshot:
    raise NotImplementedError


def snapshot_of_guard(guard: Any) -> TreeSnapshot:
    raise NotImplementedError
