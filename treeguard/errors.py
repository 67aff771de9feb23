"""The treeguard error family.

Every error treeguard raises derives from :class:`FreezeError`, and also from the builtin
whose meaning it shares, so ``except PermissionError`` or ``except TimeoutError`` keep
working. Each error carries the processes involved as data (not only in its message) and
pickles with them, so it can cross a process boundary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "CgroupError",
    "CgroupUnavailableError",
    "FreezeError",
    "FreezePermissionError",
    "FrozenInterrupt",
    "InvalidArgumentError",
    "NoSuchProcessError",
    "ProcfsParseError",
    "StateFileError",
    "StopTimeoutError",
    "TokenError",
    "TreeUnstableError",
    "WatchdogError",
]


class FreezeError(Exception):
    """Base of every treeguard error.

    Subclasses take structured arguments and build their own message; ``args`` keeps the
    constructor arguments so the error pickles and compares by what it carries.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)

    def __str__(self) -> str:
        return self.message()

    def message(self) -> str:
        return " ".join(str(a) for a in self.args)


class InvalidArgumentError(FreezeError, ValueError, TypeError):
    """An argument is of the wrong type or out of range; no process was touched."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(name, problem)
        self.name = name
        self.problem = problem

    def message(self) -> str:
        return f"{self.name}: {self.problem}"


class ProcfsParseError(FreezeError, ValueError):
    """A /proc file did not have the format the kernel documents."""

    def __init__(self, what: str, data: bytes | str | None = None) -> None:
        super().__init__(what, data)
        self.what = what
        self.data = data

    def message(self) -> str:
        shown = self.data if self.data is None or len(self.data) <= 80 else self.data[:80]
        return f"cannot parse /proc data: {self.what} (got {shown!r})"


class NoSuchProcessError(FreezeError, ProcessLookupError):
    """The named process does not exist (or is not visible in this PID namespace)."""

    def __init__(self, pid: int, what: str = "process") -> None:
        super().__init__(pid, what)
        self.pid = pid
        self.what = what

    def message(self) -> str:
        return f"no such {self.what}: PID {self.pid} does not exist in this PID namespace"


class FreezePermissionError(FreezeError, PermissionError):
    """The caller may not signal some processes of the tree (EPERM).

    Nothing is left stopped when this is raised. Pass ``partial_ok=True`` to skip such
    processes instead, or run the supervisor as their owner (or with CAP_KILL).
    """

    def __init__(self, pids: Iterable[int], reason: str = "") -> None:
        pids = tuple(pids)
        super().__init__(pids, reason)
        self.pids = pids
        #: Why the kernel refused, where the backend could tell (e.g. "traced by PID 7").
        self.reason = reason

    def message(self) -> str:
        shown = ", ".join(map(str, self.pids[:20])) + (" ..." if len(self.pids) > 20 else "")
        if self.reason:
            return (
                f"not permitted to freeze PID {shown}: {self.reason}; pass partial_ok=True to skip"
            )
        return (
            f"not permitted to signal PID {shown}: run as their owner or with CAP_KILL, "
            "or pass partial_ok=True to skip them"
        )


class StopTimeoutError(FreezeError, TimeoutError):
    """Some tasks did not reach the stopped state in time; the tree was thawed.

    :attr:`not_stopped` lists ``(pid, tid, state)`` for every task still running.
    """

    def __init__(self, timeout: float, not_stopped: Iterable[tuple[int, int, str]]) -> None:
        not_stopped = tuple(not_stopped)
        super().__init__(timeout, not_stopped)
        self.timeout = timeout
        self.not_stopped = not_stopped

    def message(self) -> str:
        shown = ", ".join(f"{p}/{t}={s}" for p, t, s in self.not_stopped[:20])
        more = " ..." if len(self.not_stopped) > 20 else ""
        return (
            f"{len(self.not_stopped)} task(s) did not stop within {self.timeout:g} s "
            f"(pid/tid=state: {shown}{more}); everything was thawed. A task in D is blocked "
            "in the kernel: raise the timeout or find what it waits for"
        )


class TreeUnstableError(FreezeError):
    """New processes kept appearing: the tree did not settle within ``max_passes`` rounds.

    Everything that was stopped has been thawed. Freeze with the cgroup backend, which
    stops a forking tree in one step, or raise ``max_passes``.
    """

    def __init__(self, passes: int, newcomers: Iterable[int]) -> None:
        newcomers = tuple(newcomers)
        super().__init__(passes, newcomers)
        self.passes = passes
        self.newcomers = newcomers

    def message(self) -> str:
        shown = ", ".join(map(str, self.newcomers[:20]))
        return (
            f"new processes forked while freezing: still changing after {self.passes} "
            f"pass(es) (new: {shown}); everything was thawed. Use backend='cgroup' for a "
            "tree that forks continuously, or raise max_passes"
        )


class TokenError(FreezeError, ValueError):
    """A freeze token or state file is malformed or was tampered with; nobody was signalled."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem

    def message(self) -> str:
        return f"invalid freeze token: {self.problem}"


class StateFileError(FreezeError, PermissionError):
    """A pause/resume state file is unsafe to use (symlink, foreign owner, open mode)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def message(self) -> str:
        return f"refusing state file {self.path}: {self.problem}"


class CgroupError(FreezeError, OSError):
    """A cgroup operation failed; the cgroup was left thawed."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def message(self) -> str:
        return f"cgroup {self.path}: {self.problem}"


class CgroupUnavailableError(CgroupError):
    """No usable cgroup hierarchy (not mounted, read-only, or no freezer)."""


class WatchdogError(FreezeError):
    """The watchdog helper could not be started or stopped cleanly."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem

    def message(self) -> str:
        return f"watchdog: {self.problem}"


class FrozenInterrupt(FreezeError):
    """A termination signal arrived while the tree was frozen by :func:`treeguard.freezethaw`.

    The tree is thawed before this propagates. :attr:`signum` is the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def message(self) -> str:
        import signal

        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        return f"{name} received while frozen; the tree was thawed"
