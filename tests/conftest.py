"""Fixtures shared by every test: worker trees that are always torn down, and a check
that no test leaves a process of its own stopped or alive."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests import proc
from treeguard._workers import SLOTS, WorkerTree
from treeguard.cgroup import Cgroup

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

IN_CI = bool(os.environ.get("CI"))
IS_ROOT = os.geteuid() == 0


def require_root(what: str) -> None:
    """Skip (on other people's machines) a test that needs root; never skip in CI."""
    if not IS_ROOT:
        if IN_CI:
            pytest.fail(f"{what} needs root, and CI runs as root")
        pytest.skip(f"{what} needs root")


def _children(pid: int) -> list[int]:
    """The children of ``pid``, from the ``children`` file of each of its threads."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += map(int, f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return kids


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        kids = _children(stack.pop())
        found += kids
        stack += kids
    return found


def _stopped_machine_wide() -> set[int]:
    return {int(n) for n in os.listdir("/proc") if n.isdigit() and proc.state(int(n)) in ("T", "t")}


def _stopped_here() -> set[int]:
    """Stopped processes this test run may have made: machine-wide in CI, where this is the
    only test session (so an orphan of a test is caught too); our descendants elsewhere,
    where other sessions may legitimately hold trees stopped."""
    if IN_CI:
        return _stopped_machine_wide()
    return {pid for pid in _descendants(os.getpid()) if proc.stopped([pid])}


def zombie_children() -> set[int]:
    """The children of this process that are zombies (exited, not reaped yet)."""
    return {k for k in _children(os.getpid()) if proc.state(k) == "Z"}


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Fail a test that leaves a process of its own stopped, alive or unreaped (a zombie
    child of this process, which later tests freezing "every descendant" would meet), and
    clean up after it."""
    before_stopped = _stopped_here()
    before = set(_descendants(os.getpid()))
    before_zombies = zombie_children()
    yield
    left_zombies = sorted(zombie_children() - before_zombies)
    for pid in left_zombies:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    left_stopped = _stopped_here() - before_stopped
    left_alive = [
        p
        for p in _descendants(os.getpid())
        if p not in before and proc.task_states(p) and set(proc.task_states(p).values()) != {"Z"}
    ]
    for pid in left_alive:  # clean up by PID before failing
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left_stopped, f"the test left processes stopped: {sorted(left_stopped)}"
    assert not left_alive, f"the test left processes alive: {left_alive}"
    assert not left_zombies, f"the test left zombie children unreaped: {left_zombies}"


@pytest.fixture
def make_tree() -> Iterator[Callable[..., WorkerTree]]:
    """Start worker trees (see treeguard._workers); all are torn down after the test."""
    trees: list[WorkerTree] = []

    def make(spec: dict[str, Any], **kwargs: Any) -> WorkerTree:
        tree = WorkerTree(spec, **kwargs)
        trees.append(tree)
        return tree.start()

    try:
        yield make
    finally:
        for tree in reversed(trees):
            tree.close()


def slot(process_index: int, thread: int = 0) -> int:
    """Index into WorkerTree.counters() of one thread of one process."""
    return process_index * SLOTS + thread


MakeCgroup = Callable[..., Cgroup]


@pytest.fixture
def cgroup() -> Iterator[MakeCgroup]:
    """Make cgroups (``make(version=2, **create_options)``); each is killed empty and
    removed after the test, even when it fails."""
    require_root("cgroup tests")
    made: list[Cgroup] = []

    def make(version: int = 2, **kwargs: Any) -> Cgroup:
        cg = Cgroup.create(version=version, **kwargs)
        made.append(cg)
        return cg

    try:
        yield make
    finally:
        for cg in reversed(made):
            try:
                cg.kill()
            finally:
                cg.remove()
        for cg in made:
            assert not os.path.exists(cg.path)


class Ticker:
    """A task that counts its turns on the event loop: ``tg.start_soon(ticker.run)``."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        import anyio.lowlevel

        while True:
            self.ticks += 1
            await anyio.lowlevel.checkpoint()
