"""Holes found in review of the cgroup v2 freezer's held files (treeguard._cgroupfiles):
each test failed before its fix. Whether a cgroup is frozen is read by path, what a
descriptor names through /proc/self/fd.
"""

from __future__ import annotations

import gc
import os
import pathlib
from collections.abc import Callable

import pytest

from tests import proc
from tests.conftest import MakeCgroup, slot
from treeguard._cgroupfiles import CgroupFiles
from treeguard._workers import WorkerTree, demo_spec
from treeguard.cgroup import Cgroup


def _frozen(path: str) -> bool:
    """What the cgroup's own cgroup.events says, read by path."""
    return "frozen 1" in proc.read_text(os.path.join(path, "cgroup.events")).splitlines()


def test_a_cgroup_made_again_while_frozen_is_thawed_by_the_freeze_that_froze_it(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree]
) -> None:
    # Frozen by the Cgroup (empty), removed and made again behind its back, a tree
    # spawned into the new one, frozen again by the same Cgroup: that second freeze froze
    # the new cgroup, so its thaw() must thaw it (the first freeze's cgroup is gone).
    cg = cgroup(2)
    cg.freeze()
    assert _frozen(cg.path)
    os.rmdir(cg.path)
    os.mkdir(cg.path)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    control = os.path.join(cg.path, "cgroup.freeze")
    try:
        report = cg.freeze()
        assert report.stopped == tree.size
        assert _frozen(cg.path)
        cg.thaw()
        assert proc.read_text(control).strip() == "0"
        assert not _frozen(cg.path)
    finally:
        with open(control, "w") as f:
            f.write("0")  # (for the teardown, if the thaw left it frozen)
    proc.counters_moving(tree.counters, [slot(i) for i in range(tree.size)])


@pytest.mark.parametrize("end", ["close", "collect"])
def test_a_forked_child_never_closes_a_number_it_reused(end: str, cgroup: MakeCgroup) -> None:
    # A wait that went past its spin made an epoll instance on the held cgroup.events. A
    # forked child closes its copies of every inherited descriptor and reuses the numbers
    # for files of its own (as a daemon does), then closes or drops the parent's files:
    # that must close nothing of the child's.
    cg = cgroup(2)
    files = CgroupFiles(cg.path, kept=True)
    watch = files.watch()
    epfd = watch.ready_fd()
    assert epfd is not None
    del watch  # (the wait is over)
    inherited = [int(name) for name in os.listdir("/proc/self/fd")]

    def child() -> str:
        nonlocal files
        mine = os.open("/dev/null", os.O_RDONLY)
        for fd in {*inherited, epfd}:
            if fd > 2:
                os.dup2(mine, fd)  # the number is the child's own /dev/null now
        if end == "close":
            files.close()
        else:
            files = None  # type: ignore[assignment]
            gc.collect()
        os.fstat(epfd)  # EBADF if closed behind the child's back
        return ""

    proc.in_child(child)
    files.close()


def test_a_cgroup_at_a_path_that_names_another_one_now_is_that_one(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree], tmp_path: pathlib.Path
) -> None:
    # A Cgroup made of a path through a symlink: once the link names another cgroup (the
    # first one still there), a freeze freezes the cgroup at the path, as everything else
    # the Cgroup does by path (its pids, its kill, its remove), and not the one whose
    # files it held from before.
    first, second = cgroup(2), cgroup(2)
    sleeper = first.spawn(["sleep", "60"])
    tree = make_tree(demo_spec(), spawn=second.spawn)
    link = tmp_path / "cg"
    link.symlink_to(first.path)
    cg = Cgroup(str(link))
    cg.freeze()
    assert _frozen(first.path)
    cg.thaw()
    link.unlink()
    link.symlink_to(second.path)
    try:
        report = cg.freeze()
        assert not _frozen(first.path)
        assert _frozen(second.path)
        assert report.stopped == tree.size
    finally:
        cg.thaw()
        first.thaw()  # (thaws only what it froze: nothing)
        for path in (first.path, second.path):
            with open(os.path.join(path, "cgroup.freeze"), "w") as f:
                f.write("0")  # (if the freeze went to the wrong one)
    assert not _frozen(second.path)
    proc.counters_moving(tree.counters, [slot(i) for i in range(tree.size)])
    first.kill()
    assert sleeper.wait(10) < 0


@pytest.mark.parametrize("when", ["before the freeze", "before the thaw"])
def test_numbers_closed_and_reused_by_someone_else_are_never_written(
    when: str, cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree], tmp_path: pathlib.Path
) -> None:
    # Code that closes every descriptor it did not open itself (a daemon library, a
    # close_range) and then opens files of its own at those numbers, in the same process:
    # the Cgroup's descriptors are gone, and a freeze or thaw through their numbers would
    # write into those files. Both must reach the cgroup, and the files stay as they were.
    cg = cgroup(2)
    tree = make_tree(demo_spec(), spawn=cg.spawn)
    cg.freeze()
    cg.thaw()
    if when == "before the thaw":
        cg.freeze()
    held = [
        fd
        for fd in map(int, os.listdir("/proc/self/fd"))
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(cg.path)
    ]
    assert held
    victim = tmp_path / "data"
    victim.write_bytes(b"x" * 64)
    mine = os.open(victim, os.O_RDWR)
    try:
        for fd in held:
            os.dup2(mine, fd)  # (closes the Cgroup's: the number is the victim's now)
        if when == "before the freeze":
            cg.freeze()
            assert _frozen(cg.path)
        cg.thaw()
        assert not _frozen(cg.path)
        assert victim.read_bytes() == b"x" * 64
    finally:
        # The numbers still the victim's and no longer treeguard's are closed here (those
        # it still holds, it closes when the fixture removes the cgroup).
        ours = os.fstat(mine)
        files = cg._files
        kept = set() if files is None else set(files._held.fds.values())
        for fd in set(held) - kept:
            try:
                if os.path.samestat(os.fstat(fd), ours):
                    os.close(fd)
            except OSError:
                pass
        os.close(mine)
        with open(os.path.join(cg.path, "cgroup.freeze"), "w") as f:
            f.write("0")  # (if it was left frozen)
    proc.counters_moving(tree.counters, [slot(i) for i in range(tree.size)])


def test_a_cgroup_frozen_through_a_path_that_names_another_one_now_is_thawed(
    cgroup: MakeCgroup, make_tree: Callable[..., WorkerTree], tmp_path: pathlib.Path
) -> None:
    # Frozen through a symlink, not thawed; the link then names another cgroup and the
    # Cgroup freezes again: that freezes the one at the path, and the first one, which
    # this Cgroup would no longer thaw, is thawed first.
    first, second = cgroup(2), cgroup(2)
    one = make_tree(demo_spec(), spawn=first.spawn)
    two = make_tree(demo_spec(), spawn=second.spawn)
    link = tmp_path / "cg"
    link.symlink_to(first.path)
    cg = Cgroup(str(link))
    try:
        cg.freeze()
        assert _frozen(first.path)
        link.unlink()
        link.symlink_to(second.path)
        report = cg.freeze()
        assert not _frozen(first.path)
        assert _frozen(second.path)
        assert report.stopped == two.size
        cg.thaw()
        assert not _frozen(second.path)
    finally:
        cg.thaw()
        for path in (first.path, second.path):
            with open(os.path.join(path, "cgroup.freeze"), "w") as f:
                f.write("0")  # (if one was left frozen)
    for tree in (one, two):
        proc.counters_moving(tree.counters, [slot(i) for i in range(tree.size)])
