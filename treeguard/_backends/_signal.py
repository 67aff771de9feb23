"""The signal backend: SIGSTOP parent-first through pidfds, prove every task stopped, SIGCONT.

The algorithm goes down the tree one generation at a time:

1. *Stop* every process of the generation: open a pidfd, read its stat (the pidfd was opened
   first, and the stat must name the parent that listed it, so it is that very process; a
   guard frozen again meets a process it kept through the kept descriptors, :mod:`._known`),
   record it (the backend's list, its hold, then the watchdog's journal), send SIGSTOP.
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

Its parts: :mod:`._pidfds` (what holds a process, known by its identity, never by PID
alone), :mod:`._proof` (when it counts as stopped), :mod:`._relays` (relays above the tree).
"""

from __future__ import annotations

import errno
import signal
import time

from .._drive import YIELD, Slices, Steps
from .._report import Skip
from .._thaw import keep_reserve, pidfd_inode
from .._tree import ROOT, ChildrenFiles, unfreezable
from ..errors import FreezeError, FreezePermissionError, TreeUnstableError
from ._base import Backend, Plan
from ._known import Known
from ._pidfds import (
    OUT_OF_DESCRIPTORS,
    Entry,
    budget,
    close,
    close_stat,
    close_tasks,
    count,
    drop_hold,
    handed_over,
    held,
    open_pidfd,
    release,
    release_pidfd,
    resignal,
    resume,
)
from ._proof import GONE, TRACED, Look, look, traced_reason, wait_stopped
from ._relays import Watchers

__all__ = ["SignalBackend"]


