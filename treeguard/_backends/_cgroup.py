"""The cgroup freezer backends: the kernel stops a whole cgroup, invisibly and in one step.

* **v2** (Documentation/admin-guide/cgroup-v2.rst, "Core Interface Files"): writing ``1``
  to ``cgroup.freeze`` freezes the cgroup and its descendants; ``cgroup.events`` says
  ``frozen 1`` once every task is frozen, and a change of that file raises POLLPRI on
  its open descriptors (kernfs_notify). Frozen tasks show ``S`` in /proc, so the
  verification comes from ``cgroup.events``, not from task states.
* **v1** (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst): ``freezer.state``
  goes THAWED -> FREEZING -> FROZEN; there is no notification, so it is polled. A cgroup
  stuck in FREEZING is thawed and frozen again a bounded number of times (runc's remedy).

:class:`CgroupBackend` with no explicit cgroup finds the one that holds the plan's tree
without walking the tree: the candidate is the cgroup of the tree's first top process (the
root's first child, or the root), and the few processes that must keep running (the
caller, its ancestors, excluded PIDs) are checked to be outside it BEFORE anything is
frozen. That the candidate holds the whole tree and nothing else is proven from its task
list and the ``children`` files of all its tasks, and each process's thread count
(:class:`_Census`): while the kernel freezes the cgroup (the write runs in a thread of its
own, so this work and an event loop go on meanwhile; for a cgroup of a few dozen tasks,
right after the write), then once more from the task list when it is frozen and can no
longer change. A cgroup found to hold other processes, or to miss part of the tree (a
descendant or a thread in another cgroup), is thawed again before the error is raised.

An interrupt (KeyboardInterrupt at any bytecode, a cancellation) never leaves the cgroup
frozen: a freeze cut short writes the thaw back, and a thaw cut short is finished by the
next one (see :class:`CgroupFreezer`).
"""

from __future__ import annotations

import _thread
import errno
import functools
import itertools
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._drive import YIELD, Steps, Wait, run_sync
from .._mounts import cgroup_paths, hierarchies
from .._report import FreezeReport, Skip
from .._thaw import close_fd, keep_reserve, open_file
from .._tree import ROOT, ChildrenSource, unfreezable, walk
from ..errors import (
    CgroupError,
    CgroupUnavailableError,
    InvalidArgumentError,
    StopTimeoutError,
)
from ..procfs import DEAD_STATES, PF_EXITING, ProcFS, Stat
from ._base import Backend, Journal, Plan

__all__ = [
    "CgroupBackend",
    "CgroupV1Backend",
    "CgroupV2Backend",
    "V1Freezer",
    "V2Freezer",
    "freezer_for",
    "thaw_cgroup",
]

#: Name prefix of the cgroups :meth:`treeguard.cgroup.Cgroup.create` makes; ``auto`` picks
#: the cgroup backend only for a tree alone in one of these.
OWN_PREFIX = "treeguard-"

#: cgroup_file_notify() sends at most one notification per 10 ms per file
#: (CGROUP_FILE_NOTIFY_MIN_INTV, kernel/cgroup/cgroup.c), delaying later ones: the file is
#: also re-read at least this often, so that rate limit never adds up to 10 ms.
_RECHECK = 0.001
#: Longest pause between two reads of a v1 freezer.state.
_V1_MAX_BACKOFF = 0.005
#: How many times a v1 cgroup stuck in FREEZING is thawed and frozen again before failing.
_V1_ATTEMPTS = 4
#: Longest stretch of enumeration between two points where an event loop may run.
_SLICE = 0.002
#: A cgroup whose task list fits in this many bytes (about 30 to 40 tasks) is written to by
#: the caller: a thread for a write that short costs more than the census it lets run
#: meanwhile. In A/B runs: 10 processes 0.62 -> 0.45 ms a freeze, 30 processes 0.73 -> 0.58
#: ms; at 1,000 the look costs about 0.05 ms. (At 1 KiB, 150 processes, the two ways were
#: even, and at 300 the thread won by 0.25 ms.)
_FEW_TASKS = 256
#: What a write to a file of a cgroup that was removed fails with.
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV, errno.ENOTDIR)


