"""The proof that a process stopped: every one of its tasks shows ``T`` in /proc.

A single-threaded process is proven by one read of its stat file (kept open: one ``pread``);
a multi-threaded one by the stat of each task once its main thread stopped (the threads
listed then are final: a stopped process makes no new ones). Two states are classified, not
waited for:

- ``D`` in vfork() (wchan ``kernel_clone``): the parent cannot run until its vfork child
  execs or exits; the cgroup freezer counts it frozen, and if the child execs first, the
  parent takes its pending SIGSTOP before it returns to user space;
- ``t``: stopped by a tracer, which may let it go at any moment: never a proof.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .._drive import YIELD, Backoff, Slices, Steps
from .._report import FreezeReport
from ..errors import StopTimeoutError
from ..procfs import DEAD_STATES, ProcFS, dead, parse_stat, parse_stat_brief, parse_state
from ._base import Plan
from ._pidfds import Entry, count

__all__ = [
    "GONE",
    "SETTLED",
    "TRACED",
    "VFORK_WCHAN",
    "Look",
    "look",
    "traced_reason",
    "wait_stopped",
]

#: Where a task waits while its vfork child has not exec'd or exited (kernel/fork.c).
VFORK_WCHAN = frozenset({"kernel_clone", "_do_fork", "do_fork"})

#: States of a task that needs no more waiting for: stopped by a signal, or gone. ``t``
#: (stopped by a tracer) is not among them: a tracer lets its tracee go at any moment.
SETTLED = frozenset("T") | DEAD_STATES

#: :func:`look`'s answer for a process that exited (or whose PID names another now).
GONE = object()
#: :func:`look`'s answer for a process one of whose tasks a tracer holds.
TRACED = object()


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at a process found: its tasks not stopped yet, and how many it has."""

    late: list[tuple[int, int, str]]
    tasks: int


#: What :func:`look` finds most often (one task, stopped), made once.
_ONE_STOPPED = Look([], 1)


def look(entry: Entry, fs: ProcFS, report: FreezeReport, keep: bool = False) -> Look | object:
    """Look at ``entry``'s tasks once: a :class:`Look`, :data:`GONE` or :data:`TRACED`.

    Records on the way what the process is (its stat when its thread count changed, its
    threads once its main thread stopped) and the vfork parents in ``report``. With
    ``keep``, the stat files of its other threads are kept open for the next look
    (``entry.taskfds``: the caller closes them, :func:`._pidfds.close_tasks`).
    """
    pid = entry.pid
    data = fs.read(f"{pid}/stat") if entry.statfd < 0 else fs.reread(entry.statfd)
    if data is None:
        return GONE
    # Only the state, the thread count and the identity matter here.
    state, threads, starttime = parse_stat_brief(data)
    if starttime != entry.starttime:
        return GONE
    if dead(state, threads):
        return GONE  # it died since it was met: it never runs again
    if threads != entry.stat.num_threads:
        entry.stat = parse_stat(data)  # the children of every thread are read later
    if threads <= 1 or (state not in SETTLED and state != "D"):
        if threads <= 1 and state in SETTLED:  # the common case: one task, stopped
            return _ONE_STOPPED
        # One task only, or the main thread still runs: the other threads are looked at
        # once it has stopped; until then it is enough to wait on.
        tasks = [(pid, state)]
    else:
        tasks = []
        entry.tids = fs.tids(pid) or []
        for tid in entry.tids:
            tdata = data if tid == pid else _task_stat(entry, tid, fs, keep)
            if tdata is not None:
                tasks.append((tid, parse_state(tdata)))
    late: list[tuple[int, int, str]] = []
    for tid, state in tasks:
        if state in SETTLED:
            continue
        if state == "t":
            return TRACED
        if state == "D" and fs.wchan(pid, tid) in VFORK_WCHAN:
            if pid not in report.blocked_in_vfork:
                report.blocked_in_vfork.append(pid)
            continue
        late.append((pid, tid, state))
    return Look(late, len(tasks))


def traced_reason(fs: ProcFS, pid: int) -> str:
    """Why a process held by a tracer (``t``) cannot be frozen by signals, naming the tracer."""
    tracer = (fs.status(pid) or {}).get("TracerPid", "?")
    return (
        f"traced by PID {tracer} (a debugger or strace): a traced process runs whenever its "
        "tracer lets it, so it cannot be proven stopped; detach the tracer"
    )


def wait_stopped(
    entries: list[Entry],
    check: Callable[[Entry], list[tuple[int, int, str]]],
    plan: Plan,
    deadline: float,
    slices: Slices,
) -> Steps[None]:
    """Look at ``entries`` until ``check`` finds no task of them running (it returns the
    tasks not stopped yet), backing off from a bare yield of the CPU to a few milliseconds.

    :raises StopTimeoutError: past ``deadline``, once the backoff has grown to its cap.
    """
    backoff = Backoff()
    pending = entries
    while True:
        running: list[tuple[int, int, str]] = []
        still: list[Entry] = []
        for entry in pending:
            late = check(entry)
            if late:
                running += late
                still.append(entry)
            if slices.due():
                yield YIELD
        if not still:
            return
        if plan.journal is not None:
            plan.journal.check()  # a lease that ran out resumed what we wait for
        # Past the deadline, give up only once the backoff has grown to its cap (a few
        # milliseconds of looking): a task signalled a moment ago deserves that chance.
        if time.perf_counter() > deadline and backoff.capped:
            raise StopTimeoutError(plan.timeout, running)
        yield backoff.next()
        pending = still


def _task_stat(entry: Entry, tid: int, fs: ProcFS, keep: bool) -> bytes | None:
    """The stat line of thread ``tid`` of ``entry``: through its kept file if there is one
    (a file opened for a thread reads as that thread for good, or fails), else read anew,
    and kept with ``keep``."""
    fds = entry.taskfds
    fd = -1 if fds is None else fds.get(tid, -1)
    if fd >= 0:
        return fs.reread(fd)
    if not keep:
        return fs.read(f"{entry.pid}/task/{tid}/stat")
    found = fs.open_read(f"{entry.pid}/task/{tid}/stat")
    if found is None:
        return None
    fd, data = found
    count(fd)
    if fds is None:
        fds = entry.taskfds = {}
    fds[tid] = fd
    return data
