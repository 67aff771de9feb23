"""The cgroup freezer backends on real cgroups (v2 and the v1 freezer) with real trees.

Every cgroup a test makes is killed empty and removed by the ``cgroup`` fixture, even when
the test fails; v2-frozen tasks show ``S`` in /proc, so "frozen" is checked by counters
that must not move.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import treeguard
from tests import proc
from tests.conftest import MakeCgroup, require_root, slot, zombie_children
from treeguard import ProcessesGuard
from treeguard._backends import Plan, thaw_described, validate_described
from treeguard._backends._cgroup import CgroupV2Backend
from treeguard._backends._freezers import thaw_cgroup
from treeguard._delegation import choose
from treeguard._drive import Steps, run_async
from treeguard._subreaper import is_subreaper, set_subreaper
from treeguard._workers import WorkerTree, chain, demo_spec, wide
from treeguard._workers import counters_moving as moved
from treeguard.cgroup import Cgroup, discover, parse_proc_cgroup
from treeguard.errors import (
    CgroupError,
    CgroupUnavailableError,
    InvalidArgumentError,
)
from treeguard.procfs import ProcFS


def _in_cgroup(pid: int, cg: Cgroup) -> bool:
    text = ProcFS().read(f"{pid}/cgroup")
    assert text is not None
    rel = parse_proc_cgroup(text.decode()).get("" if cg.version == 2 else "freezer")
    found = discover()
    hierarchy = found.v2 if cg.version == 2 else found.freezer
    assert hierarchy is not None
    assert rel is not None
    return hierarchy.directory(rel) == cg.path


def _main_slots(tree: WorkerTree) -> list[int]:
    return [slot(i) for i in range(tree.size)]


@pytest.mark.parametrize("version", [2, 1])
def test_freeze_and_thaw_a_tree_with_threads(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    assert sorted(cg.pids()) == sorted(tree.pids)
    guard = ProcessesGuard(backend="cgroup")
    with guard:
        assert cg.frozen
        assert guard.report.backend == "cgroup"
        assert guard.report.stopped == tree.size
        assert guard.report.tasks > tree.size  # the threads are counted too
        assert sorted(guard.pids) == sorted(tree.pids)
        assert guard.pids[0] == tree.root  # parent-first
        assert ("cgroup.events" if version == 2 else "freezer.state") in guard.report.verified_by
        assert proc.counters_still(tree.counters, tree.period)
        if version == 2:
            # Invisible to the tasks: no job-control stop, they sleep in the freezer.
            assert not proc.stopped(tree.pids)
    assert not cg.frozen
    proc.counters_moving(tree.counters, _main_slots(tree))
    proc.assert_none_stopped(tree.pids)


FORKER = r"""
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
print(os.getpid(), flush=True)
while True:
    if os.fork() == 0:
        if os.fork() == 0:
            time.sleep(0.02)
            os._exit(0)
        time.sleep(0.02)
        os._exit(0)
    time.sleep(0.001)
