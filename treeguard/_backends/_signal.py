"""The signal backend: SIGSTOP parent-first through pidfds, prove every task stopped, SIGCONT.

The algorithm, in rounds:

1. *Discover*: walk the tree parent-first; for each new process open a pidfd, read its stat
   (the pidfd was opened first, so a matching stat proves it names that process), and send
   SIGSTOP at once, before reading its children: the window in which it can fork is as short
   as one syscall.
2. *Verify*: wait until every task of every process of the round shows ``T`` (polling with
   a backoff that starts at a bare yield of the CPU, not at a fixed sleep).
3. *Re-enumerate*: read the children of every process of the round again. They are stopped,
   so what they list now is final; a newcomer (forked before its parent's stop landed)
   starts another round. Passed-through processes (the caller) are re-read every round.

Processes are held by pidfd (``pidfd_send_signal`` cannot reach a recycled PID). When the
descriptor budget runs out, a process is signalled through a short-lived pidfd instead,
re-checked against its starttime each time.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import time
from collections.abc import Iterable

from .._drive import YIELD, Steps, Wait
from .._report import Skip
from .._tree import ChildrenFiles, walk
from ..errors import FreezeError, FreezePermissionError, StopTimeoutError, TreeUnstableError
from ..procfs import DEAD_STATES, STOPPED_STATES, ProcFS, Stat
from ._base import Backend, Plan

__all__ = ["SignalBackend", "thaw_identities"]

#: Where a task waits while its vfork child has not exec'd or exited (kernel/fork.c).
_VFORK_WCHAN = frozenset({"kernel_clone", "_do_fork", "do_fork"})
#: Longest pause between two looks at tasks that have not stopped yet.
_MAX_BACKOFF = 0.002
#: Longest stretch of work between two points where an event loop may run.
_SLICE = 0.002

_held = 0  # pidfds held by all guards of this process


def _pidfd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(0, soft - 64) // 2  # leave half for everything else the supervisor does


class _Entry:
    __slots__ = ("alive", "fd", "ours", "pid", "starttime", "stat")

    def __init__(self, pid: int, fd: int, stat: Stat, ours: bool) -> None:
        self.pid = pid
        self.fd = fd
        self.stat = stat
        self.starttime = stat.starttime
        self.ours = ours
        self.alive = True


class SignalBackend(Backend):
    name = "signal"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self._entries: list[_Entry] = []  # ours, in stop order
        self._foreign: list[_Entry] = []  # stopped by someone else when found
        self._known: dict[int, _Entry | None] = {}
        self._denied: list[int] = []
        self._round: list[_Entry] = []
        self._through: list[int] = []  # passed-through pids that the walk met
        self._budget = _pidfd_budget()

    # -- what the guard sees -------------------------------------------------------------

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(e.pid for e in self._entries)

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        return tuple((e.pid, e.starttime) for e in self._entries)

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        return tuple((e.pid, e.starttime) for e in self._foreign)

    def describe(self) -> dict[str, object]:
        return {
            "stopped": [[e.pid, e.starttime] for e in self._entries],
            "already_stopped": [[e.pid, e.starttime] for e in self._foreign],
        }

    # -- freezing -------------------------------------------------------------------------

    def freeze(self) -> Steps[None]:
        plan, report = self.plan, self.report
        clock = time.perf_counter
        start = clock()
        deadline = start + plan.timeout
        try:
            plan.source.refresh()
            pending: list[int] = list(plan.starts)
            while True:
                report.passes += 1
                self._round = []
                t0 = clock()
                next_slice = t0 + _SLICE
                for _ in walk(pending, self._visit, plan.source):
                    if clock() > next_slice:
                        yield YIELD
                        next_slice = clock() + _SLICE
                report.enumerate_seconds += clock() - t0
                if self._denied:
                    raise FreezePermissionError(self._denied)
                t0 = clock()
                yield from self._wait_stopped(self._round, deadline)
                report.verify_seconds += clock() - t0
                t0 = clock()
                plan.source.refresh()
                pending = self._newcomers()
                report.enumerate_seconds += clock() - t0
                if not pending:
                    break
                if report.passes >= plan.max_passes:
                    raise TreeUnstableError(report.passes, pending)
            report.stopped = len(self._entries)
            report.freeze_seconds = clock() - start
        except BaseException:
            # Anything, GeneratorExit from a cancelled driver included: leave nothing stopped.
            for _ in self.thaw():
                pass
            raise

    def _visit(self, pid: int) -> Stat | None:
        """Act on one process met by the walk; return its stat to walk into its children."""
        known = self._known
        if pid in known:
            return None
        plan, report = self.plan, self.report
        reason = plan.blocked.get(pid)
        if reason is not None:
            known[pid] = None
            report.skipped[pid] = reason
            return None
        if pid in plan.passthrough:
            known[pid] = None
            self._through.append(pid)
            return plan.fs.stat(pid) if pid else _ROOT
        t0 = time.perf_counter()
        fd = self._open(pid)
        if fd is None:
            return self._skip(pid, Skip.EXITED)
        stat = plan.fs.stat(pid)
        # The pidfd was opened before this read, so a stat that reads at all names the
        # very process the pidfd holds: it cannot have been recycled in between.
        if stat is None:
            return self._skip(pid, Skip.EXITED, fd)
        if stat.is_kernel_thread:
            return self._skip(pid, Skip.KERNEL_THREAD, fd)
        if stat.state in DEAD_STATES and stat.num_threads <= 1:
            return self._skip(pid, Skip.ZOMBIE, fd)
        entry = _Entry(pid, fd, stat, ours=stat.state not in STOPPED_STATES)
        known[pid] = entry
        if not entry.ours:
            report.skipped[pid] = Skip.ALREADY_STOPPED
            self._foreign.append(entry)
            self._round.append(entry)
            self._release_fd(entry)
            return stat
        if plan.journal is not None:
            plan.journal.stopping(pid, stat.starttime)
        try:
            signal.pidfd_send_signal(fd, signal.SIGSTOP)
        except ProcessLookupError:
            self._release_fd(entry)
            return self._skip(pid, Skip.EXITED)
        except PermissionError:
            self._release_fd(entry)
            if not plan.partial_ok:
                self._denied.append(pid)
                return None
            report.skipped[pid] = Skip.PERMISSION
            return stat
        finally:
            report.signal_seconds += time.perf_counter() - t0
        self._entries.append(entry)
        self._round.append(entry)
        if fd >= 0 and _held >= self._budget:
            self._release_fd(entry)
        return stat

    def _skip(self, pid: int, reason: Skip, fd: int = -1) -> Stat | None:
        if fd >= 0:
            self._close(fd)
        self._known[pid] = None
        self.report.skipped[pid] = reason
        return None

    def _newcomers(self) -> list[int]:
        """Children not seen yet, read from every process of the round once it stopped."""
        plan, known = self.plan, self._known
        found: list[int] = []
        for pid in self._through:  # not stopped, so they may have forked since
            stat = plan.fs.stat(pid) if pid else _ROOT
            if stat is not None:
                found += (c for c in plan.source.children(pid, stat) if c not in known)
        for entry in self._round:
            if entry.alive:
                found += (c for c in plan.source.children(entry.pid, entry.stat) if c not in known)
        return list(dict.fromkeys(found))

    # -- verifying ------------------------------------------------------------------------

    def _wait_stopped(self, entries: list[_Entry], deadline: float) -> Steps[None]:
        backoff = 0.0
        pending = entries
        while True:
            running: list[tuple[int, int, str]] = []
            still: list[_Entry] = []
            for entry in pending:
                late = self._check(entry)
                if late:
                    running += late
                    still.append(entry)
            if not still:
                return
            if time.perf_counter() > deadline:
                raise StopTimeoutError(self.plan.timeout, running)
            yield Wait(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2 if backoff else 0.00002)
            pending = still

    def _check(self, entry: _Entry) -> list[tuple[int, int, str]]:
        """Tasks of ``entry`` that are not stopped yet, as ``(pid, tid, state)``."""
        fs, pid = self.plan.fs, entry.pid
        stat = fs.stat(pid)
        if stat is None or stat.starttime != entry.starttime:
            return self._gone(entry)
        entry.stat = stat
        if stat.num_threads <= 1:
            tasks = [(pid, stat)]
        else:
            tasks = []
            for tid in fs.tids(pid) or ():
                tstat = fs.stat(pid, tid)
                if tstat is not None:
                    tasks.append((tid, tstat))
        late: list[tuple[int, int, str]] = []
        for tid, tstat in tasks:
            state = tstat.state
            if state in STOPPED_STATES or state in DEAD_STATES:
                continue
            if state == "D" and fs.wchan(pid, tid) in _VFORK_WCHAN:
                # Waiting for a vfork child that we stopped: it cannot run, and it will
                # only reach T after the child goes on. The cgroup freezer agrees.
                if pid not in self.report.blocked_in_vfork:
                    self.report.blocked_in_vfork.append(pid)
                continue
            late.append((pid, tid, state))
        if not late:
            self.report.tasks += len(tasks)
        elif not entry.ours:
            # Someone resumed a process that was stopped when we found it: stop it as ours.
            if self.plan.journal is not None:
                self.plan.journal.stopping(pid, entry.starttime)
            if self._resignal(entry, signal.SIGSTOP):
                entry.ours = True
                self.report.skipped.pop(pid, None)
                self._foreign.remove(entry)
                self._entries.append(entry)
            else:
                return self._gone(entry)
        return late

    def _gone(self, entry: _Entry) -> list[tuple[int, int, str]]:
        # Exited (or reaped and its PID reused) while we froze: nothing to wait for. It stays
        # in the thaw list: the thaw finds it gone, which is not an error.
        entry.alive = False
        self.report.skipped.setdefault(entry.pid, Skip.EXITED)
        return []

    # -- thawing --------------------------------------------------------------------------

    def thaw(self) -> Steps[None]:
        """SIGCONT children-first to exactly what this freeze stopped. Resumable."""
        t0 = time.perf_counter()
        entries = self._entries
        while entries:
            entry = entries.pop()
            try:
                self._resignal(entry, signal.SIGCONT)
            finally:
                self._release_fd(entry)
        while self._foreign:
            self._release_fd(self._foreign.pop())
        if self.plan.journal is not None:
            self.plan.journal.released()
        self.report.thaw_seconds = time.perf_counter() - t0
        return
        yield  # a generator, like every backend's thaw

    # -- pidfds ---------------------------------------------------------------------------

    def _resignal(self, entry: _Entry, sig: int) -> bool:
        """Signal ``entry`` if it is still the process we found; False if it is gone."""
        fd = entry.fd
        transient = fd < 0
        if transient:
            opened = self._open(entry.pid, transient=True)
            if opened is None:
                return False
            fd = opened
        try:
            if transient:
                stat = self.plan.fs.stat(entry.pid)
                if stat is None or stat.starttime != entry.starttime:
                    return False  # the PID now names another process: never signal it
            signal.pidfd_send_signal(fd, sig)
            return True
        except ProcessLookupError:
            return False
        finally:
            if transient:
                os.close(fd)

    def _open(self, pid: int, transient: bool = False) -> int | None:
        global _held
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                raise FreezeError(
                    "out of file descriptors while freezing: raise RLIMIT_NOFILE"
                ) from err
            raise
        if not transient:
            _held += 1
        return fd

    def _close(self, fd: int) -> None:
        global _held
        os.close(fd)
        _held -= 1

    def _release_fd(self, entry: _Entry) -> None:
        if entry.fd >= 0:
            fd, entry.fd = entry.fd, -1
            self._close(fd)


_ROOT = Stat(
    pid=0, comm=b"", state="S", ppid=0, pgrp=0, session=0, flags=0, num_threads=1, starttime=0
)


def thaw_identities(identities: Iterable[tuple[int, int]], fs: ProcFS | None = None) -> int:
    """SIGCONT each ``(pid, starttime)``, last first, skipping any whose PID now names another
    process or nothing. For a thaw from another process (a token, the watchdog).

    :returns: how many processes were signalled.
    """
    fs = fs or ProcFS()
    plan = Plan(
        starts=(),
        passthrough=frozenset(),
        blocked={},
        timeout=1.0,
        max_passes=1,
        partial_ok=True,
        scope="tree",
        fs=fs,
        source=ChildrenFiles(fs),
    )
    backend = SignalBackend(plan)
    for pid, starttime in identities:
        entry = _Entry(pid, -1, _ROOT, ours=True)
        entry.starttime = starttime
        backend._entries.append(entry)
    signalled = 0
    entries = backend._entries
    while entries:
        if backend._resignal(entries.pop(), signal.SIGCONT):
            signalled += 1
    return signalled
