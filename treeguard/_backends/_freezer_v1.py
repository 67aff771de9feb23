"""The cgroup v1 freezer (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst):
``freezer.state`` goes THAWED -> FREEZING -> FROZEN; there is no notification, so it is
polled. A cgroup stuck in FREEZING is thawed and frozen again a bounded number of times
(runc's remedy).
"""

from __future__ import annotations

import functools
import time

from .._cgroupfs import (
    _unfrozen_tasks,
    procs_below,
)
from .._drive import YIELD, Steps, Wait
from .._report import FreezeReport
from ..errors import (
    CgroupError,
    StopTimeoutError,
)
from . import _holds
from ._freezer_base import CgroupFreezer, _write_during

__all__ = ["V1Freezer"]

#: Longest pause between two reads of a v1 freezer.state.
_V1_MAX_BACKOFF = 0.005
#: How many times a v1 cgroup stuck in FREEZING is thawed and frozen again before failing.
_V1_ATTEMPTS = 4


class V1Freezer(CgroupFreezer):
    """``freezer.state``, polled with a backoff; unstuck by thaw-and-retry."""

    version = 1
    control = "freezer.state"
    thawed = "THAWED"

    def state(self) -> str:
        text = self._read("freezer.state")
        if text is None:
            raise CgroupError(self.path, "the cgroup was removed while freezing")
        return text.strip()

    def set_state(self, value: str) -> None:
        self.put("freezer.state", value)

    def _write(self, value: str) -> None:
        self.set_state(value)  # which tests replace, to watch what is written

    def is_frozen(self) -> bool:
        return self.state() == "FROZEN"

    def freeze(
        self,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None = None,
    ) -> Steps[None]:
        start = time.perf_counter()
        self.check()
        prev = self.state()
        # Restore what was there (CRIU does): a cgroup frozen (or being frozen) by someone
        # else stays so after this guard.
        self.was_frozen = prev in ("FROZEN", "FREEZING")
        try:
            # Held by this freeze from now on, unless frozen by someone outside this
            # process: a freeze of this process that froze it is joined, not taken for theirs.
            if self.enter_hold(self.was_frozen):
                if not self.was_frozen:  # (found frozen: the watchdog of who froze it)
                    self._announce()
                self.froze = True  # before the write: an interrupted freeze is undone
            if prev != "FROZEN":
                yield from self._freeze(start, timeout, report, meanwhile)
            elif meanwhile is not None:
                yield from meanwhile
        except BaseException:
            self.undo()
            raise
        report.verified_by = f"cgroup v1: {self.file('freezer.state')} says FROZEN"

    def _freeze(
        self,
        start: float,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None,
    ) -> Steps[None]:
        per_attempt = timeout / _V1_ATTEMPTS
        for attempt in range(_V1_ATTEMPTS):
            if attempt == 0:
                job = functools.partial(self.set_state, "FROZEN")
                thread = self.threaded_write(meanwhile)
                yield from _write_during(self, job, meanwhile, report, thread=thread)
            else:
                t0 = time.perf_counter()
                self.set_state("FROZEN")
                report.signal_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            done = yield from self._wait_for("FROZEN", min(start + timeout, t0 + per_attempt))
            report.verify_seconds += time.perf_counter() - t0
            if done:
                report.passes = attempt + 1
                return
            if attempt + 1 < _V1_ATTEMPTS:
                # Stuck in FREEZING: thaw, let the tasks run a moment, and try again (not
                # while another freeze of this process holds it: that one counts on it).
                if self.hold is None or _holds.alone(self.hold, self):
                    self.set_state("THAWED")
                yield YIELD
        pids = procs_below(self.path)
        late = _unfrozen_tasks(pids, self.fs, "DTtZXI")
        self.undo()
        raise StopTimeoutError(timeout, late)

    def _wait_for(self, want: str, deadline: float) -> Steps[bool]:
        """Poll, with a backoff, until ``freezer.state`` reads ``want``; False at the
        deadline."""
        backoff = 0.00005
        while self.state() != want:
            if time.perf_counter() > deadline:
                return False
            if want == "FROZEN":
                self._lease_check()
            yield Wait(backoff)
            backoff = min(backoff * 2, _V1_MAX_BACKOFF)
        return True
