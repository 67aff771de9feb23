"""Ways of freezing, behind the one interface of :class:`Backend`."""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ._base import Backend, Journal, Plan
from ._signal import SignalBackend, thaw_identities

__all__ = ["BACKENDS", "Backend", "Journal", "Plan", "create", "thaw_described"]

BACKENDS = ("signal",)


def create(name: str, plan: Plan) -> Backend:
    """The backend called ``name``, ready to freeze ``plan``."""
    if name == "signal":
        return SignalBackend(plan)
    raise InvalidArgumentError("backend", f"must be one of {', '.join(BACKENDS)}, not {name!r}")


def thaw_described(name: str, payload: dict[str, object]) -> int:
    """Thaw, from any process, a freeze that ``Backend.describe()`` described.

    The payload must have been validated by the caller (see :mod:`treeguard._token`).

    :returns: how many processes (or cgroups) were thawed.
    """
    if name == "signal":
        stopped = payload["stopped"]
        assert isinstance(stopped, list)
        return thaw_identities((int(p), int(s)) for p, s in stopped)
    raise InvalidArgumentError("backend", f"cannot thaw a {name!r} freeze")
