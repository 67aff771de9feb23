"""``async with treeguard.guard()`` on asyncio and trio: freezes, keeps the loop running,
and thaws whatever ends the block (cancellation, KeyboardInterrupt, errors)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import treeguard
from tests import proc
from tests.conftest import Ticker, require_root
from treeguard._workers import WorkerTree, demo_spec, wide

pytestmark = pytest.mark.anyio

MakeTree = Callable[..., WorkerTree]


def _running(tree: WorkerTree) -> None:
    """The whole tree runs: no task stopped, and every main-thread counter moves."""
    proc.wait_until(lambda: not proc.stopped(tree.pids), what="the tree to be thawed")
    if tree.mode == "tick":
        proc.counters_moving(tree.counters, [i * 8 for i in range(tree.size)])


async def test_freezes_inside_and_thaws_after(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    async with treeguard.guard(root=tree.root, include_root=True) as g:
        assert isinstance(g, treeguard.ProcessesGuard)
        assert g.frozen
        assert set(g.pids) == set(tree.pids)
        proc.assert_all_stopped(tree.pids)
        assert proc.counters_still(tree.counters, tree.period)
    assert not g.frozen
    _running(tree)


async def test_monitor_pid_and_its_subtree_keep_running(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    monitor = tree.pids[1]  # has two children of its own (pre-order: pids 2 and 3)
    subtree = tree.pids[1:4]
    async with treeguard.guard(tree.root, monitor_pid=monitor, include_root=True) as g:
        assert not set(g.pids) & set(subtree)
        proc.assert_all_stopped(p for p in tree.pids if p not in subtree)
        assert not proc.stopped(subtree)
    _running(tree)


def _cgroup_not_frozen(path: str) -> Callable[[list[int]], list[str]]:
    """A check that the cgroup at ``path`` is frozen, read from its own file (a v2 cgroup's
    frozen tasks sleep, so their states say nothing)."""

    def check(pids: list[int]) -> list[str]:
        with open(f"{path}/cgroup.events") as f:
            return [] if "frozen 1" in f.read() else [path]

    return check


async def _longest_gap_while_frozen(
    tree: WorkerTree,
    backend: str = "signal",
    late_of: Callable[[list[int]], Any] = proc.not_stopped,
) -> float:
    """The longest wait of a task that ticks every 1 ms, from the start of the freeze to
    the end of the thaw."""
    gaps: list[float] = []
    measuring = True
    checks = 0  # bumped around the test's own (blocking) look at /proc

    async def ticker(task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        last = time.perf_counter()
        task_status.started()
        while measuring:
            before = checks
            await anyio.sleep(0.001)
            now = time.perf_counter()
            if checks == before:  # a wait that spanned the test's check is not the core's
                gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        await tg.start(ticker)
        async with treeguard.guard(root=tree.root, include_root=True, backend=backend) as g:  # type: ignore[arg-type]
            assert g.report.stopped == tree.size
            checks += 1
            late = late_of(tree.pids)  # independently, through /proc (or the cgroup's file)
            checks += 1
            assert not late, f"tasks not stopped inside the block: {late}"
            await anyio.sleep(0.005)
        measuring = False
    # Too few ticks to judge counts as a stall: the retry below decides, not this run.
    return max(gaps) if len(gaps) >= 3 else float("inf")


async def test_event_loop_runs_while_a_300_process_tree_freezes(make_tree: MakeTree) -> None:
    """The issue's bound: a task ticking every 1 ms never waits more than 20 ms while a
    300-process tree is frozen and thawed (measured here: 4-8 ms on 2 cores).

    The best of three runs counts: a stall of the freezing core shows in every run, while
    this machine's other work may preempt any single one. A full collection first, because
    a gen-2 collection of the test runner's heap alone takes 10-20 ms."""
    tree = make_tree(wide(300), mode="idle")
    runs = []
    for _ in range(3):
        gc.collect()
        runs.append(await _longest_gap_while_frozen(tree))
        proc.assert_none_stopped(tree.pids)
        if runs[-1] < 0.020:
            break
    print(f"longest event-loop gap, 300 processes: {[f'{g * 1000:.1f} ms' for g in runs]}")
    assert min(runs) < 0.020, f"the event loop stalled for {min(runs) * 1000:.1f} ms"


