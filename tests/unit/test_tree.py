"""The tree walk on synthetic /proc forests: parent-first order, both child sources agree,
vanished processes and exclusions are handled. Pure data: no process is touched."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from treeguard._tree import ChildrenFiles, PpidScan, walk
from treeguard.procfs import ProcFS, Stat


def _stat_line(pid: int, ppid: int, threads: int) -> str:
    return (
        f"{pid} (p{pid}) S {ppid} {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 {threads} 0 {pid * 10}\n"
    )


def _write(root: str, parents: dict[int, int], threads: dict[int, int], vanished: set[int]) -> None:
    """A /proc with a stat and per-thread children files for each live process. A child
    forked by thread k of its parent is listed in that thread's children file."""
    by_thread: dict[tuple[int, int], list[int]] = {}
    for child, parent in parents.items():
        n = threads[parent] if parent in threads else 1
        tid = parent if n == 1 or child % n == 0 else parent * 1000 + child % n
        by_thread.setdefault((parent, tid), []).append(child)
    for pid, ppid in [(1, 0), *parents.items()]:
        if pid in vanished:
            continue  # listed by its parent, gone by the time we look
        n = threads.get(pid, 1)
        tids = [pid] + [pid * 1000 + k for k in range(1, n)]
        os.makedirs(f"{root}/{pid}/task")
        with open(f"{root}/{pid}/stat", "w") as f:
            f.write(_stat_line(pid, ppid, n))
        for tid in tids:
            os.makedirs(f"{root}/{pid}/task/{tid}")
            with open(f"{root}/{pid}/task/{tid}/stat", "w") as f:
                f.write(_stat_line(tid, ppid, n))
            with open(f"{root}/{pid}/task/{tid}/children", "w") as f:
                f.write("".join(f"{c} " for c in sorted(by_thread.get((pid, tid), []))))


def _expected(parents: dict[int, int], vanished: set[int], excluded: set[int]) -> list[int]:
    kids: dict[int, list[int]] = {}
    for child, parent in sorted(parents.items()):
        kids.setdefault(parent, []).append(child)
    out: list[int] = []

    def visit(pid: int) -> None:
        if pid in vanished or pid in excluded:
            return
        out.append(pid)
        for c in kids.get(pid, []):
            visit(c)

    visit(1)
    return out


@st.composite
def forests(draw: st.DrawFn) -> tuple[dict[int, int], dict[int, int], set[int], set[int]]:
    n = draw(st.integers(min_value=1, max_value=40))
    # Process k (2..n+1) picks a parent among the ones before it: a tree rooted at 1.
    parents = {k: draw(st.integers(min_value=1, max_value=k - 1)) for k in range(2, n + 2)}
    threads = {p: draw(st.integers(min_value=1, max_value=4)) for p in range(1, n + 2)}
    others = sorted(parents)
    vanished = set(draw(st.lists(st.sampled_from(others), max_size=3))) if others else set()
    excluded = set(draw(st.lists(st.sampled_from(others), max_size=2))) if others else set()
    return parents, threads, vanished, excluded


def _walk(fs: ProcFS, source: ChildrenFiles | PpidScan, excluded: set[int]) -> list[int]:
    seen: list[int] = []

    def visit(pid: int) -> Stat | None:
        if pid in excluded:
            return None
        stat = fs.stat(pid)
        if stat is not None:
            seen.append(pid)
        return stat

    source.refresh()
    for _ in walk([1], visit, source):
        pass
    return seen


def _assert_depth_first(order: list[int], parents: dict[int, int]) -> None:
    """Every process comes after its parent, and a subtree is never interleaved with
    another: after a process, the walk only returns to an ancestor's other children."""
    position = {pid: i for i, pid in enumerate(order)}
    for pid in order[1:]:
        assert position[parents[pid]] < position[pid]
    stack: list[int] = []
    for pid in order:
        while stack and stack[-1] != parents.get(pid):
            stack.pop()
        assert pid == order[0] or stack, f"{pid} is not inside its parent's subtree"
        stack.append(pid)


@settings(max_examples=60)
@given(forests())
def test_walk_is_parent_first_and_both_sources_agree(
    forest: tuple[dict[int, int], dict[int, int], set[int], set[int]],
) -> None:
    parents, threads, vanished, excluded = forest
    with tempfile.TemporaryDirectory() as root:
        _write(root, parents, threads, vanished)
        fs = ProcFS(root)
        expected = _expected(parents, vanished, excluded)
        via_files = _walk(fs, ChildrenFiles(fs), excluded)
        # Siblings forked by different threads may come in any order; the set, the
        # parent-first order and contiguous subtrees (depth-first) are what matter.
        assert sorted(via_files) == sorted(expected)
        _assert_depth_first(via_files, parents)
        if not vanished:  # a vanished process's children: only the scan would see them
            assert _walk(fs, PpidScan(fs), excluded) == expected


def test_children_of_secondary_threads_are_found() -> None:
    with tempfile.TemporaryDirectory() as root:
        # 3 children of process 1, which has 3 threads: children 2 and 5 are forked by
        # secondary threads (see _write), so only their thread's children file lists them.
        _write(root, {2: 1, 3: 1, 5: 1}, {1: 3}, set())
        with open(f"{root}/1/task/1/children") as f:
            assert f.read().split() == ["3"]
        fs = ProcFS(root)
        assert sorted(_walk(fs, ChildrenFiles(fs), set())) == [1, 2, 3, 5]
