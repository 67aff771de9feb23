"""Review of the cgroup a guard keeps with its census (:meth:`Kept.target`): the cgroup kept
is frozen only while it holds the tree alone, and a guard that never froze keeps nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import MakeCgroup, require_root
from tests.integration.conftest import SpawnForker, fork_one
from tests.integration.test_kept_census import _sockets
from treeguard import ProcessesGuard
from treeguard._backends import Plan, _cgroup
from treeguard._backends._freezer_base import CgroupFreezer
from treeguard._backends._target import Target
from treeguard.cgroup import Cgroup
from treeguard.errors import CgroupError
from treeguard.procfs import ProcFS


def test_a_guard_whose_tree_no_cgroup_holds_never_subscribes() -> None:
    # The tree shares the caller's cgroups: every freeze is refused before anything is
    # frozen, and none may leave the guard listening to every fork and exit of the
    # machine (a census can be kept only by a guard subscribed already: none is asked for
    # before a cgroup is found).
    require_root("process events")
    before = _sockets()
    sleeper = subprocess.Popen(["sleep", "60"])
    guard = ProcessesGuard(sleeper.pid, include_root=True, backend="cgroup")
    try:
        for _ in range(3):
            with pytest.raises(CgroupError):  # the caller's cgroup, or the root one
                guard.freeze()
            assert _sockets() == before
    finally:
        guard.close()
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("version", [2, 1])
def test_a_tree_moved_into_a_child_of_the_kept_cgroup_is_frozen_with_it(
    version: int,
    cgroup: MakeCgroup,
    spawn_forker: SpawnForker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cgroups below the kept one list their tasks after it: moved into the (empty)
    # child, the tree's task list reads byte for byte as before. The kept cgroup is frozen
    # (not the child, which find_target would find): it must freeze the child too.
    require_root("process events")
    cg = cgroup(version)
    below = cgroup(version, parent=cg.path)
    forker = spawn_forker(cg.spawn)
    kid = fork_one(forker)
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    try:
        for _ in range(3):  # the census (and its cgroup) is kept from the second freeze on
            with guard:
                assert sorted(guard.pids) == sorted([forker.pid, kid])
        assert below.adopt([forker.pid]) == sorted([forker.pid, kid])
        with open(os.path.join(cg.path, "cgroup.procs")) as f:
            assert not f.read()  # all in the child
        found: list[str] = []
        real_find = _cgroup.find_target

        def finding(plan: Plan, *, whole: bool = False) -> Target | None:
            target = real_find(plan, whole=whole)
            found.append("" if target is None else target.path)
            return target

        monkeypatch.setattr(_cgroup, "find_target", finding)
        with guard:
            assert not found  # the kept cgroup, not looked for
            assert sorted(guard.pids) == sorted([forker.pid, kid])
            assert below.frozen
    finally:
        guard.close()
    assert not cg.frozen and not below.frozen


@pytest.mark.parametrize("version", [2, 1])
def test_a_root_moved_into_the_kept_cgroup_is_refused_before_anything_is_frozen(
    version: int,
    cgroup: MakeCgroup,
    spawn_forker: SpawnForker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_root("process events")
    cg, home = cgroup(version), cgroup(version)
    forker = spawn_forker(home.spawn)
    first = fork_one(forker)
    assert cg.adopt([first]) == [first]
    guard = ProcessesGuard(forker.pid, backend="cgroup")  # the root keeps running
    writes: list[str] = []
    real = CgroupFreezer.put

    def put(self: CgroupFreezer, name: str, value: str) -> None:
        writes.append(f"{self.path}/{name} {value}")
        real(self, name, value)

    try:
        for _ in range(3):
            with guard:
                assert guard.pids == (first,)
        with open(os.path.join(cg.path, "cgroup.procs"), "w") as f:
            f.write(str(forker.pid))  # the root alone, not its child
        monkeypatch.setattr(CgroupFreezer, "put", put)
        with pytest.raises(CgroupError, match=f"the root {forker.pid} "):
            guard.freeze()
        assert writes == []
    finally:
        guard.close()
        cg.kill()  # both, once the root moved: kill() reaps the child its parent left
        home.kill()


@pytest.mark.parametrize("version", [2, 1])
def test_a_cgroup_made_again_under_the_same_path_is_read_anew(
    version: int,
    cgroup: MakeCgroup,
    spawn_forker: SpawnForker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tree leaves, the cgroup is removed and made again, the tree comes back: the path
    # and the task list read as before, but the cgroup is another (its inode).
    require_root("process events")
    cg, other = cgroup(version), cgroup(version)
    forker = spawn_forker(cg.spawn)
    guard = ProcessesGuard(forker.pid, include_root=True, backend="cgroup")
    reads: list[int] = []
    real = ProcFS.children

    def counted(self: ProcFS, pid: int, tid: int | None = None) -> list[int] | None:
        reads.append(pid)
        return real(self, pid, tid)

    try:
        for _ in range(3):
            with guard:
                pass
        inode = os.stat(cg.path).st_ino
        assert other.adopt([forker.pid]) == [forker.pid]
        os.rmdir(cg.path)
        os.mkdir(cg.path)
        assert os.stat(cg.path).st_ino != inode
        assert Cgroup(cg.path).adopt([forker.pid]) == [forker.pid]
        monkeypatch.setattr(ProcFS, "children", counted)
        with guard:
            assert reads == [forker.pid]
            assert cg.frozen
    finally:
        guard.close()
