"""Holes found in review of the cgroup v2 freezer's held files (treeguard._cgroupfiles):
each test failed before its fix. Whether a cgroup is frozen is read by path, what a
descriptor names through /proc/self/fd.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tests import proc
from tests.conftest import MakeCgroup, slot
from treeguard._workers import WorkerTree, demo_spec


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
