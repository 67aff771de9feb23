"""The cgroup freezer backends: the kernel stops a whole cgroup, invisibly and in one step.

* **v2** (Documentation/admin-guide/cgroup-v2.rst, "Core Interface Files"): writing ``1``
  to ``cgroup.freeze`` freezes the cgroup and its descendants; ``cgroup.events`` says
  ``frozen 1`` once every task is frozen, and a change of that file raises POLLPRI on
  its open descriptors (kernfs_notify). Frozen tasks show ``S`` in /proc, so the
  verification comes from ``cgroup.events``, not from task states.
* **v1** (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst): ``freezer.state``
  goes THAWED -> FREEZING -> FROZEN; there is no notification, so it is polled. A cgroup
  stuck in FREEZING is thawed and frozen again a bounded number of times (runc's remedy).

:class:`CgroupBackend` with no explicit cgroup finds the one that holds the plan's tree
without walking the tree: the candidate is the cgroup of the tree's first top process (the
root's first child, or the root), and the few processes that must keep running (the
caller, its ancestors, excluded PIDs) are checked to be outside it BEFORE anything is
frozen. That the candidate holds the whole tree and nothing else is proven from its task
list and the ``children`` files of all its tasks, and each process's thread count
(:class:`_Census`): while the kernel freezes the cgroup (the write runs in a thread of its
own, so this work and an event loop go on meanwhile; for a cgroup of a few dozen tasks,
right after the write), then once more from the task list when it is frozen and can no
longer change. A cgroup found to hold other processes, or to miss part of the tree (a
descendant or a thread in another cgroup), is thawed again before the error is raised.

An interrupt (KeyboardInterrupt at any bytecode, a cancellation) never leaves the cgroup
frozen: a freeze cut short writes the thaw back, and a thaw cut short is finished by the
next one (see :class:`CgroupFreezer`).
"""

from __future__ import annotations

import time

from .._cgroupfiles import CgroupFiles
from .._drive import Steps, run_sync
from .._report import FreezeReport
from .._thaw import keep_reserve
from ..errors import (
    CgroupError,
)
from ._base import Backend, Plan
from ._census import _Census, _Members
from ._freezers import CgroupFreezer, freezer_for
from ._kept import Kept
from ._order import by_ppid
from ._target import Target, find_target

__all__ = ["CgroupBackend", "CgroupV1Backend", "CgroupV2Backend"]


def _timed(steps: Steps[None], report: FreezeReport) -> Steps[None]:
    """``steps``, their own time (not the waits between them) counted as proving."""
    clock = time.perf_counter
    try:
        while True:
            t0 = clock()
            try:
                wait = next(steps)
            except StopIteration:
                return
            finally:
                report.prove_seconds += clock() - t0
            yield wait
    finally:
        steps.close()


