"""Finding the cgroup of a tree, before anything is frozen.

The candidate is the cgroup of the tree's first top process (the root's first child, or the
root), and the few processes that must keep running (the caller, its ancestors, excluded
PIDs) are checked to be outside it, in its task list. That it holds the whole tree and
nothing else is proven by the census (:mod:`._census`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from .._cgroupfiles import CgroupFiles
from .._cgroupfs import _listing, _subtree
from .._mounts import cgroup_paths, hierarchies
from .._report import Skip
from .._tree import ROOT, unfreezable, walk
from ..errors import CgroupError, CgroupUnavailableError
from ..procfs import ProcFS, Stat
from ._base import Plan
from ._freezers import V1Freezer, V2Freezer

__all__ = ["Target", "describe_pids", "find_target", "held_files", "refusal"]

#: The key, in a guard's memo, of the files of the cgroup its last freeze froze.
_FILES = "cgroup files"


@dataclass(frozen=True, slots=True)
class Target:
    """The cgroup that holds a tree, and the tree's top processes (where it enters it)."""

    version: int
    path: str
    top: frozenset[int]
    listing: tuple[list[str], bytes] | None = None  #: its cgroups and task list, as read
    files: CgroupFiles | None = None  #: (v2) its files, held open, current for this freeze


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


def describe_pids(pids: list[int], fs: ProcFS) -> str:
    shown = []
    for pid in pids[:10]:
        st = fs.stat(pid)
        shown.append(f"{pid} ({st.name})" if st else str(pid))
    return ", ".join(shown) + (" ..." if len(pids) > 10 else "")


def refusal(inside: list[int], plan: Plan) -> str:
    """Why a cgroup holding ``inside`` (processes that must keep running) cannot be frozen."""
    fs = plan.fs
    excluded = [p for p in inside if plan.blocked.get(p) is Skip.EXCLUDED]
    roots = [p for p in inside if p in plan.starts and p != os.getpid()]
    callers = [p for p in inside if p not in excluded and p not in roots]
    if callers:
        return (
            f"the calling process, its ancestors or helpers ({describe_pids(callers, fs)}) "
            "are in it: freezing it would freeze the caller; spawn the tree into a cgroup "
            "of its own (treeguard.cgroup.Cgroup.create)"
        )
    if excluded:
        return (
            f"excluded PID(s) {describe_pids(excluded, fs)} are in it, and a cgroup freezes "
            "all its processes: move the monitor out of the cgroup or use backend='signal'"
        )
    return (
        f"it also holds processes outside the tree: the root {describe_pids(roots, fs)}, "
        "which is not frozen without include_root=True (pass it, or use backend='signal')"
    )


def held_files(plan: Plan, path: str) -> CgroupFiles:
    """The files of the cgroup v2 directory ``path`` for this freeze: those the guard kept
    from its last freeze if that froze the same cgroup (:meth:`CgroupFiles.current`), else
    new ones, which a guard keeps for its next freeze (and closes when it is closed)."""
    memo = plan.memo
    kept = None if memo is None else memo.get(_FILES)
    if isinstance(kept, CgroupFiles) and kept.path == path:
        files = kept.current()
        if files is kept:
            return files
        kept.close()  # (nothing is due through them: this guard is not frozen)
    else:
        if isinstance(kept, CgroupFiles):
            kept.close()  # the tree is in another cgroup now
        files = CgroupFiles(path)
    if memo is not None:
        memo.put(_FILES, files)
        files.kept = memo.get(_FILES) is files  # not in a forked child: its thaw closes them
    return files


def _common_parent(paths: list[str]) -> str:
    # (One path is its own: commonpath costs more than the rest of finding the cgroup.)
    common = paths[0] if len(paths) == 1 else os.path.commonpath(paths)
    return common if common.startswith("/") else "/"


def find_target(plan: Plan, *, whole: bool = False) -> Target | None:
    """The cgroup that holds the plan's tree; ``None`` if the tree has no processes.

    The candidate is the cgroup of the tree's first top process, or with ``whole`` the
    closest common cgroup of them all (the freezer is hierarchical): a thousand children
    of the root need one ``/proc/PID/cgroup`` read, not a thousand. Only the few processes
    that must keep running are checked here (the caller, its ancestors, the root unless
    included, excluded PIDs: in the candidate's task list, one read); that the candidate
    holds exactly the tree is proven by :class:`_Census`.

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
        # Who must keep running is looked for in the cgroup's task list (one read, which the
        # census starts from): a process is in it through its leader, whose TID is its PID.
        files = held_files(plan, path) if version == 2 else None
        dirs = _subtree(path, files)
        tasks = _listing(dirs, (V2Freezer if version == 2 else V1Freezer).tasks_file, files)
        listed = set(map(int, tasks.split()))
        inside = [pid for pid in guarded if pid in listed]
        if not inside:
            return Target(version, path, frozenset(top), (dirs, tasks), files)
        if files is not None and not files.kept:
            files.close()
        problems.append(f"{kind} {path}: {refusal(inside, plan)}")
    raise CgroupError(
        f"of the tree of PID {plan.starts[0] if plan.starts else '?'}",
        "no cgroup holds this tree alone, so backend='cgroup' cannot freeze it ("
        + "; ".join(problems or ["its processes are in no cgroup hierarchy this process sees"])
        + ")",
    )