"""


@pytest.mark.parametrize("version", [2, 1])
def test_a_tree_that_forks_continuously_is_frozen_in_one_step(
    version: int, cgroup: MakeCgroup
) -> None:
    cg = cgroup(version)
    forker = cg.spawn([sys.executable, "-c", FORKER], stdout=subprocess.PIPE)
    assert forker.stdout is not None
    forker.stdout.readline()
    proc.wait_until(lambda: len(cg.pids()) > 3, what="the tree to fork")
    guard = ProcessesGuard(backend="cgroup", timeout=5.0)
    with guard:
        assert guard.report.passes == 1
        inside = sorted(cg.pids())
        assert sorted(guard.pids) == inside
        assert guard.report.stopped == len(inside)
        # Nothing is born, nothing dies while frozen.
        for _ in range(5):
            proc.wait_until(lambda: True)
            assert sorted(cg.pids()) == inside
    forker.stdout.close()


@pytest.mark.parametrize("version", [2, 1])
def test_a_direct_freeze_counts_exactly_what_it_froze(version: int, cgroup: MakeCgroup) -> None:
    # The cgroup is listed while the kernel freezes it and once more when frozen: with
    # processes born and dying all the time, the counts must be those of the frozen cgroup.
    cg = cgroup(version)
    forker = cg.spawn([sys.executable, "-c", FORKER], stdout=subprocess.PIPE)
    assert forker.stdout is not None
    with forker.stdout:
        forker.stdout.readline()
        proc.wait_until(lambda: len(cg.pids()) > 3, what="the tree to fork")
        for _ in range(5):
            report = cg.freeze(timeout=5.0)
            try:
                tasks = "cgroup.threads" if version == 2 else "tasks"
                with open(os.path.join(cg.path, tasks)) as f:
                    assert report.tasks == len(f.read().split())
                assert report.stopped == len(cg.pids())
            finally:
                cg.thaw()


def test_spawned_child_forking_at_once_stays_inside(cgroup: MakeCgroup) -> None:
    cg = cgroup(2)
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    p = cg.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None
    child = int(p.stdout.readline())
    assert _in_cgroup(p.pid, cg)
    assert _in_cgroup(child, cg)
    assert sorted(cg.pids()) == sorted([p.pid, child])
    p.stdout.close()


def test_adopt_moves_a_whole_tree(cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]) -> None:
    cg = cgroup(2)
    tree = make_tree(demo_spec())
    assert not any(_in_cgroup(pid, cg) for pid in tree.pids)
    moved = cg.adopt([tree.root])
    assert sorted(moved) == sorted(tree.pids)
    assert sorted(cg.pids()) == sorted(tree.pids)
    assert cg.adopt([tree.root]) == []  # nothing left outside
    with ProcessesGuard(tree.root, include_root=True, backend="cgroup") as guard:
        assert guard.report.backend == "cgroup"
        assert proc.counters_still(tree.counters, tree.period)
    proc.counters_moving(tree.counters, _main_slots(tree))
    with pytest.raises(InvalidArgumentError):
        cg.adopt([os.getpid()])
    with pytest.raises(InvalidArgumentError):
        cg.adopt([os.getppid()])


def test_v1_state_from_before_is_restored(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(1)
    tree = make_tree({"threads": 1, "children": [{}]}, spawn=cg.spawn)
    state = os.path.join(cg.path, "freezer.state")
    with open(state, "w") as f:
        f.write("FROZEN")
    proc.wait_until(lambda: cg.frozen, what="FROZEN")
    try:
        with ProcessesGuard(backend="cgroup") as guard:
            assert guard.report.stopped == 2
        with open(state) as f:
            assert f.read().strip() == "FROZEN"
        assert proc.counters_still(tree.counters, tree.period)
    finally:
        with open(state, "w") as f:
            f.write("THAWED")
    proc.counters_moving(tree.counters, _main_slots(tree))


class _Writes:
    """Every write to a file, seen by inotify (IN_MODIFY, IN_CLOSE_WRITE: inotify(7)), to
    prove that a control file was never written, not even for a moment."""

    def __init__(self, path: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        assert libc.inotify_add_watch(self.fd, os.fsencode(path), 0x2 | 0x8) >= 0

    def seen(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("version", [2, 1])
def test_refused_before_freezing_when_a_process_that_must_run_is_inside(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    writes = _Writes(os.path.join(cg.path, "cgroup.freeze" if version == 2 else "freezer.state"))
    try:
        monitor = tree.pids[1]
        with pytest.raises(CgroupError, match="excluded"):
            ProcessesGuard(exclude=[monitor], backend="cgroup").freeze()
        with pytest.raises(CgroupError, match="outside the tree"):
            ProcessesGuard(tree.root, backend="cgroup").freeze()  # the root is not frozen
        assert not writes.seen()  # nothing was frozen, not even for a moment
        proc.counters_moving(tree.counters, _main_slots(tree))
        cg.freeze()  # the watch does see a freeze
        cg.thaw()
        assert writes.seen()
    finally:
        writes.close()


def test_refused_and_thawed_when_the_cgroup_holds_an_outsider(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    outsider = make_tree({"threads": 1}, spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup")
    with pytest.raises(CgroupError, match=f"outside the tree: {outsider.root} "):
        guard.freeze()
    assert not guard.frozen
    assert proc.read_text(os.path.join(cg.path, "cgroup.freeze")).strip() == "0"
    assert not cg.frozen
    proc.counters_moving(outsider.counters, [slot(0), slot(0, 1)])
    proc.counters_moving(tree.counters, _main_slots(tree))
    # (Closed first: the guard holds cgroup.freeze open for writing since its freeze, and
    # the close of that descriptor is an IN_CLOSE_WRITE.)
    guard.close()
    # backend="auto" proves it before freezing: the next way (ptrace, as root) runs, the
    # cgroup is never written.
    writes = _Writes(os.path.join(cg.path, "cgroup.freeze"))
    try:
        with ProcessesGuard(tree.root, include_root=True, backend="auto") as guard:
            assert guard.report.backend == "ptrace"
            assert "outside the tree" in guard.report.declined["cgroup"]
            assert not proc.not_stopped(tree.pids)
        assert not writes.seen()
    finally:
        writes.close()
    proc.assert_none_stopped(tree.pids)


def test_refused_and_thawed_when_part_of_the_tree_is_elsewhere(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg, other = cgroup(2), cgroup(2)
    tree = make_tree({"children": [{}, {}]}, spawn=cg.spawn)
    moved = tree.pids[2]
    assert other.adopt([moved]) == [moved]
    with pytest.raises(CgroupError, match=f"in another cgroup: {moved} "):
        ProcessesGuard(tree.root, include_root=True, backend="cgroup").freeze()
    assert not cg.frozen
    proc.counters_moving(tree.counters, _main_slots(tree))


@pytest.mark.parametrize("version", [2, 1])
def test_a_descendant_elsewhere_below_processes_whose_parents_are_known(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # A grandchild moved out: every process left in the cgroup has its parent there, so
    # a census that stops reading once each has one never reads the child's parent's file.
    cg, other = cgroup(version), cgroup(version)
    tree = make_tree({"children": [{"children": [{}]}, {}]}, spawn=cg.spawn)
    moved = tree.pids[2]
    assert proc.ppid(moved) == tree.pids[1]
    assert other.adopt([moved]) == [moved]
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup")
    try:
        with pytest.raises(CgroupError, match=f"in another cgroup: {moved} "):
            guard.freeze()
    finally:
        guard.release()
    assert not cg.frozen
    assert _control(cg) == _THAWED[version]
    proc.counters_moving(tree.counters, _main_slots(tree))
    # auto goes on to ptrace (as root), which holds the moved grandchild too.
    with ProcessesGuard(tree.root, include_root=True, backend="auto") as guard:
        assert guard.report.backend == "ptrace"
        assert "cgroup" in guard.report.declined
        assert proc.state(moved) == "t"
        assert not proc.not_stopped(tree.pids)
        assert not cg.frozen
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, _main_slots(tree))


_THAWED = {2: "0", 1: "THAWED"}


def _control(cg: Cgroup) -> str:
    """What the cgroup's freezer control file says (``cgroup.freeze``, ``freezer.state``)."""
    name = "cgroup.freeze" if cg.version == 2 else "freezer.state"
    return proc.read_text(os.path.join(cg.path, name)).strip()


