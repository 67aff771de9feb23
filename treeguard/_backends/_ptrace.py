"""The ptrace backend: seize every thread of the tree and hold it in a ptrace-stop.

A ptrace-stop is reported to the tracer only (ptrace(2)): the tree's parents get no SIGCHLD
and no ``waitpid(WUNTRACED)`` report, no SIGCONT is ever sent, so no handler runs. The
algorithm:

1. *Seize*: walk the tree parent-first; for every thread of a process, PTRACE_SEIZE (with
   PTRACE_O_TRACECLONE/FORK/VFORK: a thread or child born of a seized task is attached by
   the kernel and starts in a ptrace-stop, so a fork storm cannot outrun us), then
   PTRACE_INTERRUPT. Siblings are seized in a batch, as soon as their parent lists them.
2. *Settle*: before a process's children are read, ``waitid(tid, WSTOPPED | __WALL)``
   collects the stop of each of its threads, and its thread list is read again (a thread
   made meanwhile is seized too). A fork in flight when it was seized has completed by
   then, and every later child is the kernel's to attach: its children are final, and a
   storm freezes in one pass. A fork or clone event names a new task (PTRACE_GETEVENTMSG);
   a signal-delivery-stop keeps its signal, delivered again on detach; a group stop is kept
   by the kernel itself on detach (a process stopped before the freeze stays stopped).
3. *Re-enumerate*: only the passed-through processes (they run) may have new children;
   newcomers begin another pass.
4. *Prove*: every task held reported its ptrace-stop to waitid (the kernel's word for that
   very TID: the stop lasts until this tracer ends it, or SIGKILL ends the task), or was
   seen ``t`` in /proc twice when another thread of this process took the report; the
   leader of every process shows ``t`` in /proc once all its threads stopped.

The thaw detaches every task, children first; PTRACE_DETACH resumes it. Every request of
a freeze comes from the one tracer thread that holds it (the kernel takes requests only
from the thread that attached; a thread let go serves the next freeze), so a thaw works
from any thread, a finalizer or an event loop: the step generators hand work to that
thread and wait on an eventfd. If this process dies, the kernel detaches its tracees and
they run on.
"""

from __future__ import annotations

import os
import time

from .._drive import Backoff, Steps, run_sync
from .._report import Skip
from .._tree import ROOT, ChildrenFiles, ChildrenSource, unfreezable, walk
from ..errors import (
    FreezeError,
    FreezePermissionError,
    InvalidArgumentError,
    StopTimeoutError,
    TreeUnstableError,
)
from ..procfs import DEAD_STATES, Stat
from ._base import Backend, Plan
from ._hold import Hold, Proc, Task
from ._tracer import Tracer

__all__ = ["PtraceBackend"]

#: How long tasks that have not reported their stop yet are asked only through waitid.
_SPIN = 0.0002


