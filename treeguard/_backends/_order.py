"""Parent-first orders of the processes a cgroup freeze found: from the parents its census
learnt, or from each process's ppid (a cgroup frozen whole, with no census)."""

from __future__ import annotations

from .._tree import ROOT, ChildrenSource, walk
from ..procfs import ProcFS, Stat

__all__ = ["by_ppid", "parent_first"]


class _Known(ChildrenSource):
    """Children from a map built already (the order of a frozen cgroup's processes)."""

    def __init__(self, fs: ProcFS, kids: dict[int, list[int]]) -> None:
        super().__init__(fs)
        self.kids = kids

    def children(self, pid: int, stat: Stat) -> list[int]:
        return list(self.kids.get(pid, ()))


def parent_first(tops: list[int], kids: dict[int, list[int]], fs: ProcFS) -> list[int]:
    """The processes below ``tops`` in ``kids``, parents before children (the core walk
    over a map built already)."""
    return list(walk(tops, lambda pid: ROOT, _Known(fs, kids)))


def by_ppid(stats: dict[int, Stat], fs: ProcFS) -> list[int]:
    """The processes of ``stats`` parents first, by their ppids."""
    kids: dict[int, list[int]] = {}
    tops: list[int] = []
    for pid in sorted(stats, key=lambda p: (stats[p].starttime, p)):
        ppid = stats[pid].ppid
        (kids.setdefault(ppid, []) if ppid in stats else tops).append(pid)
    return parent_first(tops, kids, fs)
