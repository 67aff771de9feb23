"""Adversarial checks of the faces built on the one core: a guard driven from two tasks or
two threads at once (or from a signal handler), cancellations at every wait of a freeze and
of a thaw, a guard collected while frozen, a forked child of a frozen supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import treeguard
from tests import proc
from tests.conftest import require_root
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]


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


def _in_two_threads(target: Callable[..., object], *args: object) -> None:
    """Run ``target(*args)`` in two threads at once, and wait for both."""
    threads = [threading.Thread(target=target, args=args) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


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
        _in_two_threads(_release_on, threading.Barrier(2), g)
        g.release()
        proc.assert_none_stopped(tree.pids)


def test_a_release_from_another_thread_waits_for_an_async_thaw_under_way(
    make_tree: MakeTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thaw of an ``async with`` block (an event loop in another thread) is held as it
    resumes its first process while this thread releases the same guard: the release waits
    for it instead of thawing beside it (two thaws at once resume, close and forget one
    entry twice and skip the next: that process would stay stopped)."""
    tree = make_tree(wide(4), mode="idle")
    real, loop_thread, held = signal.pidfd_send_signal, [], threading.Event()

    def send(fd: int, sig: int, *rest: Any) -> None:
        if sig == signal.SIGCONT and threading.current_thread() in loop_thread:
            if not held.is_set():
                held.set()
                time.sleep(0.3)
        real(fd, sig, *rest)

    monkeypatch.setattr(signal, "pidfd_send_signal", send)
    guard = treeguard.guard(root=tree.root, include_root=True)

    async def block() -> None:
        async with guard:
            pass

    def run_loop() -> None:
        loop_thread.append(threading.current_thread())
        asyncio.run(block())

    thread = threading.Thread(target=run_loop)
    thread.start()
    try:
        assert held.wait(10), "the async thaw never began"
        guard.guard.release()
    finally:
        thread.join(10)
    proc.assert_none_stopped(tree.pids)


def _events_frozen(path: str) -> bool:
    with open(f"{path}/cgroup.events") as f:
        return "frozen 1" in f.read()


def _tree_for(
    backend: str, size: int, make_tree: MakeTree, request: pytest.FixtureRequest
) -> tuple[WorkerTree, str]:
    """An idle tree of ``size`` processes for ``backend``, in a cgroup of its own for the
    cgroup backend: the tree, and that cgroup's path ("" for the others)."""
    require_root(f"the {backend} backend")
    if backend != "cgroup":
        return make_tree(wide(size), mode="idle"), ""
    cg = request.getfixturevalue("cgroup")(2)
    return make_tree(wide(size), mode="idle", spawn=cg.spawn), cg.path


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["signal", "cgroup", "ptrace"])
async def test_a_timeout_at_any_point_of_the_freeze_leaves_nothing_stopped(
    backend: str, make_tree: MakeTree, request: pytest.FixtureRequest
) -> None:
    """move_on_after with timeouts from 0 to 50 ms lands at every stage of the freeze (and
    in the block, for the longer ones), on each backend: a block that runs holds the whole
    tree stopped, and once the scope is left nothing is stopped (or frozen), checked
    through /proc and the cgroup's own file."""
    tree, path = _tree_for(backend, 40, make_tree, request)
    ran = cut = 0
    for timeout in (0, 1e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2) * 2:
        with anyio.move_on_after(timeout) as scope:
            async with treeguard.guard(tree.root, include_root=True, backend=backend) as g:  # type: ignore[arg-type]
                ran += 1
                assert g.frozen
                if path:
                    assert _events_frozen(path)
                else:  # (T, or t under ptrace)
                    assert not proc.not_stopped(tree.pids)
                await anyio.sleep(1)
        assert scope.cancelled_caught
        cut += 1
        if path:
            assert not _events_frozen(path)
        proc.assert_none_stopped(tree.pids)
    # (A cgroup freeze that the kernel completes at once may not await at all on asyncio:
    # then every block runs, cut short in its sleep.)
    assert ran, "no block ran: the freezes never finished"


@pytest.mark.anyio
async def test_a_guard_collected_while_frozen_inside_the_loop_thaws(make_tree: MakeTree) -> None:
    """A guard entered by hand (``__aenter__``) and dropped while frozen, the event loop
    running: the collection thaws every process (its finalizer runs the thaw in place)."""
    tree = make_tree(wide(30), mode="idle")
    manager = treeguard.guard(root=tree.root, include_root=True)
    g = await manager.__aenter__()
    proc.assert_all_stopped(tree.pids)
    del g, manager
    gc.collect()
    proc.assert_none_stopped(tree.pids)


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["signal", "cgroup"])
async def test_a_forked_child_of_a_frozen_async_supervisor_never_thaws(
    backend: str, make_tree: MakeTree, request: pytest.FixtureRequest
) -> None:
    """Inside ``async with guard()``, a forked child releases, leaves the block on an event
    loop of its own, closes and drops the guard: the tree stays stopped (checked through /proc
    and the cgroup's file) until the parent's block ends."""
    tree, path = _tree_for(backend, 10, make_tree, request)
    manager = treeguard.guard(tree.root, include_root=True, backend=backend)  # type: ignore[arg-type]
    async with manager as g:

        def child() -> str:
            g.release()
            asyncio.run(manager.__aexit__(None, None, None))
            g.close()
            frozen = g.frozen
            manager.guard = None  # type: ignore[assignment]
            gc.collect()
            return str(frozen)

        assert proc.in_child(child) == "False"
        assert g.frozen
        if path:
            assert _events_frozen(path)
        else:
            proc.assert_all_stopped(tree.pids)
    if path:
        assert not _events_frozen(path)
    proc.assert_none_stopped(tree.pids)