class _Events:
    """A cgroup's ``cgroup.events``, held open, and a descriptor that turns readable when it
    changes.

    When the kernel notifies a change of a cgroup file (kernfs_notify), every open
    descriptor of it raises POLLPRI at once (inotify hears of it later, from a workqueue).
    An epoll instance waiting for EPOLLPRI turns that into plain readability, the one
    condition drivers and event loops wait for. Reading through :attr:`fd` clears it;
    epoll reports a change made before it was set up, so none is missed between a read
    and the wait.
    """

    def __init__(self, path: str) -> None:
        try:
            self.fd = open_file(path, os.O_RDONLY | os.O_CLOEXEC)  # a thaw's wait too
        except (FileNotFoundError, NotADirectoryError):
            self.fd = -1
        self._epoll: select.epoll | None = None
        self._pollable = True

    def read(self) -> dict[str, str] | None:
        """The file's fields, ``None`` if the cgroup is gone."""
        if self.fd < 0:
            return None
        try:
            return parse_keyed(os.pread(self.fd, 4096, 0).decode())
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENODEV):
                return None  # removed since it was opened
            raise

    def ready_fd(self) -> int | None:
        """The descriptor to wait on, or ``None`` if there is none (out of descriptors,
        or not a kernfs file): the caller then polls."""
        if self._epoll is None and self._pollable:
            try:
                epoll = select.epoll(1)
            except OSError:
                self._pollable = False
                return None
            try:
                epoll.register(self.fd, select.EPOLLPRI)
            except OSError:
                epoll.close()
                self._pollable = False
                return None
            self._epoll = epoll
        return None if self._epoll is None else self._epoll.fileno()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            close_fd(fd)


def read_file(path: str) -> str | None:
    """A cgroup file's content, or ``None`` if it (or its cgroup) is gone."""
    try:
        fd = open_file(path, os.O_RDONLY | os.O_CLOEXEC)  # a thaw's wait reads too
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    except OSError as err:
        # A file of a cgroup removed after the open reads as ENODEV.
        if err.errno in (errno.ENOENT, errno.ENODEV):
            return None
        raise
    finally:
        close_fd(fd)


