"""What a ptrace freeze holds, and the steps on one tracee: seize and interrupt it, collect
its stop, adopt a task the kernel attached for us, let it go, reap it. Every method runs in
the freeze's tracer thread (see :mod:`treeguard._backends._tracer`).
"""

from __future__ import annotations

import os
import threading

from .. import _ptrace
from .._report import FreezeReport
from ..errors import FreezePermissionError
from ..procfs import DEAD_STATES, PF_EXITING, ProcFS, Stat, parse_stat_brief, parse_state
from ._base import Journal
from ._proof import VFORK_WCHAN

__all__ = ["Hold", "Proc", "Task"]

# Every task held by a freeze of this process, and the hold that has it. The kernel names
# one tracer process (TracerPid), but requests must come from the one thread that attached:
# another guard of this process holding a task must not be taken for the kernel's doing.
_HELD: dict[int, Hold] = {}

#: How many stat descriptors a freeze keeps open at most (see :meth:`Hold.keep`).
_KEEP = 64
#: waitid's options to collect a ptrace-stop without blocking.
_WAIT_STOP = os.WSTOPPED | os.WNOHANG | _ptrace.WALL

_EVENTS_NEW_TASK = frozenset(
    {_ptrace.PTRACE_EVENT_FORK, _ptrace.PTRACE_EVENT_VFORK, _ptrace.PTRACE_EVENT_CLONE}
)


class Proc:
    """A process of the tree met by the walk (or born during the freeze) and seized."""

    __slots__ = ("denied", "ours", "pid", "ppid", "proven", "starttime", "stat", "statfd", "tasks")

    def __init__(self, pid: int, stat: Stat) -> None:
        self.pid = pid
        self.stat = stat
        self.starttime = stat.starttime
        self.ppid = stat.ppid
        # Found in a group stop (T): held like the rest, and stopped again on detach.
        self.ours = stat.state != "T"
        self.tasks: list[Task] = []
        self.denied = ""  # why a thread of it may not be seized (partial_ok lets it go)
        self.proven = False  # its leader seen ``t`` in /proc once all its threads stopped
        self.statfd = -1  # its stat, kept open from the meeting until it settled

    @property
    def held(self) -> bool:
        """Whether a task of it is held still: one whose every task exited while held is
        gone (a zombie never runs again), not frozen; one never seized is not held."""
        return any(not task.done for task in self.tasks)


class Task:
    """One thread of a :class:`Proc`: the unit ptrace works on."""

    __slots__ = ("done", "proc", "seen_t", "sig", "stopped", "tid", "vfork")

    def __init__(self, tid: int, proc: Proc) -> None:
        self.tid = tid
        self.proc = proc
        self.stopped = False  # in a ptrace-stop we collected: to be detached
        self.sig = 0  # the signal of a signal-delivery-stop, delivered again on detach
        self.done = False  # detached, or gone: nothing more to do
        self.vfork = False  # blocked in vfork behind a child we held: stops once it goes on
        self.seen_t = False  # seen in a ptrace-stop that waitid did not report


