"""A guard frozen again keeps its cgroup census only while the kernel's process events say
that nothing of the tree forked or exited, and the cgroup's task list reads as it did."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests import proc
from tests.conftest import MakeCgroup, require_root
from tests.integration.conftest import SpawnForker, fork_one
from treeguard import ProcessesGuard
from treeguard._backends import Memo, _cgroup, _kept
from treeguard._proc_events import ProcEvents
from treeguard.errors import CgroupError
from treeguard.procfs import ProcFS


@pytest.fixture
def events() -> Iterator[ProcEvents]:
    require_root("process events")
    found = ProcEvents.open()
    assert found is not None, "the kernel gave no process events subscription"
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def children_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The TIDs whose ``children`` file treeguard reads, as they are read."""
    reads: list[int] = []
    real = ProcFS.children

    def counted(self: ProcFS, pid: int, tid: int | None = None) -> list[int] | None:
        reads.append(pid if tid is None else tid)
        return real(self, pid, tid)

    monkeypatch.setattr(ProcFS, "children", counted)
    return reads


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A process that neither forks nor exits while the test runs: the PID no event names."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_events_name_the_forks_and_exits_of_the_pids_asked_about(
    events: ProcEvents, sleeper: int
) -> None:
    assert events.quiet((), 64)
    child = subprocess.Popen(["true"])
    assert child.wait() == 0
    assert not events.quiet({child.pid}, 64)  # its fork and its exit
    assert events.quiet({child.pid}, 64)  # read already: nothing new
    subprocess.run(["true"], check=True)
    assert events.quiet({sleeper}, 64)  # forks and exits of others do not count


def test_too_many_events_are_not_trusted_and_dropped(events: ProcEvents, sleeper: int) -> None:
    for _ in range(20):
        subprocess.run(["true"], check=True)
    assert not events.quiet({sleeper}, 10)  # forty events and more: over the budget
    assert events.quiet({sleeper}, 10)  # subscribed anew: the backlog is gone


