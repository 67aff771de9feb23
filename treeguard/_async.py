"""``async with treeguard.guard()``: the anyio face of the freezing core (issue 3)."""

from __future__ import annotations

from typing import Any


def guard(monitor_pid: int | None = None, **options: Any) -> Any:
    """Async context manager: freeze on enter, yield the ProcessesGuard, thaw on exit."""
    raise NotImplementedError
