"""Who is in the tree: the one depth-first walk every face uses, and where children come from.

The walk is parent-first (pre-order), the order in which a freezer must stop processes so
that no parent runs on after one of its children stopped (Sys::FreezeThaw's reasoning), and
the order the kernel's own checkpoint code records a tree in.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

from ._checks import check_process
from ._report import Skip
from ._thaw import has_pidfs, kept_share
from .errors import NoSuchProcessError
from .procfs import HELPER_COMM, ProcFS, Stat

__all__ = [
    "ROOT",
    "ChildrenFiles",
    "ChildrenSource",
    "PpidScan",
    "Root",
    "ancestors",
    "children_source",
    "unfreezable",
    "walk",
]

#: The stat of PID 0, which stands for the roots of the PID namespace in a walk.
ROOT = Stat(
    pid=0, comm=b"", state="S", ppid=0, pgrp=0, session=0, flags=0, num_threads=1, starttime=0
)


def unfreezable(stat: Stat) -> Skip | None:
    """Why a process met by a walk is never to be frozen, by any backend, if it is not: a
    kernel thread (no user space), a zombie (it cannot run), a treeguard watchdog helper (of
    this process or another: the one that would thaw)."""
    if stat.is_kernel_thread:
        return Skip.KERNEL_THREAD
    if stat.is_dead:
        return Skip.ZOMBIE
    if stat.comm == HELPER_COMM:
        return Skip.SUPERVISOR
    return None


class ChildrenSource:
    """Where the children of a process are read from.

    :meth:`refresh` is called before every enumeration; only a source that takes a snapshot
    of the whole process table needs it.
    """

    def __init__(self, fs: ProcFS) -> None:
        self.fs = fs

    def refresh(self) -> None:  # pragma: no cover - the default has nothing to refresh
        pass

    def children(self, pid: int, stat: Stat) -> list[int]:
        raise NotImplementedError


class ChildrenFiles(ChildrenSource):
    """``/proc/PID/task/TID/children`` of every thread: cost follows the tree, not the machine.

    A single-threaded process has one such file; only a multi-threaded one needs the task
    directory listed (a child forked by a secondary thread is listed under that thread only).
    PID 0 stands for the roots of the PID namespace (processes whose parent is not visible),
    which only a scan of the process table can find.
    """

    def children(self, pid: int, stat: Stat) -> list[int]:
        fs = self.fs
        if pid == 0:
            return _scan(fs).get(0, [])
        if stat.num_threads <= 1:
            return fs.children(pid, pid) or []
        return self.of_threads(pid, fs.tids(pid) or ())

    def of_threads(self, pid: int, tids: Iterable[int]) -> list[int]:
        """The children forked by the threads ``tids`` of ``pid`` (listed already)."""
        fs = self.fs
        found: list[int] = []
        for tid in tids:
            found += fs.children(pid, tid) or ()
        return found


class PpidScan(ChildrenSource):
    """The fallback for kernels without children files: one scan of every ``/proc/*/stat``."""

    def __init__(self, fs: ProcFS) -> None:
        super().__init__(fs)
        self._map: dict[int, list[int]] = {}

    def refresh(self) -> None:
        self._map = _scan(self.fs)

    def children(self, pid: int, stat: Stat) -> list[int]:
        return self._map.get(pid, [])


def _scan(fs: ProcFS) -> dict[int, list[int]]:
    by_parent: dict[int, list[int]] = {}
    for pid in sorted(fs.pids()):
        st = fs.stat(pid)
        if st is not None:
            by_parent.setdefault(st.ppid, []).append(pid)
    return by_parent


def children_source(fs: ProcFS, *, use_children_files: bool | None = None) -> ChildrenSource:
    """The best source this kernel offers (``use_children_files`` forces one, for tests)."""
    if use_children_files is None:
        use_children_files = fs.has_children_files()
    return ChildrenFiles(fs) if use_children_files else PpidScan(fs)


def walk(
    starts: Iterable[int],
    visit: Callable[[int], Stat | None],
    source: ChildrenSource,
) -> Iterator[int]:
    """Visit the trees below ``starts`` depth-first, parents before children.

    ``visit(pid)`` acts on one process and returns its stat to descend into its children,
    or ``None`` to prune it (gone, excluded, already seen). The walk yields each visited pid
    so that a caller may pause between processes (the async face stays responsive).
    """
    stack = list(starts)
    stack.reverse()
    while stack:
        pid = stack.pop()
        stat = visit(pid)
        if stat is not None:
            kids = source.children(pid, stat)
            if kids:
                kids.reverse()
                stack += kids
        yield pid


def ancestors(fs: ProcFS, pid: int | None = None) -> list[int]:
    """The ancestors of ``pid`` (default: this process), nearest first, up to the namespace
    root. This process's are kept between calls while all of them live (:class:`_Lineage`)."""
    if pid is None and fs.root == "/proc":
        return _LINEAGE.chain(fs)
    return _walk_up(fs, os.getpid() if pid is None else pid)


def _walk_up(fs: ProcFS, pid: int) -> list[int]:
    chain: list[int] = []
    stat = fs.stat(pid)
    while stat is not None and stat.ppid > 0 and stat.ppid not in chain:
        chain.append(stat.ppid)
        stat = fs.stat(stat.ppid)
    return chain


class _Lineage:
    """This process's ancestors, read once and kept while every one of them lives.

    A process keeps its parent until the parent exits (then it is re-parented), so the
    chain changes only when one of its processes exits, and that turns the process's pidfd
    readable (pidfd_open(2)): one poll(2) over the pidfds says whether the chain still
    stands. Each pidfd is opened after the walk and before the child's parent is read
    again: a parent that exited (and whose PID came back as another process) is not taken
    for the one opened.
    A forked child starts afresh.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: list[int] | None = None
        self._fds: list[int] = []
        self._poller = select.poll()
        os.register_at_fork(after_in_child=self._after_fork)

    def chain(self, fs: ProcFS) -> list[int]:
        with self._lock:
            if self._pids is None or self._poller.poll(0):
                self._forget()
                for _ in range(10):  # again while ancestors exit meanwhile
                    try:
                        if self._read(fs):
                            break
                    except OSError:  # out of descriptors: read below, and not kept
                        self._forget()
                        break
                    self._forget()
                if self._pids is None:
                    return _walk_up(fs, os.getpid())
            return list(self._pids)

    def _read(self, fs: ProcFS) -> bool:
        """Read the chain, a pidfd per ancestor; False if an ancestor exited meanwhile."""
        child = os.getpid()
        chain = _walk_up(fs, child)
        for parent in chain:
            try:
                fd = os.pidfd_open(parent)
            except ProcessLookupError:
                return False
            self._fds.append(fd)
            self._poller.register(fd, select.POLLIN)
            stat = fs.stat(child)
            if stat is None or stat.ppid != parent:
                return False
            child = parent
        self._pids = chain
        return True

    def _forget(self) -> None:
        for fd in self._fds:
            self._poller.unregister(fd)
            os.close(fd)
        self._fds = []
        self._pids = None

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._forget()


_LINEAGE = _Lineage()


class Root:
    """A guard's ``root`` (another process than the caller), held by a pidfd from the
    freeze that first checked it: a freeze after that asks one fstat(2) and one poll(2)
    whether it still lives (a pidfd turns readable once its whole process has exited, the
    moment its stat would say dead) instead of reading its stat and opening a pidfd again.
    A root that has exited stays gone for the guard: a process that gets its PID later is
    not taken for it.

    Kept only on kernels with pidfs, where the pidfd's inode names its process for good:
    the descriptor is checked against it (its device and inode) before it is polled or
    closed, since code that closes descriptors it did not open may have given the number
    to another file (whose answer under poll says nothing of the root). The guards of a
    process keep a few roots at most (:func:`_room`): past that, a guard checks its root
    afresh at each freeze. A forked child checks afresh and keeps nothing; :meth:`close`
    (the guard's) lets it go.
    """

    def __init__(self) -> None:
        self._pid = self._fd = 0
        self._file = (0, 0)  # the pidfd's device and inode (inode numbers are per device)
        self._owner = os.getpid()
        self._poller = select.poll()

    def check(self, pid: int, fs: ProcFS) -> None:
        """``check_process("root", pid, fs, zombie_ok=False)``, in one poll once kept.

        :raises NoSuchProcessError: if it has exited (or never was).
        :raises InvalidArgumentError: if ``pid`` is a thread of another process.
        """
        mine = os.getpid() == self._owner
        # Its file first: another file under the number (never readable, an empty pipe)
        # would say nothing of the root under poll.
        if self._pid == pid and mine and self._holds():
            if not self._poller.poll(0):
                return  # it lives: no pidfd of an exited process is ever unreadable
            raise NoSuchProcessError(pid)
        if self._pid and mine:
            self.close()
        keep = mine and has_pidfs() and _room()
        fd = check_process("root", pid, fs, zombie_ok=False, keep=keep)
        if fd >= 0:
            found = os.fstat(fd)
            self._file = (found.st_dev, found.st_ino)
            self._poller.register(fd, select.POLLIN)
            self._pid, self._fd = pid, fd
            _KEEPING.add(self)

    def _holds(self) -> bool:
        try:
            found = os.fstat(self._fd)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == self._file

    def close(self) -> None:
        pid, self._pid = self._pid, 0
        _KEEPING.discard(self)
        if pid and os.getpid() == self._owner:
            self._poller.unregister(self._fd)
            if self._holds():
                os.close(self._fd)


#: The roots that the guards of this process keep, a descriptor each (one collected
#: unclosed leaves the count).
_KEEPING: weakref.WeakSet[Root] = weakref.WeakSet()
#: How many at most: a program that keeps many guards must not find its descriptor table
#: filled by them (nor its low numbers, which select(2) needs, taken).
_MOST_ROOTS = 64


def _room() -> bool:
    """Whether one more root may be kept: fewer than :data:`_MOST_ROOTS` are, and fewer
    than a sixteenth of the soft RLIMIT_NOFILE."""
    return len(_KEEPING) < kept_share(_MOST_ROOTS, 16)
