"""``freezethaw(fn, *args)``: returns fn's value, always thaws, and turns termination
signals into FrozenInterrupt (in the main thread only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

import treeguard
from tests import proc
from treeguard._drive import Steps, run_sync
from treeguard._freezethaw import INTERRUPTING_SIGNALS, _abort_on, _Interrupted, _Interrupts
from treeguard._workers import SLOTS, WorkerTree, demo_spec, wide

MakeTree = Callable[..., WorkerTree]


def _running(tree: WorkerTree) -> None:
    proc.wait_until(lambda: not proc.stopped(tree.pids), what="the thaw")
    proc.counters_moving(tree.counters, [i * SLOTS for i in range(tree.size)])


def _handlers() -> dict[int, Any]:
    return {sig: signal.getsignal(sig) for sig in INTERRUPTING_SIGNALS}


def test_returns_what_fn_returned_and_thaws(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())

    def body(a: int, b: int) -> int:
        proc.assert_all_stopped(tree.pids)
        assert proc.counters_still(tree.counters, tree.period)
        return a + b

    assert treeguard.freezethaw(body, 2, 3, root=tree.root, include_root=True) == 5
    _running(tree)


def test_an_error_from_fn_propagates_after_the_thaw(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    before = _handlers()

    def body() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        treeguard.freezethaw(body, root=tree.root, include_root=True)
    _running(tree)
    assert _handlers() == before


def test_handlers_are_installed_while_frozen_and_restored(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        before = _handlers()
        seen: dict[int, Any] = {}
        treeguard.freezethaw(lambda: seen.update(_handlers()), root=tree.root)
        held = [s for s in INTERRUPTING_SIGNALS if before[s] != signal.SIG_IGN]
        assert signal.SIGUSR1 not in held and signal.SIGTERM in held
        assert all(seen[s] != before[s] for s in held)
        assert seen[signal.SIGUSR1] == signal.SIG_IGN  # ignored before: left ignored
        assert _handlers() == before
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _HandlerRan(Exception):
    pass


def _interrupted_body(tree: WorkerTree, signum: int, swallowed: list[str]) -> Callable[[], None]:
    def body() -> None:
        proc.assert_all_stopped(tree.pids)
        try:
            os.kill(os.getpid(), signum)
            for _ in range(10**7):  # the handler runs between two bytecodes
                pass
        except Exception:  # noqa: BLE001 - what careless user code does
            swallowed.append("an `except Exception` in fn swallowed the signal")
        swallowed.append("fn went on after the signal")

    return body


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGALRM])
def test_a_signal_while_frozen_goes_to_the_previous_handler_after_the_thaw(
    signum: int, make_tree: MakeTree
) -> None:
    """The previous handler (pytest-timeout's SIGALRM, an application's SIGTERM) runs once
    the tree is thawed, and what it raises is what freezethaw raises."""
    tree = make_tree(wide(3))
    calls: list[tuple[int, bool]] = []

    def handler(sig: int, frame: object) -> None:
        calls.append((sig, not proc.stopped(tree.pids)))  # thawed by now?
        raise _HandlerRan(sig)

    previous = signal.signal(signum, handler)
    try:
        before = _handlers()
        swallowed: list[str] = []
        body = _interrupted_body(tree, signum, swallowed)
        with pytest.raises(_HandlerRan):
            treeguard.freezethaw(body, root=tree.root, include_root=True)
        assert calls == [(signum, True)]
        assert not swallowed
        assert _handlers() == before
    finally:
        signal.signal(signum, previous)
    _running(tree)


def test_sigint_raises_keyboard_interrupt_after_the_thaw(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    swallowed: list[str] = []
    body = _interrupted_body(tree, signal.SIGINT, swallowed)
    with pytest.raises(KeyboardInterrupt):
        treeguard.freezethaw(body, root=tree.root, include_root=True)
    assert not swallowed
    _running(tree)


def test_a_handler_that_returns_leaves_frozen_interrupt(make_tree: MakeTree) -> None:
    """fn was stopped by the signal; its handler ran after the thaw and did not raise:
    freezethaw says fn did not finish."""
    tree = make_tree(wide(3))
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda sig, frame: calls.append(sig))
    try:
        swallowed: list[str] = []
        body = _interrupted_body(tree, signal.SIGUSR2, swallowed)
        with pytest.raises(treeguard.FrozenInterrupt) as info:
            treeguard.freezethaw(body, root=tree.root, include_root=True)
        assert info.value.signum == signal.SIGUSR2
        assert calls == [signal.SIGUSR2]
        assert not swallowed
    finally:
        signal.signal(signal.SIGUSR2, previous)
    _running(tree)


def test_a_signal_while_freezing_aborts_and_thaws(make_tree: MakeTree) -> None:
    """A signal recorded while freezing stops the freeze at its next wait, which thaws."""
    tree = make_tree(wide(200), mode="idle")  # big enough for the walk itself to pause
    interrupts = _Interrupts()
    seen_stopped: list[bool] = []

    def signal_arrives_at_first_wait(steps: Steps[Any]) -> Steps[Any]:
        # The first wait once part of the tree has stopped (the root's generation first).
        for wait in steps:
            if proc.stopped(tree.pids):
                break
            yield wait
        seen_stopped.append(bool(proc.stopped(tree.pids)))
        interrupts.handler(signal.SIGTERM, None)  # what the installed handler does
        yield wait
        yield from steps  # never reached: the freeze is abandoned at that wait

    guard = treeguard.ProcessesGuard(tree.root, include_root=True, timeout=5.0)
    with pytest.raises(_Interrupted):
        run_sync(_abort_on(signal_arrives_at_first_wait(guard._freeze_steps()), interrupts))
    assert seen_stopped == [True]  # the freeze was under way
    assert not guard.frozen
    proc.assert_none_stopped(tree.pids)


def test_off_the_main_thread_no_handlers(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    before = _handlers()
    results: list[Any] = []

    def worker() -> None:
        def body() -> str:
            proc.assert_all_stopped(tree.pids)
            results.append(_handlers())
            return "done"

        results.append(treeguard.freezethaw(body, root=tree.root, include_root=True))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert results == [before, "done"]
    _running(tree)


@pytest.mark.parametrize(
    ("fn", "options"),
    [(42, {}), (print, {"timeout": 0}), (print, {"scope": "galaxy"}), (print, {"nope": 1})],
)
def test_bad_arguments_touch_nothing(fn: Any, options: dict[str, Any], make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    before = _handlers()
    with pytest.raises(treeguard.InvalidArgumentError):
        treeguard.freezethaw(fn, **options)
    assert not proc.stopped(tree.pids)
    assert _handlers() == before


SUPERVISOR = r"""
import json, subprocess, sys, time
import treeguard

child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL
)
print(json.dumps({"pid": child.pid}), flush=True)

def body():
    print("frozen", flush=True)
    time.sleep(120)

treeguard.freezethaw(body, root=child.pid, include_root=True)
print("not reached: SIGTERM's default action ends this process", flush=True)
"""


def test_sigterm_to_the_supervisor_thaws_then_ends_it() -> None:
    """SIGTERM's default action still ends the supervisor, but only after the thaw: its
    child (which outlives it) runs again."""
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None
    child = -1
    try:
        child = json.loads(sup.stdout.readline())["pid"]
        start = proc.starttime(child)
        assert sup.stdout.readline().strip() == "frozen"
        proc.assert_all_stopped([child])
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == -signal.SIGTERM
        assert sup.stdout.read() == ""
        proc.wait_until(lambda: proc.state(child) not in ("T", None), 10, "the child to run")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        sup.stdout.close()
        if child > 0 and proc.starttime(child) == start:  # orphaned now: ended by PID
            os.kill(child, signal.SIGKILL)
