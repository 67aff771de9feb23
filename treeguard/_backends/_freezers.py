"""The two cgroup freezers (v2 ``cgroup.freeze``, v1 ``freezer.state``): freeze, wait,
thaw, each resumable, and on failure the thaw written back.

* **v2** (Documentation/admin-guide/cgroup-v2.rst, "Core Interface Files"): writing ``1``
  to ``cgroup.freeze`` freezes the cgroup and its descendants; ``cgroup.events`` says
  ``frozen 1`` once every task is frozen, and a change of that file raises POLLPRI on
  its open descriptors (kernfs_notify).
* **v1** (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst): ``freezer.state``
  goes THAWED -> FREEZING -> FROZEN; there is no notification, so it is polled. A cgroup
  stuck in FREEZING is thawed and frozen again a bounded number of times (runc's remedy).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from .._cgroupfs import (
    _GONE_ERRNOS,
    _RECHECK,
    _Events,
    _subtree,
    _unfrozen_tasks,
    _Writer,
    parse_keyed,
    procs_below,
    read_file,
    write_file,
)
from .._drive import YIELD, Steps, Wait, run_sync
from .._report import FreezeReport
from ..errors import (
    CgroupError,
    CgroupUnavailableError,
    InvalidArgumentError,
    StopTimeoutError,
)
from ..procfs import ProcFS
from ._base import Journal

__all__ = ["CgroupFreezer", "V1Freezer", "V2Freezer", "freezer_for", "thaw_cgroup"]


#: Longest pause between two reads of a v1 freezer.state.
_V1_MAX_BACKOFF = 0.005
#: How many times a v1 cgroup stuck in FREEZING is thawed and frozen again before failing.
_V1_ATTEMPTS = 4
#: A cgroup whose task list fits in this many bytes (about 30 to 40 tasks) is written to by
#: the caller: a thread for a write that short costs more than the census it lets run
#: meanwhile. In A/B runs: 10 processes 0.62 -> 0.45 ms a freeze, 30 processes 0.73 -> 0.58
#: ms; at 1,000 the look costs about 0.05 ms. (At 1 KiB, 150 processes, the two ways were
#: even, and at 300 the thread won by 0.25 ms.)
_FEW_TASKS = 256


def _write_during(
    freezer: CgroupFreezer,
    job: Callable[[], None],
    meanwhile: Steps[None] | None,
    report: FreezeReport,
    *,
    thread: bool,
) -> Steps[None]:
    """Make the write ``job`` in a thread while ``meanwhile`` runs here (without ``thread``,
    first the write, whose failure is raised at once, then ``meanwhile``); over when both
    are. A write made by the thread fails after ``meanwhile`` did. The writer is handed to
    ``freezer`` before it starts, so that its undo waits for it (see
    :meth:`CgroupFreezer.settle`)."""
    if not thread:
        t0 = time.perf_counter()
        try:
            job()
        finally:
            report.signal_seconds += time.perf_counter() - t0
        if meanwhile is not None:
            yield from meanwhile
        return
    writer = freezer.writer = _Writer(job)
    try:
        writer.start()
        if meanwhile is not None:
            yield from meanwhile
        while not writer.over:
            yield Wait(_RECHECK, writer.done_fd)
    finally:
        writer.close()
        report.signal_seconds += writer.seconds
    if writer.error is not None:
        raise writer.error


class CgroupFreezer:
    """Freezes and thaws one cgroup directory; remembers whether it was frozen before.

    The thaw is resumable and idempotent at every point: :attr:`froze` is set before the
    freeze is written and cleared only once the thaw was written (or the cgroup is gone),
    so a thaw cut short (KeyboardInterrupt at any bytecode, a write that failed) leaves it
    set, and the next :meth:`thaw` writes the thaw again. A freeze written by a thread of its
    own is waited for first (:meth:`settle`), so that it never lands after the thaw.
    """

    version = 0
    control = ""
    #: What the control file says when thawed.
    thawed = ""

    def __init__(self, path: str, fs: ProcFS | None = None, journal: Journal | None = None) -> None:
        self.path = path
        self.fs = fs or ProcFS()
        self.journal = journal  # the watchdog's, told before the freeze is written
        self.was_frozen = False
        self.froze = False  # this freezer wrote (or is writing) the freeze: it must undo it
        self.writer: _Writer | None = None  # the thread writing the freeze, if any
        self._inode: int | None = None

    @property
    def inode(self) -> int:
        """The directory's inode: which cgroup this is (cgroupfs never reuses one), for a
        thaw by another process (the watchdog, a token) to recognise it."""
        if self._inode is None:
            try:
                self._inode = os.stat(self.path).st_ino
            except OSError as err:
                raise CgroupError(self.path, f"the cgroup is gone: {err.strerror}") from err
        return self._inode

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _announce(self) -> None:
        """Tell the watchdog (if any) which cgroup is about to be frozen.

        :raises WatchdogError: if its lease ran out already.
        """
        if self.journal is not None:
            self.journal.freezing_cgroup(self.version, self.path, self.inode)

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
            cause = err.__cause__
            if not (isinstance(cause, OSError) and cause.errno in _GONE_ERRNOS):
                raise

    def _write(self, value: str) -> None:
        write_file(self.file(self.control), value)

    def undo(self) -> None:
        """Write the thaw if this freezer froze the cgroup; forget that only once written.

        :raises CgroupError: if the thaw could not be written (:attr:`froze` stays set).
        """
        self.settle()
        if self.froze:
            self.write_control(self.thawed)
            self.froze = False

    def thaw(self, timeout: float = 1.0) -> Steps[None]:
        """Undo this freezer's freeze (nothing if it did not freeze): write the thaw, then
        wait for the kernel to confirm it. Resumable and idempotent.

        :raises CgroupError: if the thaw could not be written (call again to retry).
        """
        if not self.froze:
            return  # not ours to thaw (it was frozen before us, or never frozen)
        self.undo()
        # Thawing is immediate in the kernel (v2: cgroup_do_freeze; v1: freezer_change_state
        # thaws every task before the write returns); waiting only confirms it. A cgroup
        # that is gone, or still frozen by an ancestor, is fine.
        try:
            yield from self._wait_for(self.thawed, time.perf_counter() + timeout)
        except CgroupError:
            pass

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

    def has_few_tasks(self) -> bool:
        """Whether the cgroup has no cgroups below it and lists all its tasks in
        :data:`_FEW_TASKS` bytes (one short read: a read returns less than asked for only
        at the end of the list)."""
        if len(_subtree(self.path)) > 1:
            return False
        try:
            fd = os.open(self.file(self.tasks_file), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # the write will say what is wrong
        try:
            return len(os.read(fd, _FEW_TASKS)) < _FEW_TASKS
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


class V2Freezer(CgroupFreezer):
    """``cgroup.freeze`` / ``cgroup.events``, waited for by poll (POLLPRI)."""

    version = 2
    control = "cgroup.freeze"
    tasks_file = "cgroup.threads"
    thawed = "0"

    def events(self) -> dict[str, str]:
        text = read_file(self.file("cgroup.events"))
        if text is None:
            raise CgroupError(self.path, "the cgroup was removed while freezing")
        return parse_keyed(text)

    def is_frozen(self) -> bool:
        return self.events().get("frozen") == "1"

    def threads_may_be_elsewhere(self) -> bool:
        # Only within a threaded subtree may the threads of a process be in different
        # cgroups; a "domain threaded" cgroup is the root of one and holds it whole.
        kind = read_file(self.file("cgroup.type"))
        return kind is not None and kind.strip() == "threaded"

    def _wait_for(self, want: str, deadline: float) -> Steps[bool]:
        """Wait until ``frozen`` reads ``want``; False at the deadline."""
        watch = _Events(self.file("cgroup.events"))
        backoff = 0.00005
        try:
            while True:
                fields = watch.read()
                if fields is None:
                    raise CgroupError(self.path, "the cgroup was removed while freezing")
                if fields.get("frozen") == want:
                    return True  # usually at once: the kernel is done when the write returns
                if want == "1":
                    self._lease_check()
                left = deadline - time.perf_counter()
                if left <= 0:
                    return False
                fd = watch.ready_fd()
                if fd is not None:
                    # Never trust the event alone: the file is re-read after every wake-up.
                    yield Wait(min(left, _RECHECK), fd)
                else:
                    yield Wait(min(left, backoff))
                    backoff = min(backoff * 2, _RECHECK)
        finally:
            watch.close()

    def freeze(
        self,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None = None,
    ) -> Steps[None]:
        start = time.perf_counter()
        state = read_file(self.file("cgroup.freeze"))
        if state is None:
            self.check()  # says what is missing
            raise CgroupError(self.path, "the cgroup was removed")
        self.was_frozen = state.strip() == "1"
        try:
            if not self.was_frozen:
                self._announce()
                self.froze = True  # before the write: an interrupted freeze is undone
                job = functools.partial(write_file, self.file("cgroup.freeze"), "1")
                thread = not self.has_few_tasks()
                yield from _write_during(self, job, meanwhile, report, thread=thread)
            elif meanwhile is not None:
                yield from meanwhile
            t0 = time.perf_counter()
            done = yield from self._wait_for("1", start + timeout)
            report.verify_seconds += time.perf_counter() - t0
            if not done:
                pids = procs_below(self.path)
                raise StopTimeoutError(timeout, _unfrozen_tasks(pids, self.fs, "STtZXI"))
        except BaseException:
            # A failed or cancelled freeze writes the thaw back (runc's half-frozen bug:
            # cgroup.freeze must not stay 1); if even that is cut short, froze stays set.
            self.undo()
            raise
        report.verified_by = f"cgroup v2: {self.file('cgroup.events')} says frozen 1"


class V1Freezer(CgroupFreezer):
    """``freezer.state``, polled with a backoff; unstuck by thaw-and-retry."""

    version = 1
    control = "freezer.state"
    thawed = "THAWED"

    def state(self) -> str:
        text = read_file(self.file("freezer.state"))
        if text is None:
            raise CgroupError(self.path, "the cgroup was removed while freezing")
        return text.strip()

    def set_state(self, value: str) -> None:
        write_file(self.file("freezer.state"), value)

    def _write(self, value: str) -> None:
        self.set_state(value)  # which tests replace, to watch what is written

    def is_frozen(self) -> bool:
        return self.state() == "FROZEN"

    def freeze(
        self,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None = None,
    ) -> Steps[None]:
        start = time.perf_counter()
        self.check()
        prev = self.state()
        # Restore what was there (CRIU does): a cgroup frozen (or being frozen) by someone
        # else stays so after this guard.
        self.was_frozen = prev in ("FROZEN", "FREEZING")
        try:
            if prev != "FROZEN":
                yield from self._freeze(start, timeout, report, meanwhile)
            elif meanwhile is not None:
                yield from meanwhile
        except BaseException:
            self.undo()
            raise
        report.verified_by = f"cgroup v1: {self.file('freezer.state')} says FROZEN"

    def _freeze(
        self,
        start: float,
        timeout: float,
        report: FreezeReport,
        meanwhile: Steps[None] | None,
    ) -> Steps[None]:
        per_attempt = timeout / _V1_ATTEMPTS
        if not self.was_frozen:
            self._announce()
        for attempt in range(_V1_ATTEMPTS):
            self.froze = not self.was_frozen  # before the write: an interrupt undoes it
            if attempt == 0:
                job = functools.partial(self.set_state, "FROZEN")
                thread = not self.has_few_tasks()
                yield from _write_during(self, job, meanwhile, report, thread=thread)
            else:
                t0 = time.perf_counter()
                self.set_state("FROZEN")
                report.signal_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            done = yield from self._wait_for("FROZEN", min(start + timeout, t0 + per_attempt))
            report.verify_seconds += time.perf_counter() - t0
            if done:
                report.passes = attempt + 1
                return
            if attempt + 1 < _V1_ATTEMPTS:
                # Stuck in FREEZING: thaw, let the tasks run a moment, and try again.
                self.set_state("THAWED")
                yield YIELD
        pids = procs_below(self.path)
        late = _unfrozen_tasks(pids, self.fs, "DTtZXI")
        self.undo()
        raise StopTimeoutError(timeout, late)

    def _wait_for(self, want: str, deadline: float) -> Steps[bool]:
        """Poll, with a backoff, until ``freezer.state`` reads ``want``; False at the
        deadline."""
        backoff = 0.00005
        while self.state() != want:
            if time.perf_counter() > deadline:
                return False
            if want == "FROZEN":
                self._lease_check()
            yield Wait(backoff)
            backoff = min(backoff * 2, _V1_MAX_BACKOFF)
        return True


def freezer_for(
    version: int, path: str, fs: ProcFS | None = None, journal: Journal | None = None
) -> CgroupFreezer:
    """The freezer of a v1 or v2 cgroup directory."""
    if version == 2:
        return V2Freezer(path, fs, journal)
    if version == 1:
        return V1Freezer(path, fs, journal)
    raise InvalidArgumentError("version", f"must be 1 or 2, not {version!r}")


def thaw_cgroup(version: int, path: str, inode: int | None = None) -> int:
    """Thaw a cgroup frozen by another process (a token, the watchdog): 1 if it was
    thawed, 0 if it is gone (or, given ``inode``, if the directory is another cgroup now)."""
    freezer = freezer_for(version, path)
    freezer.froze = True
    try:
        freezer.check()
        if inode is not None and freezer.inode != inode:
            return 0
    except CgroupError:  # gone (CgroupUnavailableError included)
        return 0
    run_sync(freezer.thaw())
    return 1