class Hold:
    """The processes and threads a freeze seized (parent-first), and those whose stop has
    not been collected yet (:attr:`pending`)."""

    def __init__(self, fs: ProcFS, report: FreezeReport, journal: Journal | None) -> None:
        self.fs = fs
        self.report = report
        self.journal = journal
        self.me = os.getpid()
        self.procs: list[Proc] = []  # new children come after their parents
        self.known: dict[int, Proc | None] = {}  # every PID met: None if not held
        self.tasks: dict[int, Task] = {}
        self.pending: list[Task] = []  # seized, stop not collected yet
        self.kept: list[Proc] = []  # those whose stat descriptor is kept (Hold.keep)
        self.left: list[Task] | None = None  # what a thaw could not let go yet (linger)

    def seize_threads(self, proc: Proc, statfd: int = -1) -> None:
        """Seize and interrupt each thread of ``proc`` not held yet, as its thread list
        names them now. A thread not seized yet may make another meanwhile: the caller
        lists again once every thread held has stopped, until a list names no new one
        (:meth:`PtraceBackend._settle`).

        ``statfd`` (the leader's stat, kept open since the process was met) proves the
        leader's identity once seized with one ``pread``. A process met with one thread is
        not listed here: its leader is seized alone, and the list read once it has stopped
        names any thread it made before the seize."""
        if proc.denied:
            return
        if statfd >= 0 and proc.pid not in self.tasks and proc.stat.num_threads == 1:
            new = [proc.pid]
        else:
            new = [t for t in self.fs.tids(proc.pid) or () if t not in self.tasks]
            new.sort(key=lambda t: t != proc.pid)  # the leader first: it proves the identity
        for tid in new:
            if not self._seize(proc, tid, statfd):
                return  # not the process met: none of its threads is ours

    def _seize(self, proc: Proc, tid: int, statfd: int = -1) -> bool:
        """Seize and interrupt ``tid``; False if ``proc`` turned out not to be the process
        met (its PID was recycled): nothing of it is held then."""
        for attempt in range(2):
            try:
                _ptrace.seize(tid)
                break
            except ProcessLookupError:
                return True  # gone
            except FreezePermissionError:
                # TracerPid names the tracing *thread*: this one (the kernel attached a task
                # born of one we seized), or another thread of this process (another guard).
                tracer = _ptrace.tracer_of(tid)
                if tracer == threading.get_native_id():
                    break
                ours = os.path.exists(f"/proc/self/task/{tracer}")
                if ours or _HELD.get(tid) not in (None, self):
                    proc.denied = f"PID {tid} is held by another ptrace freeze of this process"
                    return True
                stat = self.fs.stat(proc.pid, tid)
                if stat is None or stat.state in DEAD_STATES or stat.flags & PF_EXITING:
                    return True  # exiting (ptrace_attach refuses an exiting task with EPERM)
                if tracer == 0 and attempt == 0:
                    continue  # a tracer was letting it go: once more
                proc.denied = _ptrace.permission_reason(tid)
                return True
        # Seized: the TID names this task until it is let go (or reaped by us). Identity
        # before the stop: the leader must still be the process met (a PID recycled since
        # the listing is a stranger), and a thread must be one of its threads.
        if tid == proc.pid:
            # A stat descriptor opened when the process was met reads only while that very
            # process lives (a /proc file holds the process, not the number: procfs.py), and
            # a PID is not given again while its process lives: read, it names the seized.
            if statfd >= 0:
                mine = bool(self.fs.reread(statfd))
            else:
                data = self.fs.read(f"{tid}/stat")
                mine = data is not None and parse_stat_brief(data)[2] == proc.starttime
        else:  # the leader, seized first, is proven: is this one of its threads?
            mine = self.fs.has_thread(proc.pid, tid)
        if not mine:
            try:
                _ptrace.detach(tid)
            except ProcessLookupError:
                pass
            return tid != proc.pid
        self._add(proc, tid)
        try:
            _ptrace.interrupt(tid)
        except ProcessLookupError:
            pass  # exiting: collecting sees it go
        return True

    def _add(self, proc: Proc, tid: int) -> None:
        task = Task(tid, proc)
        self.left = None  # a task held since the last thaw: look at all again
        _HELD[tid] = self
        self.tasks[tid] = task
        proc.tasks.append(task)
        self.pending.append(task)

    def _finish(self, task: Task) -> None:
        """Nothing more to do for ``task``: let go of, or gone."""
        task.done = True
        if _HELD.get(task.tid) is self:
            del _HELD[task.tid]

    def poll(self, task: Task, look: bool = True) -> str | None:
        """Collect ``task``'s stop if it reported one. None if it needs no more waiting
        (stopped, gone, or blocked in vfork behind a child we hold), else its state (``"?"``
        without ``look``: /proc was not read, as the first waits after an interrupt need
        not, the stop being on its way)."""
        try:
            found = os.waitid(os.P_PID, task.tid, _WAIT_STOP)
        except ChildProcessError:
            self._finish(task)  # not a tracee of ours any more: it was reaped
            return None
        if found is not None:
            self._stopped(task, found.si_status)
            return None
        if not look:
            return "?"
        pid = task.proc.pid
        state = self.state(pid, task.tid)
        if state is None or state in DEAD_STATES:
            self._reap(task)
            return None
        if state == "t":
            # In a ptrace-stop, ours, with no report: another thread of this process took
            # it (any thread of the tracer's process may wait for a tracee, ptrace(2); a
            # waitpid() on a child does), or the stopping task is still setting it up. Seen
            # so at two looks, it is stopped (its signal, if any, went with the report).
            if task.seen_t:
                task.stopped, task.vfork = True, False
                return None
            task.seen_t = True
        if state == "D" and self.fs.wchan(pid, task.tid) in VFORK_WCHAN:
            # Waiting for its vfork child, which we hold: it cannot run. It reaches its
            # pending stop once the child goes on (the thaw waits for it then).
            task.vfork = True
            if pid not in self.report.blocked_in_vfork:
                self.report.blocked_in_vfork.append(pid)
            return None
        return state

    def _stopped(self, task: Task, status: int) -> None:
        # si_status of a ptrace-stop: the signal in bits 0-7, the event in bits 8-15.
        event, sig = status >> 8, status & 0xFF
        task.stopped, task.vfork = True, False
        if event in _EVENTS_NEW_TASK:
            try:
                self._adopt(task, _ptrace.geteventmsg(task.tid))
            except ProcessLookupError:
                pass
        elif event == 0:
            task.sig = sig  # a signal-delivery-stop: that signal would be lost otherwise
        # PTRACE_EVENT_STOP: our interrupt, a group stop (kept on detach), or a new task.

    def _adopt(self, parent: Task, tid: int) -> None:
        """A task the kernel attached for us (fork, vfork or clone of a tracee)."""
        if tid in self.tasks:
            return
        proc = parent.proc
        if not os.path.exists(f"/proc/{proc.pid}/task/{tid}"):  # a process, not a thread
            stat = self.fs.stat(tid)
            if stat is None:
                return
            proc = Proc(tid, stat)
            proc.ours = True
            self.known[tid] = proc
            if self.journal is not None:
                self.journal.stopping(tid, stat.starttime)
            self.procs.append(proc)
        self._add(proc, tid)

    def _reap(self, task: Task) -> None:
        """Finish a tracee that exited. Its exit is reported to us, the tracer, first: wait
        for it, so that its real parent hears of it. A process whose real parent is this
        one is left to be reaped by its owner (a Popen's status is theirs)."""
        if task.tid != task.proc.pid or task.proc.ppid != self.me:
            try:
                found = os.waitid(os.P_PID, task.tid, os.WEXITED | os.WNOHANG | _ptrace.WALL)
            except ChildProcessError:
                found = None  # reaped already
            else:
                if found is None:
                    return  # a leader waits for its threads: again later
        self._finish(task)

    def keep(self, proc: Proc, statfd: int) -> bool:
        """Keep ``proc``'s stat descriptor (opened when it was met) for the look at its
        leader once it settled (:meth:`alone`, :meth:`prove`): one ``pread`` then. False
        (the caller closes it) past :data:`_KEEP` descriptors, so that a wide tree does not
        use up this process's descriptors."""
        if len(self.kept) >= _KEEP or not proc.tasks or proc.denied:
            return False
        proc.statfd = statfd
        self.kept.append(proc)
        return True

    def close_kept(self) -> None:
        """Close the stat descriptors still kept (the freeze ended, or gave up)."""
        for proc in self.kept:
            if proc.statfd >= 0:
                os.close(proc.statfd)
                proc.statfd = -1
        self.kept.clear()

    def alone(self, proc: Proc) -> bool:
        """Whether ``proc``'s leader, held and stopped, is its only thread: its stat, read
        now, shows the process met (its starttime), ``t`` (the leader in a ptrace-stop) and
        one thread. Then no thread can be missing: a thread made before the leader's seize
        (a clone in flight) counts in the stat once the leader has stopped, and every later
        one is the kernel's to attach. One read, where listing the threads costs several."""
        tasks = proc.tasks
        if len(tasks) != 1 or tasks[0].tid != proc.pid or not tasks[0].stopped or tasks[0].done:
            return False
        data = self._stat_now(proc)
        if data is None:
            return False
        state, threads, starttime = parse_stat_brief(data)
        proc.proven = state == "t" and threads == 1 and starttime == proc.starttime
        return proc.proven

    def prove(self, proc: Proc) -> None:
        """Once every thread of ``proc`` listed is held and stopped: whether its leader shows
        ``t`` in /proc (a thread never seized that exec'd would hold the leader's PID, and
        run). Not proven so, it is looked at again at the end of the freeze."""
        leader = self.tasks.get(proc.pid)
        if leader is None or leader.done or not leader.stopped:
            self._stat_now(proc, read=False)
            return
        data = self._stat_now(proc)
        proc.proven = data is not None and parse_state(data) == "t"

    def _stat_now(self, proc: Proc, read: bool = True) -> bytes | None:
        """The stat of ``proc`` read now, through the descriptor kept for it (then closed)."""
        fd, proc.statfd = proc.statfd, -1
        if fd < 0:
            return self.fs.read(f"{proc.pid}/stat") if read else None
        try:
            return self.fs.reread(fd) if read else None
        finally:
            os.close(fd)

    def state(self, pid: int, tid: int) -> str | None:
        data = self.fs.read(f"{pid}/task/{tid}/stat")
        return None if data is None else parse_state(data)

    def release(self, task: Task) -> None:
        if not task.stopped:
            self.poll(task)  # collects a stop, or an exit, that happened meanwhile
            if task.done or not task.stopped:
                return
        try:
            _ptrace.detach(task.tid, task.sig)
        except ProcessLookupError:
            # Not in a ptrace-stop any more: SIGKILL wakes a tracee, which is now exiting.
            task.stopped = False
            state = self.state(task.proc.pid, task.tid)
            if state is None or state in DEAD_STATES:
                self._reap(task)
            return
        self._finish(task)

    def linger(self) -> list[Task]:
        """Let go of what a thaw could not yet; the tasks still left. Called by the thaw,
        then by the tracer thread while it waits for requests: only the tasks left at the
        last look (:attr:`left`) are looked at again, once the thaw has listed them."""
        pool = self.left
        if pool is None:
            pool = [task for proc in self.procs for task in proc.tasks]
        held = len(self.tasks)
        left: list[Task] = []
        for task in pool:
            if not task.done:
                self.release(task)
                if not task.done:
                    left.append(task)
        # A fork reported meanwhile (a task stopping as it is let go) adds a task: all again.
        self.left = left if len(self.tasks) == held else None
        return left
