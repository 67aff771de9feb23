"""``backend="auto"``: the least visible way of freezing that works for this tree.

In order, each tried only where it can work, and given up on before it holds anything:

1. the cgroup freezer, for a tree alone in a cgroup made by :meth:`Cgroup.create`
   (proven alone before the freeze: ``auto`` never freezes a cgroup to learn it may not);
2. ptrace, where tracing is allowed (Yama's scope, CAP_SYS_PTRACE) and this process may keep
   the hold (not for a token, which another process thaws, nor under a lease, which another
   process ends); a refusal from the kernel (another tracer, another user) lets go of
   everything before the next way is tried;
3. signals.

Each attempt runs on a plan of its own, so the report is that of the backend that ran;
:attr:`FreezeReport.declined` says why each earlier way was not used.
"""

from __future__ import annotations

import dataclasses
import os
import time

from .. import _ptrace
from .._cgroupfs import OWN_PREFIX
from .._drive import Steps
from .._report import FreezeReport
from .._tree import ancestors
from ..errors import CgroupError, FreezePermissionError
from ._base import Backend, Plan
from ._cgroup import CgroupBackend
from ._ptrace import PtraceBackend
from ._signal import SignalBackend
from ._target import find_target

__all__ = ["AutoBackend"]


class AutoBackend(Backend):
    name = "auto"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self._inner: Backend | None = None

    def _fresh(self) -> Plan:
        """The plan with a report of its own, for one attempt."""
        report = FreezeReport(backend=self.name, scope=self.plan.scope)
        return dataclasses.replace(self.plan, report=report)

    def freeze(self) -> Steps[None]:
        t0 = time.perf_counter()
        declined: dict[str, str] = {}
        inner = yield from self._cgroup(declined)
        if inner is None:
            inner = yield from self._ptrace(declined)
        if inner is None:
            inner = SignalBackend(self._fresh())
            self._inner = inner
            yield from inner.freeze()
        self._adopt(inner, declined)
        self.report.freeze_seconds = time.perf_counter() - t0

    def _cgroup(self, declined: dict[str, str]) -> Steps[Backend | None]:
        plan = self._fresh()
        try:
            target = find_target(plan)
        except CgroupError as err:
            declined["cgroup"] = str(err)
            return None
        if target is None or not os.path.basename(target.path).startswith(OWN_PREFIX):
            declined["cgroup"] = "the tree is not alone in a cgroup made by Cgroup.create()"
            return None
        backend = CgroupBackend(plan)
        census = backend._aim(target)
        yield from census.survey()
        problem = census.problem()
        if problem is not None:
            declined["cgroup"] = problem
            return None
        self._inner = backend
        yield from backend.freeze()
        return backend

    def _ptrace(self, declined: dict[str, str]) -> Steps[Backend | None]:
        plan = self._fresh()
        if not plan.trace_ok:
            declined["ptrace"] = "another process is to end this freeze (a token or a lease)"
            return None
        why = _ptrace.refusal(descendants=self._descendants(plan))
        if why is not None:
            declined["ptrace"] = why
            return None
        backend = PtraceBackend(plan)
        self._inner = backend
        try:
            yield from backend.freeze()
        except FreezePermissionError as err:
            # Refused by the kernel for some task (another tracer, another user): the
            # backend let go of everything before raising.
            declined["ptrace"] = str(err)
            self._inner = None
            return None
        return backend

    def _descendants(self, plan: Plan) -> bool:
        """Whether every process the plan covers descends from this process."""
        me = os.getpid()
        if plan.scope != "tree":
            return False
        return all(pid == me or me in ancestors(plan.fs, pid) for pid in plan.starts)

    def _adopt(self, inner: Backend, declined: dict[str, str]) -> None:
        """Make the report the one of the backend that ran (its name included)."""
        for field in dataclasses.fields(FreezeReport):
            setattr(self.report, field.name, getattr(inner.report, field.name))
        self.report.declined = declined

    def thaw(self) -> Steps[None]:
        inner = self._inner
        if inner is None:
            return
        try:
            yield from inner.thaw()
        finally:
            self.report.thaw_seconds = inner.report.thaw_seconds

    @property
    def pids(self) -> tuple[int, ...]:
        return () if self._inner is None else self._inner.pids

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        return () if self._inner is None else self._inner.identities

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        return () if self._inner is None else self._inner.already_stopped

    def detach(self) -> None:
        if self._inner is not None:
            self._inner.detach()

    def describe(self) -> dict[str, object]:
        return {} if self._inner is None else self._inner.describe()