class CgroupBackend(Backend):
    """Freezes the cgroup that holds the plan's tree (or the cgroup it is given).

    For a tree, the processes that must keep running (the caller, its ancestors, the
    root unless included, excluded PIDs) are checked to be outside the cgroup before it
    is frozen: if one is inside, :class:`CgroupError` and nothing frozen. That the cgroup
    holds nothing else is proven by the census, which reads the cgroup while the kernel
    freezes it (the write to ``cgroup.freeze`` takes milliseconds for a big cgroup, in a
    thread of its own) and reads its task list once more when it is frozen, to learn what was born
    meanwhile. If it holds other processes, it is thawed before :class:`CgroupError` is
    raised, so those were frozen for a moment, a few milliseconds, which the cgroup
    freezer does invisibly (no signal, nothing a process can observe but the lost time).
    If the cgroup was chosen from the first top process alone and other top processes
    turn out to be elsewhere, the closest cgroup holding them all is frozen instead.
    """

    name = "cgroup"
    version: int | None = None

    def __init__(
        self, plan: Plan, path: str | None = None, files: CgroupFiles | None = None
    ) -> None:
        super().__init__(plan)
        self._path = path
        self._files = files  # the given cgroup's, kept (and made current) by the caller
        self._freezer: CgroupFreezer | None = None
        self._census: _Census | None = None
        self._kept: Kept | None = None
        self._kept_looked = False  # Kept.of() was asked (once a freeze: it subscribes)
        self._target: Target | None = None
        self._members: _Members | None = None  # what the cgroup held once frozen
        self._pids: list[int] | None = None
        self._identities: list[tuple[int, int]] | None = None

    def _kept_state(self) -> Kept | None:
        """The guard's kept census and subscription (see :mod:`._kept`), asked for once."""
        if not self._kept_looked:
            self._kept, self._kept_looked = Kept.of(self.plan), True
        return self._kept

    def _aim(self, target: Target) -> _Census:
        plan = self.plan
        freezer = freezer_for(target.version, target.path, plan.fs, plan.journal, target.files)
        self._freezer, self._target = freezer, target
        kept = self._kept_state()
        census = (
            _Census(freezer, target.top, plan)
            if kept is None
            else kept.census_for(target, freezer, plan)
        )
        self._census = census
        freezer.listed = census.listed = target.listing  # read by find_target
        return census

    def freeze(self) -> Steps[None]:
        keep_reserve()  # before the freeze: its thaw must never lack a descriptor
        try:
            yield from self._freeze()
        except BaseException:
            # Whatever cut the freeze short (an interrupt between two steps too), the
            # cgroup is thawed before this raises; a thaw itself cut short is finished by
            # the next thaw() (the freezer keeps its state until the thaw is written).
            run_sync(self._thaw_cgroup())
            raise

    def _freeze(self) -> Steps[None]:
        report = self.report
        start = time.perf_counter()
        whole = False
        while True:
            problem = yield from self._attempt(whole)
            census = self._census
            if problem is None:
                break
            yield from self._thaw_cgroup()  # the journal stays armed: a retry may follow
            if census is not None and census.tops_elsewhere and not whole:
                # The first top process's cgroup is too narrow: aim at the closest
                # cgroup holding every top process instead.
                self._census, whole = None, True
                continue
            assert self._freezer is not None
            raise CgroupError(self._freezer.path, f"{problem}; it was thawed again")
        report.freeze_seconds = time.perf_counter() - start

    def _attempt(self, whole: bool) -> Steps[str | None]:
        """Freeze the cgroup of the tree (chosen from every top process if ``whole``);
        return what is wrong with it (``None`` if nothing), frozen either way."""
        plan, report = self.plan, self.report
        start = time.perf_counter()
        census = self._census
        if self._path is not None:
            assert self.version is not None
            self._freezer = freezer_for(
                self.version, self._path, plan.fs, plan.journal, self._files
            )
        elif census is None:
            # Held already, not asked for: asked for here (before a cgroup is found), a
            # guard whose tree no cgroup holds would subscribe at its second attempt.
            kept = None if whole else Kept.held(plan)
            target = None if kept is None else kept.target(plan)
            if target is None:
                target = find_target(plan, whole=whole)
            if target is None:
                report.verified_by = "nothing to freeze: the tree has no processes"
                return None
            census = self._aim(target)
        freezer = self._freezer
        assert freezer is not None
        report.enumerate_seconds += time.perf_counter() - start
        left = plan.timeout - (time.perf_counter() - start)
        # The census reads the cgroup while the kernel freezes it (the write takes
        # milliseconds): what it learns holds, since only the tree can add to the cgroup
        # (a process born in a cgroup stays there unless someone moves it).
        # A cgroup given by name is frozen whole (no proof needed): what it holds is
        # listed once, when frozen (a look meanwhile would only be read again).
        members = _Members(freezer) if census is None else census
        meanwhile = None
        if census is not None and census.reused:
            census.listed = None  # taken over: only the look once frozen can tell a change
        elif census is not None:
            meanwhile = _timed(census.survey(), report)
        yield from freezer.freeze(max(left, 0.0), report, meanwhile=meanwhile)
        report.passes = max(report.passes, 1)
        t0 = time.perf_counter()
        # Frozen: nothing forks or exits now, so what the cgroup holds is final; the
        # census reads the task list once more and learns only what is new. (Should this
        # fail, freeze() thaws.)
        yield from members.survey()
        kept, keep = self._kept, None
        if census is not None and kept is not None and (yield from kept.confirm(census)):
            keep = census
        problem = None if census is None else census.problem()
        if kept is not None and keep is not None and problem is None:
            kept.keep(keep, self._target)  # only now: an interrupt before keeps nothing
        report.prove_seconds += time.perf_counter() - t0
        self._members = members
        report.stopped = members.count
        report.tasks = members.tasks
        self._pids = self._identities = None
        return problem

    def _ordered(self) -> list[tuple[int, int]]:
        """``(pid, starttime)`` of what the cgroup held when frozen, parent-first (read on
        first use: the freeze costs no more than the cgroup's own)."""
        if self._identities is None:
            fs = self.plan.fs
            pids = self._held() if self._census is None else self._parent_first()
            stats = {pid: st for pid in pids if (st := fs.stat(pid)) is not None}
            order = by_ppid(stats, fs) if self._census is None else self._parent_first()
            self._identities = [(pid, stats[pid].starttime) for pid in order if pid in stats]
        return self._identities

    def _held(self) -> set[int]:
        return set() if self._members is None else self._members.procs

    def _parent_first(self) -> list[int]:
        if self._pids is None:
            assert self._census is not None
            self._pids = self._census.parent_first()
        return self._pids

    def thaw(self) -> Steps[None]:
        t0 = time.perf_counter()
        yield from self._thaw_cgroup()
        if self.plan.journal is not None:
            self.plan.journal.released()
        self.report.thaw_seconds = time.perf_counter() - t0

    def _thaw_cgroup(self) -> Steps[None]:
        if self._freezer is not None:
            yield from self._freezer.thaw(max(self.plan.timeout, 1.0))

    @property
    def path(self) -> str | None:
        """The cgroup directory frozen (``None`` before the freeze)."""
        return None if self._freezer is None else self._freezer.path

    @property
    def pids(self) -> tuple[int, ...]:
        if self._census is not None:  # no read needed: the proof learnt every parent
            return tuple(self._parent_first())
        return tuple(p for p, _ in self._ordered())

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._ordered())

    def detach(self) -> None:
        if self._freezer is not None:
            self._freezer.hand_over()  # a token thaws it now; our thaw leaves it alone
        if self.plan.journal is not None:
            self.plan.journal.released()

    def describe(self) -> dict[str, object]:
        f = self._freezer
        return {
            "version": 0 if f is None else f.version,
            "path": "" if f is None else f.path,
            "inode": 0 if f is None else f.inode,
            # (Held with another freeze of this process that froze it first: that one's.)
            "was_frozen": True if f is None else not f.froze or f.was_frozen,
        }


class CgroupV2Backend(CgroupBackend):
    """Freezes one given cgroup v2 directory (no enumeration)."""

    version = 2

    def __init__(self, plan: Plan, path: str, files: CgroupFiles | None = None) -> None:
        super().__init__(plan, path, files)


class CgroupV1Backend(CgroupBackend):
    """Freezes one given cgroup v1 freezer directory (no enumeration)."""

    version = 1

    def __init__(self, plan: Plan, path: str) -> None:
        super().__init__(plan, path)
