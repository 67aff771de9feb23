"""Review of the cgroup a guard keeps with its census (:meth:`Kept.target`)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import require_root
from tests.integration.test_kept_census import _sockets
from treeguard import ProcessesGuard
from treeguard.errors import CgroupError


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
