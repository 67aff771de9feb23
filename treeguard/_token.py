"""Freeze in one place, thaw in another: ``freeze() -> Token``, ``thaw(token)`` (issue 3)."""

from __future__ import annotations

from typing import Any


class Token:
    """What a freeze stopped: pid, starttime and stop order of each process."""


def freeze(root: int | None = None, **options: Any) -> Token:
    raise NotImplementedError


def thaw(token: Token) -> None:
    raise NotImplementedError
