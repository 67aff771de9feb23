"""``freezethaw(fn, *args)``: the Sys::FreezeThaw shape (issue 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def freezethaw(fn: Callable[..., T], *args: Any, **options: Any) -> T:
    raise NotImplementedError
