"""The API without traps: one meaning for the first argument of every face, process objects
wherever a process is taken, nested ``with`` blocks, a report that means the same on every
face. (That option mistakes are type errors for a user's type checker is checked by mypy on
tests/typing/consumer.py.)"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import warnings
from collections.abc import Callable

import anyio
import psutil
import pytest

import treeguard
from tests import proc
from treeguard import InvalidArgumentError, NoSuchProcessError, ProcessesGuard
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]


def test_guard_takes_the_root_first(make_tree: MakeTree, anyio_backend: str) -> None:
    """``guard(pid)`` freezes what is below ``pid``, as ``ProcessesGuard(pid)`` does."""
    tree = make_tree(wide(3))

    async def main() -> tuple[int, ...]:
        async with treeguard.guard(tree.root) as g:
            proc.assert_all_stopped(tree.pids[1:])
            assert not proc.stopped([tree.root])
            return g.pids

    assert sorted(anyio.run(main, backend=anyio_backend)) == sorted(tree.pids[1:])
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_process_objects_are_targets() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # "fork": "spawn" would leave a resource tracker process behind.
    worker = multiprocessing.get_context("fork").Process(target=_sleep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
        worker.start()
    try:
        for target, pid in (
            (popen, popen.pid),
            (worker, worker.pid),
            (psutil.Process(popen.pid), popen.pid),
        ):
            with ProcessesGuard(target, include_root=True) as guard:
                assert guard.pids == (pid,)
                proc.assert_all_stopped([pid])
            assert not proc.stopped([pid])
        with ProcessesGuard(exclude=[popen, worker]) as guard:
            assert popen.pid not in guard.pids and worker.pid not in guard.pids
    finally:
        popen.kill()
        popen.wait()
        worker.kill()
        worker.join()


def _sleep() -> None:
    import time

    time.sleep(60)


def test_a_finished_process_object_is_no_process() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    handle = psutil.Process(popen.pid)
    popen.wait()  # reaped: its PID may name another process from now on
    with pytest.raises(NoSuchProcessError):
        ProcessesGuard(popen, include_root=True)
    with pytest.raises(NoSuchProcessError):
        ProcessesGuard(handle, include_root=True)


def test_a_thread_is_no_process_and_its_process_is_named(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2, threads=1))
    leader = tree.pids[1]
    thread = next(tid for tid in proc.task_states(leader) if tid != leader)
    for options in ({"root": thread}, {"exclude": [thread]}):
        with pytest.raises(InvalidArgumentError, match=f"{thread} is a thread of process {leader}"):
            ProcessesGuard(**options)  # type: ignore[arg-type]
    proc.assert_none_stopped(tree.pids)


def test_nested_with_blocks_thaw_at_the_outermost_exit(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    guard = ProcessesGuard(tree.root, include_root=True)
    with guard:
        with guard:
            proc.assert_all_stopped(tree.pids)
        proc.assert_all_stopped(tree.pids)  # the inner exit did not thaw
        assert guard.frozen
    assert not guard.frozen
    proc.assert_none_stopped(tree.pids)


def test_the_report_means_the_same_on_every_face(make_tree: MakeTree) -> None:
    tree = make_tree(wide(20))

    async def main() -> ProcessesGuard:
        async with treeguard.guard(tree.root, include_root=True) as g:
            pass
        return g

    g = anyio.run(main)
    assert g.report.thaw_seconds > 0  # not the 0 of a second, empty thaw
    assert g.report.stopped == len(tree.pids)
    assert g.pids == ()  # released: it holds nothing
    with ProcessesGuard(tree.root, include_root=True) as guard:
        assert len(guard.pids) == len(tree.pids)
    assert guard.pids == () and guard.report.stopped == len(tree.pids)


def test_the_report_prints_and_serialises(make_tree: MakeTree) -> None:
    import json

    tree = make_tree(wide(3))
    with ProcessesGuard(tree.root, exclude=[tree.pids[1]]) as guard:
        pass
    text = str(guard.report)
    assert text.startswith("signal: 1 processes (1 tasks) frozen in ")
    assert "thawed in" in text and "skipped 1 excluded" in text
    data = json.loads(json.dumps(guard.report.to_dict()))
    assert data["stopped"] == 1 and data["skipped"] == {str(tree.pids[1]): "excluded"}


def test_close_stops_the_helper_and_a_new_freeze_starts_one(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    guard = ProcessesGuard(tree.root, include_root=True, watchdog=True)
    assert guard.helper_pid is None  # started by the first freeze
    with guard:
        first = guard.helper_pid
        assert first is not None and proc.state(first) not in (None, "Z", "T")
    guard.close()
    assert guard.helper_pid is None
    assert proc.state(first) is None  # exited and reaped
    with guard:
        second = guard.helper_pid
        assert second is not None and second != first
        proc.assert_all_stopped(tree.pids)
        guard.close()  # releases too
        proc.assert_none_stopped(tree.pids)
    assert proc.state(second) is None
