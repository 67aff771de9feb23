"""The ptrace backend: seize every thread of the tree and hold it in a ptrace-stop.

A ptrace-stop is reported to the tracer only (ptrace(2)): the tree's parents get no SIGCHLD
and no ``waitpid(WUNTRACED)`` report, no SIGCONT is ever sent, so no handler runs. The
algorithm, in rounds, like the signal backend's:

1. *Seize*: walk the tree parent-first; for every thread of every process, PTRACE_SEIZE
   (with PTRACE_O_TRACECLONE/FORK/VFORK: a thread or child born of a seized task is attached
   by the kernel and starts in a ptrace-stop, so a fork storm cannot outrun us), then
   PTRACE_INTERRUPT. The thread list is read again until it holds no thread not seized.
2. *Collect*: ``waitid(tid, WSTOPPED | __WALL)`` for every task until each has reported a
   stop. A fork or clone event names a new task (PTRACE_GETEVENTMSG), collected too. A
   signal-delivery-stop keeps its signal, delivered again on detach; a group stop is kept
   by the kernel itself on detach (a process stopped before the freeze stays stopped).
3. *Re-enumerate*: threads and children of the round's processes, now stopped; newcomers
   (a fork in flight when its parent was seized) begin another round.
4. *Verify*: every task held shows ``t`` in /proc.

The thaw detaches every task, children first; PTRACE_DETACH resumes it. Every request
comes from one tracer thread per freeze (the kernel takes requests only from the thread
that attached), so a thaw works from any thread, a finalizer or an event loop: the step
generators hand work to that thread and wait on an eventfd. If this process dies, the
kernel detaches its tracees and they run on.
"""

from __future__ import annotations

import os
import time

from .. import _ptrace
from .._drive import Steps, run_sync
from .._report import Skip
from .._tree import ChildrenFiles, ChildrenSource, walk
from ..errors import (
    FreezeError,
    FreezePermissionError,
    InvalidArgumentError,
    StopTimeoutError,
    TreeUnstableError,
)
from ..procfs import DEAD_STATES, HELPER_COMM, Stat, parse_stat_brief
from ._base import Backend, Plan
from ._signal import _ROOT, _VFORK_WCHAN
from ._tracer import Tracer

__all__ = ["PtraceBackend"]

#: Longest pause between two looks at tasks that have not reported their stop yet.
_MAX_BACKOFF = 0.002
_EVENTS_NEW_TASK = frozenset(
    {_ptrace.PTRACE_EVENT_FORK, _ptrace.PTRACE_EVENT_VFORK, _ptrace.PTRACE_EVENT_CLONE}
)


class _Proc:
    __slots__ = ("denied", "ours", "pid", "ppid", "starttime", "stat", "tasks")

    def __init__(self, pid: int, stat: Stat) -> None:
        self.pid = pid
        self.stat = stat
        self.starttime = stat.starttime
        self.ppid = stat.ppid
        # Found in a group stop (T): held like the rest, and stopped again on detach.
        self.ours = stat.state != "T"
        self.tasks: list[_Task] = []
        self.denied = ""  # why a thread of it may not be seized (partial_ok lets it go)


class _Task:
    __slots__ = ("done", "proc", "sig", "stopped", "tid")

    def __init__(self, tid: int, proc: _Proc) -> None:
        self.tid = tid
        self.proc = proc
        self.stopped = False  # in a ptrace-stop we collected: to be detached
        self.sig = 0  # the signal of a signal-delivery-stop, delivered again on detach
        self.done = False  # detached, or gone: nothing more to do