def write_file(path: str, value: str) -> None:
    """Write ``value`` to a cgroup control file, as one write(2).

    :raises ProcessLookupError: if ``value`` is a PID written to ``cgroup.procs`` (or
        ``tasks``) and that process is gone (ESRCH).
    :raises CgroupError: if the write fails otherwise (gone, read-only, not permitted).
    """
    try:
        # A thaw must not fail for want of a descriptor: the reserve is spent if need be.
        fd = open_file(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            close_fd(fd)
    except ProcessLookupError:
        raise
    except OSError as err:
        cls = CgroupUnavailableError if err.errno in (errno.EROFS, errno.EACCES) else CgroupError
        raise cls(
            os.path.dirname(path),
            f"cannot write {value!r} to {os.path.basename(path)}: {err.strerror}",
        ) from err


class _Writer:
    """One :func:`write_file` (``job``) in a short-lived thread of its own.

    Writing ``cgroup.freeze`` (or ``freezer.state``) returns only once the kernel has told
    every task of the cgroup to stop: 2.5 ms for 1,000 processes on this machine, 20 ms
    for 5,000 threads. Meanwhile the GIL is free, so the caller can do useful work (the
    census) and an event loop keeps running; ``done_fd`` (an eventfd) turns readable when
    the write is over. The thread is started only when there is a write to make: started
    earlier, to get ready while the cgroup was found, it took the GIL from that work and
    cost more than it hid (0.1 to 0.4 ms a freeze in A/B runs with 1,000 processes). Where
    no thread can be had, the write happens in the caller.

    Whoever comes first, the thread about to write or :meth:`close`, claims the writer (one
    ``dict.setdefault``, which nothing can interrupt half way): once closed, a thread that
    had not begun never writes, and one that had is waited for. So a thaw that closes the
    writer first is never overtaken by the freeze, however the caller was interrupted (the
    thread may not even have started). The caller never holds a lock here: an interrupt
    anywhere leaves nothing for the next call to wait on.
    """

    def __init__(self, job: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.done_fd = -1
        self._job = job
        self._claim: dict[str, str] = {}
        self._done = False

    def start(self) -> None:
        """Start the write (in the caller if no thread can be had)."""
        self.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            _thread.start_new_thread(self._run, ())
        except RuntimeError:  # no thread to be had (RLIMIT_NPROC, ...)
            if self._claim.setdefault("by", "caller") == "caller":
                t0 = time.perf_counter()
                try:
                    self._job()
                finally:
                    self.seconds = time.perf_counter() - t0

    def _run(self) -> None:
        if self._claim.setdefault("by", "thread") != "thread":
            return  # closed before this thread ran: the write must not happen now
        t0 = time.perf_counter()
        try:
            self._job()
        except BaseException as err:  # handed to the caller, see _write_during
            self.error = err
        finally:
            self.seconds = time.perf_counter() - t0
            os.eventfd_write(self.done_fd, 1)
            self._done = True  # last: close() closes done_fd once it reads this

    @property
    def over(self) -> bool:
        return self._done or self._claim.get("by") == "caller"

    def close(self) -> None:
        """Wait until the write is over, or make sure it never happens if it has not begun,
        even through KeyboardInterrupt (re-raised then): nothing may touch the cgroup
        before, or a thaw could land before the freeze. Idempotent; the write's own
        failure is left in :attr:`error`."""
        interrupted: BaseException | None = None
        if self._claim.setdefault("by", "caller") == "thread":
            while not self._done:
                try:
                    select.select([self.done_fd], [], [], _RECHECK)
                except BaseException as err:  # noqa: BLE001 - raised below, once it is over
                    interrupted = err
        fd, self.done_fd = self.done_fd, -1
        if fd >= 0:
            os.close(fd)
        if interrupted is not None:
            raise interrupted


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


def parse_keyed(text: str) -> dict[str, str]:
    """A flat-keyed cgroup file (``cgroup.events``: ``populated 1\\nfrozen 0``) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key:
            out[key] = value.strip()
    return out


def _subtree(path: str) -> list[str]:
    """``path`` and every cgroup below it (the freezer is hierarchical in v1 and v2)."""
    dirs = [path]
    # A v2 cgroup counts its descendants in cgroup.stat: the usual leaf costs one small
    # read instead of a directory walk (a tenth of a millisecond less per freeze, cold).
    stat = read_file(os.path.join(path, "cgroup.stat"))
    if stat is not None and parse_keyed(stat).get("nr_descendants") == "0":
        return dirs
    for top, subdirs, _ in os.walk(path):
        dirs += (os.path.join(top, d) for d in subdirs)
    return dirs


def _listing(dirs: list[str], name: str) -> bytes:
    """The file ``name`` (``cgroup.procs``, ``cgroup.threads``, ``tasks``) of each cgroup
    of ``dirs``, one after the other; a cgroup removed meanwhile lists nothing."""
    out = []
    for d in dirs:
        try:
            fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            while chunk := os.read(fd, 65536):
                out.append(chunk)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENODEV):
                raise
        finally:
            os.close(fd)
    return b"".join(out)  # each entry ends with a newline


def _ids(dirs: list[str], name: str) -> set[int]:
    """The PIDs (or TIDs) listed in the file ``name`` of each cgroup of ``dirs``."""
    return set(map(int, _listing(dirs, name).split()))


def _procs(dirs: list[str], fs: ProcFS | None = None) -> set[int]:
    """The processes in the cgroups ``dirs`` (``cgroup.procs``).

    A threaded v2 cgroup refuses to list its processes (EOPNOTSUPP: cgroup-v2.rst,
    "Threads"; a process is in it only through some of its threads): there, each thread of
    ``cgroup.threads`` stands for its thread group, read from ``/proc/TID/status``.
    """
    found: set[int] = set()
    for d in dirs:
        try:
            found |= _ids([d], "cgroup.procs")
        except OSError as err:
            if err.errno != errno.EOPNOTSUPP:
                raise
            fs = fs or ProcFS()
            for tid in _ids([d], "cgroup.threads"):
                status = fs.status(tid)
                if status is not None and status.get("Tgid", "").isdigit():
                    found.add(int(status["Tgid"]))
    return found


def procs_below(path: str) -> list[int]:
    """Every process in the cgroup ``path`` and its descendants (``cgroup.procs``)."""
    return sorted(_procs(_subtree(path)))


def _unfrozen_tasks(pids: list[int], fs: ProcFS, frozen_shows: str) -> list[tuple[int, int, str]]:
    """``(pid, tid, state)`` of tasks that look runnable, to name in a timeout error."""
    late: list[tuple[int, int, str]] = []
    for pid in pids:
        for tid in fs.tids(pid) or ():
            st = fs.stat(pid, tid)
            if st is not None and st.state not in frozen_shows:
                late.append((pid, tid, st.state))
    return late


# -- the two freezers --------------------------------------------------------------------


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


# -- finding the cgroup of a tree --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The cgroup that holds a tree, and the tree's top processes (where it enters it).

    ``whole`` says the cgroup was chosen from every top process; otherwise from the first
    one, and the census finds out whether the others are in it too.
    """

    version: int
    path: str
    top: frozenset[int]
    whole: bool = True


def _top(plan: Plan) -> list[int]:
    """The tree's topmost processes: the core walk from the plan's starts, descending only
    through the processes walked through but never stopped (the root, the caller's
    ancestors). Every other process of the tree descends from one of them."""
    fs, report = plan.fs, plan.report
    top: list[int] = []
    seen: set[int] = set()

    def visit(pid: int) -> Stat | None:
        if pid in seen:
            return None
        seen.add(pid)
        reason = plan.blocked.get(pid)
        if reason is not None:
            report.skipped[pid] = reason
            return None
        if pid in plan.passthrough:
            return fs.stat(pid) if pid else ROOT
        stat = fs.stat(pid)
        if stat is None:
            return None
        skip = unfreezable(stat)
        if skip is not None:
            report.skipped[pid] = skip
        else:
            top.append(pid)
        return None

    plan.source.refresh()
    for _ in walk(plan.starts, visit, plan.source):
        pass
    return top


def _describe_pids(pids: list[int], fs: ProcFS) -> str:
    shown = []
    for pid in pids[:10]:
        st = fs.stat(pid)
        shown.append(f"{pid} ({st.name})" if st else str(pid))
    return ", ".join(shown) + (" ..." if len(pids) > 10 else "")


def _refusal(inside: list[int], plan: Plan) -> str:
    """Why a cgroup holding ``inside`` (processes that must keep running) cannot be frozen."""
    fs = plan.fs
    excluded = [p for p in inside if plan.blocked.get(p) is Skip.EXCLUDED]
    roots = [p for p in inside if p in plan.starts and p != os.getpid()]
    callers = [p for p in inside if p not in excluded and p not in roots]
    if callers:
        return (
            f"the calling process, its ancestors or helpers ({_describe_pids(callers, fs)}) "
            "are in it: freezing it would freeze the caller; spawn the tree into a cgroup "
            "of its own (treeguard.cgroup.Cgroup.create)"
        )
    if excluded:
        return (
            f"excluded PID(s) {_describe_pids(excluded, fs)} are in it, and a cgroup freezes "
            "all its processes: move the monitor out of the cgroup or use backend='signal'"
        )
    return (
        f"it also holds processes outside the tree: the root {_describe_pids(roots, fs)}, "
        "which is not frozen without include_root=True (pass it, or use backend='signal')"
    )


def _common_parent(paths: list[str]) -> str:
    common = os.path.commonpath(paths)
    return common if common.startswith("/") else "/"


def find_target(plan: Plan, *, whole: bool = False) -> Target | None:
    """The cgroup that holds the plan's tree; ``None`` if the tree has no processes.

    The candidate is the cgroup of the tree's first top process, or with ``whole`` the
    closest common cgroup of them all (the freezer is hierarchical): a thousand children
    of the root need one ``/proc/PID/cgroup`` read, not a thousand. Only the few processes
    that must keep running are checked here (the caller, its ancestors, the root unless
    included, excluded PIDs: one read each); that the candidate holds exactly the tree is
    proven by :class:`_Census`.

    :raises CgroupUnavailableError: if no cgroup hierarchy is mounted.
    :raises CgroupError: if no cgroup can hold the tree alone (saying why), nothing frozen.
    """

    top = _top(plan)
    if not top:
        return None
    fs = plan.fs
    v2, freezer = hierarchies(fs)
    if v2 is None and freezer is None:
        raise CgroupUnavailableError(
            f"{fs.root}/self/mountinfo", "neither cgroup v2 nor a v1 freezer is mounted"
        )
    guarded = sorted(p for p in {*plan.passthrough, *plan.blocked} if p > 0)
    whole = whole or len(top) == 1
    problems: list[str] = []
    for version, hierarchy in ((2, v2), (1, freezer)):
        if hierarchy is None:
            continue
        key = "" if version == 2 else "freezer"
        kind = "cgroup v2" if version == 2 else "v1 freezer cgroup"

        def cgroup_of(pid: int, key: str = key) -> str | None:
            data = fs.read(f"{pid}/cgroup")
            return None if data is None else cgroup_paths(data).get(key)

        known = (r for r in map(cgroup_of, top) if r is not None)
        rels = list(known) if whole else list(itertools.islice(known, 1))
        if not rels:
            continue
        rel = _common_parent(rels)
        path = hierarchy.directory(rel)
        if rel == "/" or path is None:
            problems.append(
                f"the tree is in the root {kind}"
                + (
                    " (it spans cgroups whose only common ancestor is the root)"
                    * (len(set(rels)) > 1)
                )
                + ", which cannot be frozen"
            )
            continue
        inside = []
        for pid in guarded:
            theirs = cgroup_of(pid)
            if theirs is not None and (theirs == rel or theirs.startswith(rel + "/")):
                inside.append(pid)
        if not inside:
            return Target(version, path, frozenset(top), whole)
        problems.append(f"{kind} {path}: {_refusal(inside, plan)}")
    raise CgroupError(
        f"of the tree of PID {plan.starts[0] if plan.starts else '?'}",
        "no cgroup holds this tree alone, so backend='cgroup' cannot freeze it ("
        + "; ".join(problems or ["its processes are in no cgroup hierarchy this process sees"])
        + ")",
    )


class _Members:
    """What a cgroup (with the cgroups below it) holds: its processes, and how many tasks.

    Looked at while the kernel freezes the cgroup, then once more when it is frozen: if the
    task list reads the same, no task was born, died or moved in between, and so no process
    either (each has a task in the list), so the second look costs one read.
    """

    def __init__(self, freezer: CgroupFreezer) -> None:
        self.freezer = freezer
        self.procs: set[int] = set()
        self.tasks = 0
        self._seen: tuple[list[str], bytes] | None = None

    def look(self) -> tuple[list[str], bytes] | None:
        """Read the task list: the cgroups and the list if it changed since the last
        look, ``None`` if it did not."""
        dirs = _subtree(self.freezer.path)
        tasks = _listing(dirs, self.freezer.tasks_file)
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
            self.procs = _procs(changed[0], self.freezer.fs)
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

    def survey(self) -> Steps[None]:
        """List the cgroup and read the ``children`` file of each task not read yet. The
        task list is read first: if a later survey reads the same list, what was learnt
        still holds (see :class:`_Members`)."""
        changed = self.look()
        if changed is None:
            return
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
            procs = _procs(dirs, self.plan.fs)
        # A child forked by a secondary thread is listed under that thread's TID: its
        # parent process is learnt from its ppid (see problem()), like an orphan's.
        self.parent = {kid: tid for kid, tid in parent.items() if kid in procs and tid in procs}
        self._orphans = procs - self.top - self.parent.keys()
        self.procs = procs

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
            return _refusal(moved_in, plan)
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
                f"it also holds processes outside the tree: {_describe_pids(foreign, fs)}; "
                "freezing it stops them too (use backend='signal')"
            )
        outside = []
        for pid in sorted(set().union(self.top, *self._kids.values()) - procs - kept):
            st = fs.stat(pid)
            if st is None or st.state in DEAD_STATES or st.is_kernel_thread:
                continue  # a zombie is in no cgroup.procs
            if pid in self.top or st.ppid in procs:
                outside.append(pid)
        if outside:
            self.tops_elsewhere = all(pid in self.top for pid in outside)
            return (
                f"processes of the tree are in another cgroup: {_describe_pids(outside, fs)}"
                " (moved there?); freezing it would leave them running (use backend='signal')"
            )
        elsewhere = self._threads_elsewhere()
        if elsewhere:
            shown = ", ".join(
                f"thread {tid} of PID {_describe_pids([pid], fs)}" for pid, tid in elsewhere[:10]
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
        return _parent_first(sorted(self.top & self.procs), kids, self.plan.fs)


class _Known(ChildrenSource):
    """Children from a map built already (the order of a frozen cgroup's processes)."""

    def __init__(self, fs: ProcFS, kids: dict[int, list[int]]) -> None:
        super().__init__(fs)
        self.kids = kids

    def children(self, pid: int, stat: Stat) -> list[int]:
        return list(self.kids.get(pid, ()))


def _parent_first(tops: list[int], kids: dict[int, list[int]], fs: ProcFS) -> list[int]:
    """The processes below ``tops`` in ``kids``, parents before children (the core walk
    over a map built already)."""
    return list(walk(tops, lambda pid: ROOT, _Known(fs, kids)))


def _by_ppid(stats: dict[int, Stat], fs: ProcFS) -> list[int]:
    """The processes of ``stats`` parents first, by their ppids."""
    kids: dict[int, list[int]] = {}
    tops: list[int] = []
    for pid in sorted(stats, key=lambda p: (stats[p].starttime, p)):
        ppid = stats[pid].ppid
        (kids.setdefault(ppid, []) if ppid in stats else tops).append(pid)
    return _parent_first(tops, kids, fs)


# -- the backends ------------------------------------------------------------------------


class CgroupBackend(Backend):
    """Freezes the cgroup that holds the plan's tree (or the cgroup it is given).

    For a tree, the processes that must keep running (the caller, its ancestors, the
    root unless included, excluded PIDs) are checked to be outside the cgroup before it
    is frozen: if one is inside, :class:`CgroupError` and nothing frozen. That the cgroup
    holds nothing else is proven by the census, which reads the cgroup while the kernel
    freezes it (the write to ``cgroup.freeze`` takes milliseconds for a big cgroup, in a
    thread of its own) and reads its task list once more when it is frozen, to learn what was born
    meanwhile. If it holds other processes, it is thawed before :class:`CgroupError` is
    raised, so those were frozen for a moment, a few milliseconds, which the cgroup
    freezer does invisibly (no signal, nothing a process can observe but the lost time).
    If the cgroup was chosen from the first top process alone and other top processes
    turn out to be elsewhere, the closest cgroup holding them all is frozen instead.
    """

    name = "cgroup"
    version: int | None = None

    def __init__(self, plan: Plan, path: str | None = None) -> None:
        super().__init__(plan)
        self._path = path
        self._freezer: CgroupFreezer | None = None
        self._census: _Census | None = None
        self._procs: set[int] = set()
        self._pids: list[int] | None = None
        self._identities: list[tuple[int, int]] | None = None

    def _aim(self, target: Target) -> _Census:
        freezer = freezer_for(target.version, target.path, self.plan.fs, self.plan.journal)
        self._freezer = freezer
        self._census = _Census(freezer, target.top, self.plan)
        return self._census

    def freeze(self) -> Steps[None]:
        keep_reserve()  # before the freeze: its thaw must never lack a descriptor
        try:
            yield from self._freeze()
        except BaseException:
            # Whatever cut the freeze short (an interrupt between two steps too), the
            # cgroup is thawed before this raises; a thaw itself cut short is finished by
            # the next thaw() (the freezer keeps its state until the thaw is written).
            run_sync(self._thaw_cgroup())
            raise

    def _freeze(self) -> Steps[None]:
        report = self.report
        start = time.perf_counter()
        whole = False
        while True:
            problem = yield from self._attempt(whole)
            census = self._census
            if problem is None:
                break
            yield from self._thaw_cgroup()  # the journal stays armed: a retry may follow
            if census is not None and census.tops_elsewhere and not whole:
                # The first top process's cgroup is too narrow: aim at the closest
                # cgroup holding every top process instead.
                self._census, whole = None, True
                continue
            assert self._freezer is not None
            raise CgroupError(self._freezer.path, f"{problem}; it was thawed again")
        report.freeze_seconds = time.perf_counter() - start

    def _attempt(self, whole: bool) -> Steps[str | None]:
        """Freeze the cgroup of the tree (chosen from every top process if ``whole``);
        return what is wrong with it (``None`` if nothing), frozen either way."""
        plan, report = self.plan, self.report
        start = time.perf_counter()
        census = self._census
        if self._path is not None:
            assert self.version is not None
            self._freezer = freezer_for(self.version, self._path, plan.fs, plan.journal)
        elif census is None:
            target = find_target(plan, whole=whole)
            if target is None:
                report.verified_by = "nothing to freeze: the tree has no processes"
                return None
            census = self._aim(target)
        freezer = self._freezer
        assert freezer is not None
        report.enumerate_seconds += time.perf_counter() - start
        left = plan.timeout - (time.perf_counter() - start)
        # The census reads the cgroup while the kernel freezes it (the write takes
        # milliseconds): what it learns holds, since only the tree can add to the cgroup
        # (a process born in a cgroup stays there unless someone moves it).
        # A cgroup given by name is frozen whole (no proof needed): only what it holds
        # is listed, the same way.
        members = _Members(freezer) if census is None else census
        yield from freezer.freeze(max(left, 0.0), report, meanwhile=members.survey())
        report.passes = max(report.passes, 1)
        t0 = time.perf_counter()
        # Frozen: nothing forks or exits now, so what the cgroup holds is final; the
        # census reads the task list once more and learns only what is new. (Should this
        # fail, freeze() thaws.)
        yield from members.survey()
        problem = None if census is None else census.problem()
        report.enumerate_seconds += time.perf_counter() - t0
        self._procs = members.procs
        report.stopped = len(self._procs)
        report.tasks = members.tasks
        self._pids = self._identities = None
        return problem

    def _ordered(self) -> list[tuple[int, int]]:
        """``(pid, starttime)`` of what the cgroup held when frozen, parent-first (read on
        first use: the freeze costs no more than the cgroup's own)."""
        if self._identities is None:
            fs = self.plan.fs
            pids = self._procs if self._census is None else self._parent_first()
            stats = {pid: st for pid in pids if (st := fs.stat(pid)) is not None}
            order = _by_ppid(stats, fs) if self._census is None else self._parent_first()
            self._identities = [(pid, stats[pid].starttime) for pid in order if pid in stats]
        return self._identities

    def _parent_first(self) -> list[int]:
        if self._pids is None:
            assert self._census is not None
            self._pids = self._census.parent_first()
        return self._pids

    def thaw(self) -> Steps[None]:
        t0 = time.perf_counter()
        yield from self._thaw_cgroup()
        if self.plan.journal is not None:
            self.plan.journal.released()
        self.report.thaw_seconds = time.perf_counter() - t0

    def _thaw_cgroup(self) -> Steps[None]:
        if self._freezer is not None:
            yield from self._freezer.thaw(max(self.plan.timeout, 1.0))

    @property
    def path(self) -> str | None:
        """The cgroup directory frozen (``None`` before the freeze)."""
        return None if self._freezer is None else self._freezer.path

    @property
    def pids(self) -> tuple[int, ...]:
        if self._census is not None:  # no read needed: the proof learnt every parent
            return tuple(self._parent_first())
        return tuple(p for p, _ in self._ordered())

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._ordered())

    def detach(self) -> None:
        if self._freezer is not None:
            self._freezer.froze = False  # a token thaws it now; our thaw leaves it alone
        if self.plan.journal is not None:
            self.plan.journal.released()

    def describe(self) -> dict[str, object]:
        f = self._freezer
        return {
            "version": 0 if f is None else f.version,
            "path": "" if f is None else f.path,
            "inode": 0 if f is None else f.inode,
            "was_frozen": True if f is None else not f.froze,
        }


class CgroupV2Backend(CgroupBackend):
    """Freezes one given cgroup v2 directory (no enumeration)."""

    version = 2

    def __init__(self, plan: Plan, path: str) -> None:
        super().__init__(plan, path)


class CgroupV1Backend(CgroupBackend):
    """Freezes one given cgroup v1 freezer directory (no enumeration)."""

    version = 1

    def __init__(self, plan: Plan, path: str) -> None:
        super().__init__(plan, path)
