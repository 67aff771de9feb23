"""Adversarial checks of the faces built on the one core: a guard driven from two tasks or
two threads at once, cancellations at every wait, tokens and freezethaw under stress."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import treeguard
from tests import proc
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


async def _release_from_another_task_once_all_stopped(tree: WorkerTree) -> bool:
    """Enter a guard while another task releases it once every process is stopped; returns
    whether that release landed before the block started (the freeze still under way)."""
    manager = treeguard.guard(root=tree.root, include_root=True)
    in_body = False
    early = False

    async def release_once_all_stopped() -> None:
        nonlocal early
        while proc.not_stopped(tree.pids):
            await anyio.lowlevel.checkpoint()
        early = not in_body
        try:
            manager.guard.release()
        except treeguard.FreezeError:
            pass  # refused: the freeze under way owns the guard until it returns

    async with anyio.create_task_group() as tg:
        tg.start_soon(release_once_all_stopped)
        async with manager as g:
            in_body = True
            if early:
                assert g.frozen, "the freeze returned a guard that holds nothing"
                proc.assert_all_stopped(tree.pids)
            await anyio.sleep(0.01)
    proc.assert_none_stopped(tree.pids)
    return early


@pytest.mark.anyio
async def test_a_release_from_another_task_never_undoes_a_freeze_under_way(
    make_tree: MakeTree,
) -> None:
    """Another task calls release() once every process is stopped, while the freeze is still
    proving and finishing: the freeze must either be refused that release (it then returns
    the whole tree stopped) or not be undermined by it (a release that thawed it half way
    broke the freeze: a StopTimeoutError, or a block running beside a running tree, or a later
    generation stopped with nothing left to thaw it)."""
    tree = make_tree(wide(200), mode="idle")
    for _ in range(10):
        if await _release_from_another_task_once_all_stopped(tree):
            return
    pytest.fail("the release never landed while the freeze was under way")


def test_release_from_another_thread_while_freezing_leaves_nothing_stopped(
    make_tree: MakeTree,
) -> None:
    """One thread freezes, another releases once the root is stopped (the freeze is half
    way): once both return, nothing is stopped and the guard holds nothing."""
    tree = make_tree(wide(200), mode="idle")
    for _ in range(5):
        g = treeguard.ProcessesGuard(root=tree.root, include_root=True)
        worker = threading.Thread(target=g.freeze)
        worker.start()
        try:
            proc.wait_until(lambda: proc.stopped([tree.root]), what="the freeze to start")
            g.release()
        finally:
            worker.join()
        assert not g.frozen
        proc.assert_none_stopped(tree.pids)


def _release_on(go: threading.Barrier, g: treeguard.ProcessesGuard) -> None:
    go.wait()
    g.release()


def test_two_threads_releasing_at_once_thaw_everything(make_tree: MakeTree) -> None:
    """Two threads release one frozen guard at the same time: each process is resumed (a
    thaw that forgot an entry the other had not signalled would leave it stopped)."""
    tree = make_tree(wide(300), mode="idle")
    for _ in range(10):
        g = treeguard.ProcessesGuard(root=tree.root, include_root=True).freeze()
        go = threading.Barrier(2)
        threads = [threading.Thread(target=_release_on, args=(go, g)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        g.release()
        proc.assert_none_stopped(tree.pids)


CONT_COUNTER = r"""
import os, signal, sys, time
signal.signal(signal.SIGCONT, lambda *_: os.write(1, b"c"))
os.write(1, b"r")
while True:
    time.sleep(1)
"""


class _Coroutine:
    async def __call__(self) -> None:
        return None


async def _coroutine_function() -> None:
    return None


@pytest.mark.parametrize(
    "fn",
    [_coroutine_function, functools.partial(_coroutine_function), _Coroutine()],
    ids=["async def", "partial", "async __call__"],
)
def test_freezethaw_refuses_a_coroutine_function_before_freezing(fn: Any) -> None:
    """freezethaw calls fn synchronously: an async fn would only make a coroutine that never
    runs while frozen (the tree is stopped and resumed for nothing). It is bad input: one
    clear error, and the process is never touched (it sees no SIGCONT)."""
    child = subprocess.Popen([sys.executable, "-c", CONT_COUNTER], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.read(1) == b"r"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the old code's lost coroutine
            with pytest.raises(treeguard.InvalidArgumentError) as info:
                treeguard.freezethaw(fn, root=child.pid, include_root=True)
        assert info.value.name == "fn"
        os.set_blocking(child.stdout.fileno(), False)
        assert child.stdout.read() is None, "the process was stopped and resumed"
    finally:
        child.kill()
        child.communicate()  # reaps it and closes its pipe
