"""Two guards of one process holding the same tree (two threads, two tasks, one nested in the
other): the tree stays stopped (or its cgroup frozen) until the last of them releases it,
whichever releases first, and a thaw cut short and resumed counts its guard out once."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest

import treeguard
from tests import proc
from tests.conftest import MakeCgroup
from treeguard import ProcessesGuard
from treeguard._backends import _holds, _pidfds
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]

#: Rounds of two concurrent freezes: enough that the two walks overlap in most of them.
ROUNDS = 6


def _frozen(path: str) -> bool:
    """Whether the cgroup at ``path`` is frozen, read from its files (not through treeguard)."""
    events = os.path.join(path, "cgroup.events")
    if os.path.exists(events):
        with open(events) as f:
            return "frozen 1" in f.read().splitlines()
    with open(os.path.join(path, "freezer.state")) as f:
        return f.read().strip() == "FROZEN"


def _holds_of(pids: list[int]) -> dict[int, int]:
    """How many freezes of this process hold each of ``pids`` (by its identity key)."""
    counts: dict[int, int] = {}
    for key, n in _holds.census().items():
        assert isinstance(key, tuple)
        if key[0] == "pid" and key[1] in pids:
            counts[key[1]] = n
    return counts


@pytest.fixture
def guards() -> Iterator[list[ProcessesGuard]]:
    """Guards made by a test, each released (whatever happened) after it."""
    made: list[ProcessesGuard] = []
    try:
        yield made
    finally:
        for guard in made:
            guard.release()


def _freeze_at_once(pair: list[ProcessesGuard]) -> None:
    """Freeze each guard of ``pair`` in a thread of its own, both let go at the same moment."""
    start = threading.Barrier(len(pair), timeout=30)
    errors: list[BaseException] = []

    def freeze(guard: ProcessesGuard) -> None:
        try:
            start.wait()
            guard.freeze()
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            errors.append(err)

    threads = [threading.Thread(target=freeze, args=(g,)) for g in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a freeze never ended"
    if errors:
        raise errors[0]


def test_two_threads_freezing_one_tree_keep_it_stopped_until_both_release(
    make_tree: MakeTree, guards: list[ProcessesGuard]
) -> None:
    tree = make_tree(wide(300), mode="idle")
    for n in range(ROUNDS):
        pair = [ProcessesGuard(tree.root, include_root=True, timeout=20) for _ in range(2)]
        guards += pair
        _freeze_at_once(pair)
        first, second = pair if n % 2 else pair[::-1]
        first.release()
        running = proc.not_stopped(tree.pids)
        assert not running, f"round {n}: {len(running)} tasks run under the guard still held"
        assert set(_holds_of(tree.pids).values()) == {1}
        second.release()
        proc.assert_none_stopped(tree.pids)
        assert _holds_of(tree.pids) == {}


@pytest.mark.parametrize("version", [2, 1])
def test_two_threads_freezing_one_cgroup_keep_it_frozen_until_both_release(
    make_tree: MakeTree, cgroup: MakeCgroup, guards: list[ProcessesGuard], version: int
) -> None:
    cg = cgroup(version)
    tree = make_tree(wide(100), mode="idle", spawn=cg.spawn)
    for n in range(ROUNDS):
        pair = [
            ProcessesGuard(tree.root, include_root=True, backend="cgroup", timeout=20)
            for _ in range(2)
        ]
        guards += pair
        _freeze_at_once(pair)
        assert _frozen(cg.path)
        first, second = pair if n % 2 else pair[::-1]
        first.release()
        assert _frozen(cg.path), f"round {n}: thawed under the guard still held"
        second.release()
        proc.wait_until(lambda: not _frozen(cg.path), what="thawed by the last release")
        assert _holds.census() == {}


@pytest.mark.parametrize("inner_first", [True, False], ids=["inner-first", "outer-first"])
def test_a_nested_guard_keeps_the_tree_stopped_until_the_last_release(
    make_tree: MakeTree, guards: list[ProcessesGuard], inner_first: bool
) -> None:
    tree = make_tree({"children": [wide(3), {}]})
    outer = ProcessesGuard(tree.root, include_root=True).freeze()
    guards.append(outer)
    inner = ProcessesGuard(tree.root, include_root=True).freeze()
    guards.append(inner)
    # The inner guard holds what it found stopped by the outer one: with it, not foreign.
    assert sorted(inner.pids) == sorted(outer.pids) == sorted(tree.pids)
    assert inner.already_stopped == ()
    (inner if inner_first else outer).release()
    proc.assert_all_stopped(tree.pids)
    assert proc.counters_still(tree.counters, tree.period)
    (outer if inner_first else inner).release()
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [0])


@pytest.mark.parametrize("inner_first", [True, False], ids=["inner-first", "outer-first"])
def test_a_nested_cgroup_guard_keeps_it_frozen_until_the_last_release(
    make_tree: MakeTree, cgroup: MakeCgroup, guards: list[ProcessesGuard], inner_first: bool
) -> None:
    cg = cgroup(2)
    tree = make_tree(wide(3), spawn=cg.spawn)
    pair = [ProcessesGuard(tree.root, include_root=True, backend="cgroup") for _ in range(2)]
    guards += pair
    outer, inner = (g.freeze() for g in pair)
    (inner if inner_first else outer).release()
    assert _frozen(cg.path)
    (outer if inner_first else inner).release()
    assert not _frozen(cg.path)
    proc.counters_moving(tree.counters, [0])


def _interrupt_once(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, at: int, *, before: bool
) -> list[int]:
    """Make the ``at``-th call of ``module.name`` raise KeyboardInterrupt once, ``before`` it
    runs or after; the calls made are counted in the list returned."""
    real = getattr(module, name)
    calls = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at and before:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if calls[0] == at:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(module, name, interrupted)
    return calls


@pytest.mark.parametrize("last", [False, True], ids=["other-holds", "last-holder"])
def test_a_thaw_cut_short_between_leaving_and_forgetting_counts_once(
    make_tree: MakeTree, guards: list[ProcessesGuard], monkeypatch: pytest.MonkeyPatch, last: bool
) -> None:
    """An interrupt lands right after a process's hold was let go of, before the thaw forgot
    it: the thaw resumed (run_to_end) lets go of it again, which must not count it out a
    second time (the other guard's hold would go with it)."""
    tree = make_tree(wide(20))
    first = ProcessesGuard(tree.root, include_root=True).freeze()
    guards.append(first)
    second = ProcessesGuard(tree.root, include_root=True).freeze()
    guards.append(second)
    if last:
        second.release()
    calls = _interrupt_once(monkeypatch, _holds, "leave", 10, before=False)
    with pytest.raises(KeyboardInterrupt):
        first.release()
    assert calls[0] > len(tree.pids)  # the interrupted one again, then the rest
    assert not first.frozen
    if not last:
        proc.assert_all_stopped(tree.pids)
        assert _holds_of(tree.pids) == dict.fromkeys(tree.pids, 1)
        second.release()
    proc.assert_none_stopped(tree.pids)
    assert _holds_of(tree.pids) == {}


def test_a_resume_cut_short_is_finished_by_the_thaw_resumed(
    make_tree: MakeTree, guards: list[ProcessesGuard], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last holder's SIGCONT itself is interrupted: the hold stays, empty, and the thaw
    resumed sends it."""
    tree = make_tree(wide(20))
    for _ in range(2):
        guards.append(ProcessesGuard(tree.root, include_root=True).freeze())
    guards[0].release()
    _interrupt_once(monkeypatch, _pidfds, "resignal", 5, before=True)
    with pytest.raises(KeyboardInterrupt):
        guards[1].release()
    proc.assert_none_stopped(tree.pids)
    assert _holds_of(tree.pids) == {}


def test_a_forked_child_holds_nothing(make_tree: MakeTree, guards: list[ProcessesGuard]) -> None:
    tree = make_tree(wide(3))
    guards.append(ProcessesGuard(tree.root, include_root=True).freeze())
    assert len(_holds_of(tree.pids)) == len(tree.pids)

    def count() -> str:
        held: dict[Hashable, int] = _holds.census()
        return str(len(held))

    assert proc.in_child(count) == "0"
    guards[0].release()
    proc.assert_none_stopped(tree.pids)


def test_a_cgroup_frozen_twice_by_one_cgroup_object_is_thawed_by_its_thaw(
    make_tree: MakeTree, cgroup: MakeCgroup
) -> None:
    """The second freeze of a Cgroup frozen already leaves it to the first one's thaw, and
    holds nothing that would keep it frozen after that thaw."""
    cg = cgroup(2)
    tree = make_tree(wide(3), spawn=cg.spawn)
    cg.freeze()
    cg.freeze()
    assert _frozen(cg.path)
    cg.thaw()
    assert not _frozen(cg.path)
    assert _holds.census() == {}
    proc.counters_moving(tree.counters, [0])


def test_a_guard_inside_a_cgroup_freeze_of_this_process_leaves_it_to_that_freeze(
    make_tree: MakeTree, cgroup: MakeCgroup, guards: list[ProcessesGuard]
) -> None:
    cg = cgroup(2)
    tree = make_tree(wide(3), spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend="cgroup")
    guards.append(guard)
    cg.freeze()
    try:
        guard.freeze().release()
        assert _frozen(cg.path)
        guard.freeze()
    finally:
        cg.thaw()
    assert _frozen(cg.path)  # the guard holds it still
    guard.release()
    assert not _frozen(cg.path)
    proc.counters_moving(tree.counters, [0])


@pytest.mark.parametrize("backend", ["signal", "cgroup"])
def test_a_token_taken_inside_a_guard_leaves_the_tree_to_it(
    make_tree: MakeTree, cgroup: MakeCgroup, guards: list[ProcessesGuard], backend: str
) -> None:
    """A token made while a guard of this process holds the tree names it as found stopped
    (frozen): its thaw leaves it to the guard, whose release resumes it."""
    cg = cgroup(2)
    tree = make_tree(wide(4), spawn=cg.spawn)
    guard = ProcessesGuard(tree.root, include_root=True, backend=backend).freeze()
    guards.append(guard)
    token = treeguard.freeze(tree.root, include_root=True, backend=backend)
    treeguard.thaw(token)
    if backend == "signal":
        proc.assert_all_stopped(tree.pids)
    else:
        assert _frozen(cg.path)
    guard.release()
    assert not _frozen(cg.path)
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [0])
    assert _holds.census() == {}