class PtraceBackend(Backend):
    name = "ptrace"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.report.verified_by = "ptrace-stops collected by waitid, /proc task states"
        self._me = os.getpid()
        self._procs: list[_Proc] = []  # seized, parent-first (new children after parents)
        self._known: dict[int, _Proc | None] = {}
        self._tasks: dict[int, _Task] = {}
        self._pending: list[_Task] = []  # seized, stop not collected yet
        self._round: list[_Proc] = []
        self._through: list[int] = []
        self._parents: dict[int, int] = {}  # child -> the process whose children listed it
        self._denied: dict[int, str] = {}
        self._abort = False
        self._tracer: Tracer | None = None

    # -- what the guard sees -------------------------------------------------------------

    def _held(self, ours: bool) -> list[_Proc]:
        return [p for p in self._procs if p.ours == ours and not p.denied and p.tasks]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._held(True))

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.pid, p.starttime) for p in self._held(True))

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.pid, p.starttime) for p in self._held(False))

    def describe(self) -> dict[str, object]:
        raise InvalidArgumentError("backend", _NO_TOKEN)

    # -- the step generators (any thread) --------------------------------------------------

    def freeze(self) -> Steps[None]:
        start = time.perf_counter()
        self._tracer = Tracer(self._linger)
        try:
            yield from self._tracer.steps(self._freeze_work)
        except BaseException:
            # Anything, GeneratorExit from a cancelled driver included: let everything go.
            # A freeze still running in the tracer thread stops at its next look at _abort.
            self._abort = True
            run_sync(self.thaw())
            raise
        self.report.freeze_seconds = time.perf_counter() - start

    def thaw(self) -> Steps[None]:
        """Detach every task, children first. Resumable: the tracer thread finishes a thaw
        even if its caller was interrupted, and a second call finds what is left."""
        if self._tracer is None or os.getpid() != self._me:
            return  # never froze, or a forked child: the hold is the parent's
        t0 = time.perf_counter()
        yield from self._tracer.steps(self._thaw_work)
        if self.plan.journal is not None:
            self.plan.journal.released()
        self.report.thaw_seconds = time.perf_counter() - t0

    # -- freezing (tracer thread) ----------------------------------------------------------

    def _freeze_work(self) -> None:
        plan, report = self.plan, self.report
        clock = time.perf_counter
        deadline = clock() + plan.timeout
        source = _Listing(self)
        plan.source.refresh()
        pending: list[int] = list(plan.starts)
        while True:
            report.passes += 1
            self._round = []
            t0 = clock()
            for _ in walk(pending, self._visit, source):
                if self._abort:
                    raise FreezeError("the freeze was abandoned")
            report.enumerate_seconds += clock() - t0
            if self._denied and not plan.partial_ok:
                pids = sorted(self._denied)
                raise FreezePermissionError(pids, "; ".join(self._denied[p] for p in pids))
            t0 = clock()
            self._collect(deadline)
            report.verify_seconds += clock() - t0
            t0 = clock()
            plan.source.refresh()
            pending = self._newcomers()
            report.enumerate_seconds += clock() - t0
            if not pending and not self._pending:
                break
            if report.passes >= plan.max_passes:
                raise TreeUnstableError(report.passes, pending or [t.tid for t in self._pending])
        for proc in self._procs:
            if proc.denied:  # partial_ok: threads seized before the refusal go at once
                for task in proc.tasks:
                    self._release(task)
        self._verify()
        report.stopped = len(self._held(True))

    def _visit(self, pid: int) -> Stat | None:
        """Meet ``pid``: skip, pass through, or seize it. Its stat to walk into its children,
        or None to prune it."""
        known, plan, report = self._known, self.plan, self.report
        if pid in known:
            return None
        reason = plan.blocked.get(pid)
        if reason is not None:
            return self._skip(pid, reason)
        if pid in plan.passthrough:
            known[pid] = None
            self._through.append(pid)
            return plan.fs.stat(pid) if pid else _ROOT
        stat = plan.fs.stat(pid)
        parent = self._parents.pop(pid, None)
        if stat is None or (parent is not None and stat.ppid != parent):
            return self._skip(pid, Skip.EXITED)  # gone, or its PID reused meanwhile
        if stat.comm == HELPER_COMM:
            return self._skip(pid, Skip.SUPERVISOR)  # any guard's watchdog helper
        if stat.is_kernel_thread:
            return self._skip(pid, Skip.KERNEL_THREAD)
        if stat.state in DEAD_STATES and stat.num_threads <= 1:
            return self._skip(pid, Skip.ZOMBIE)
        proc = _Proc(pid, stat)
        known[pid] = proc
        if proc.ours and plan.journal is not None:
            plan.journal.stopping(pid, stat.starttime)  # recorded before it is seized
        self._procs.append(proc)
        self._round.append(proc)
        t0 = time.perf_counter()
        self._seize_threads(proc)
        report.signal_seconds += time.perf_counter() - t0
        if proc.denied:
            if not plan.partial_ok:
                self._denied[pid] = proc.denied
                return None
            report.skipped[pid] = Skip.PERMISSION  # its children may be ours
        elif not proc.tasks:
            report.skipped[pid] = Skip.EXITED
            return None
        elif not proc.ours:
            report.skipped[pid] = Skip.ALREADY_STOPPED
        return stat

    def _skip(self, pid: int, reason: Skip) -> Stat | None:
        self._known[pid] = None
        self.report.skipped[pid] = reason
        return None

    def _seize_threads(self, proc: _Proc) -> None:
        """Seize and interrupt every thread of ``proc``, reading its thread list again until
        it names none we have not tried (a thread not yet seized may have made one)."""
        tried: set[int] = set()
        while not proc.denied:
            new = [t for t in self.plan.fs.tids(proc.pid) or () if t not in tried]
            new = [t for t in new if t not in self._tasks]
            if not new:
                return
            for tid in new:
                tried.add(tid)
                self._seize(proc, tid)

    def _seize(self, proc: _Proc, tid: int) -> None:
        try:
            _ptrace.seize(tid)
        except ProcessLookupError:
            return  # gone
        except FreezePermissionError as err:
            if _ptrace.tracer_of(tid) != self._me:
                state = self._state(proc.pid, tid)
                if state is not None and state not in DEAD_STATES:  # an exiting task: EPERM
                    proc.denied = err.reason
                return
            # Attached already, by the kernel: born of a task we seized. It is ours.
        self._add(proc, tid)
        try:
            _ptrace.interrupt(tid)
        except ProcessLookupError:
            pass  # exiting: collecting sees it go

    def _add(self, proc: _Proc, tid: int) -> None:
        task = _Task(tid, proc)
        self._tasks[tid] = task
        proc.tasks.append(task)
        self._pending.append(task)

    def _collect(self, deadline: float) -> None:
        """Wait until every seized task has reported a stop (or exited)."""
        backoff = 0.0
        while self._pending:
            pending, self._pending = self._pending, []
            late: list[tuple[int, int, str]] = []
            for task in pending:
                state = self._poll(task)
                if state is not None:
                    late.append((task.proc.pid, task.tid, state))
                    self._pending.append(task)
            if not late:
                continue  # tasks born meanwhile (fork events) may have joined _pending
            if self._abort:
                raise FreezeError("the freeze was abandoned")
            if time.perf_counter() > deadline and backoff >= _MAX_BACKOFF:
                raise StopTimeoutError(self.plan.timeout, late)
            time.sleep(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2 if backoff else 0.00002)

    def _poll(self, task: _Task) -> str | None:
        """Collect ``task``'s stop if it reported one. None if it needs no more waiting
        (stopped, gone, or blocked in vfork behind a child we hold), else its state."""
        try:
            found = os.waitid(os.P_PID, task.tid, os.WSTOPPED | os.WNOHANG | _ptrace.WALL)
        except ChildProcessError:
            task.done = True  # not a tracee of ours any more: it was reaped
            return None
        if found is not None:
            self._stopped(task, found.si_status)
            return None
        pid = task.proc.pid
        state = self._state(pid, task.tid)
        if state is None or state in DEAD_STATES:
            self._reap(task)
            return None
        if state == "D" and self.plan.fs.wchan(pid, task.tid) in _VFORK_WCHAN:
            # Waiting for its vfork child, which we hold: it cannot run. It reaches its
            # pending stop once the child goes on (the thaw waits for it then).
            if pid not in self.report.blocked_in_vfork:
                self.report.blocked_in_vfork.append(pid)
            return None
        return state

    def _stopped(self, task: _Task, status: int) -> None:
        # si_status of a ptrace-stop: the signal in bits 0-7, the event in bits 8-15.
        event, sig = status >> 8, status & 0xFF
        task.stopped = True
        if event in _EVENTS_NEW_TASK:
            try:
                self._adopt(task, _ptrace.geteventmsg(task.tid))
            except ProcessLookupError:
                pass
        elif event == 0:
            task.sig = sig  # a signal-delivery-stop: that signal would be lost otherwise
        # PTRACE_EVENT_STOP: our interrupt, a group stop (kept on detach), or a new task.

    def _adopt(self, parent: _Task, tid: int) -> None:
        """A task the kernel attached for us (fork, vfork or clone of a tracee)."""
        if tid in self._tasks:
            return
        proc = parent.proc
        if not os.path.exists(f"/proc/{proc.pid}/task/{tid}"):  # a process, not a thread
            stat = self.plan.fs.stat(tid)
            if stat is None:
                return
            proc = _Proc(tid, stat)
            proc.ours = True
            self._known[tid] = proc
            if self.plan.journal is not None:
                self.plan.journal.stopping(tid, stat.starttime)
            self._procs.append(proc)
        self._add(proc, tid)

    def _reap(self, task: _Task) -> None:
        """Finish a tracee that exited. Its exit is reported to us, the tracer, first: wait
        for it, so that its real parent hears of it. A process whose real parent is this
        one is left to be reaped by its owner (a Popen's status is theirs)."""
        task.done = True
        if task.tid == task.proc.pid and task.proc.ppid == self._me:
            return
        try:
            if os.waitid(os.P_PID, task.tid, os.WEXITED | os.WNOHANG | _ptrace.WALL) is None:
                task.done = False  # a leader waits for its threads: again later
        except ChildProcessError:
            pass

    def _newcomers(self) -> list[int]:
        """Threads (seized at once) and children (returned) that appeared in the round's
        processes before they stopped, and children of passed-through processes."""
        fs, known, source = self.plan.fs, self._known, self.plan.source
        found: list[tuple[int, int]] = []
        for pid in self._through:  # not stopped: they may have forked since
            stat = fs.stat(pid) if pid else _ROOT
            if stat is not None:
                found += ((c, pid) for c in source.children(pid, stat) if c not in known)
        for proc in self._round:
            if proc.denied or not proc.tasks:
                continue
            self._seize_threads(proc)
            tids = [t.tid for t in proc.tasks if not t.done]
            if isinstance(source, ChildrenFiles):
                kids = source.of_threads(proc.pid, tids)
            else:
                kids = source.children(proc.pid, proc.stat)
            found += ((c, proc.pid) for c in kids if c not in known)
        for kid, parent in found:
            self._parents.setdefault(kid, parent)
        return list(dict.fromkeys(kid for kid, _ in found))

    def _verify(self) -> None:
        """Every task held shows ``t`` (ptrace-stopped) in /proc."""
        late: list[tuple[int, int, str]] = []
        for proc in self._held(True) + self._held(False):
            for task in proc.tasks:
                if task.done or not task.stopped:
                    continue
                state = self._state(proc.pid, task.tid)
                if state == "t":
                    self.report.tasks += 1
                elif state is not None and state not in DEAD_STATES:
                    late.append((proc.pid, task.tid, state))
        if late:
            raise FreezeError(f"tasks not in a ptrace-stop after the freeze: {late}")

    def _state(self, pid: int, tid: int) -> str | None:
        data = self.plan.fs.read(f"{pid}/task/{tid}/stat")
        return None if data is None else parse_stat_brief(data)[0]

    # -- thawing (tracer thread) -----------------------------------------------------------

    def _thaw_work(self) -> None:
        for proc in reversed(self._procs):
            for task in proc.tasks:
                if not task.done:
                    self._release(task)
        # A task that was not in a ptrace-stop (a vfork parent whose child we held, a task
        # killed while held) stops or exits once its child goes on: wait for it a while,
        # then leave it to the tracer thread, which keeps looking until it is let go.
        deadline = time.perf_counter() + max(1.0, self.plan.timeout)
        backoff = 0.00002
        while self._linger() and time.perf_counter() < deadline:
            time.sleep(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2)
        assert self._tracer is not None
        self._tracer.finished = True

    def _release(self, task: _Task) -> None:
        if not task.stopped:
            self._poll(task)  # collects a stop, or an exit, that happened meanwhile
            if task.done or not task.stopped:
                return
        try:
            _ptrace.detach(task.tid, task.sig)
        except ProcessLookupError:
            # Not in a ptrace-stop any more: SIGKILL wakes a tracee, which is now exiting.
            task.stopped = False
            state = self._state(task.proc.pid, task.tid)
            if state is None or state in DEAD_STATES:
                self._reap(task)
            return
        task.done = True

    def _linger(self) -> bool:
        """Let go of what a thaw could not yet; whether anything is left. Called by the
        thaw, then by the tracer thread while it waits for requests."""
        left = False
        for proc in self._procs:
            for task in proc.tasks:
                if not task.done:
                    self._release(task)
                    left = left or not task.done
        return left


class _Listing(ChildrenSource):
    """The plan's children, remembering which process listed each child (checked against
    the child's ppid when it is met: a PID reused meanwhile is not taken for it)."""

    def __init__(self, backend: PtraceBackend) -> None:
        super().__init__(backend.plan.fs)
        self._source = backend.plan.source
        self._parents = backend._parents

    def children(self, pid: int, stat: Stat) -> list[int]:
        kids = self._source.children(pid, stat)
        for kid in kids:
            self._parents.setdefault(kid, pid)
        return kids


_NO_TOKEN = (
    "a ptrace freeze cannot be handed to another process (a token or state file): the hold "
    "belongs to the thread that seized the tree, and ends when this process exits; use "
    "backend='signal' or 'cgroup' for tokens"
)
