"""Ways of freezing, behind the one interface of :class:`Backend`."""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ._base import Backend, Journal, Plan
from ._signal import SignalBackend

__all__ = ["BACKENDS", "Backend", "Journal", "Plan", "create"]

BACKENDS = ("signal",)


def create(name: str, plan: Plan) -> Backend:
    """The backend called ``name``, ready to freeze ``plan``."""
    if name == "signal":
        return SignalBackend(plan)
    raise InvalidArgumentError("backend", f"must be one of {', '.join(BACKENDS)}, not {name!r}")