class PtraceBackend(Backend):
    name = "ptrace"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.report.verified_by = "the ptrace-stop of every task, reported by waitid"
        self._me = os.getpid()
        self._hold = Hold(plan.fs, self.report, plan.journal)
        self._through: list[int] = []
        self._batched: dict[int, Stat] = {}  # met with its siblings, not visited yet
        self._listing = _Listing(self)
        self._deadline = 0.0
        self._denied: dict[int, str] = {}
        self._abort = False
        self._tracer: Tracer | None = None

    # -- what the guard sees -------------------------------------------------------------

    def _held(self, ours: bool) -> list[Proc]:
        return [p for p in self._hold.procs if p.ours == ours and not p.denied and p.held]

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
        try:
            self._seize_tree()
        finally:
            self._hold.close_kept()

    def _seize_tree(self) -> None:
        plan, report, tracer = self.plan, self.report, self._tracer
        assert tracer is not None
        clock = time.perf_counter
        self._deadline = clock() + plan.timeout
        plan.source.refresh()
        pending: list[int] = list(plan.starts)
        while True:
            report.passes += 1
            t0, seized = clock(), report.signal_seconds
            for _ in walk(pending, self._visit, self._listing):
                if self._abort:
                    raise FreezeError("the freeze was abandoned")
                tracer.pause_if_due()
            # The report's parts are disjoint: the seizes made while walking count apart.
            report.enumerate_seconds += clock() - t0 - (report.signal_seconds - seized)
            if self._denied and not plan.partial_ok:
                pids = sorted(self._denied)
                raise FreezePermissionError(pids, "; ".join(self._denied[p] for p in pids))
            t0 = clock()
            self._collect(self._hold.pending)  # tasks born meanwhile, and the walk's last
            report.verify_seconds += clock() - t0
            t0 = clock()
            plan.source.refresh()
            pending = self._newcomers()
            report.enumerate_seconds += clock() - t0
            if not pending:
                break
            if report.passes >= plan.max_passes:
                raise TreeUnstableError(report.passes, pending)
        for proc in self._hold.procs:
            if proc.denied:  # partial_ok: threads seized before the refusal go at once
                for task in proc.tasks:
                    self._hold.release(task)
        self._verify()
        report.stopped = len(self._held(True))

    def _visit(self, pid: int) -> Stat | None:
        """The walk reached ``pid``: met already with its siblings (see :class:`_Listing`),
        or a start of the walk. Its stat to walk into its children, or None to prune it."""
        stat = self._batched.pop(pid, None)
        return stat if stat is not None else self._meet(pid, None)

    def _meet(self, pid: int, parent: int | None) -> Stat | None:
        """Meet ``pid`` (listed by ``parent``): skip, pass through, or seize it."""
        known, plan, report = self._hold.known, self.plan, self.report
        assert self._tracer is not None
        self._tracer.pause_if_due()  # siblings are met in a batch: a long one, maybe
        if pid in known:
            return None
        reason = plan.blocked.get(pid)
        if reason is not None:
            return self._skip(pid, reason)
        if pid in plan.passthrough:
            known[pid] = None
            self._through.append(pid)
            return plan.fs.stat(pid) if pid else ROOT
        found = plan.fs.open_stat(pid, keep=True)  # kept to prove the identity once seized
        if found is None:
            return self._skip(pid, Skip.EXITED)
        statfd, stat = found
        kept = False
        try:
            if parent is not None and stat.ppid != parent:
                return self._skip(pid, Skip.EXITED)  # its PID reused meanwhile
            reason = unfreezable(stat)  # a kernel thread, a zombie, any guard's helper
            if reason is not None:
                return self._skip(pid, reason)
            proc = Proc(pid, stat)
            known[pid] = proc
            if proc.ours and plan.journal is not None:
                plan.journal.stopping(pid, stat.starttime)  # recorded before it is seized
            self._hold.procs.append(proc)
            t0 = time.perf_counter()
            self._hold.seize_threads(proc, statfd)
            report.signal_seconds += time.perf_counter() - t0
            kept = self._hold.keep(proc, statfd)
        finally:
            if not kept:
                os.close(statfd)
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

    def _settle(self, proc: Proc) -> None:
        """Wait until every thread of ``proc`` stopped, seizing any made meanwhile: its
        forks are then complete, and the children read next are final (every later child
        is attached by the kernel)."""
        while True:
            count = len(proc.tasks)
            self._collect(proc.tasks)
            if self._hold.alone(proc):
                return
            self._hold.seize_threads(proc)
            if len(proc.tasks) == count or proc.denied:
                self._hold.prove(proc)
                return

    def _collect(self, tasks: list[Task]) -> None:
        """Wait until each of ``tasks`` has reported a stop (or exited, or waits in vfork
        for a child we hold); new tasks appended to the list meanwhile are waited for too.

        A task interrupted a moment ago stops within microseconds once it runs: for the
        first :data:`_SPIN` seconds only waitid is asked, between yields of the CPU (the
        task may need this one). Past that, /proc says what keeps a task (gone, in vfork,
        stopped with its report taken by another thread), and the waits grow."""
        poll = self._hold.poll
        if len(tasks) == 1:  # one task whose stop has come already: the common case
            task = tasks[0]
            if task.stopped or task.done or task.vfork or poll(task, False) is None:
                if len(tasks) == 1:  # no task born meanwhile
                    if tasks is self._hold.pending:
                        tasks.clear()
                    return
        backoff: Backoff | None = None  # from the first look that finds a task late
        while True:
            count = len(tasks)
            look = backoff is not None and backoff.spun
            late: list[tuple[int, int, str]] = []
            for task in tasks[:count]:
                if task.stopped or task.done or task.vfork:
                    continue
                state = poll(task, look)
                if state is not None:
                    late.append((task.proc.pid, task.tid, state))
            if not late:
                if len(tasks) > count:
                    continue  # born meanwhile (a fork or clone event): wait for them too
                if tasks is self._hold.pending:
                    tasks.clear()
                return
            if self._abort:
                raise FreezeError("the freeze was abandoned")
            if backoff is None:
                backoff = Backoff(spin=_SPIN)
            if look and time.perf_counter() > self._deadline and backoff.capped:
                raise StopTimeoutError(self.plan.timeout, late)
            backoff.pause()

    def _newcomers(self) -> list[int]:
        """Children of passed-through processes (they run, and may have forked since). The
        children of a seized process were read once it had stopped: they are final."""
        fs, known, source = self.plan.fs, self._hold.known, self.plan.source
        found: list[int] = []
        for pid in self._through:
            stat = fs.stat(pid) if pid else ROOT
            if stat is not None:
                kids = [c for c in source.children(pid, stat) if c not in known]
                for kid in kids:
                    stat = self._meet(kid, pid)
                    if stat is not None:
                        self._batched[kid] = stat
                        found.append(kid)
        return found

    def _verify(self) -> None:
        """Count the tasks held, each proven stopped already: by the kernel's report of its
        ptrace-stop (waitid, for that very TID: only this tracer ends the stop, and SIGKILL,
        which makes the task exit), or by two looks at ``t`` in /proc when another thread of
        this process took that report. The leader of a process not proven once settled
        (:meth:`Hold.prove`) shows ``t`` in /proc now."""
        late: list[tuple[int, int, str]] = []
        for proc in self._hold.procs:
            if proc.tasks and not proc.held and not proc.denied:  # it died while held
                self.report.skipped.setdefault(proc.pid, Skip.EXITED)
        for proc in self._held(True) + self._held(False):
            for task in proc.tasks:
                if task.stopped and not task.done:
                    self.report.tasks += 1
            leader = self._hold.tasks.get(proc.pid)
            if proc.proven or leader is None or leader.done or not leader.stopped:
                continue
            state = self._hold.state(proc.pid, proc.pid)
            if state is not None and state != "t" and state not in DEAD_STATES:
                late.append((proc.pid, proc.pid, state))
        if late:
            raise FreezeError(f"tasks not in a ptrace-stop after the freeze: {late}")

    # -- thawing (tracer thread) -----------------------------------------------------------

    def _thaw_work(self) -> None:
        tracer, hold = self._tracer, self._hold
        assert tracer is not None
        left: list[Task] = []
        held = len(hold.tasks)
        for proc in reversed(hold.procs):
            for task in proc.tasks:
                if not task.done:
                    hold.release(task)
                    if not task.done:
                        left.append(task)
            tracer.pause_if_due()
        if len(hold.tasks) == held:  # else a fork reported meanwhile: linger looks at all
            hold.left = left
        # A task killed while held exits at once: wait for it a while. A vfork parent stops
        # only once its child execs or exits, which may take long: the tracer thread keeps
        # looking after the thaw returned, and lets each go as soon as it can.
        deadline = time.perf_counter() + max(1.0, self.plan.timeout)
        backoff = Backoff(spin=0.0)
        while time.perf_counter() < deadline and any(not t.vfork for t in self._hold.linger()):
            backoff.pause()
        tracer.finished = True


