"""Who is in the tree: the one depth-first walk every face uses, and where children come from.

The walk is parent-first (pre-order), the order in which a freezer must stop processes so
that no parent runs on after one of its children stopped (Sys::FreezeThaw's reasoning), and
the order the kernel's own checkpoint code records a tree in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from .procfs import ProcFS, Stat

__all__ = ["ChildrenFiles", "ChildrenSource", "PpidScan", "ancestors", "children_source", "walk"]


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
    """The ancestors of ``pid`` (default: this process), nearest first, up to the namespace root."""
    chain: list[int] = []
    stat = fs.stat(os.getpid() if pid is None else pid)
    while stat is not None and stat.ppid > 0 and stat.ppid not in chain:
        chain.append(stat.ppid)
        stat = fs.stat(stat.ppid)
    return chain
