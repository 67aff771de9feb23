"""What the two cgroup freezers share: the control file written (by the caller, or by a
thread of its own while the census runs), the freeze undone if cut short, and the thaw
resumable and idempotent. The versions are :mod:`._freezer_v2` and :mod:`._freezer_v1`;
:mod:`._freezers` picks one.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from .._cgroupfiles import CgroupFiles
from .._cgroupfs import (
    _GONE_ERRNOS,
    _RECHECK,
    _subtree,
    _Writer,
    read_file,
    write_file,
)
from .._drive import YIELD, Steps, Wait, under_event_loop
from .._report import FreezeReport
from ..errors import (
    CgroupError,
    CgroupUnavailableError,
)
from ..procfs import ProcFS
from . import _holds
from ._base import Journal

__all__ = ["CgroupFreezer", "is_gone"]

#: A cgroup whose task list fits in this many bytes (about 30 to 40 tasks) is written to by
#: the caller: a thread for a write that short costs more than the census it lets run
#: meanwhile. In A/B runs: 10 processes 0.62 -> 0.45 ms a freeze, 30 processes 0.73 -> 0.58
#: ms; at 1,000 the look costs about 0.05 ms. (At 1 KiB, 150 processes, the two ways were
#: even, and at 300 the thread won by 0.25 ms.)
_FEW_TASKS = 256
#: Under an event loop, a cgroup whose freeze a thread wrote, and whose task list does not
#: fit in this many bytes (about 400 tasks), is thawed by a thread too: the kernel's thaw
#: then takes over a millisecond (half a slice of work), as long as its freeze. Otherwise
#: the caller writes the thaw: a thread cost a thaw of 100 processes 0.2 to 0.5 ms, and a
#: caller who waits for it anyway 2 to 6 ms at 1,000 (woken among the tasks just thawed).
_MANY_TASKS = 2800


def is_gone(err: CgroupError) -> bool:
    """Whether ``err`` failed for want of the cgroup (removed, or never there), by its
    cause: out of descriptors, say, is not gone."""
    cause = err.__cause__
    return isinstance(cause, OSError) and cause.errno in _GONE_ERRNOS


def _write_during(
    freezer: CgroupFreezer,
    job: Callable[[], None],
    meanwhile: Steps[None] | None,
    report: FreezeReport | None,
    *,
    thread: bool,
) -> Steps[None]:
    """Make the write ``job`` in a thread while ``meanwhile`` runs here (without ``thread``,
    first the write, whose failure is raised at once, then ``meanwhile``); over when both
    are. A write made by the thread fails after ``meanwhile`` did. The writer is handed to
    ``freezer`` before it starts, so that its undo waits for it (see
    :meth:`CgroupFreezer.settle`). The write's time counts as signalling in ``report``."""
    freezer.threaded = thread
    if not thread:
        t0 = time.perf_counter()
        try:
            job()
        finally:
            if report is not None:
                report.signal_seconds += time.perf_counter() - t0
        if meanwhile is not None:
            yield from meanwhile
        return
    writer = freezer.writer = _Writer(job)
    try:
        writer.start()
        if meanwhile is not None:
            # Under an event loop, a turn for it each side of the work meanwhile: finding
            # the cgroup took up to a millisecond already, and what follows the last slice of
            # that work (the proof of the census) takes as long.
            if under_event_loop():
                yield YIELD
            yield from meanwhile
            if under_event_loop():
                yield YIELD
        while not writer.over:
            yield Wait(_RECHECK, writer.done_fd)
    finally:
        writer.close()
        if report is not None:
            report.signal_seconds += writer.seconds
    if writer.error is not None:
        raise writer.error


def _append_result(results: list[bool], job: Callable[[], bool]) -> None:
    results.append(job())


