"""Adversarial checks of freezethaw(fn): an async fn, a signal held back when fn raises, a
child that fn forks."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import treeguard
from tests import proc
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]
MAIN_PID = os.getpid()


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


class _CleanupFailed(Exception):
    pass


def test_a_signal_held_back_reaches_its_handler_even_when_fn_raises(make_tree: MakeTree) -> None:
    """A signal held back while frozen is handed over after the thaw, also when fn ends with
    an exception of its own (here a cleanup that fails in fn's ``finally``, after the held
    signal stopped it): without treeguard the handler would have run, so it must run
    (once, after the thaw), whatever fn raised."""
    tree = make_tree(wide(3))
    calls: list[tuple[int, bool]] = []

    def handler(sig: int, frame: object) -> None:
        calls.append((sig, not proc.stopped(tree.pids)))  # thawed by now?

    def body() -> None:
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            proc.wait_until(lambda: False, timeout=10, what="the held signal to stop fn")
        finally:
            raise _CleanupFailed

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(_CleanupFailed):
            treeguard.freezethaw(body, root=tree.root, include_root=True)
        assert calls == [(signal.SIGUSR1, True)], "the held-back signal was lost"
    finally:
        signal.signal(signal.SIGUSR1, previous)
    proc.assert_none_stopped(tree.pids)


def test_a_child_forked_by_fn_leaves_freezethaw_without_thawing(make_tree: MakeTree) -> None:
    """fn forks; the child returns through freezethaw (its thaw, its handlers' restore) as
    the parent's code would: the tree stays stopped until the parent's own thaw."""
    tree = make_tree(wide(5), mode="idle")
    child_status: list[int] = []

    def body() -> str:
        pid = os.fork()
        if pid == 0:
            return "child"
        _, status = os.waitpid(pid, 0)
        child_status.append(os.waitstatus_to_exitcode(status))
        proc.assert_all_stopped(tree.pids)
        return "parent"

    try:
        result = treeguard.freezethaw(body, root=tree.root, include_root=True)
    except BaseException:
        if not child_status and os.getpid() != MAIN_PID:  # pragma: no cover - the child
            os._exit(3)
        raise
    if os.getpid() != MAIN_PID:  # pragma: no cover - the child, back from freezethaw
        os._exit(0 if result == "child" and not proc.not_stopped(tree.pids) else 1)
    assert result == "parent"
    assert child_status == [0], "the child thawed (or failed)"
    proc.assert_none_stopped(tree.pids)
