"""What the report's clock covers, on every backend (real trees, real freezes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests import proc
from tests.conftest import MakeCgroup, require_root
from treeguard import ProcessesGuard
from treeguard._guard import ProcessesGuard as Guard
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]
BACKENDS = ["signal", "ptrace", "cgroup"]


def _tree(backend: str, make_tree: MakeTree, cgroup: MakeCgroup) -> WorkerTree:
    if backend == "cgroup":
        return make_tree(wide(5, threads=1), spawn=cgroup(2).spawn)
    if backend == "ptrace":
        require_root("ptrace tests")  # a tracer outside the tree needs CAP_SYS_PTRACE
    return make_tree(wide(5, threads=1))


@pytest.fixture
def any_cgroup(request: pytest.FixtureRequest) -> Iterator[MakeCgroup]:
    """The ``cgroup`` fixture, asked for only by the cgroup case (it needs root)."""
    if request.node.callspec.params["backend"] == "cgroup":
        yield request.getfixturevalue("cgroup")
    else:
        yield lambda *a, **k: pytest.fail("no cgroup for this backend")


@pytest.mark.parametrize("backend", BACKENDS)
def test_freeze_seconds_is_the_whole_call(
    backend: str, make_tree: MakeTree, any_cgroup: MakeCgroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The planning (the root's and exclusions' checks, the ancestors, the backend's
    # creation) is timed by wrapping it; the report must count it, and the backend's work,
    # and no more than the caller waited.
    tree = _tree(backend, make_tree, any_cgroup)
    spans: dict[str, float] = {}
    real_plan = Guard._plan

    def timed_plan(self: Guard) -> object:
        spans["plan_start"] = time.perf_counter()
        try:
            return real_plan(self)
        finally:
            spans["plan_end"] = time.perf_counter()

    monkeypatch.setattr(Guard, "_plan", timed_plan)
    guard = ProcessesGuard(root=tree.root, include_root=True, backend=backend)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with guard:
        waited = time.perf_counter() - t0
        report = guard.report
        if backend != "cgroup":  # a v2-frozen task sleeps (S): the cgroup says frozen
            assert not proc.not_stopped(tree.pids)
        planned = spans["plan_end"] - spans["plan_start"]
        assert report.plan_seconds >= planned
        assert report.freeze_seconds >= report.plan_seconds + report.verify_seconds
        assert report.freeze_seconds >= report.plan_seconds + report.enumerate_seconds
        assert report.freeze_seconds <= waited
        if backend == "cgroup":
            assert report.prove_seconds > 0  # the census ran
        else:
            # Disjoint parts on the signal and ptrace backends.
            parts = (
                report.plan_seconds
                + report.enumerate_seconds
                + report.signal_seconds
                + report.verify_seconds
            )
            assert report.freeze_seconds >= parts
        data = report.to_dict()
        assert data["plan_seconds"] == report.plan_seconds
        assert data["prove_seconds"] == report.prove_seconds
    proc.assert_none_stopped(tree.pids)
