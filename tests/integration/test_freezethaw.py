"""``freezethaw(fn, *args)``: returns fn's value, always thaws, and turns termination
signals into FrozenInterrupt (in the main thread only)."""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

import treeguard
from tests import proc
from treeguard._drive import Steps, run_sync
from treeguard._freezethaw import INTERRUPTING_SIGNALS, _abort_on, _Interrupts
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
        assert all(seen[s] != before[s] for s in INTERRUPTING_SIGNALS)
        assert _handlers() == before
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT, signal.SIGALRM])
def test_a_signal_while_frozen_raises_frozen_interrupt(signum: int, make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    before = _handlers()
    after_kill: list[str] = []

    def body() -> None:
        proc.assert_all_stopped(tree.pids)
        os.kill(os.getpid(), signum)
        for _ in range(10**7):  # the handler runs between two bytecodes
            pass
        after_kill.append("the signal was not turned into an exception")

    with pytest.raises(treeguard.FrozenInterrupt) as info:
        treeguard.freezethaw(body, root=tree.root, include_root=True)
    assert info.value.signum == signum
    assert not after_kill
    _running(tree)
    assert _handlers() == before


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
    with pytest.raises(treeguard.FrozenInterrupt):
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
import json, sys, time
import treeguard
from treeguard._workers import WorkerTree, wide

tree = WorkerTree(wide(4)).start()
try:
    print(json.dumps({"pids": tree.pids, "memfd": tree._memfd, "size": tree.size}), flush=True)

    def body():
        print("frozen", flush=True)
        time.sleep(120)
        return "finished"

    try:
        treeguard.freezethaw(body)
    except treeguard.FrozenInterrupt as err:
        print(json.dumps({"interrupted": err.signum}), flush=True)
        sys.stdin.readline()  # the test checks that the tree runs, then lets us go
        raise
finally:
    tree.close()
"""


def test_sigterm_to_the_supervisor_thaws_its_tree() -> None:
    sup = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert sup.stdin is not None and sup.stdout is not None and sup.stderr is not None
    try:
        info = json.loads(sup.stdout.readline())
        pids: list[int] = info["pids"]
        size = info["size"]
        # The supervisor's counters, read independently through its memfd.
        with open(f"/proc/{sup.pid}/fd/{info['memfd']}", "rb") as f:
            mem = mmap.mmap(f.fileno(), size * SLOTS * 8, prot=mmap.PROT_READ)

        def counters() -> list[int]:
            return list(struct.unpack_from(f"{size * SLOTS}q", mem, 0))

        assert sup.stdout.readline().strip() == "frozen"
        proc.assert_all_stopped(pids)
        assert proc.counters_still(counters, 0.005)

        sup.send_signal(signal.SIGTERM)
        assert json.loads(sup.stdout.readline()) == {"interrupted": signal.SIGTERM}
        proc.wait_until(lambda: not proc.stopped(pids), what="the thaw")
        proc.counters_moving(counters, [i * SLOTS for i in range(size)])
        mem.close()

        sup.stdin.write("go\n")
        sup.stdin.flush()
        assert sup.wait(60) == 1
        assert "FrozenInterrupt: SIGTERM received while frozen" in sup.stderr.read()
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)  # thaws if frozen, then stdin's EOF lets it go
        sup.stdin.close()
        if sup.poll() is None:
            try:
                sup.wait(30)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()
        sup.stdout.close()
        sup.stderr.close()