class CgroupFreezer:
    """Freezes and thaws one cgroup directory; remembers whether it was frozen before.

    The thaw is resumable and idempotent at every point: :attr:`froze` is set before the
    freeze is written and cleared only once the thaw was written (or the cgroup is gone),
    so a thaw cut short (KeyboardInterrupt at any bytecode, a write that failed) leaves it
    set, and the next :meth:`thaw` writes the thaw again. A freeze written by a thread of its
    own is waited for first (:meth:`settle`), so that it never lands after the thaw.

    With :attr:`files` (v2; v1 too for a thaw by another process), every read and write
    goes through the cgroup's descriptors held open, those of the one cgroup frozen (see
    :mod:`treeguard._cgroupfiles`); whoever hands them over made them current first. Files
    of the freezer's own are closed once its thaw is confirmed (the control file's once the
    thaw is written).
    """

    version = 0
    control = ""
    #: What the control file says when thawed.
    thawed = ""

    def __init__(
        self,
        path: str,
        fs: ProcFS | None = None,
        journal: Journal | None = None,
        files: CgroupFiles | None = None,
    ) -> None:
        self.path = path
        self.files = files
        self.fs = fs or ProcFS()
        self.journal = journal  # the watchdog's, told before the freeze is written
        self.was_frozen = False
        self.froze = False  # this freezer wrote (or is writing) the freeze: it must undo it
        #: What it holds the cgroup by in :mod:`._holds` (set before it enters the hold):
        #: a thaw lets go of it, and writes the thaw only as the last holder.
        self.hold: tuple[str, int, int] | None = None
        self.writer: _Writer | None = None  # the thread writing the freeze (or thaw), if any
        self.threaded = False  # the freeze was to be written by a thread (many tasks)
        #: The cgroups and task list read just before (by the census), if any.
        self.listed: tuple[list[str], bytes] | None = None
        self._inode: int | None = None
        #: The last write of the control file found the cgroup gone (nothing was written).
        self.gone = False

    @property
    def inode(self) -> int:
        """The directory's inode: which cgroup this is (cgroupfs never reuses one), for a
        thaw by another process (the watchdog, a token) to recognise it."""
        if self._inode is None:
            try:
                if self.files is not None:
                    return self.files.opened()  # (the one its descriptors are of)
                self._inode = os.stat(self.path).st_ino
            except OSError as err:
                raise CgroupError(self.path, f"cannot open the cgroup: {err.strerror}") from err
        return self._inode

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _read(self, name: str) -> str | None:
        """The file ``name``, through the files held if there are; ``None`` if gone."""
        if self.files is None:
            return read_file(self.file(name))
        data = self.files.read(name)
        return None if data is None else data.decode("utf-8", "replace")

    def _announce(self) -> None:
        """Tell the watchdog (if any) which cgroup is about to be frozen.

        :raises WatchdogError: if its lease ran out already.
        """
        if self.journal is not None:
            self.journal.freezing_cgroup(self.version, self.path, self.inode)

    def enter_hold(self, frozen: bool) -> bool:
        """Enter this freeze's hold of the cgroup, before the freeze is written: join the
        hold of another freeze of this process if there is one (this freeze holds it too,
        and its thaw does not thaw it under the other), else start one, unless the cgroup
        was ``frozen`` already (by someone outside this process: left frozen, as found).

        :returns: whether this freeze holds it (it must thaw it; see :attr:`froze`).
        """
        self.hold = ("cgroup", self.version, self.inode)  # before: an interrupt leaves it
        return _holds.enter(self.hold, self, stopped=frozen)

    def hand_over(self) -> None:
        """The freeze is handed over (to a token, which thaws it): this freezer's thaw
        leaves it alone, and its hold is no longer counted."""
        self.froze = False
        if self.hold is not None:
            _holds.drop(self.hold, self)
            self.hold = None

    def settle(self) -> None:
        """Wait until the thread writing the freeze (if any) is over, or make sure it never
        writes: after this, nothing but this process's own calls writes the control file."""
        if self.writer is not None:
            self.writer.close()

    def write_control(self, value: str) -> None:
        """Write ``value`` to the control file; a cgroup that is gone counts as written
        (nothing is frozen there any more).

        :raises CgroupError: if the write failed otherwise (out of descriptors, ...): the
            caller keeps its state, so that the write is tried again.
        """
        try:
            self._write(value)
        except CgroupError as err:
            if not is_gone(err):
                raise
            self.gone = True
        else:
            self.gone = False

    def _write(self, value: str) -> None:
        self.put(self.control, value)

    def put(self, name: str, value: str) -> None:
        """Write ``value`` to this cgroup's file ``name``: every write of a freezer goes
        through here."""
        if self.files is not None:
            self.files.write(name, value)
        else:
            write_file(self.file(name), value)

    def _leave(self) -> bool:
        """Write the thaw if this freezer froze the cgroup, unless another freeze of this
        process holds it still (:mod:`._holds`); whether it was written."""
        if self.hold is not None:
            return _holds.leave(self.hold, self, self.froze, CgroupFreezer._write_thaw)
        if self.froze:
            self._write_thaw()
        return self.froze

    def _write_thaw(self) -> None:
        self.write_control(self.thawed)

    def undo(self) -> bool:
        """Write the thaw if this freezer froze the cgroup and it is the last freeze of this
        process to hold it; forget that only once written (or left to the others).

        :returns: whether the thaw was written.
        :raises CgroupError: if the thaw could not be written (:attr:`froze` stays set).
        """
        self.settle()
        written = self._leave()
        self.froze, self.hold = False, None
        return written

    def thaw(self, timeout: float = 1.0) -> Steps[None]:
        """Undo this freezer's freeze (nothing if it did not freeze): write the thaw, then
        wait for the kernel to confirm it. Resumable and idempotent.

        :raises CgroupError: if the thaw could not be written (call again to retry).
        """
        if not self.froze and self.hold is None:
            self._let_go()
            return  # not ours to thaw (it was frozen before us, or never frozen)
        if self.threaded and under_event_loop() and not self._fits(_MANY_TASKS):
            # Written by a thread, so that an event loop runs on meanwhile.
            self.settle()
            # The thaw written by a thread: cut short (GeneratorExit while waiting), the
            # writer is waited for and froze stays set, so the next thaw writes it again
            # (or leaves it to the other holders: leaving twice counts once).
            written: list[bool] = []
            job = functools.partial(_append_result, written, self._leave)
            yield from _write_during(self, job, None, None, thread=True)
            self.froze, self.hold = False, None
            wrote = bool(written and written[0])
        else:
            wrote = self.undo()
        if self.files is not None and not self.files.kept:
            # Files of its own are closed after this thaw anyway: the control file's
            # descriptor is given back before the wait opens the file it reads (v2:
            # cgroup.events), so that a thaw that opens them all (thaw_cgroup) holds two at
            # a time, the directory's and one, as many as the reserve gives a full table.
            self.files.close_file(self.control)
        if wrote:
            # Thawing is immediate in the kernel (v2: cgroup_do_freeze; v1:
            # freezer_change_state thaws every task before the write returns); waiting only
            # confirms it. A cgroup that is gone, or still frozen by an ancestor, is fine.
            try:
                yield from self._wait_for(self.thawed, time.perf_counter() + timeout)
            except CgroupError:
                pass
        self._let_go()

    def _let_go(self) -> None:
        """Close the files of this freezer's own (not those someone keeps)."""
        if self.files is not None and not self.files.kept:
            self.files.close()

    def _wait_for(self, want: str, deadline: float) -> Steps[bool]:
        raise NotImplementedError

    def _lease_check(self) -> None:
        """:raises WatchdogError: if the watchdog's lease ran out (it thawed the cgroup)."""
        if self.journal is not None:
            self.journal.check()

    def check(self) -> None:
        """:raises CgroupUnavailableError: if the directory is not a cgroup of this kind."""
        if not os.path.isfile(self.file(self.control)):
            raise CgroupUnavailableError(
                self.path,
                f"no {self.control}: not a non-root cgroup v{self.version}"
                + (" freezer" if self.version == 1 else "")
                + " directory",
            )

    def threaded_write(self, meanwhile: Steps[None] | None) -> bool:
        """Whether the freeze is written by a thread: when there is work to do meanwhile (a
        census to read) or an event loop to keep running, and the write is long (many
        tasks). A synchronous caller with nothing to do meanwhile waits anyway: a thread
        would only add its start and the wake-up that says it is over."""
        return (meanwhile is not None or under_event_loop()) and not self.has_few_tasks()

    def has_few_tasks(self) -> bool:
        """Whether the cgroup has no cgroups below it and lists all its tasks in
        :data:`_FEW_TASKS` bytes."""
        return self._fits(_FEW_TASKS)

    def _fits(self, size: int) -> bool:
        """Whether the cgroup has no cgroups below it and lists all its tasks in ``size``
        bytes (one short read: a read returns less than asked for only at the end of the
        list; none if the census has read it)."""
        if self.listed is not None:
            dirs, tasks = self.listed
            return len(dirs) == 1 and len(tasks) < size
        if len(_subtree(self.path, self.files)) > 1:
            return False
        if self.files is not None:
            try:
                head = self.files.head(self.tasks_file, size)
            except OSError:
                return False  # the write will say what is wrong
            return head is not None and len(head) < size
        try:
            fd = os.open(self.file(self.tasks_file), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return len(os.read(fd, size)) < size
        except OSError:
            return False
        finally:
            os.close(fd)

    def freeze(
        self,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None = None,
    ) -> Steps[None]:
        """Freeze the cgroup and wait until the kernel says it is frozen; run the steps
        ``meanwhile`` (if any) while the kernel is at work. On any failure, thawed again."""
        raise NotImplementedError

    def is_frozen(self) -> bool:
        raise NotImplementedError

    def threads_may_be_elsewhere(self) -> bool:
        """Whether a process in this cgroup may have threads in another cgroup."""
        return True  # v1: any task may be moved on its own (freezer-subsystem.rst)

    #: The file listing the cgroup's tasks (threads); every cgroup lists its processes
    #: in ``cgroup.procs``.
    tasks_file = "tasks"
