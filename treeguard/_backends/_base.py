"""The small interface between the guard and a way of freezing."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

from .._drive import Steps
from .._report import FreezeReport, Skip
from .._tree import ChildrenFiles, ChildrenSource
from ..procfs import ProcFS

__all__ = ["Backend", "Journal", "Memo", "Plan"]


class Memo:
    """What a guard's backends keep from one freeze to the next freeze of the same guard
    (each says what, and how it checks that it still holds), for the process that made it
    only: a forked child that freezes with an inherited guard starts afresh."""

    __slots__ = ("_items", "_owner")

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._items: dict[str, object] = {}

    def get(self, key: str) -> object | None:
        return self._items.get(key) if os.getpid() == self._owner else None

    def put(self, key: str, value: object) -> None:
        if os.getpid() == self._owner:
            self._items[key] = value

    def close(self) -> None:
        """Let go of what is kept (what holds a descriptor has a ``close()``)."""
        items, self._items = self._items, {}
        for item in items.values():
            close = getattr(item, "close", None)
            if close is not None:
                close()


@dataclass(slots=True)
class Plan:
    """Which processes a freeze covers, decided once by the guard, obeyed by every backend.

    The walk starts at ``starts``. A pid in ``passthrough`` is walked through but never
    stopped (the caller, its ancestors, the namespace's PID 1); a pid in ``blocked`` is
    neither stopped nor walked into, with its reason (excluded monitors, the supervisor's
    own helpers).
    """

    starts: tuple[int, ...]
    passthrough: frozenset[int]
    blocked: dict[int, Skip]
    timeout: float
    max_passes: int
    partial_ok: bool
    scope: str
    fs: ProcFS
    source: ChildrenSource
    journal: Journal | None = None
    report: FreezeReport = field(default_factory=FreezeReport)
    #: Whether a ptrace hold may serve this freeze: False when another process is to end it
    #: (a token's holder, a lease's watchdog), since a hold ends only with this process.
    trace_ok: bool = True
    #: What the last freeze of the same guard kept, if the plan comes from a guard.
    memo: Memo | None = None

    @classmethod
    def bare(cls, *, timeout: float = 1.0, scope: str = "tree", fs: ProcFS | None = None) -> Plan:
        """A plan that walks nothing, for a backend told exactly what to freeze (a cgroup)."""
        fs = fs or ProcFS()
        return cls(
            starts=(),
            passthrough=frozenset(),
            blocked={},
            timeout=timeout,
            max_passes=1,
            partial_ok=False,
            scope=scope,
            fs=fs,
            source=ChildrenFiles(fs),
        )


class Journal(Protocol):
    """Told of every process before it is stopped, or of the cgroup before it is frozen, so
    that another process (the watchdog) can thaw the tree if this one dies. Each call
    raises :class:`~treeguard.errors.WatchdogError` once the lease ran out."""

    def stopping(self, pid: int, starttime: int, inode: int = 0) -> None: ...

    def watching(self, pid: int, starttime: int) -> None:
        """``pid``, running and outside the frozen set, is about to be told of a stop (the
        parent of a process stopped): a job-control relay stops itself then, and the thaw
        resumes it if so."""

    def freezing_cgroup(self, version: int, path: str, inode: int) -> None: ...

    def check(self) -> None: ...

    def released(self) -> None: ...


class Backend(ABC):
    """One way of freezing: stops the plan's processes, and thaws exactly them.

    :meth:`freeze` either returns with every process stopped and verified, or raises with
    everything it stopped thawed. :meth:`thaw` is idempotent and may be resumed after an
    interruption. Both are step generators (see :mod:`treeguard._drive`).
    """

    name = "?"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.report = plan.report
        self.report.backend = self.name
        self.report.scope = plan.scope

    @abstractmethod
    def freeze(self) -> Steps[None]: ...

    @abstractmethod
    def thaw(self) -> Steps[None]: ...

    @property
    @abstractmethod
    def pids(self) -> tuple[int, ...]:
        """The processes this freeze stopped, parent-first."""

    @property
    @abstractmethod
    def identities(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of each process this freeze stopped, parent-first."""

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of processes found stopped by someone else (never resumed)."""
        return ()

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """What another process needs to thaw this freeze (JSON-able); see
        :func:`treeguard._backends.thaw_described`."""

    def detach(self) -> None:
        """Forget this freeze without thawing it: its :meth:`describe` was handed to someone
        else (a token). Release what the backend holds; a later :meth:`thaw` does nothing."""
        return None  # a backend that holds nothing (descriptors, ...) has nothing to release
