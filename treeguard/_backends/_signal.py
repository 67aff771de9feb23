"""The signal backend: SIGSTOP parent-first through pidfds, prove every task stopped, SIGCONT.

The algorithm goes down the tree one generation at a time:

1. *Stop* every process of the generation: open a pidfd, read its stat (the pidfd was opened
   first, and the stat must name the parent that listed it, so it is that very process),
   record it (the backend's list, then the watchdog's journal), send SIGSTOP.
2. *Verify* that every task of the generation shows ``T`` (polling with a backoff that starts
   at a bare yield of the CPU, not at a fixed sleep).
3. *Descend*: read the children of the generation, now that it is stopped (a stopped process
   cannot fork, so the lists are final): they are the next generation.

No child is stopped before its parent is proven stopped: a parent that waits for its child
with ``WUNTRACED`` (``su``, ``runuser``, an interactive shell: job-control relays) is itself
stopped when the child's stop is reported, and the thaw resumes children first, so by the time
it runs again the stop is no longer reportable (SIGCONT clears it at once, kernel/signal.c
``prepare_signal``). Processes the freeze walks through without stopping (the caller, ``root``
itself, a process it may not signal) keep running: their children are read again after each
round, and newcomers start another round, up to ``max_passes``.

A parent outside the frozen set that relays the stop of its child (``su`` above the root)
stops itself: such *watchers* are remembered, and the thaw resumes one that stopped during
the freeze.

Processes are held by pidfd (``pidfd_send_signal`` cannot reach a recycled PID) and known by
identity, never by PID alone. When the descriptor budget runs out, a process is signalled
through a short-lived pidfd instead, checked against its pidfs inode (or starttime).
A traced process (state ``t``: strace, gdb) cannot be proven stopped: it is refused, or
skipped with ``partial_ok``.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import time

from .._drive import YIELD, Steps, Wait
from .._report import Skip
from .._thaw import keep_reserve, pidfd_inode, signal_identity
from .._tree import ChildrenFiles
from ..errors import FreezeError, FreezePermissionError, StopTimeoutError, TreeUnstableError
from ..procfs import DEAD_STATES, HELPER_COMM, Stat, parse_stat, parse_stat_brief
from ._base import Backend, Plan

__all__ = ["SignalBackend"]

#: Where a task waits while its vfork child has not exec'd or exited (kernel/fork.c).
_VFORK_WCHAN = frozenset({"kernel_clone", "_do_fork", "do_fork"})
#: Longest pause between two looks at tasks that have not stopped yet.
_MAX_BACKOFF = 0.002
#: Longest stretch of work between two points where an event loop may run.
_SLICE = 0.002

#: States of a task that needs no more waiting for: stopped by a signal, or gone. ``t``
#: (stopped by a tracer) is not among them: a tracer lets its tracee go at any moment.
_SETTLED = frozenset("T") | DEAD_STATES

_held = 0  # descriptors (pidfds, stat files) held by all guards of this process


class _Slices:
    """Says when a stretch of work has run for :data:`_SLICE`: time to let an event loop
    run (``if slices.due(): yield YIELD``)."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = time.perf_counter() + _SLICE

    def due(self) -> bool:
        now = time.perf_counter()
        if now < self._next:
            return False
        self._next = now + _SLICE
        return True


def _pidfd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(0, soft - 64) // 2  # leave half for everything else the supervisor does


class _Entry:
    __slots__ = (
        "alive",
        "fd",
        "inode",
        "ours",
        "pid",
        "settled",
        "starttime",
        "stat",
        "statfd",
        "tids",
        "traced",
    )

    def __init__(self, pid: int, fd: int, stat: Stat, ours: bool, statfd: int, inode: int) -> None:
        self.pid = pid
        self.fd = fd
        self.inode = inode  # the pidfs inode of the process (0 without pidfs)
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
        # Seen stopped by a tracer after our SIGSTOP (partial_ok): not proven stopped, so
        # not reported as frozen, but still resumed by the thaw.
        self.traced = False