class SignalBackend(Backend):
    name = "signal"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self._entries: list[Entry] = []  # ours, in stop order (parents first)
        self._foreign: list[Entry] = []  # stopped by someone else when found
        # pid -> (starttime, pidfs inode) of every process met: a PID met again is the same
        # process only if both match (the inode alone decides within one clock tick).
        self._met: dict[int, tuple[int, int]] = {}
        self._denied: list[int] = []  # EPERM
        self._traced_pids: list[int] = []  # stopped by a tracer when met
        self._through: list[int] = []  # walked through, not stopped: re-read every round
        self._through_now: list[int] = []  # those met by the generation under way
        self._watchers = Watchers(plan.fs)  # parents told of a stop we did not stop
        self._slices = Slices()  # one clock for every loop of a freeze (or thaw)
        self._budget = budget()
        self._known = Known.of(plan)  # the guard's kept descriptors (its thaw settles them)

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
            **handed_over(self._entries, self._foreign),
            "relays": self._watchers.records(),  # for a thaw elsewhere to resume them too
        }

    # -- freezing -------------------------------------------------------------------------

    def freeze(self) -> Steps[None]:
        plan, report = self.plan, self.report
        clock = time.perf_counter
        start = clock()
        deadline = start + plan.timeout
        self._slices = slices = Slices()
        try:
            if self._known is not None and not self._known.lend():
                self._known = None  # closed meanwhile: this freeze keeps nothing
            keep_reserve()  # before the first stop: the thaw must never lack a descriptor
            plan.source.refresh()
            frontier: list[tuple[int, int | None]] = [(pid, None) for pid in plan.starts]
            while True:
                report.passes += 1
                while frontier:
                    frontier = yield from self._generation(frontier, deadline)
                if not self._through:
                    break  # newcomers come only from processes that run: none here
                t0 = clock()
                plan.source.refresh()
                frontier = self._newcomers()
                report.enumerate_seconds += clock() - t0
                if not frontier:
                    break
                if report.passes >= plan.max_passes:
                    raise TreeUnstableError(report.passes, [pid for pid, _ in frontier])
            if self._watchers:
                self._watchers.settle()
            if self._known is not None:
                self._known.keep(self._entries)
            for entry in (*self._entries, *self._foreign):
                close_stat(entry)
                if slices.due():
                    yield YIELD
            report.stopped = len(self.pids)
            report.freeze_seconds = clock() - start
        except BaseException as err:
            # Anything, GeneratorExit from a cancelled driver included: leave nothing stopped.
            # (Interrupted in its turn, the thaw resumes on the guard's next release().)
            for _ in self.thaw():
                pass
            if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
                raise FreezeError(OUT_OF_DESCRIPTORS) from err
            raise

    def _generation(
        self, frontier: list[tuple[int, int | None]], deadline: float
    ) -> Steps[list[tuple[int, int | None]]]:
        """Stop one generation, prove it stopped, and return the next (its children)."""
        clock, report = time.perf_counter, self.report
        t0, signalled = clock(), report.signal_seconds
        slices = self._slices
        met: list[Entry] = []
        for pid, parent in frontier:
            entry = self._meet(pid, parent)
            if entry is not None:
                met.append(entry)
            if slices.due():
                yield YIELD
        report.enumerate_seconds += clock() - t0 - (report.signal_seconds - signalled)  # apart
        if self._denied:
            raise FreezePermissionError(self._denied)
        if self._traced_pids:
            raise FreezePermissionError(
                self._traced_pids, reason=traced_reason(self.plan.fs, self._traced_pids[0])
            )
        t0 = clock()
        yield from wait_stopped(met, self._check, self.plan, deadline, slices)
        report.verify_seconds += clock() - t0
        t0 = clock()
        children: list[tuple[int, int | None]] = []
        for entry in met:
            if entry.alive:
                kids = self._children_of(entry)
                if kids:  # most processes of a tree are leaves
                    pid = entry.pid
                    children += [(kid, pid) for kid in kids]
            if slices.due():
                yield YIELD
        children += self._children_through(self._through_now)  # read at the round's end too
        self._through_now = []
        report.enumerate_seconds += clock() - t0
        return children

    def _children_of(self, entry: Entry) -> list[int]:
        source = self.plan.source
        if entry.tids is not None and isinstance(source, ChildrenFiles):
            return source.of_threads(entry.pid, entry.tids)
        return source.children(entry.pid, entry.stat)

    def _children_through(self, pids: list[int]) -> list[tuple[int, int | None]]:
        """The children of processes walked through (running), with their parent."""
        fs, source = self.plan.fs, self.plan.source
        found: list[tuple[int, int | None]] = []
        for pid in pids:
            stat = fs.stat(pid) if pid else ROOT
            if stat is not None:
                found += ((kid, pid) for kid in source.children(pid, stat))
        return found

    def _meet(self, pid: int, parent: int | None) -> Entry | None:
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
        t0 = time.perf_counter()
        known = self._known
        if known is not None and parent is not None and pid not in self._met:
            entry = known.meet(pid, parent, plan.fs)  # its kept descriptors (see _known)
            if entry is not None:
                self._met[pid] = (entry.starttime, entry.inode)
                report.known += 1
                return self._stop(entry, t0)
        fd = open_pidfd(pid)
        if fd is None:
            return self._skip(pid, Skip.EXITED)
        # The stat file kept open to verify, within half of the budget (pidfds get the rest).
        found = plan.fs.open_stat(pid, keep=held() * 2 < self._budget)
        # The pidfd was opened before this read, so a stat that reads at all names the
        # very process the pidfd holds: it cannot have been recycled in between.
        if found is None:
            return self._skip(pid, Skip.EXITED, fd)
        statfd, stat = found
        count(statfd)
        identity = (stat.starttime, pidfd_inode(fd))
        met = self._met.get(pid) == identity
        if met or (parent is not None and stat.ppid != parent):
            # Met already (listed again), or not the child its parent listed: re-parented
            # (its parent died), or exited with its PID reused between the two reads.
            if statfd >= 0:
                close(statfd)
            if met:
                close(fd)
                return None
            return self._skip(pid, Skip.EXITED, fd)
        self._met[pid] = identity  # a PID met again as another process is met anew
        skip = unfreezable(stat) or (Skip.TRACED if stat.state == "t" else None)
        if skip is not None:
            if statfd >= 0:
                close(statfd)
            if skip is Skip.TRACED:
                if not plan.partial_ok:
                    self._traced_pids.append(pid)
                self._walk_through(pid)  # it runs: its children are read again every round
            return self._skip(pid, skip, fd)
        entry = Entry(pid, fd, stat, stat.state != "T", statfd, identity[1])
        entry.parent = -1 if parent is None else parent
        return self._stop(entry, t0)

    def _stop(self, entry: Entry, t0: float) -> Entry | None:
        """Stop ``entry``, met running (or hold it as found, stopped by someone else)."""
        plan, report, pid = self.plan, self.report, entry.pid
        report.skipped.pop(pid, None)  # a PID reused by a process we stop now
        if entry.parent < 0 or entry.parent in plan.passthrough:  # the top of a frozen subtree
            watcher = entry.stat.ppid if entry.parent < 0 else entry.parent
            start = self._watchers.watch(watcher)
            if start is not None and plan.journal is not None:
                plan.journal.watching(watcher, start)  # before it can be told of a stop
        # Recorded and held (_holds) before it is signalled: an interrupt leaves it to the thaw.
        self._entries.append(entry)
        if not entry.enter_hold(stopped=not entry.ours):  # stopped by someone else: theirs
            self._entries.pop()
            report.skipped[pid] = Skip.ALREADY_STOPPED
            self._foreign.append(entry)
            release_pidfd(entry)
            return entry
        entry.ours = True  # (joined: stopped once more, the other's SIGSTOP may be unsent)
        if plan.journal is not None and not entry.joined:  # (joined: the other's journal)
            plan.journal.stopping(pid, entry.starttime, entry.inode)
        try:
            signal.pidfd_send_signal(entry.fd, signal.SIGSTOP)
        except ProcessLookupError:
            entry.alive = False
            release(entry)
            return self._skip(pid, Skip.EXITED)
        except PermissionError:
            entry.alive = False
            release(entry)
            if not plan.partial_ok:
                self._denied.append(pid)
                return None
            report.skipped[pid] = Skip.PERMISSION
            self._walk_through(pid)  # it runs: its children are read again every round
            return None
        finally:
            report.signal_seconds += time.perf_counter() - t0
        if entry.fd >= 0 and held() >= self._budget:
            release_pidfd(entry)
        return entry

    def _walk_through(self, pid: int) -> None:
        if pid not in self._through:
            self._through.append(pid)
            self._through_now.append(pid)

    def _skip(self, pid: int, reason: Skip, fd: int = -1) -> Entry | None:
        """Skip ``pid`` for ``reason`` (closing its pidfd): None, for :meth:`_meet`."""
        if fd >= 0:
            close(fd)
        self.report.skipped.setdefault(pid, reason)
        return None

    def _newcomers(self) -> list[tuple[int, int | None]]:
        """Children not met yet of the processes walked through: they run, so they may have
        forked since the round began."""
        plan, fresh = self.plan, []
        for kid, parent in dict.fromkeys(self._children_through(self._through)):
            if kid in self._met and kid not in self._through:
                st = plan.fs.stat(kid)
                if st is None or st.starttime == self._met[kid][0]:
                    continue  # the process met already (or gone)
            elif kid in self._through or kid in plan.blocked:
                continue
            fresh.append((kid, parent))
        return fresh

    # -- verifying ------------------------------------------------------------------------

    def _check(self, entry: Entry) -> list[tuple[int, int, str]]:
        """Tasks of ``entry`` that are not stopped yet, as ``(pid, tid, state)``."""
        found = look(entry, self.plan.fs, self.report, keep=held() * 2 < self._budget)
        if not isinstance(found, Look) or not found.late:
            close_tasks(entry)  # its threads' stat files: only a process waited for needs them
        if found is GONE:
            return self._gone(entry)
        if found is TRACED:
            return self._traced(entry)
        assert isinstance(found, Look)
        late = found.late
        if not late:
            self.report.tasks += found.tasks
        elif not entry.ours:
            # Someone resumed a process that was stopped when we found it: stop it as ours,
            # recorded (and journaled) before the signal.
            self._foreign.remove(entry)
            self._entries.append(entry)
            entry.enter_hold(stopped=False)
            entry.ours = True
            self.report.skipped.pop(entry.pid, None)
            if self.plan.journal is not None:
                self.plan.journal.stopping(entry.pid, entry.starttime, entry.inode)
            if not resignal(entry, signal.SIGSTOP):
                return self._gone(entry)
        return late

    def _traced(self, entry: Entry) -> list[tuple[int, int, str]]:
        """A task of ``entry`` is stopped by a tracer (``t``): it runs whenever the tracer
        lets it, so it cannot be proven stopped. Refused, or skipped with ``partial_ok``
        (the thaw still sends the SIGCONT that undoes our SIGSTOP)."""
        if not self.plan.partial_ok:
            raise FreezePermissionError([entry.pid], reason=traced_reason(self.plan.fs, entry.pid))
        entry.settled = entry.traced = True
        self.report.skipped[entry.pid] = Skip.TRACED
        return []

    def _gone(self, entry: Entry) -> list[tuple[int, int, str]]:
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
        self._slices = Slices()
        refused = yield from resume(self._entries, self._slices)
        while self._foreign:
            release(self._foreign.pop())
        if self._known is not None:
            self._known.settle()  # every descriptor it lent is given back
        if self._watchers:
            yield from self._watchers.resume()
        if self.plan.journal is not None:
            self.plan.journal.released()
        self.report.thaw_seconds = time.perf_counter() - t0
        if refused:
            raise FreezePermissionError(refused, reason="they may no longer be signalled")

    def detach(self) -> None:
        """Hand the freeze over (to a token): close every pidfd, signal nobody, hold none."""
        while self._entries:
            drop_hold(self._entries[-1])
            release(self._entries.pop())
        while self._foreign:
            release(self._foreign.pop())
        if self._known is not None:
            self._known.settle()