def test_a_forked_child_never_reads_its_parents_events(events: ProcEvents) -> None:
    memo = Memo()
    memo.put("events", events)
    pid = os.fork()
    if pid == 0:  # the child: it must neither read the queue nor find what is kept
        os._exit(0 if memo.get("events") is None and not events.quiet((), 64) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    subprocess.run(["true"], check=True)
    assert not events.quiet({os.getpid()}, 64)  # the events are still the parent's


@pytest.mark.parametrize("version", [2, 1])
def test_a_quiet_tree_is_not_read_again(
    version: int,
    cgroup: MakeCgroup,
    children_reads: list[int],
    spawn_forker: SpawnForker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_root("process events")
    cg = cgroup(version)
    forker = spawn_forker(cg.spawn)
    kids = [fork_one(forker), fork_one(forker)]
    found: list[str] = []
    real_find = _cgroup.find_target

    def finding(plan: Any, *, whole: bool = False) -> Any:
        target = real_find(plan, whole=whole)
        found.append(target.path)
        return target

    monkeypatch.setattr(_cgroup, "find_target", finding)
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    try:
        for freeze in range(4):
            children_reads.clear()
            found.clear()
            with guard:
                assert sorted(guard.pids) == sorted([forker.pid, *kids])
                assert cg.frozen
            # The first two freezes read every task's file (a guard subscribes to the
            # events at its second), later ones only what is new.
            assert (sorted(children_reads) == sorted([forker.pid, *kids])) == (freeze < 2)
            # Nor is the cgroup looked for again: it is the one the census was proven in.
            assert found == ([] if freeze >= 2 else [cg.path])
        assert not children_reads
        # Every so many freezes the census is read in full, whatever the events say.
        reads = []
        for _ in range(_kept._MAX_TAKEN + 1):
            children_reads.clear()
            with guard:
                pass
            reads.append(bool(children_reads))
        assert reads == [False] * (_kept._MAX_TAKEN - 2) + [True, False, False]
        # A fork is heard of: the next freeze reads the tree again, and holds the newcomer.
        newcomer = fork_one(forker)
        with guard:
            assert newcomer in guard.pids
            assert set(children_reads) >= {forker.pid, *kids, newcomer}
            assert proc.ppid(newcomer) == forker.pid
    finally:
        guard.close()
    assert not cg.frozen


@pytest.mark.parametrize("version", [2, 1])
def test_a_child_forked_and_moved_out_since_the_last_freeze_is_found(
    version: int, cgroup: MakeCgroup, spawn_forker: SpawnForker
) -> None:
    # The cgroup's task list reads exactly as at the last freeze: only the fork event tells
    # that the tree has a process elsewhere, which a freeze of the cgroup would leave running.
    require_root("process events")
    cg, other = cgroup(version), cgroup(version)
    forker = spawn_forker(cg.spawn)
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    escaped = 0
    try:
        for _ in range(2):  # subscribed at the second freeze: the census is kept from it
            with guard:
                assert guard.pids == (forker.pid,)
        escaped = fork_one(forker)
        assert other.adopt([escaped]) == [escaped]
        assert cg.pids() == [forker.pid]
        with pytest.raises(CgroupError, match=f"in another cgroup: {escaped} "):
            guard.freeze()
        assert not guard.frozen
        assert not cg.frozen
        assert proc.state(escaped) in "SR"
    finally:
        guard.close()
        cg.kill()  # the forker first: its child in the other cgroup becomes this process's
        other.kill()
        if escaped:
            os.waitpid(escaped, 0)


def test_a_census_kept_is_dropped_when_the_cgroup_is_another(
    cgroup: MakeCgroup, children_reads: list[int], spawn_forker: SpawnForker
) -> None:
    require_root("process events")
    first, second = cgroup(2), cgroup(2)
    forker = spawn_forker(first.spawn)
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    try:
        for _ in range(2):
            with guard:
                pass
        assert second.adopt([forker.pid]) == [forker.pid]
        children_reads.clear()
        with guard:
            assert second.frozen and not first.frozen
            assert children_reads == [forker.pid]
    finally:
        guard.close()


def test_a_top_process_born_outside_the_cgroup_since_the_last_freeze_is_found(
    cgroup: MakeCgroup, spawn_forker: SpawnForker
) -> None:
    # The root is not frozen and lives in another cgroup; its children are the tree's top
    # processes. A new child is born in the root's cgroup: no event names a task of the
    # census and the cgroup's task list reads as it did, so only the top processes, found
    # again at every freeze, tell that the cgroup kept from the last freeze is too narrow.
    require_root("process events")
    cg, home = cgroup(2), cgroup(2)
    forker = spawn_forker(home.spawn)
    first = fork_one(forker)
    assert cg.adopt([first]) == [first]
    guard = ProcessesGuard(forker.pid, backend="cgroup")
    try:
        for _ in range(3):  # the census is kept from the second freeze on
            with guard:
                assert guard.pids == (first,)
                assert cg.frozen
        second = fork_one(forker)
        assert home.pids() == sorted([forker.pid, second])
        with pytest.raises(CgroupError):
            guard.freeze()
        assert not guard.frozen
        assert not cg.frozen and not home.frozen
        assert proc.state(second) in "SR"
    finally:
        guard.close()
        home.kill()  # the forker first: its child in the other cgroup becomes this process's
        cg.kill()
        os.waitpid(first, 0)


def test_a_census_taken_over_but_contradicted_once_frozen_is_read_from_the_frozen_cgroup(
    cgroup: MakeCgroup,
    children_reads: list[int],
    spawn_forker: SpawnForker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_root("process events")
    cg = cgroup(2)
    forker = spawn_forker(cg.spawn)
    kid = fork_one(forker)
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    try:
        for _ in range(2):
            with guard:
                pass
        # Quiet before the write, then a fork heard of by the time the cgroup is frozen.
        answers = iter([True, False])
        monkeypatch.setattr(ProcEvents, "quiet", lambda self, pids, budget: next(answers))
        children_reads.clear()
        with guard:
            assert sorted(children_reads) == sorted([forker.pid, kid])
            assert sorted(guard.pids) == sorted([forker.pid, kid])
            assert cg.frozen
    finally:
        guard.close()


def test_what_a_census_works_out_is_what_it_read_freeze_after_freeze(
    cgroup: MakeCgroup, spawn_forker: SpawnForker
) -> None:
    """A census works out once, from what it read, the sets that every freeze that takes it
    over asks for; they must say what its reads say now, whether it was read in full,
    taken over, or read again (a child forked since the last freeze)."""
    require_root("process events")
    cg = cgroup(2)
    forker = spawn_forker(cg.spawn)
    kids: list[int] = []
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    try:
        for round_ in range(6):
            if round_ in (2, 4):
                kids.append(fork_one(forker))
            with guard:
                assert sorted(guard.pids) == sorted([forker.pid, *kids])
                census = guard._backend._census  # type: ignore[union-attr]
                assert census is not None
                read = census._kids
                assert census.watched == census.tids | read.keys() | census.procs
                assert census._listed_kids == set().union(*read.values()) == set(kids)
                assert census.keepable
    finally:
        guard.close()


def _sockets() -> set[str]:
    """The sockets this process holds (as ``socket:[inode]``)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def test_a_guard_frozen_once_never_subscribes_and_close_unsubscribes(
    cgroup: MakeCgroup, spawn_forker: SpawnForker
) -> None:
    require_root("process events")
    cg = cgroup(2)
    forker = spawn_forker(cg.spawn)
    before = _sockets()
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    try:
        with guard:
            pass
        assert _sockets() == before
        with guard:
            pass
        assert len(_sockets() - before) == 1  # the subscription, kept for the next freeze
    finally:
        guard.close()
    assert _sockets() == before