class _Listing(ChildrenSource):
    """The walk's view of children. A seized process is settled first (see
    :meth:`PtraceBackend._settle`); its new children are then met at once, siblings in a
    batch, so that each one's stop is on its way while the walk descends into the first."""

    def __init__(self, backend: PtraceBackend) -> None:
        super().__init__(backend.plan.fs)
        self._backend = backend

    def children(self, pid: int, stat: Stat) -> list[int]:
        backend = self._backend
        source, known = backend.plan.source, backend._hold.known
        proc = known.get(pid)
        if proc is not None and not proc.denied:
            backend._settle(proc)
            tids = [t.tid for t in proc.tasks if not t.done]
            if isinstance(source, ChildrenFiles):
                kids = source.of_threads(pid, tids)
            else:
                kids = source.children(pid, stat)
        else:
            kids = source.children(pid, stat)
        fresh: list[int] = []
        for kid in kids:
            if kid not in known:
                kid_stat = backend._meet(kid, pid)
                if kid_stat is not None:
                    backend._batched[kid] = kid_stat
                    fresh.append(kid)
        return fresh


_NO_TOKEN = (
    "a ptrace freeze cannot be handed to another process (a token or state file): the hold "
    "belongs to the thread that seized the tree, and ends when this process exits; use "
    "backend='signal' or 'cgroup' for tokens"
)
