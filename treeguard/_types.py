"""The types of treeguard's options, for users' type checkers: a misspelt backend, scope or
option name is an error for mypy, not only at run time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol, TypedDict

__all__ = [
    "BackendName",
    "FreezeOptions",
    "GuardOptions",
    "HasPid",
    "Options",
    "Scope",
    "Target",
]

#: The ways of freezing (see :class:`treeguard.ProcessesGuard`).
BackendName = Literal["signal", "cgroup", "ptrace", "auto"]
#: What a freeze covers: the tree below ``root``, or the caller's whole PID namespace.
Scope = Literal["tree", "namespace"]


class HasPid(Protocol):
    """A process object: ``subprocess.Popen``, ``multiprocessing.Process``,
    ``psutil.Process``."""

    @property
    def pid(self) -> int | None: ...


#: A process, wherever one is asked for: a PID or a process object.
Target = int | HasPid


class FreezeOptions(TypedDict, total=False):
    """The options every face takes besides its target (see :class:`ProcessesGuard`)."""

    include_root: bool
    exclude: Iterable[Target]
    timeout: float
    max_passes: int
    partial_ok: bool
    scope: Scope
    backend: BackendName
    subreaper: bool


class GuardOptions(FreezeOptions, total=False):
    """:class:`FreezeOptions` and the watchdog's, for the faces whose freeze ends in this
    process (a token's does not)."""

    watchdog: bool
    max_frozen: float | None


class Options(GuardOptions, total=False):
    """Every option of :class:`ProcessesGuard`, ``root`` included (``freezethaw``'s)."""

    root: Target | None
