"""The cgroup v2 freezer (Documentation/admin-guide/cgroup-v2.rst, "Core Interface Files"):
writing ``1`` to ``cgroup.freeze`` freezes the cgroup and its descendants; ``cgroup.events``
says ``frozen 1`` once every task is frozen, and a change of that file raises POLLPRI on its
open descriptors (kernfs_notify), so the wait needs no sleep loop. The files are held open
from the freeze to its thaw (:mod:`treeguard._cgroupfiles`).
"""

from __future__ import annotations

import functools
import time

from .._cgroupfiles import CgroupFiles
from .._cgroupfs import (
    _RECHECK,
    _Events,
    _unfrozen_tasks,
    parse_keyed,
    procs_below,
)
from .._drive import YIELD, Steps, Wait, under_event_loop
from .._report import FreezeReport
from ..errors import (
    CgroupError,
    StopTimeoutError,
)
from ._freezer_base import CgroupFreezer, _write_during

__all__ = ["V2Freezer"]

#: How long a wait re-reads ``cgroup.events`` at once (under an event loop, letting others
#: run in between) before it sleeps in poll: the kernel usually finishes within this, and a
#: wake-up from poll costs more than the whole freeze of a small cgroup.
_SPIN = 0.002


class V2Freezer(CgroupFreezer):
    """``cgroup.freeze`` / ``cgroup.events``, waited for by poll (POLLPRI)."""

    version = 2
    control = "cgroup.freeze"
    tasks_file = "cgroup.threads"
    thawed = "0"

    def events(self) -> dict[str, str]:
        text = self._read("cgroup.events")
        if text is None:
            raise CgroupError(self.path, "the cgroup was removed while freezing")
        return parse_keyed(text)

    def is_frozen(self) -> bool:
        return self.events().get("frozen") == "1"

    def threads_may_be_elsewhere(self) -> bool:
        # Only within a threaded subtree may the threads of a process be in different
        # cgroups; a "domain threaded" cgroup is the root of one and holds it whole.
        kind = self._read("cgroup.type")
        return kind is not None and kind.strip() == "threaded"

    def _wait_for(self, want: str, deadline: float) -> Steps[bool]:
        """Wait until ``frozen`` reads ``want``; False at the deadline."""
        files = self.files
        watch = _Events(self.file("cgroup.events")) if files is None else files.watch()
        line = f"frozen {want}".encode()
        backoff = 0.00005
        spin_until = time.perf_counter() + _SPIN
        # A caller who waits anyway (no event loop) re-reads at once: a turn through the
        # driver (sched_yield) costs more than a read, and the kernel is usually done in
        # tens of microseconds (10 processes: 0.05 ms, some 20 reads).
        at_once = not under_event_loop()
        try:
            while True:
                lines = watch.lines()
                if lines is None:
                    raise CgroupError(self.path, "the cgroup was removed while freezing")
                if line in lines:
                    return True
                if want == "1":
                    self._lease_check()
                now = time.perf_counter()
                left = deadline - now
                if left <= 0:
                    return False
                if now < spin_until:
                    if not at_once:
                        yield YIELD
                    continue
                fd = watch.ready_fd()
                if fd is not None:
                    # Never trust the event alone: the file is re-read after every wake-up.
                    yield Wait(min(left, _RECHECK), fd)
                else:
                    yield Wait(min(left, backoff))
                    backoff = min(backoff * 2, _RECHECK)
        finally:
            watch.close()  # (of held files: its epoll instance only)

    def freeze(
        self,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None = None,
    ) -> Steps[None]:
        start = time.perf_counter()
        if self.files is None:
            self.files = CgroupFiles(self.path)  # held until the thaw is confirmed
        state = self._read("cgroup.freeze")
        if state is None:
            self.check()  # says what is missing
            raise CgroupError(self.path, "the cgroup was removed")
        self.was_frozen = state.strip() == "1"
        try:
            # Held by this freeze from now on, unless frozen by someone outside this
            # process: a freeze of this process that froze it is joined, not taken for theirs.
            if self.enter_hold(self.was_frozen):
                if not self.was_frozen:  # (found frozen: the watchdog of who froze it)
                    self._announce()
                self.froze = True  # before the write: an interrupted freeze is undone
            if self.froze and not self.was_frozen:
                job = functools.partial(self.put, "cgroup.freeze", "1")
                thread = self.threaded_write(meanwhile)
                yield from _write_during(self, job, meanwhile, report, thread=thread)
            elif meanwhile is not None:
                yield from meanwhile
            t0 = time.perf_counter()
            done = yield from self._wait_for("1", start + timeout)
            report.verify_seconds += time.perf_counter() - t0
            if not done:
                pids = procs_below(self.path)
                raise StopTimeoutError(timeout, _unfrozen_tasks(pids, self.fs, "STtZXI"))
        except BaseException:
            # A failed or cancelled freeze writes the thaw back (runc's half-frozen bug:
            # cgroup.freeze must not stay 1); if even that is cut short, froze stays set.
            self.undo()
            raise
        report.verified_by = f"cgroup v2: {self.file('cgroup.events')} says frozen 1"
