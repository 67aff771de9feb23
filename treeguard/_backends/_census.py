"""Proving that a cgroup holds exactly a tree: the census.

The cgroup is found by :mod:`._target`. That it holds the whole tree and nothing else is
proven from its task list, the ``children`` files of all its tasks, and each process's
thread count (:class:`_Census`).
"""

from __future__ import annotations

import errno
import time

from .._cgroupfs import _SLICE, _listing, _procs, _subtree
from .._drive import YIELD, Steps
from ..procfs import DEAD_STATES, PF_EXITING
from ._base import Plan
from ._freezers import CgroupFreezer
from ._order import parent_first
from ._target import describe_pids, refusal

__all__ = ["_Census", "_Members"]


class _Members:
    """What a cgroup (with the cgroups below it) holds: its processes, and how many tasks.

    Looked at while the kernel freezes the cgroup, then once more when it is frozen: if the
    task list reads the same, no task was born, died or moved in between, and so no process
    either (each has a task in the list), so the second look costs one read.
    """

    def __init__(self, freezer: CgroupFreezer) -> None:
        self.freezer = freezer
        self._procs: set[int] | None = set()
        self._listed_procs = b""  # the process list read, parsed on first use (procs)
        self.count = 0  # the processes listed
        self.tasks = 0
        self._seen: tuple[list[str], bytes] | None = None
        self.listed: tuple[list[str], bytes] | None = None  # read already: the next look's

    @property
    def procs(self) -> set[int]:
        """The processes in the cgroup at the last survey."""
        if self._procs is None:
            self._procs = set(map(int, self._listed_procs.split()))
        return self._procs

    @procs.setter
    def procs(self, procs: set[int]) -> None:
        self._procs, self.count = procs, len(procs)

    def look(self) -> tuple[list[str], bytes] | None:
        """Read the task list: the cgroups and the list if it changed since the last
        look, ``None`` if it did not."""
        if self.listed is None:
            freezer = self.freezer
            dirs = _subtree(freezer.path, freezer.files)
            self.listed = dirs, _listing(dirs, freezer.tasks_file, freezer.files)
        (dirs, tasks), self.listed = self.listed, None
        if (dirs, tasks) == self._seen:
            return None
        self._seen = dirs, tasks
        self.tasks = tasks.count(b"\n")
        return dirs, tasks

    def survey(self) -> Steps[None]:
        """Learn what the cgroup holds now; steps, like the census's survey (this one
        never pauses)."""
        changed = self.look()
        if changed is not None:
            freezer = self.freezer
            # Counted now (each process is listed once: v2 lists leaders, v1 its pidlist
            # without duplicates), parsed if ever asked for (1,000 processes: 0.15 ms).
            try:
                self._listed_procs = _listing(changed[0], "cgroup.procs", freezer.files)
                self._procs, self.count = None, self._listed_procs.count(b"\n")
            except OSError as err:
                if err.errno != errno.EOPNOTSUPP:
                    raise
                self.procs = _procs(changed[0], freezer.fs, freezer.files)  # threaded
        yield from ()