def _freeze_on(go: threading.Barrier, g: treeguard.ProcessesGuard, out: list[str]) -> None:
    go.wait()
    try:
        g.freeze()
        out.append("frozen")
    except treeguard.FreezeError:
        out.append("refused")


def test_two_threads_freezing_one_guard_at_once_leave_one_freeze_to_release(
    make_tree: MakeTree,
) -> None:
    """Two threads freeze one guard at the same moment: one freezes, the other is refused
    (the guard is frozen), and one release() thaws everything, while the guard is still
    referenced (a second freeze that replaced the first would leave the first's processes
    to the garbage collector)."""
    tree = make_tree(wide(100), mode="idle")
    for _ in range(5):
        g = treeguard.ProcessesGuard(root=tree.root, include_root=True)
        out: list[str] = []
        _in_two_threads(_freeze_on, threading.Barrier(2), g, out)
        g.release()
        proc.assert_none_stopped(tree.pids)
        assert sorted(out) == ["frozen", "refused"], out


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancellations_during_the_thaw_leave_nothing_stopped(
    make_tree: MakeTree,
) -> None:
    """``Task.cancel()`` (asyncio's own, which anyio's shield does not stop) sent again and
    again while the block's thaw of 300 processes runs: the thaw is finished anyway."""
    tree = make_tree(wide(300), mode="idle")
    entered = asyncio.Event()

    async def hold() -> None:
        async with treeguard.guard(root=tree.root, include_root=True):
            entered.set()
            await asyncio.sleep(0)

    task = asyncio.create_task(hold())
    await entered.wait()
    cancels = 0
    while not task.done():
        task.cancel()
        cancels += 1
        await asyncio.sleep(0)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert cancels > 1
    proc.assert_none_stopped(tree.pids)


def test_a_signal_handler_that_releases_during_the_freeze_does_not_undermine_it(
    make_tree: MakeTree,
) -> None:
    """A SIGUSR1 handler calls release() while the main thread is freezing (half way: the
    root is stopped): the freeze is either refused that release (the handler's FreezeError
    aborts it, which thaws) or finishes with the tree stopped; it is never undone under its
    feet (which ended in a StopTimeoutError, or processes stopped with nothing to thaw them)."""
    tree = make_tree(wide(200), mode="idle")
    g = treeguard.ProcessesGuard(root=tree.root, include_root=True)
    previous = signal.signal(signal.SIGUSR1, lambda *_: g.release())
    sender = threading.Thread(
        target=lambda: (
            proc.wait_until(lambda: proc.stopped([tree.root]), what="the freeze to start"),
            os.kill(os.getpid(), signal.SIGUSR1),
        )
    )
    try:
        sender.start()
        try:
            g.freeze()
            proc.assert_all_stopped(tree.pids)
        except treeguard.FreezeError as err:
            assert not isinstance(err, treeguard.StopTimeoutError), err
        sender.join()
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, previous)
        g.release()
    proc.assert_none_stopped(tree.pids)


@pytest.mark.anyio
async def test_two_guards_freezing_one_tree_at_once_keep_it_stopped_until_both_release(
    make_tree: MakeTree,
) -> None:
    """Two tasks freeze the same tree at the same time with two guards; the one that
    leaves first must not resume what the other still holds."""
    tree = make_tree(wide(300), mode="idle")
    second_left = anyio.Event()
    first_in = anyio.Event()

    async def second() -> None:
        async with treeguard.guard(tree.root, include_root=True):
            await first_in.wait()
        second_left.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        async with treeguard.guard(tree.root, include_root=True) as g:
            first_in.set()
            await second_left.wait()
            assert g.frozen
            running = proc.not_stopped(tree.pids)
            assert not running, f"{len(running)} tasks run under a guard that holds them"
    proc.assert_none_stopped(tree.pids)


def test_a_release_never_waits_for_ever_for_steps_left_suspended(make_tree: MakeTree) -> None:
    """A freeze whose steps were left suspended by a driver that went away (an event loop
    stopped with the task pending, here a thread that took one step and ended) holds the
    guard's turn: a release from another thread gives up with FreezeError after a bounded
    wait instead of hanging; closing the steps thaws."""
    tree = make_tree(wide(20), mode="idle")
    g = treeguard.ProcessesGuard(root=tree.root, include_root=True, timeout=0.1)
    left: list[Any] = []

    def one_step() -> None:
        # A freeze whose every process is proven stopped at the first look ends without a
        # wait: freeze again until one is suspended at its wait.
        for _ in range(50):
            steps = g._freeze_steps()
            try:
                next(steps)
            except StopIteration:
                g.release()
                continue
            left.append(steps)
            return

    stepper = threading.Thread(target=one_step)
    stepper.start()
    stepper.join()
    (steps,) = left
    try:
        assert g.frozen
        started = time.perf_counter()
        with pytest.raises(treeguard.FreezeError, match="another thread is freezing"):
            g.release()
        assert time.perf_counter() - started < 5
    finally:
        steps.close()  # the abandoned freeze thaws on its way out
    assert not g.frozen
    proc.assert_none_stopped(tree.pids)
