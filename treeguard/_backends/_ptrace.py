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
from ..procfs import DEAD_STATES, HELPER_COMM, Stat
from ._base import Backend, Plan
from ._hold import Hold, Proc
from ._signal import _ROOT
from ._tracer import Tracer

__all__ = ["PtraceBackend"]

#: Longest pause between two looks at tasks that have not reported their stop yet.
_MAX_BACKOFF = 0.002


class PtraceBackend(Backend):
    name = "ptrace"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.report.verified_by = "ptrace-stops collected by waitid, /proc task states"
        self._me = os.getpid()
        self._hold = Hold(plan.fs, self.report, plan.journal)
        self._round: list[Proc] = []
        self._through: list[int] = []
        self._parents: dict[int, int] = {}  # child -> the process whose children listed it
        self._denied: dict[int, str] = {}
        self._abort = False
        self._tracer: Tracer | None = None

    # -- what the guard sees -------------------------------------------------------------

    def _held(self, ours: bool) -> list[Proc]:
        return [p for p in self._hold.procs if p.ours == ours and not p.denied and p.tasks]

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
        self._tracer = Tracer(lambda: bool(self._hold.linger()))
        try:
            self._tracer.start()
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
            if not pending and not self._hold.pending:
                break
            if report.passes >= plan.max_passes:
                raise TreeUnstableError(
                    report.passes, pending or [t.tid for t in self._hold.pending]
                )
        for proc in self._hold.procs:
            if proc.denied:  # partial_ok: threads seized before the refusal go at once
                for task in proc.tasks:
                    self._hold.release(task)
        self._verify()
        report.stopped = len(self._held(True))

    def _visit(self, pid: int) -> Stat | None:
        """Meet ``pid``: skip, pass through, or seize it. Its stat to walk into its children,
        or None to prune it."""
        known, plan, report = self._hold.known, self.plan, self.report
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
        proc = Proc(pid, stat)
        known[pid] = proc
        if proc.ours and plan.journal is not None:
            plan.journal.stopping(pid, stat.starttime)  # recorded before it is seized
        self._hold.procs.append(proc)
        self._round.append(proc)
        t0 = time.perf_counter()
        self._hold.seize_threads(proc)
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
        self._hold.known[pid] = None
        self.report.skipped[pid] = reason
        return None

    def _collect(self, deadline: float) -> None:
        """Wait until every seized task has reported a stop (or exited)."""
        backoff = 0.0
        while self._hold.pending:
            pending, self._hold.pending = self._hold.pending, []
            late: list[tuple[int, int, str]] = []
            for task in pending:
                state = self._hold.poll(task)
                if state is not None:
                    late.append((task.proc.pid, task.tid, state))
                    self._hold.pending.append(task)
            if not late:
                continue  # tasks born meanwhile (fork events) may have joined _pending
            if self._abort:
                raise FreezeError("the freeze was abandoned")
            if time.perf_counter() > deadline and backoff >= _MAX_BACKOFF:
                raise StopTimeoutError(self.plan.timeout, late)
            time.sleep(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2 if backoff else 0.00002)

    def _newcomers(self) -> list[int]:
        """Threads (seized at once) and children (returned) that appeared in the round's
        processes before they stopped, and children of passed-through processes."""
        fs, known, source = self.plan.fs, self._hold.known, self.plan.source
        found: list[tuple[int, int]] = []
        for pid in self._through:  # not stopped: they may have forked since
            stat = fs.stat(pid) if pid else _ROOT
            if stat is not None:
                found += ((c, pid) for c in source.children(pid, stat) if c not in known)
        for proc in self._round:
            if proc.denied or not proc.tasks:
                continue
            self._hold.seize_threads(proc)
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
                state = self._hold.state(proc.pid, task.tid)
                if state == "t":
                    self.report.tasks += 1
                elif state is not None and state not in DEAD_STATES:
                    late.append((proc.pid, task.tid, state))
        if late:
            raise FreezeError(f"tasks not in a ptrace-stop after the freeze: {late}")

    # -- thawing (tracer thread) -----------------------------------------------------------

    def _thaw_work(self) -> None:
        for proc in reversed(self._hold.procs):
            for task in proc.tasks:
                if not task.done:
                    self._hold.release(task)
        # A task killed while held exits at once: wait for it a while. A vfork parent stops
        # only once its child execs or exits, which may take long: the tracer thread keeps
        # looking after the thaw returned, and lets each go as soon as it can.
        deadline = time.perf_counter() + max(1.0, self.plan.timeout)
        backoff = 0.00002
        while time.perf_counter() < deadline and any(not t.vfork for t in self._hold.linger()):
            time.sleep(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2)
        assert self._tracer is not None
        self._tracer.finished = True


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