class SignalBackend(Backend):
    name = "signal"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self._entries: list[_Entry] = []  # ours, in stop order (parents first)
        self._foreign: list[_Entry] = []  # stopped by someone else when found
        # pid -> (starttime, pidfs inode) of every process met: a PID met again is the same
        # process only if both match (the inode alone decides within one clock tick).
        self._met: dict[int, tuple[int, int]] = {}
        self._denied: list[int] = []  # EPERM
        self._traced_pids: list[int] = []  # stopped by a tracer when met
        self._through: list[int] = []  # walked through, not stopped: re-read every round
        self._through_now: list[int] = []  # those met by the generation under way
        # Parents outside the frozen set of a process we stop: pid -> (starttime, stopped
        # before the freeze). One that stops meanwhile relays job control (see the thaw).
        self._watchers: dict[int, tuple[int, bool]] = {}
        self._budget = _pidfd_budget()
        self._slices = _Slices()  # one clock for every loop of a freeze (or thaw)

    # -- what the guard sees -------------------------------------------------------------

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(e.pid for e in self._entries if e.alive and not e.traced)

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        return tuple((e.pid, e.starttime) for e in self._entries if e.alive and not e.traced)

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        return tuple((e.pid, e.starttime) for e in self._foreign)

    def describe(self) -> dict[str, object]:
        return {
            "stopped": [[e.pid, e.starttime, e.inode] for e in self._entries if e.alive],
            "already_stopped": [[e.pid, e.starttime, e.inode] for e in self._foreign],
        }

    # -- freezing -------------------------------------------------------------------------

    def freeze(self) -> Steps[None]:
        plan, report = self.plan, self.report
        clock = time.perf_counter
        start = clock()
        deadline = start + plan.timeout
        self._slices = slices = _Slices()
        try:
            keep_reserve()  # before the first stop: the thaw must never lack a descriptor
            plan.source.refresh()
            frontier: list[tuple[int, int | None]] = [(pid, None) for pid in plan.starts]
            while True:
                report.passes += 1
                while frontier:
                    frontier = yield from self._generation(frontier, deadline)
                t0 = clock()
                plan.source.refresh()
                frontier = self._newcomers()
                report.enumerate_seconds += clock() - t0
                if not frontier:
                    break
                if report.passes >= plan.max_passes:
                    raise TreeUnstableError(report.passes, [pid for pid, _ in frontier])
            self._look_at_watchers()
            for entry in (*self._entries, *self._foreign):
                self._close_stat(entry)
                if slices.due():
                    yield YIELD
            report.stopped = len(self.pids)
            report.freeze_seconds = clock() - start
        except BaseException:
            # Anything, GeneratorExit from a cancelled driver included: leave nothing stopped.
            # (Interrupted in its turn, the thaw resumes on the guard's next release().)
            for _ in self.thaw():
                pass
            raise

    def _generation(
        self, frontier: list[tuple[int, int | None]], deadline: float
    ) -> Steps[list[tuple[int, int | None]]]:
        """Stop one generation, prove it stopped, and return the next (its children)."""
        clock, report = time.perf_counter, self.report
        t0 = clock()
        slices = self._slices
        met: list[_Entry] = []
        for pid, parent in frontier:
            entry = self._meet(pid, parent)
            if entry is not None:
                met.append(entry)
            if slices.due():
                yield YIELD
        report.enumerate_seconds += clock() - t0
        if self._denied:
            raise FreezePermissionError(self._denied)
        if self._traced_pids:
            raise FreezePermissionError(
                self._traced_pids, reason=_traced_reason(self.plan, self._traced_pids[0])
            )
        t0 = clock()
        yield from self._wait_stopped(met, deadline)
        report.verify_seconds += clock() - t0
        t0 = clock()
        children: list[tuple[int, int | None]] = []
        for entry in met:
            if entry.alive:
                children += ((kid, entry.pid) for kid in self._children_of(entry))
            if slices.due():
                yield YIELD
        fs, source = self.plan.fs, self.plan.source
        for pid in self._through_now:  # running: read again at the end of the round too
            stat = fs.stat(pid) if pid else _ROOT
            if stat is not None:
                children += ((kid, pid) for kid in source.children(pid, stat))
        self._through_now = []
        report.enumerate_seconds += clock() - t0
        return children

    def _children_of(self, entry: _Entry) -> list[int]:
        source = self.plan.source
        if entry.tids is not None and isinstance(source, ChildrenFiles):
            return source.of_threads(entry.pid, entry.tids)
        return source.children(entry.pid, entry.stat)

    def _meet(self, pid: int, parent: int | None) -> _Entry | None:
        """Meet ``pid`` (listed by ``parent``; None where the walk starts): skip it, walk
        through it, or stop it. Returns the entry to verify and descend into, if any."""
        plan, report = self.plan, self.report
        reason = plan.blocked.get(pid)
        if reason is not None:
            report.skipped[pid] = reason
            return None
        if pid in plan.passthrough:
            self._walk_through(pid)
            return None
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
        identity = (stat.starttime, pidfd_inode(fd))
        met = self._met.get(pid) == identity
        if met or (parent is not None and stat.ppid != parent):
            # Met already (listed again), or not the child its parent listed: re-parented
            # (its parent died), or exited with its PID reused between the two reads.
            if statfd >= 0:
                self._close(statfd)
            if met:
                self._close(fd)
                return None
            return self._skip(pid, Skip.EXITED, fd)
        self._met[pid] = identity  # a PID met again as another process is met anew
        skip = _unfreezable(stat)
        if skip is not None:
            if statfd >= 0:
                self._close(statfd)
            if skip is Skip.TRACED:
                if not plan.partial_ok:
                    self._traced_pids.append(pid)
                self._walk_through(pid)  # it runs: its children are read again every round
            return self._skip(pid, skip, fd)
        report.skipped.pop(pid, None)  # a PID reused by a process we stop now
        self._watch(pid, parent, stat)
        entry = _Entry(pid, fd, stat, stat.state != "T", statfd, identity[1])
        if not entry.ours:
            report.skipped[pid] = Skip.ALREADY_STOPPED
            self._foreign.append(entry)
            self._release_pidfd(entry)
            return entry
        # Recorded before it is signalled: an interrupt at any point leaves it to the thaw.
        self._entries.append(entry)
        if plan.journal is not None:
            plan.journal.stopping(pid, stat.starttime, entry.inode)
        try:
            signal.pidfd_send_signal(fd, signal.SIGSTOP)
        except ProcessLookupError:
            entry.alive = False
            self._release_fd(entry)
            return self._skip(pid, Skip.EXITED)
        except PermissionError:
            entry.alive = False
            self._release_fd(entry)
            if not plan.partial_ok:
                self._denied.append(pid)
                return None
            report.skipped[pid] = Skip.PERMISSION
            self._walk_through(pid)  # it runs: its children are read again every round
            return None
        finally:
            report.signal_seconds += time.perf_counter() - t0
        if fd >= 0 and _held >= self._budget:
            self._release_pidfd(entry)
        return entry

    def _walk_through(self, pid: int) -> None:
        if pid not in self._through:
            self._through.append(pid)
            self._through_now.append(pid)

    def _skip(self, pid: int, reason: Skip, fd: int = -1) -> _Entry | None:
        """Skip ``pid`` for ``reason`` (closing its pidfd): None, for :meth:`_meet`."""
        if fd >= 0:
            self._close(fd)
        self.report.skipped.setdefault(pid, reason)
        return None

    def _newcomers(self) -> list[tuple[int, int | None]]:
        """Children not met yet of the processes walked through: they run, so they may have
        forked since the round began."""
        plan = self.plan
        found: list[tuple[int, int | None]] = []
        for pid in self._through:
            stat = plan.fs.stat(pid) if pid else _ROOT
            if stat is not None:
                found += ((kid, pid) for kid in plan.source.children(pid, stat))
        fresh = []
        for kid, parent in dict.fromkeys(found):
            if kid in self._met and kid not in self._through:
                st = plan.fs.stat(kid)
                if st is None or st.starttime == self._met[kid][0]:
                    continue  # the process met already (or gone)
            elif kid in self._through or kid in plan.blocked:
                continue
            fresh.append((kid, parent))
        return fresh

    # -- job-control relays ---------------------------------------------------------------

    def _watch(self, pid: int, parent: int | None, stat: Stat) -> None:
        """Remember the parent of a process stopped at the top of a subtree: it is told of
        the stop (SIGCHLD, ``waitpid(WUNTRACED)``) and may relay it by stopping itself."""
        watcher = stat.ppid if parent is None else parent
        if watcher <= 1 or watcher == os.getpid() or watcher in self._watchers:
            return
        if parent is not None and parent not in self.plan.passthrough:
            return  # a parent we stopped ourselves: proven stopped before this child
        wst = self.plan.fs.stat(watcher)
        if wst is not None:
            self._watchers[watcher] = (wst.starttime, wst.state == "T")

    def _look_at_watchers(self) -> None:
        """A watcher that was running and is stopped now relayed our stop."""
        fs = self.plan.fs
        for pid, (start, was_stopped) in list(self._watchers.items()):
            st = fs.stat(pid)
            if st is None or st.starttime != start or was_stopped:
                del self._watchers[pid]

    def _resume_watchers(self) -> Steps[None]:
        """After the thaw: resume each watcher that stopped itself while the tree was frozen
        (it was running before). It may still be on its way to its stop (it saw the child's
        stop just now): watch a running one for a few milliseconds."""
        fs = self.plan.fs
        deadline = time.perf_counter() + 0.005
        while self._watchers:
            for pid, (start, _) in list(self._watchers.items()):
                st = fs.stat(pid)
                if st is None or st.starttime != start:
                    del self._watchers[pid]
                elif st.state == "T":
                    signal_identity(pid, start, signal.SIGCONT, fs=fs)
                    del self._watchers[pid]
                elif st.state != "R" or time.perf_counter() > deadline:
                    del self._watchers[pid]  # asleep: it did not take the stop in
            if self._watchers:
                yield Wait(0.0005)

    # -- verifying ------------------------------------------------------------------------

    def _wait_stopped(self, entries: list[_Entry], deadline: float) -> Steps[None]:
        backoff = 0.0
        pending = entries
        slices = self._slices
        while True:
            running: list[tuple[int, int, str]] = []
            still: list[_Entry] = []
            for entry in pending:
                late = self._check(entry)
                if late:
                    running += late
                    still.append(entry)
                if slices.due():
                    yield YIELD
            if not still:
                return
            if self.plan.journal is not None:
                self.plan.journal.check()  # a lease that ran out resumed what we wait for
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
            if state == "t":
                return self._traced(entry)
            if state == "D" and fs.wchan(pid, tid) in _VFORK_WCHAN:
                # Blocked in vfork() until its child execs or exits: it cannot run (the
                # cgroup freezer counts it frozen); the child is stopped with the next
                # generation, and if it execs first, the parent takes its SIGSTOP before
                # it returns to user space.
                if pid not in self.report.blocked_in_vfork:
                    self.report.blocked_in_vfork.append(pid)
                continue
            late.append((pid, tid, state))
        if not late:
            self.report.tasks += len(tasks)
        elif not entry.ours:
            # Someone resumed a process that was stopped when we found it: stop it as ours,
            # recorded (and journaled) before the signal.
            self._foreign.remove(entry)
            self._entries.append(entry)
            entry.ours = True
            self.report.skipped.pop(pid, None)
            if self.plan.journal is not None:
                self.plan.journal.stopping(pid, entry.starttime, entry.inode)
            if not self._resignal(entry, signal.SIGSTOP):
                return self._gone(entry)
        return late

    def _traced(self, entry: _Entry) -> list[tuple[int, int, str]]:
        """A task of ``entry`` is stopped by a tracer (``t``): it runs whenever the tracer
        lets it, so it cannot be proven stopped. Refused, or skipped with ``partial_ok``
        (the thaw still sends the SIGCONT that undoes our SIGSTOP)."""
        if not self.plan.partial_ok:
            raise FreezePermissionError([entry.pid], reason=_traced_reason(self.plan, entry.pid))
        entry.settled = entry.traced = True
        self.report.skipped[entry.pid] = Skip.TRACED
        return []

    def _gone(self, entry: _Entry) -> list[tuple[int, int, str]]:
        # Exited (or reaped and its PID reused) while we froze: nothing to wait for. It stays
        # in the thaw list: the thaw finds it gone, which is not an error.
        entry.alive = False
        self.report.skipped.setdefault(entry.pid, Skip.EXITED)
        return []

    # -- thawing --------------------------------------------------------------------------

    def thaw(self) -> Steps[None]:
        """SIGCONT children-first to exactly what this freeze stopped, then resume the
        watchers that relayed the stop. Resumable: a process is forgotten only after it was
        signalled, so a thaw cut short (an interrupt, an error) finishes on the next call."""
        t0 = time.perf_counter()
        entries = self._entries
        refused: list[int] = []
        self._slices = slices = _Slices()
        while entries:
            entry = entries[-1]
            try:
                self._resignal(entry, signal.SIGCONT)
            except PermissionError:
                refused.append(entry.pid)  # it changed hands (setuid exec): not ours any more
            entries.pop()
            self._release_fd(entry)
            if slices.due():
                yield YIELD
        while self._foreign:
            self._release_fd(self._foreign.pop())
        yield from self._resume_watchers()
        if self.plan.journal is not None:
            self.plan.journal.released()
        self.report.thaw_seconds = time.perf_counter() - t0
        if refused:
            raise FreezePermissionError(refused, reason="they may no longer be signalled")

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
            return signal_identity(entry.pid, entry.starttime, sig, inode=entry.inode)
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


_ROOT = Stat(
    pid=0, comm=b"", state="S", ppid=0, pgrp=0, session=0, flags=0, num_threads=1, starttime=0
)


def _unfreezable(stat: Stat) -> Skip | None:
    """Why a process met by the walk is not to be stopped, if it is not."""
    if stat.is_kernel_thread:
        return Skip.KERNEL_THREAD
    if stat.state in DEAD_STATES and stat.num_threads <= 1:
        return Skip.ZOMBIE
    if stat.comm == HELPER_COMM:
        return Skip.SUPERVISOR  # a treeguard watchdog, of this process or another
    if stat.state == "t":
        return Skip.TRACED
    return None


def _traced_reason(plan: Plan, pid: int) -> str:
    status = plan.fs.status(pid) or {}
    tracer = status.get("TracerPid", "?")
    return (
        f"traced by PID {tracer} (a debugger or strace): a traced process runs whenever its "
        "tracer lets it, so it cannot be proven stopped; detach the tracer"
    )
