"""The pytest plugin, through pytester: the README example, and the thaw after a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import proc
from tests.conftest import require_root

pytest_plugins = ["pytester"]

README_EXAMPLE = Path(__file__).with_name("plugin_example.py")


def test_readme_example_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_pool=README_EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_thawed_at_teardown_even_when_the_test_fails(pytester: pytest.Pytester) -> None:
    # The child fixture is set up before treeguard_freeze, so it is torn down after it:
    # it records what the child's state is once the plugin has released its guards.
    pytester.makepyfile(
        test_fail="""
        import subprocess, pytest

        @pytest.fixture
        def child(tmp_path_factory):
            proc = subprocess.Popen(["sleep", "60"])
            yield proc
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                data = f.read()
            state = chr(data[data.rindex(b")") + 2])
            with open("state-at-teardown", "w") as f:
                f.write(f"{proc.pid} {state}")
            proc.kill()
            proc.wait()

        def test_fails_while_frozen(child, treeguard_freeze):
            guard = treeguard_freeze(child)
            assert guard.frozen and guard.pids == (child.pid,)
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                data = f.read()
            assert chr(data[data.rindex(b")") + 2]) == "T"
            assert False, "the test fails while the tree is frozen"

        def test_bad_target(treeguard_freeze):
            with pytest.raises(ValueError, match="subprocess.Popen"):
                treeguard_freeze("not a process")

        def test_option_typo(treeguard_freeze):
            import treeguard
            proc = subprocess.Popen(["sleep", "60"])
            try:
                # the same error as every other face, naming the options; nothing frozen
                with pytest.raises(treeguard.InvalidArgumentError, match="tmeout"):
                    treeguard_freeze(proc, tmeout=1.0)
            finally:
                proc.kill()
                proc.wait()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*the test fails while the tree is frozen*"])
    pid, state = (pytester.path / "state-at-teardown").read_text().split()
    assert state in "SR", f"PID {pid} was left in state {state} after the failing test"
    assert not proc.task_states(int(pid))


def test_freezes_a_cgroup_with_the_cgroup_backend(pytester: pytest.Pytester) -> None:
    require_root("the cgroup backend")
    pytester.makepyfile(
        test_cgroup_face="""
        import os, subprocess
        from treeguard.cgroup import Cgroup

        def test_frozen_by_the_kernel(treeguard_freeze):
            with Cgroup.create() as cg:
                worker = cg.spawn(["sleep", "60"])
                guard = treeguard_freeze(worker, backend="cgroup")
                assert guard.report.backend == "cgroup" and guard.pids == (worker.pid,)
                assert cg.frozen
                guard.release()
                assert not cg.frozen
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