@pytest.mark.parametrize("backend", ["signal", "cgroup", "ptrace"])
async def test_event_loop_runs_while_1000_processes_freeze_on_every_backend(
    backend: str, make_tree: MakeTree, request: pytest.FixtureRequest
) -> None:
    """A generous bound on every backend, 1,000 processes: a task ticking every 1 ms never
    waits 50 ms (benchmarks/run.py measures the gap: a few ms on 2 idle cores; the core
    yields every 2 ms of work). The best of three runs counts, as above."""
    require_root(f"the {backend} backend on a tree of its own")
    spawn: dict[str, Any] = {}
    late_of: Callable[[list[int]], Any] = proc.not_stopped
    if backend == "cgroup":
        cg = request.getfixturevalue("cgroup")(2)
        spawn["spawn"], late_of = cg.spawn, _cgroup_not_frozen(cg.path)
    tree = make_tree(wide(1000), mode="idle", **spawn)
    runs = []
    for _ in range(3):
        gc.collect()
        runs.append(await _longest_gap_while_frozen(tree, backend, late_of))
        proc.assert_none_stopped(tree.pids)
        if runs[-1] < 0.050:
            break
    print(
        f"longest event-loop gap, 1,000 processes, {backend}: {[f'{g * 1e3:.1f} ms' for g in runs]}"
    )
    assert min(runs) < 0.050, f"the event loop stalled for {min(runs) * 1000:.1f} ms"


async def test_every_other_task_runs_between_two_steps() -> None:
    """Between two stretches of a freeze's work (separated by a yield or a wait), every other
    ready task of the loop gets a turn: on trio too, which runs a batch of ready tasks in
    either order (a task ready at each turn would otherwise see two stretches back to back,
    its loop gap doubled)."""
    from treeguard._drive import YIELD, Steps, Wait, run_async

    turns: list[int] = []  # the ticker's turns seen at each step
    ticker = Ticker()

    def steps() -> Steps[None]:
        for i in range(60):
            turns.append(ticker.ticks)
            yield YIELD if i % 3 else Wait(0.0001)
        turns.append(ticker.ticks)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.lowlevel.checkpoint()
        await run_async(steps())
        tg.cancel_scope.cancel()
    assert all(b > a for a, b in zip(turns, turns[1:], strict=False)), turns


async def test_body_cancelled_by_a_timeout_thaws(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    entered = False
    with anyio.move_on_after(0.05) as scope:
        async with treeguard.guard(root=tree.root, include_root=True):
            entered = True
            await anyio.sleep(30)
    assert entered
    assert scope.cancelled_caught
    _running(tree)


async def test_body_cancelled_by_its_task_group_thaws(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    frozen = anyio.Event()

    async def hold() -> None:
        async with treeguard.guard(root=tree.root, include_root=True):
            frozen.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await frozen.wait()
        proc.assert_all_stopped(tree.pids)
        tg.cancel_scope.cancel()
    _running(tree)


async def test_keyboard_interrupt_in_the_body_thaws(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())

    async def interrupted() -> None:
        async with treeguard.guard(root=tree.root, include_root=True):
            proc.assert_all_stopped(tree.pids)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await interrupted()
    _running(tree)


async def test_an_error_in_the_body_propagates_after_the_thaw(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    with pytest.raises(LookupError, match="from the body"):
        async with treeguard.guard(root=tree.root, include_root=True):
            raise LookupError("from the body")
    _running(tree)


async def test_cancelled_while_entering_leaves_nothing_stopped(make_tree: MakeTree) -> None:
    """Cancel the enter as soon as the freeze has stopped its first process (the root is
    stopped first): the freeze is abandoned half way, and everything is thawed."""
    tree = make_tree(wide(200), mode="idle")
    saw_stopped = False
    body_ran = False

    async def cancel_once_stopping(scope: anyio.CancelScope) -> None:
        nonlocal saw_stopped
        while not proc.stopped([tree.root]):
            await anyio.lowlevel.checkpoint()
        saw_stopped = True
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_stopping, scope)
            async with treeguard.guard(root=tree.root, include_root=True):
                body_ran = True
    assert saw_stopped
    assert not body_ran, "the freeze finished before the cancellation reached it"
    assert scope.cancelled_caught
    proc.assert_none_stopped(tree.pids)


async def test_release_inside_the_body(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    async with treeguard.guard(root=tree.root, include_root=True) as g:
        proc.assert_all_stopped(tree.pids)
        g.release()
        assert not g.frozen
        _running(tree)
    _running(tree)


async def test_one_guard_enters_twice(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    manager = treeguard.guard(root=tree.root, include_root=True)
    for _ in range(2):
        async with manager as g:
            proc.assert_all_stopped(tree.pids)
        assert not g.frozen
        _running(tree)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"timeout": -1}, "timeout"),
        ({"monitor_pid": "12"}, "monitor_pid"),
        ({"monitor_pid": 0}, "monitor_pid"),
        ({"scope": "machine"}, "scope"),
        ({"root": 1, "scope": "namespace"}, "root"),
        ({"frozen": True}, "frozen"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(
    kwargs: dict[str, Any], name: str, make_tree: MakeTree
) -> None:
    tree = make_tree(wide(2))
    with pytest.raises(treeguard.InvalidArgumentError) as info:
        treeguard.guard(**kwargs)
    assert info.value.name == name
    assert not proc.stopped(tree.pids)