class _Census(_Members):
    """Who a cgroup holds, and the proof that it holds nothing but the whole tree entered
    at ``top``.

    The tree is walked completely: the ``children`` file (proc(5)) of every task in the
    cgroup is read, each thread's, since a thread lists only the children it forked. So
    every child of a process in the cgroup is seen, and one that lives in another cgroup
    (moved there), which the freeze would leave running, makes the census refuse. Every
    process in it must be a top process or have its parent in it: going up from any of
    them then ends at a top process, so it descends from the root. A child forked since
    its parent's file was read is asked for its ppid instead.

    The files are read while the kernel freezes the cgroup; once it is frozen, only the
    tasks new since then are read (see :class:`_Members`). A process moved out of the
    cgroup by someone else during those milliseconds is not seen: nothing else moves one
    (a process born in a cgroup stays in it).

    Threads are counted too: a process whose thread lives in another cgroup (a v1 freezer
    cgroup, or a threaded v2 cgroup) would run on in that thread, so each process's thread
    count is compared with the tasks the cgroup lists (:meth:`_threads_elsewhere`).
    """

    def __init__(self, freezer: CgroupFreezer, top: frozenset[int], plan: Plan) -> None:
        super().__init__(freezer)
        self.top = top
        self.plan = plan
        self.parent: dict[int, int] = {}  # child -> parent, for the processes in the cgroup
        self._kids: dict[int, list[int]] = {}  # the children files read, by TID
        self._tids: set[int] = set()  # the tasks the cgroup listed at the last look
        self._orphans: set[int] = set()  # processes in it whose parent is not known yet
        #: Set by :meth:`problem`: what is wrong is only that top processes of the tree
        #: are in other cgroups (a candidate chosen from one of them may be too narrow).
        self.tops_elsewhere = False
        #: Taken over from the last freeze of the same guard (see :mod:`._kept`): nothing
        #: read again unless the task list changes.
        self.reused = False
        # Worked out from what was read at the end of each survey that read something new
        # (a census taken over asks for them at every freeze): see _work_out().
        self._listed_kids: set[int] = set()
        self._watched: set[int] = set()

    @property
    def tids(self) -> set[int]:
        """The tasks of the cgroup at the last look."""
        return self._tids

    @property
    def watched(self) -> set[int]:
        """What a fork or exit event must not name for this census to hold: every task it
        read (listed at any look, though it may have exited since), and every process (a
        new thread's event names its parent process and its thread group, whose leader is
        in no task list once it exited alone)."""
        return self._watched

    def _work_out(self) -> None:
        """Work out what the tasks, children files and processes read say, once they are
        all read: every child listed, and what the events must not name."""
        self._listed_kids = set().union(*self._kids.values())
        self._watched = self._tids | self._kids.keys() | self.procs

    @property
    def keepable(self) -> bool:
        """Whether a later freeze may take this census over. Not if a process that must keep
        running (excluded, the caller) is a child of the tree, in another cgroup: no event
        of its subtree names a task of the census, yet an orphan of that subtree may be
        adopted by a subreaper of the tree (the kernel's find_new_reaper), a child of the
        tree in another cgroup that only reading the children files again finds."""
        kept = self.plan.passthrough | self.plan.blocked.keys()
        return kept.isdisjoint(self._listed_kids)

    @property
    def seen(self) -> tuple[list[str], bytes] | None:
        """The cgroups and task list read at the last look."""
        return self._seen

    def rebind(self, freezer: CgroupFreezer, plan: Plan) -> None:
        """Serve another freeze of the same cgroup (see :mod:`._kept`)."""
        self.freezer, self.plan = freezer, plan

    def forget(self) -> None:
        """Forget everything learnt: the next :meth:`survey` reads it all anew."""
        self._seen = None
        self._kids, self._tids, self._orphans, self.parent = {}, set(), set(), {}
        self.reused = False
        self._work_out()

    def survey(self) -> Steps[None]:
        """List the cgroup and read the ``children`` file of each task not read yet. The
        task list is read first: if a later survey reads the same list, what was learnt
        still holds (see :class:`_Members`)."""
        changed = self.look()
        if changed is None:
            return
        if self.reused:  # what the last freeze learnt no longer holds: read it all
            self.forget()
            self._seen = changed
        dirs, tasks = changed
        tids = self._tids = set(map(int, tasks.split()))
        yield from self._read_children(tids)
        files = self._kids
        parent = {kid: tid for tid in tids for kid in files[tid]}
        # In the usual tree every task is a process of its own: the task list stands
        # for the process list unless, below the top, a task is nobody's child (a thread,
        # or a process whose parent is not in the cgroup).
        procs = tids
        if not tids <= self.top.union(parent):
            procs = _procs(dirs, self.plan.fs, self.freezer.files)
        # A child forked by a secondary thread is listed under that thread's TID: its
        # parent process is learnt from its ppid (see problem()), like an orphan's.
        self.parent = {kid: tid for kid, tid in parent.items() if kid in procs and tid in procs}
        self._orphans = procs - self.top - self.parent.keys()
        self.procs = procs
        self._work_out()

    def _read_children(self, tids: set[int]) -> Steps[None]:
        """Read the ``children`` file of each task of ``tids`` not read yet, pausing every
        :data:`_SLICE` seconds. ``/proc/TID`` names a secondary thread too."""
        files, fs = self._kids, self.plan.fs
        next_slice = time.perf_counter() + _SLICE
        for tid in tids - files.keys():
            files[tid] = fs.children(tid, tid) or []
            if time.perf_counter() > next_slice:
                yield YIELD
                next_slice = time.perf_counter() + _SLICE

    def problem(self) -> str | None:
        """What is wrong with what :meth:`survey` found, ``None`` if nothing: run once
        frozen (nothing forks or exits then)."""
        plan, procs, parent = self.plan, self.procs, self.parent
        fs = plan.fs
        kept = plan.passthrough | plan.blocked.keys()
        moved_in = sorted(procs & kept)
        if moved_in:  # since find_target looked
            return refusal(moved_in, plan)
        foreign = []
        for pid in sorted(self._orphans):
            st = fs.stat(pid)
            if st is not None and st.ppid in procs:
                parent[pid] = st.ppid
            elif st is not None and st.state not in DEAD_STATES:
                foreign.append(pid)
        self._orphans = set()
        if foreign:
            return (
                f"it also holds processes outside the tree: {describe_pids(foreign, fs)}; "
                "freezing it stops them too (use backend='signal')"
            )
        outside = []
        for pid in sorted((self.top | self._listed_kids) - procs - kept):
            st = fs.stat(pid)
            if st is None or st.state in DEAD_STATES or st.is_kernel_thread:
                continue  # a zombie is in no cgroup.procs
            if pid in self.top or st.ppid in procs:
                outside.append(pid)
        if outside:
            self.tops_elsewhere = all(pid in self.top for pid in outside)
            return (
                f"processes of the tree are in another cgroup: {describe_pids(outside, fs)}"
                " (moved there?); freezing it would leave them running (use backend='signal')"
            )
        # (Taken over, the census stands for a task list that reads as it did, with no
        # task born since: no thread can have moved.)
        elsewhere = [] if self.reused else self._threads_elsewhere()
        if elsewhere:
            shown = ", ".join(
                f"thread {tid} of PID {describe_pids([pid], fs)}" for pid, tid in elsewhere[:10]
            )
            return (
                f"threads of the tree are in another cgroup: {shown}"
                + (" ..." if len(elsewhere) > 10 else "")
                + "; freezing it would leave them running (use backend='signal')"
            )
        return None

    def _threads_elsewhere(self) -> list[tuple[int, int]]:
        """``(pid, tid)`` of the live threads of processes in the cgroup that it does not
        list: each runs on while the cgroup is frozen.

        Every task the cgroup lists belongs to a process it lists, so the threads of those
        processes add up to the tasks listed exactly when none is elsewhere: one stat read
        per process, and the threads are looked at one by one only if the sum is larger.
        A thread that is exiting (it left its cgroup already) does not count. In a v2
        cgroup that is not threaded no thread can be elsewhere (cgroup-v2.rst, "Threads":
        the threads of a process spread only within a threaded subtree, below its domain).
        """
        if not self.freezer.threads_may_be_elsewhere():
            return []
        fs, tids = self.plan.fs, self._tids
        stats = [(pid, st) for pid in sorted(self.procs) if (st := fs.stat(pid)) is not None]
        if sum(st.num_threads for _, st in stats) <= len(tids):
            return []
        found: list[tuple[int, int]] = []
        for pid, st in stats:
            if st.num_threads <= 1 and pid in tids:
                continue
            for tid in fs.tids(pid) or ():
                if tid in tids:
                    continue
                task = fs.stat(pid, tid)
                if task is None or task.state in DEAD_STATES or task.flags & PF_EXITING:
                    continue
                found.append((pid, tid))
        return found

    def parent_first(self) -> list[int]:
        """The processes found, parents before children, from the parents learnt (no
        read): once :meth:`problem` found nothing, each has its parent among them."""
        kids: dict[int, list[int]] = {}
        for pid in sorted(self.procs - self.top):
            kids.setdefault(self.parent.get(pid, 0), []).append(pid)  # 0: it died meanwhile
        return parent_first(sorted(self.top & self.procs), kids, self.plan.fs)
