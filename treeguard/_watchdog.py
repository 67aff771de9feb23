"""The watchdog: a helper process that thaws the tree if the supervisor dies (issue 6)."""

from __future__ import annotations

from ._backends import Journal


class Watchdog:
    """One helper process per guard, reused across freezes.

    It learns each process before it is stopped (through :attr:`journal`), thaws them all if
    the supervisor dies before releasing, or when the lease set by :meth:`arm` runs out.
    """

    pid: int
    journal: Journal

    @classmethod
    def start(cls) -> Watchdog:
        raise NotImplementedError

    def arm(self, max_frozen: float | None) -> None:
        """Called before a freeze starts: forget the previous freeze, start the lease."""
        raise NotImplementedError

    def lease_expired(self) -> bool:
        """Whether the watchdog thawed the tree because the lease ran out."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the helper (idempotent)."""
        raise NotImplementedError


def set_subreaper() -> None:
    """Make the calling process a child subreaper (PR_SET_CHILD_SUBREAPER)."""
    raise NotImplementedError