def _thaw_directly(cg: Cgroup) -> None:
    """Write the thaw to the control file, not through treeguard (a failed test's cleanup:
    a v1-frozen task does not even act on SIGKILL)."""
    name = "cgroup.freeze" if cg.version == 2 else "freezer.state"
    with open(os.path.join(cg.path, name), "w") as f:
        f.write(_THAWED[cg.version])


def _threaded(cg: Cgroup) -> None:
    with open(os.path.join(cg.path, "cgroup.type"), "w") as f:
        f.write("threaded")


@pytest.mark.parametrize("version", [2, 1])
def test_refused_when_a_thread_of_the_tree_lives_in_another_cgroup(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # v1: any task may be moved on its own (its TID written to another cgroup's tasks);
    # v2: threads of a process spread over the threaded cgroups below one domain.
    if version == 2:
        domain = cgroup(2)
        cg, other = cgroup(2, parent=domain.path), cgroup(2, parent=domain.path)
        _threaded(cg)
        _threaded(other)
        tasks = "cgroup.threads"
    else:
        cg, other = cgroup(1), cgroup(1)
        tasks = "tasks"
    tree = make_tree({"threads": 1, "children": [{"threads": 1}]}, spawn=cg.spawn)
    worker = tree.pids[1]
    (tid,) = set(proc.task_states(worker)) - {worker}
    with open(os.path.join(other.path, tasks), "w") as f:
        f.write(str(tid))
    thread = [slot(1, 1)]  # the moved thread's counter
    stays = [slot(0), slot(0, 1), slot(1)]

    def counters(indexes: list[int]) -> Callable[[], list[int]]:
        return lambda: [tree.counters()[i] for i in indexes]

    # The cgroup frozen as it is: the thread elsewhere runs on. (Frozen while it held
    # the GIL, the process's main thread would stall it: tried again then.)
    for _ in range(5):
        report = cg.freeze()
        try:
            # (v2: a threaded cgroup lists no processes: each is learnt from its threads)
            assert (report.stopped, report.tasks) == (2, 3)
            assert proc.counters_still(counters(stays), tree.period)
            if moved(tree.counters, thread, 1.0):
                break
        finally:
            cg.thaw()
    else:
        pytest.fail(f"thread {tid} never ran while its cgroup was frozen")
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup")
    try:
        guard.freeze()
    except CgroupError as err:
        problem = err.problem
    else:
        try:
            running = not proc.counters_still(counters(thread), tree.period)
        finally:
            guard.release()
        pytest.fail(f"reported frozen while thread {tid} ran on (it did: {running})")
    assert f"thread {tid} of PID {worker} " in problem
    assert "another cgroup" in problem
    assert not guard.frozen
    assert not cg.frozen and _control(cg) == _THAWED[version]
    proc.counters_moving(tree.counters, stays + thread)
    # auto: the same proof before it freezes anything, and the next way (ptrace) instead.
    with ProcessesGuard(tree.root, include_root=True, backend="auto") as guard:
        assert guard.report.backend == "ptrace"
        assert not proc.not_stopped(tree.pids)
    proc.counters_moving(tree.counters, stays + thread)


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("after_the_write", [False, True])
def test_a_release_cut_short_is_finished_by_the_next(
    version: int,
    after_the_write: bool,
    cgroup: MakeCgroup,
    make_tree: Callable[..., WorkerTree],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # KeyboardInterrupt while the thaw is written (before the write, or once it is made):
    # the cgroup's state is forgotten only after the thaw was written, so the next
    # release() writes it (again).
    from treeguard._backends import _freezer_base

    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    guard = ProcessesGuard(backend="cgroup").freeze()
    freezer = _freezer_base.CgroupFreezer
    real = freezer.put

    def interrupted(self: _freezer_base.CgroupFreezer, name: str, value: str) -> None:
        if value == _THAWED[version]:
            monkeypatch.setattr(freezer, "put", real)  # once
            if after_the_write:
                real(self, name, value)
            raise KeyboardInterrupt
        real(self, name, value)

    monkeypatch.setattr(freezer, "put", interrupted)
    try:
        # release() holds the interrupt until its thaw, run again, is done; then raises it.
        with pytest.raises(KeyboardInterrupt):
            guard.release()
        assert not guard.frozen
        assert not cg.frozen and _control(cg) == _THAWED[version]
        guard.release()  # nothing left to do
        assert not guard.frozen
        assert not cg.frozen and _control(cg) == _THAWED[version]
    finally:
        _thaw_directly(cg)
    proc.counters_moving(tree.counters, _main_slots(tree))


@pytest.mark.parametrize("version", [2, 1])
def test_a_direct_thaw_cut_short_is_finished_by_the_next(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree], monkeypatch: Any
) -> None:
    from treeguard._backends import _freezer_base

    cg = cgroup(version)
    tree = make_tree({"threads": 1}, spawn=cg.spawn)
    cg.freeze()
    freezer = _freezer_base.CgroupFreezer
    real = freezer.put

    def interrupted(self: _freezer_base.CgroupFreezer, name: str, value: str) -> None:
        monkeypatch.setattr(freezer, "put", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(freezer, "put", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            cg.thaw()
        assert cg.frozen
        cg.thaw()
        assert not cg.frozen and _control(cg) == _THAWED[version]
    finally:
        _thaw_directly(cg)
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_top_processes_in_sibling_cgroups_freeze_their_common_parent(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # The candidate comes from the first top process; when the census finds the other
    # tops elsewhere, the closest cgroup holding them all is frozen instead.
    parent = cgroup(2)
    left, right = cgroup(2, parent=parent.path), cgroup(2, parent=parent.path)
    tree = make_tree({"children": [{}, {}]})
    first, second = tree.pids[1], tree.pids[2]
    assert left.adopt([first]) == [first] and right.adopt([second]) == [second]
    with ProcessesGuard(tree.root, backend="cgroup") as guard:
        assert parent.frozen
        assert guard.report.stopped == 2
        assert sorted(guard.pids) == [first, second]
        children = [slot(1), slot(2)]
        assert proc.counters_still(lambda: [tree.counters()[i] for i in children], tree.period)
        proc.counters_moving(tree.counters, [slot(0)])  # the root runs on
    assert not parent.frozen
    proc.counters_moving(tree.counters, _main_slots(tree))


@pytest.mark.parametrize("version", [2, 1])
def test_a_process_in_a_cgroup_below_is_frozen_and_counted(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # The freezer is hierarchical: a child cgroup is frozen with its parent, and the
    # census lists it too (v2 learns that it exists from cgroup.stat, v1 by walking).
    cg = cgroup(version)
    below = cgroup(version, parent=cg.path)
    tree = make_tree({"children": [{}, {}]}, spawn=cg.spawn)
    moved = tree.pids[2]
    assert below.adopt([moved]) == [moved]
    with ProcessesGuard(tree.root, include_root=True, backend="cgroup") as guard:
        assert cg.frozen
        # The child's own flag may be published a moment after its parent's; what counts
        # is that its process does not run (the counters below).
        proc.wait_until(lambda: below.frozen, 5, "the child cgroup to say frozen")
        assert guard.report.stopped == 3
        assert sorted(guard.pids) == sorted(tree.pids)
        assert proc.counters_still(tree.counters, tree.period)
    assert not cg.frozen and not below.frozen
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_the_event_loop_runs_while_the_kernel_freezes(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The write to cgroup.freeze (milliseconds for a big cgroup) happens in a thread of its
    # own. Here it is held until a task of the event loop lets it go: a freeze that blocked
    # the loop would never see that task run, and its write would give up.
    from treeguard._backends import _freezer_base

    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    monkeypatch.setattr(_freezer_base, "_FEW_TASKS", 8)  # a tree this small is written to in place
    freezer = _freezer_base.CgroupFreezer
    real_write = freezer.put

    async def freeze_while_the_loop_runs() -> None:
        writing, go_on = threading.Event(), threading.Event()

        def held_write(self: _freezer_base.CgroupFreezer, name: str, value: str) -> None:
            if name == "cgroup.freeze" and value == "1":
                writing.set()
                if not go_on.wait(10):
                    raise RuntimeError("the event loop did not run while the kernel froze")
            real_write(self, name, value)

        async def let_it_go() -> None:
            assert await anyio.to_thread.run_sync(writing.wait, 10)
            go_on.set()

        monkeypatch.setattr(freezer, "put", held_write)
        async with anyio.create_task_group() as tg:
            tg.start_soon(let_it_go)
            async with treeguard.guard(root=tree.root, include_root=True, backend="cgroup") as g:
                assert cg.frozen
                assert g.report.stopped == tree.size
                assert proc.counters_still(tree.counters, tree.period)
        monkeypatch.setattr(freezer, "put", real_write)
        assert not cg.frozen

    for backend in ("asyncio", "trio"):
        anyio.run(freeze_while_the_loop_runs, backend=backend)
    proc.counters_moving(tree.counters, _main_slots(tree))


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize(
    "case", ["many tasks", "few tasks", "no thread to be had", "no descriptor to be had"]
)
@pytest.mark.parametrize("thaw", ["sync", "async"])
def test_who_writes_the_freeze(
    version: int,
    case: str,
    thaw: str,
    cgroup: MakeCgroup,
    make_tree: Callable[..., WorkerTree],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # For many tasks a thread of its own writes, so that the census (and an event loop)
    # runs meanwhile; for a cgroup with few tasks, or where no thread can be had
    # (RLIMIT_NPROC, ...), the caller does. The same small tree counts as many tasks when a
    # list of 8 bytes is too long. Under an event loop, the thaw of a cgroup whose freeze a
    # thread wrote is written by a thread too when its task list is long (it takes as long);
    # a synchronous caller, who waits anyway, writes it.
    from treeguard import _cgroupfs
    from treeguard._backends import _freezer_base

    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    if case != "few tasks":
        monkeypatch.setattr(_freezer_base, "_FEW_TASKS", 8)
    monkeypatch.setattr(_freezer_base, "_MANY_TASKS", 8)
    real_write = _freezer_base.CgroupFreezer.put
    writers: list[int] = []
    refused: list[int] = []

    def recorded_write(self: _freezer_base.CgroupFreezer, name: str, value: str) -> None:
        writers.append(threading.get_ident())
        real_write(self, name, value)

    def no_thread(*args: object) -> int:
        refused.append(1)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_freezer_base.CgroupFreezer, "put", recorded_write)

    def no_descriptor(*args: object) -> int:
        refused.append(1)
        raise OSError(errno.EMFILE, "Too many open files")

    if case == "no thread to be had":
        monkeypatch.setattr(_cgroupfs._thread, "start_new_thread", no_thread)
    if case == "no descriptor to be had":  # for the eventfd that says the write is over
        monkeypatch.setattr(_cgroupfs.os, "eventfd", no_descriptor)
    guard = ProcessesGuard(root=tree.root, include_root=True, backend="cgroup").freeze()
    try:
        assert cg.frozen
        assert guard.report.stopped == tree.size
        assert proc.counters_still(tree.counters, tree.period)
        if thaw == "async":
            anyio.run(run_async, guard._thaw_steps())
    finally:
        guard.release()
    assert not cg.frozen
    assert bool(refused) is case.startswith("no ")
    by_caller = [w == threading.get_ident() for w in writers]  # the freeze, the thaw
    assert by_caller == [case != "many tasks", thaw == "sync" or case != "many tasks"]
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_a_cgroup_with_cgroups_below_is_not_counted_as_few_tasks(cgroup: MakeCgroup) -> None:
    from treeguard._backends import _freezers

    cg = cgroup(2)
    freezer = _freezers.V2Freezer(cg.path)
    assert freezer.has_few_tasks()
    below = os.path.join(cg.path, "below")
    os.mkdir(below)
    try:
        assert not freezer.has_few_tasks()
    finally:
        os.rmdir(below)


def test_the_wait_is_woken_by_the_change_of_cgroup_events(cgroup: MakeCgroup) -> None:
    # The kernel's notification wakes the waiter (POLLPRI, seen through epoll), and the
    # waiter's read clears it: no change missed, no wake-up without one.
    from treeguard import _cgroupfs

    cg = cgroup(2)
    events = _cgroupfs._Events(os.path.join(cg.path, "cgroup.events"))
    try:
        assert events.read() == {"populated": "0", "frozen": "0"}
        fd = events.ready_fd()
        assert fd is not None
        assert not select.select([fd], [], [], 0)[0]
        _cgroupfs.write_file(os.path.join(cg.path, "cgroup.freeze"), "1")  # empty: frozen at once
        assert select.select([fd], [], [], 5.0)[0]
        fields = events.read()
        assert fields is not None and fields["frozen"] == "1"
        assert not select.select([fd], [], [], 0)[0]
    finally:
        events.close()
        _cgroupfs.write_file(os.path.join(cg.path, "cgroup.freeze"), "0")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_event_loop_is_woken_by_the_change_of_cgroup_events(
    backend: str, cgroup: MakeCgroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cgroup freezes once the wait has begun; the event loop's wait must end because
    # the descriptor turned ready, not at the (here 30 s) re-read.
    from treeguard import _cgroupfs
    from treeguard._backends import _freezer_v2, _freezers

    cg = cgroup(2)
    monkeypatch.setattr(_freezer_v2, "_RECHECK", 30.0)
    control = os.path.join(cg.path, "cgroup.freeze")
    ready_at_wake: list[bool] = []

    def freezing_once_waiting(steps: Steps[bool]) -> Steps[bool]:
        wait = next(steps)
        try:
            while True:
                if wait.fd is not None and not ready_at_wake:
                    _cgroupfs.write_file(control, "1")  # empty: frozen at once
                yield wait
                if wait.fd is not None:
                    ready_at_wake.append(bool(select.select([wait.fd], [], [], 0)[0]))
                wait = steps.send(None)
        except StopIteration as done:
            return done.value

    async def main() -> bool:
        steps = _freezers.V2Freezer(cg.path)._wait_for("1", time.perf_counter() + 60)
        return await run_async(freezing_once_waiting(steps))

    try:
        assert anyio.run(main, backend=backend)
        assert ready_at_wake == [True]
    finally:
        _cgroupfs.write_file(control, "0")


def test_a_deep_tree_is_proven_level_by_level(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    tree = make_tree(chain(4, width=2, threads=1), spawn=cg.spawn)
    with ProcessesGuard(tree.root, include_root=True, backend="cgroup") as guard:
        assert guard.report.stopped == tree.size
        assert sorted(guard.pids) == sorted(tree.pids)
        order = {pid: i for i, pid in enumerate(guard.pids)}
        for pid in tree.pids[1:]:
            assert order[proc.ppid(pid)] < order[pid]  # parent-first
        assert proc.counters_still(tree.counters, tree.period)
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_refused_for_a_tree_in_no_cgroup_of_its_own(make_tree: Callable[..., WorkerTree]) -> None:
    tree = make_tree(demo_spec())
    with pytest.raises(CgroupError):
        ProcessesGuard(tree.root, include_root=True, backend="cgroup").freeze()
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_auto_picks_the_cgroup_only_for_a_tree_alone_in_a_treeguard_cgroup(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    inside = make_tree(demo_spec(), spawn=cg.spawn)
    with ProcessesGuard(inside.root, include_root=True, backend="auto") as guard:
        assert guard.report.backend == "cgroup"
        assert cg.frozen
        assert guard.report.declined == {}
    outside = make_tree(demo_spec())
    # Not in a cgroup of its own: ptrace (root may trace), which nothing in the tree sees.
    with ProcessesGuard(outside.root, include_root=True, backend="auto") as guard:
        assert guard.report.backend == "ptrace"
        assert set(guard.report.declined) == {"cgroup"}
        assert {t for p in outside.pids for t in proc.task_states(p).values()} == {"t"}
    proc.assert_none_stopped(outside.pids)
    # A hold ends with this process: a lease or a token (thawed elsewhere) gets signals.
    with ProcessesGuard(outside.root, include_root=True, backend="auto", max_frozen=60) as guard:
        assert guard.report.backend == "signal"
        assert set(guard.report.declined) == {"cgroup", "ptrace"}
        proc.assert_all_stopped(outside.pids)
    guard.close()
    token = treeguard.freeze(outside.root, include_root=True, backend="auto")
    try:
        assert token.backend == "signal"
        proc.assert_all_stopped(outside.pids)
    finally:
        treeguard.thaw(token)
    proc.assert_none_stopped(outside.pids)


def test_create_refused_without_permission(cgroup: MakeCgroup) -> None:
    # A forked child drops to nobody (everything is imported already) and reports back.
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            os.setgid(65534)
            os.setuid(65534)
            try:
                made = Cgroup.create()
                os.write(wfd, b"made " + made.path.encode())
                os.rmdir(made.path)
            except CgroupUnavailableError as err:
                os.write(wfd, b"refused: " + str(err).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as f:
            said = f.read().decode()
    finally:
        os.waitpid(pid, 0)
    assert said.startswith("refused:"), said
    assert "delegated" in said


def test_create_refused_outside_the_hierarchy(tmp_path: Any) -> None:
    require_root("cgroup tests")
    with pytest.raises(CgroupUnavailableError, match="not in the cgroup"):
        Cgroup.create(parent=str(tmp_path))


def test_create_names_a_missing_parent_as_missing() -> None:
    require_root("cgroup tests")
    hierarchy, _ = choose(discover())
    gone = os.path.join(hierarchy.mountpoint, f"treeguard-gone-{os.urandom(4).hex()}")
    with pytest.raises(CgroupUnavailableError, match="no such directory") as caught:
        Cgroup.create(parent=gone)
    assert caught.value.path == gone and "run as root" not in str(caught.value)
    assert not os.path.exists(gone)


@pytest.mark.parametrize(
    ("option", "value"),
    [("name", "treeguard-a\0b"), ("version", True), ("version", False), ("parent", "/x\0")],
)
def test_create_refuses_malformed_arguments_touching_nothing(option: str, value: Any) -> None:
    require_root("cgroup tests")
    hierarchy, where = choose(discover())
    before = sorted(os.listdir(where))
    with pytest.raises(InvalidArgumentError, match=option):
        Cgroup.create(**{option: value})
    assert sorted(os.listdir(where)) == before
    with pytest.raises(InvalidArgumentError, match="version"):
        Cgroup(where, version=True)


def test_direct_freeze_and_async_driver(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    report = cg.freeze()
    try:
        assert cg.frozen
        assert report.stopped == tree.size
        assert proc.counters_still(tree.counters, tree.period)
    finally:
        cg.thaw()
    assert not cg.frozen

    async def freeze_and_thaw() -> None:
        backend = CgroupV2Backend(Plan.bare(scope="cgroup"), cg.path)
        await run_async(backend.freeze())
        assert cg.frozen
        await run_async(backend.thaw())

    for backend in ("asyncio", "trio"):
        anyio.run(freeze_and_thaw, backend=backend)
        assert not cg.frozen
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_described_freeze_is_thawed_elsewhere(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    guard = ProcessesGuard(backend="cgroup").freeze()
    try:
        assert guard._backend is not None
        payload = guard._backend.describe()
        inode = os.stat(cg.path).st_ino
        assert payload == {"version": 2, "path": cg.path, "inode": inode, "was_frozen": False}
        # Another cgroup under the same name (another inode) is not thawed.
        assert thaw_described("cgroup", {**payload, "inode": inode + 1}) == 0
        assert cg.frozen
        validate_described("cgroup", payload)
        code = (
            "import json, sys\nfrom treeguard._backends import thaw_described\n"
            "print(thaw_described('cgroup', json.loads(sys.argv[1])))\n"
        )
        import json

        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(payload)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert out.stdout.strip() == "1"
        assert not cg.frozen
        proc.counters_moving(tree.counters, _main_slots(tree))
        assert thaw_described("cgroup", payload) == 1  # twice is harmless
    finally:
        guard.release()


def test_public_faces(cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]) -> None:
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)

    def frozen_now() -> bool:
        return cg.frozen and proc.counters_still(tree.counters, tree.period)

    assert treeguard.freezethaw(frozen_now, backend="cgroup")
    assert not cg.frozen

    async def in_async() -> None:
        async with treeguard.guard(backend="cgroup") as guard:
            assert guard.report.backend == "cgroup"
            assert cg.frozen

    anyio.run(in_async)
    assert not cg.frozen

    token = treeguard.freeze(backend="cgroup")
    try:
        assert token.backend == "cgroup"
        assert cg.frozen
        again = treeguard.Token.from_json(token.to_json())
    finally:
        treeguard.thaw(token)
    assert not cg.frozen
    treeguard.thaw(again)
    proc.counters_moving(tree.counters, _main_slots(tree))


def test_context_manager_kills_what_it_spawned_and_removes_itself() -> None:
    require_root("cgroup tests")
    with Cgroup.create() as cg:
        p = cg.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
        proc.wait_until(lambda: cg.pids() == [p.pid], what="the child inside")
        cg.freeze()
    assert p.returncode is not None  # killed (thawed first) and reaped
    assert not os.path.exists(cg.path)


@pytest.mark.parametrize("version", [2, 1])
def test_kill_reaps_what_died_on_its_own_meanwhile(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # The workers die with their parent (PR_SET_PDEATHSIG): killed first, the root takes
    # them down before kill() reaches them, and they become this process's children (a
    # subreaper while it kills). kill() must reap them too, not leave them as zombies.
    before = zombie_children()
    cg = cgroup(version)
    tree = make_tree(wide(40), spawn=cg.spawn)
    cg.kill()
    assert cg.pids() == []
    assert zombie_children() - before == set()
    assert not any(proc.task_states(pid) for pid in tree.pids)


def test_kill_leaves_the_callers_own_children_to_it(cgroup: MakeCgroup) -> None:
    # A child this process started itself (not by spawn), with a grandchild, is adopted and
    # killed: its exit status stays with its Popen, and the grandchild, orphaned onto this
    # process while kill() runs, is reaped by kill().
    before = zombie_children()
    cg = cgroup(2)
    script = "import subprocess, sys; subprocess.Popen(['sleep', '60']); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    grandchildren: list[int] = []
    try:
        proc.wait_until(lambda: proc.children(child.pid), what="the grandchild")
        grandchildren = proc.children(child.pid)
        cg.adopt([child.pid])
        assert sorted(cg.pids()) == sorted([child.pid, *grandchildren])
        cg.kill()
        assert cg.pids() == []
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert zombie_children() - before == set()
        assert proc.state(grandchildren[0]) is None  # reaped
    finally:
        for pid in {*grandchildren, *proc.children(child.pid)}:  # if adopt() failed
            if proc.state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()


def _open_descriptors() -> set[int]:
    """This process's open descriptors. The listing's own descriptor is listed too, and
    closed by the time it returns: fstat() tells it from the rest."""
    listed = {int(fd) for fd in os.listdir("/proc/self/fd")}
    open_now = set()
    for fd in listed:
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_now.add(fd)
    return open_now


def _limit_leaving(free: int) -> int:
    """The RLIMIT_NOFILE that leaves exactly ``free`` descriptors to open."""
    used = _open_descriptors()
    return next(n for n in itertools.count() if n - len(used & set(range(n))) == free)


@pytest.mark.parametrize("free", [20, 2, 1])
def test_kill_with_few_descriptors_left(free: int, cgroup: MakeCgroup) -> None:
    # 20 processes: with 20 descriptors free, a batch of pidfds fills the table exactly
    # and the listing that follows has none left; with 2, one process is killed a round;
    # with 1, none can be (a pidfd and a read need two): a clear error, nobody killed.
    cg = cgroup(2)
    children = [cg.spawn(["sleep", "60"]) for _ in range(20)]
    proc.wait_until(lambda: len(cg.pids()) == 20, what="the children inside")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_limit_leaving(free), hard))
    try:
        if free < 2:
            with pytest.raises(CgroupError, match="free descriptors"):
                cg.kill()
        else:
            cg.kill()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if free < 2:
        assert sorted(cg.pids()) == sorted(child.pid for child in children)
        cg.kill()
    assert cg.pids() == []
    assert all(child.returncode == -signal.SIGKILL for child in children)


CALLER_INSIDE = r"""
import sys
from treeguard.cgroup import Cgroup
from treeguard.errors import CgroupError
cg = Cgroup(sys.argv[1])
for act in (cg.freeze, cg.kill):
    try:
        act()
        print(act.__name__, "done", flush=True)
    except CgroupError as err:
        print(act.__name__, "refused:", err.problem, flush=True)
"""


@pytest.mark.parametrize("version", [2, 1])
def test_kill_refuses_like_freeze_when_the_caller_is_inside(
    version: int, cgroup: MakeCgroup
) -> None:
    # The caller is a process spawned into the cgroup (never this test runner).
    cg = cgroup(version)
    sleeper = cg.spawn(["sleep", "60"])
    caller = cg.spawn([sys.executable, "-c", CALLER_INSIDE, cg.path], stdout=subprocess.PIPE)
    assert caller.stdout is not None
    with caller.stdout:
        out, _ = caller.communicate(timeout=60)
    assert caller.returncode == 0, (caller.returncode, out)
    assert out.decode().splitlines() == [
        "freeze refused: the calling process is in it and would freeze itself",
        "kill refused: the calling process is in it and would kill itself",
    ]
    assert proc.state(sleeper.pid) in ("S", "R")  # nobody was killed
    assert not cg.frozen


# -- the watchdog thaws a cgroup freeze ------------------------------------------------

SUPERVISOR = r"""
import sys
from treeguard import ProcessesGuard
guard = ProcessesGuard(int(sys.argv[1]), include_root=True, backend="cgroup", watchdog=True)
guard.freeze()
print(guard.report.backend, guard._watchdog.pid, flush=True)
sys.stdin.readline()  # SIGKILL arrives here
"""


@pytest.mark.parametrize("version", [2, 1])
def test_watchdog_thaws_the_cgroup_when_the_supervisor_dies(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    was_subreaper = is_subreaper()
    set_subreaper(True)  # the helper, orphaned by the supervisor's death, is ours to reap
    sup = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tree.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    helper = 0
    try:
        assert sup.stdout is not None
        backend, helper_pid = sup.stdout.readline().split()
        helper = int(helper_pid)
        assert backend == "cgroup"
        assert cg.frozen
        assert proc.counters_still(tree.counters, tree.period)
        sup.kill()
        assert sup.wait(timeout=10) == -9
        proc.wait_until(lambda: not cg.frozen, 10, "the helper to thaw the cgroup")
        proc.counters_moving(tree.counters, _main_slots(tree))
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.wait()
        for stream in (sup.stdin, sup.stdout):
            if stream is not None:
                stream.close()
        if helper:
            proc.wait_until(
                lambda: set(proc.task_states(helper).values()) <= {"Z"}, 10, "the helper to exit"
            )
            try:
                os.waitpid(helper, 0)
            except ChildProcessError:
                pass  # reaped before it was re-parented to us
        set_subreaper(was_subreaper)


@pytest.mark.parametrize("version", [2, 1])
def test_watchdog_lease_thaws_the_cgroup_and_leaves_one_frozen_before_alone(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup", max_frozen=0.2)
    try:
        with guard:
            assert guard.report.backend == "cgroup"
            assert cg.frozen
            proc.wait_until(lambda: not cg.frozen, 10, "the lease to thaw the cgroup")
            proc.counters_moving(tree.counters, _main_slots(tree))
        assert guard.report.lease_expired
        # A cgroup frozen before the guard is not the guard's to thaw, nor its watchdog's.
        cg.freeze()
        try:
            with guard:
                assert guard._watchdog is not None
                proc.wait_until(guard._watchdog.lease_expired, 10, "the lease to run out")
                assert cg.frozen
                assert proc.counters_still(tree.counters, tree.period)
            assert cg.frozen
        finally:
            cg.thaw()
    finally:
        if guard._watchdog is not None:
            guard._watchdog.close()
    proc.counters_moving(tree.counters, _main_slots(tree))


@pytest.mark.parametrize("version", [2, 1])
def test_watchdog_thaw_checks_the_cgroup_is_the_same(
    version: int, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    """A directory whose inode changed is another cgroup, made again under the same name."""
    cg = cgroup(version)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    inode = os.stat(cg.path).st_ino
    cg.freeze()
    try:
        assert thaw_cgroup(version, cg.path, inode + 1) == 0
        assert cg.frozen
        assert thaw_cgroup(version, cg.path, inode) == 1
        assert not cg.frozen
        assert thaw_cgroup(version, cg.path, inode) == 1  # twice is harmless
        assert thaw_cgroup(version, cg.path) == 1  # (no inode: whatever is there)
        assert thaw_cgroup(version, os.path.join(cg.path, "gone"), inode) == 0
    finally:
        cg.thaw()
    proc.counters_moving(tree.counters, _main_slots(tree))
