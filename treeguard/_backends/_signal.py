"""The signal backend: SIGSTOP parent-first through pidfds, prove every task stopped, SIGCONT.

The algorithm, in rounds:

1. *Discover*: walk the tree parent-first. When a process's children are read, every new one
   is stopped at once, siblings in a batch: open a pidfd, read its stat (the pidfd was opened
   first, and the stat must name the parent that listed it, so it is that very process), send
   SIGSTOP. The walk then visits each: by then it has usually stopped (its siblings' work gave
   its SIGSTOP time to land), so it is verified on the spot and the children read next are
   final: a stopped process cannot fork.
2. *Verify*: wait until every task of the round's remaining processes shows ``T`` (polling
   with a backoff that starts at a bare yield of the CPU, not at a fixed sleep).
3. *Re-enumerate*: read the children of those processes again, now that they are stopped;
   a newcomer (forked before its parent's stop landed) starts another round. Passed-through
   processes (the caller) are re-read every round.

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

from .._drive import YIELD, Steps, Wait
from .._report import Skip
from .._thaw import signal_identity
from .._tree import ChildrenFiles, ChildrenSource, walk
from ..errors import FreezeError, FreezePermissionError, StopTimeoutError, TreeUnstableError
from ..procfs import DEAD_STATES, STOPPED_STATES, Stat, parse_stat, parse_stat_brief
from ._base import Backend, Plan

__all__ = ["SignalBackend"]

#: Where a task waits while its vfork child has not exec'd or exited (kernel/fork.c).
_VFORK_WCHAN = frozenset({"kernel_clone", "_do_fork", "do_fork"})
#: Longest pause between two looks at tasks that have not stopped yet.
_MAX_BACKOFF = 0.002
#: Longest stretch of work between two points where an event loop may run.
_SLICE = 0.002

#: States of a task that needs no more waiting for: stopped, or gone.
_SETTLED = STOPPED_STATES | DEAD_STATES

_held = 0  # descriptors (pidfds, stat files) held by all guards of this process


def _pidfd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(0, soft - 64) // 2  # leave half for everything else the supervisor does


class _Entry:
    __slots__ = ("alive", "fd", "ours", "pid", "settled", "starttime", "stat", "statfd", "tids")

    def __init__(self, pid: int, fd: int, stat: Stat, ours: bool, statfd: int = -1) -> None:
        self.pid = pid
        self.fd = fd
        # /proc/PID/stat kept open while freezing: verification re-reads it with one pread
        # (it names this process for good: once reaped, reading it fails).
        self.statfd = statfd
        # The threads seen when the process was verified stopped (a stopped process makes
        # no new ones): its children are read from exactly these. None: one thread.
        self.tids: list[int] | None = None
        self.stat = stat
        self.starttime = stat.starttime
        self.ours = ours
        self.alive = True
        # Verified stopped, every task: its children, read from now on, are final.
        self.settled = False


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
        # Stopped with their siblings, not visited by the walk yet: pid -> stat to descend with.
        self._batched: dict[int, Stat] = {}
        self._budget = _pidfd_budget()
        self._batching = _Batching(self)

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
                for _ in walk(pending, self._visit, self._batching):
                    if clock() > next_slice:
                        yield YIELD
                        next_slice = clock() + _SLICE
                report.enumerate_seconds += clock() - t0
                if self._denied:
                    raise FreezePermissionError(self._denied)
                t0 = clock()
                unsettled = [e for e in self._round if not e.settled]
                yield from self._wait_stopped(unsettled, deadline)
                report.verify_seconds += clock() - t0
                t0 = clock()
                plan.source.refresh()
                pending = self._newcomers(unsettled)
                report.enumerate_seconds += clock() - t0
                if not pending:
                    break
                if report.passes >= plan.max_passes:
                    raise TreeUnstableError(report.passes, pending)
            for entry in self._entries:
                self._close_stat(entry)
            for entry in self._foreign:
                self._close_stat(entry)
            report.stopped = len(self._entries)
            report.freeze_seconds = clock() - start
        except BaseException:
            # Anything, GeneratorExit from a cancelled driver included: leave nothing stopped.
            for _ in self.thaw():
                pass
            raise

    def _visit(self, pid: int) -> Stat | None:
        """The walk reached ``pid``: stop it (unless its parent's batch did), verify it if it
        already stopped, and return its stat to walk into its children (None: prune)."""
        stat = self._batched.pop(pid, None)
        if stat is None:
            if pid in self._known:
                return None
            stat = self._stop(pid, parent=None)
            if stat is None:
                return None
        entry = self._known.get(pid)
        if entry is not None and not entry.settled:
            if not self._check(entry):
                if not entry.alive:
                    return None
                entry.settled = True
            stat = entry.stat
        return stat

    def _children(self, pid: int, stat: Stat) -> list[int]:
        """The children of ``pid`` for the walk, each new one stopped right away (a batch)."""
        source = self.plan.source
        entry = self._known.get(pid)
        if entry is not None and entry.tids is not None and isinstance(source, ChildrenFiles):
            kids = source.of_threads(pid, entry.tids)
        else:
            kids = source.children(pid, stat)
        known, batched = self._known, self._batched
        fresh: list[int] = []
        for kid in kids:
            if kid in known:
                continue
            kid_stat = self._stop(kid, parent=pid)
            if kid_stat is not None:
                batched[kid] = kid_stat
                fresh.append(kid)
        return fresh

    def _stop(self, pid: int, parent: int | None) -> Stat | None:
        """Meet ``pid`` for the first time: skip, pass through, or stop it. Returns its stat
        to walk into its children, or None to prune it. ``parent`` is the process whose
        children listed it (None for where the walk starts)."""
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
        global _held
        t0 = time.perf_counter()
        fd = self._open(pid)
        if fd is None:
            return self._skip(pid, Skip.EXITED)
        # Keep the stat file open for verification while descriptors are plentiful (at
        # most half of the budget, so that pidfds always get the other half).
        found = plan.fs.open_stat(pid, keep=_held * 2 < self._budget)
        # The pidfd was opened before this read, so a stat that reads at all names the
        # very process the pidfd holds: it cannot have been recycled in between.
        if found is None:
            return self._skip(pid, Skip.EXITED, fd)
        statfd, stat = found
        if statfd >= 0:
            _held += 1
        if parent is not None and stat.ppid != parent:
            # Not the child its parent listed: it was re-parented (its parent died), or it
            # exited and its PID was reused between the two reads. Either way, not ours.
            if statfd >= 0:
                self._close(statfd)
            return self._skip(pid, Skip.EXITED, fd)
        if stat.is_kernel_thread or (stat.state in DEAD_STATES and stat.num_threads <= 1):
            if statfd >= 0:
                self._close(statfd)
            reason = Skip.KERNEL_THREAD if stat.is_kernel_thread else Skip.ZOMBIE
            return self._skip(pid, reason, fd)
        entry = _Entry(pid, fd, stat, ours=stat.state not in STOPPED_STATES, statfd=statfd)
        known[pid] = entry
        if not entry.ours:
            report.skipped[pid] = Skip.ALREADY_STOPPED
            self._foreign.append(entry)
            self._round.append(entry)
            self._release_pidfd(entry)
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
            known[pid] = None  # not ours to verify or thaw; its children may be
            report.skipped[pid] = Skip.PERMISSION
            return stat
        finally:
            report.signal_seconds += time.perf_counter() - t0
        self._entries.append(entry)
        self._round.append(entry)
        if fd >= 0 and _held >= self._budget:
            self._release_pidfd(entry)
        return stat

    def _skip(self, pid: int, reason: Skip, fd: int = -1) -> Stat | None:
        if fd >= 0:
            self._close(fd)
        self._known[pid] = None
        self.report.skipped[pid] = reason
        return None

    def _newcomers(self, unsettled: list[_Entry]) -> list[int]:
        """Children not seen yet, re-read (now that they are stopped) from the processes of
        the round whose first read came before they were verified stopped."""
        plan, known = self.plan, self._known
        found: list[int] = []
        for pid in self._through:  # not stopped, so they may have forked since
            stat = plan.fs.stat(pid) if pid else _ROOT
            if stat is not None:
                found += (c for c in plan.source.children(pid, stat) if c not in known)
        source = plan.source
        for entry in unsettled:
            if entry.alive:
                if entry.tids is not None and isinstance(source, ChildrenFiles):
                    kids = source.of_threads(entry.pid, entry.tids)
                else:
                    kids = source.children(entry.pid, entry.stat)
                found += (c for c in kids if c not in known)
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
            # Past the deadline, give up only once the backoff has grown to its cap (a few
            # milliseconds of looking): a task signalled a moment ago deserves that chance.
            if time.perf_counter() > deadline and backoff >= _MAX_BACKOFF:
                raise StopTimeoutError(self.plan.timeout, running)
            yield Wait(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2 if backoff else 0.00002)
            pending = still

    def _check(self, entry: _Entry) -> list[tuple[int, int, str]]:
        """Tasks of ``entry`` that are not stopped yet, as ``(pid, tid, state)``."""
        fs, pid = self.plan.fs, entry.pid
        data = fs.read(f"{pid}/stat") if entry.statfd < 0 else fs.reread(entry.statfd)
        if data is None:
            return self._gone(entry)
        # Only the state, the thread count and the identity matter here.
        state, threads, starttime = parse_stat_brief(data)
        if starttime != entry.starttime:
            return self._gone(entry)
        if threads != entry.stat.num_threads:
            entry.stat = parse_stat(data)  # the children of every thread are read later
        if threads <= 1 or (state not in _SETTLED and state != "D"):
            if threads <= 1 and state in _SETTLED:  # the common case: one task, stopped
                self.report.tasks += 1
                return []
            # One task only, or the main thread still runs: the other threads are looked
            # at once it has stopped; until then it is enough to wait on.
            tasks = [(pid, state)]
        else:
            tasks = []
            entry.tids = fs.tids(pid) or []
            for tid in entry.tids:
                tdata = data if tid == pid else fs.read(f"{pid}/task/{tid}/stat")
                if tdata is not None:
                    tasks.append((tid, parse_stat_brief(tdata)[0]))
        late: list[tuple[int, int, str]] = []
        for tid, state in tasks:
            if state in _SETTLED:
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

    def detach(self) -> None:
        """Hand the freeze over (to a token): close every pidfd, signal nobody."""
        while self._entries:
            self._release_fd(self._entries.pop())
        while self._foreign:
            self._release_fd(self._foreign.pop())

    # -- pidfds ---------------------------------------------------------------------------

    def _resignal(self, entry: _Entry, sig: int) -> bool:
        """Signal ``entry`` if it is still the process we found; False if it is gone."""
        if entry.fd < 0:
            return signal_identity(entry.pid, entry.starttime, sig, fs=self.plan.fs)
        try:
            signal.pidfd_send_signal(entry.fd, sig)
            return True
        except ProcessLookupError:
            return False

    def _open(self, pid: int) -> int | None:
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
        _held += 1
        return fd

    def _close(self, fd: int) -> None:
        global _held
        os.close(fd)
        _held -= 1

    def _release_pidfd(self, entry: _Entry) -> None:
        if entry.fd >= 0:
            fd, entry.fd = entry.fd, -1
            self._close(fd)

    def _close_stat(self, entry: _Entry) -> None:
        if entry.statfd >= 0:
            fd, entry.statfd = entry.statfd, -1
            self._close(fd)

    def _release_fd(self, entry: _Entry) -> None:
        """Close every descriptor ``entry`` holds (it is signalled by PID from now on)."""
        self._release_pidfd(entry)
        self._close_stat(entry)


class _Batching(ChildrenSource):
    """The walk's view of children: the backend's, which stops each batch as it reads it."""

    def __init__(self, backend: SignalBackend) -> None:
        super().__init__(backend.plan.fs)
        self.children = backend._children  # type: ignore[method-assign]


_ROOT = Stat(
    pid=0, comm=b"", state="S", ppid=0, pgrp=0, session=0, flags=0, num_threads=1, starttime=0
)
