"""What a freeze did: the report every backend fills in."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FreezeReport", "Skip"]


class Skip(str, enum.Enum):
    """Why a process of the tree was not stopped by the guard."""

    ZOMBIE = "zombie"  #: it cannot run anyway
    ALREADY_STOPPED = "already stopped"  #: stopped by someone else; the thaw leaves it stopped
    EXITED = "exited"  #: it exited (or its PID was reused) during the freeze
    EXCLUDED = "excluded"  #: named in ``exclude`` (a monitor), with its subtree
    SUPERVISOR = "supervisor"  #: the calling process, its ancestors, or its helpers
    PERMISSION = "permission"  #: EPERM, skipped because ``partial_ok=True``
    KERNEL_THREAD = "kernel thread"  #: has no user space to stop
    TRACED = "traced"  #: held by a tracer (strace, gdb), skipped because ``partial_ok=True``

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class FreezeReport:
    """Counts, reasons and timings of one freeze (and its thaw).

    ``passes`` counts rounds of stopping: after each round the children of every stopped
    process are read again, once it has stopped; a round that finds newcomers begets another.
    An idle tree takes one pass. Times are wall-clock seconds.

    ``freeze_seconds`` is the whole call, from ``freeze()`` (or entering the block) to its
    return; its parts: ``plan_seconds`` (checking the root and exclusions, reading the
    caller's ancestors, choosing the backend, arming the watchdog), ``enumerate_seconds``
    (finding the tree: the walk, or the cgroup that holds it), ``signal_seconds`` (stopping:
    signals, seizes, the cgroup write), ``verify_seconds`` (waiting for and checking that
    every task stopped) and ``prove_seconds`` (the cgroup backend's census: that the cgroup
    holds the whole tree and nothing else). What the parts leave over is the library's own
    bookkeeping and, under an event loop, the turns given to other tasks.
    """

    backend: str = "signal"
    scope: str = "tree"
    passes: int = 0
    stopped: int = 0
    tasks: int = 0
    skipped: dict[int, Skip] = field(default_factory=dict)
    blocked_in_vfork: list[int] = field(default_factory=list)
    verified_by: str = "/proc task states"
    enumerate_seconds: float = 0.0
    signal_seconds: float = 0.0
    verify_seconds: float = 0.0
    freeze_seconds: float = 0.0
    thaw_seconds: float = 0.0
    lease_expired: bool = False
    #: The watchdog helper had died by the release: the freeze ran without its safety net.
    watchdog_lost: bool = False
    #: ``backend="auto"``: each way of freezing tried before the one that ran, and why it
    #: was not used (``{"cgroup": "...", "ptrace": "..."}``).
    declined: dict[str, str] = field(default_factory=dict)
    plan_seconds: float = 0.0
    prove_seconds: float = 0.0
    #: Signal backend, a guard frozen again: processes met through the descriptors kept
    #: from its last freeze (no pidfd or stat file opened for them).
    known: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (skip reasons as their strings)."""
        data = asdict(self)
        data["skipped"] = {str(pid): str(why) for pid, why in self.skipped.items()}
        return data

    def __str__(self) -> str:
        """A one-line human summary: what was frozen, by what, in how long."""
        parts = [
            f"{self.backend}: {self.stopped} processes ({self.tasks} tasks) frozen in "
            f"{self.freeze_seconds * 1e3:.2f} ms, {self.passes} pass(es)"
        ]
        if self.thaw_seconds:
            parts.append(f"thawed in {self.thaw_seconds * 1e3:.2f} ms")
        if self.skipped:
            counts: dict[str, int] = {}
            for why in self.skipped.values():
                counts[str(why)] = counts.get(str(why), 0) + 1
            parts.append("skipped " + ", ".join(f"{n} {why}" for why, n in sorted(counts.items())))
        if self.lease_expired:
            parts.append("the lease expired")
        return "; ".join(parts)
