"""What a guard keeps between signal freezes (:mod:`treeguard._backends._known`), at its
edges: many guards in one process, a close racing the start of a freeze, one PID met as two
processes in one freeze, an interrupt while the freeze hands its descriptors over, a signal
handler that closes the guard during its thaw. Each descriptor is closed exactly once, and
nothing stays open once the guards are closed."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import treeguard
from tests import proc
from tests.integration.test_known import ROOT_FD, _fds, _fork, _frozen_again, _settled_fds, forker
from treeguard import ProcessesGuard
from treeguard._backends import _known, _pidfds
from treeguard._backends._known import Known
from treeguard._backends._pidfds import Entry
from treeguard._thaw import pidfd_inode
from treeguard.procfs import ProcFS

__all__ = ["forker"]  # the fixture, used here

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds here")


def test_what_every_guard_keeps_together_stays_within_the_cap(
    forker: subprocess.Popen[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap bounds the descriptors kept by all the guards of the process, not by each:
    a supervisor with a guard per tree must not run out of descriptors between freezes."""
    kids = _fork(forker, 4)
    tree = [forker.pid, *kids]
    before = _settled_fds(forker.pid)
    monkeypatch.setattr(_known, "_cap", lambda: 8)
    monkeypatch.setattr(_known, "_ALL", weakref.WeakSet())  # guards of other tests aside
    guards = [ProcessesGuard(root=forker.pid, include_root=True) for _ in range(3)]
    try:
        for guard in guards:
            _frozen_again(guard, tree)
        assert _fds() - before <= 8 + ROOT_FD * len(guards)
        for guard in guards:  # frozen again, each within what the others leave
            _frozen_again(guard, tree)
        assert _fds() - before <= 8 + ROOT_FD * len(guards)
        assert sum(guard.report.known for guard in guards) == len(kids)
    finally:
        for guard in guards:
            guard.close()
    assert _fds() == before


class _Gate:
    """A lock that holds the first thread to take it (the freeze lending its kept
    descriptors) until ``go`` is set, letting every other thread through at once."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.waiting = threading.Event()
        self.go = threading.Event()
        self._held: int | None = None

    def __enter__(self) -> bool:
        if self._held is None:
            self._held = threading.get_ident()
            self.waiting.set()
            assert self.go.wait(10), "the test never let the freeze go on"
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)


def test_a_guard_closed_as_its_freeze_begins_leaks_nothing(
    forker: subprocess.Popen[Any],
) -> None:
    """``guard.close()`` from another thread found the guard not frozen yet and closes its
    memo while the freeze, begun just then, holds the kept descriptors but has not borrowed
    them: that freeze must not keep its descriptors in what was closed (no one would ever
    close them)."""
    kid = _fork(forker)[0]
    tree = [forker.pid, kid]
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, tree)
    known = guard._memo.get("signal walk")
    assert isinstance(known, Known)
    gate = _Gate(known._lock)
    known._lock = gate  # type: ignore[assignment]
    errors: list[BaseException] = []

    def freeze() -> None:
        try:
            _frozen_again(guard, tree)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    worker = threading.Thread(target=freeze)
    worker.start()
    try:
        assert gate.waiting.wait(10)
        guard._memo.close()  # what guard.close() does once it found the guard not frozen
    finally:
        gate.go.set()
        worker.join(10)
    assert not worker.is_alive() and not errors, errors
    proc.assert_none_stopped(tree)
    guard.close()
    assert _fds() == before


def _counted(pid: int) -> tuple[int, int, Any]:
    """A counted pidfd and stat descriptor of ``pid``, and its stat."""
    fd = _pidfds.open_pidfd(pid)
    found = ProcFS().open_stat(pid, keep=True)
    assert fd is not None and found is not None
    statfd, stat = found
    _pidfds.count(statfd)
    return fd, statfd, stat


def test_one_pid_met_as_two_processes_in_one_freeze_keeps_one_and_leaks_nothing(
    forker: subprocess.Popen[Any],
) -> None:
    """A process stopped early in a freeze, killed by someone and reaped at once (its parent
    ignores SIGCHLD), its PID taken by a newcomer that a later round stops: two entries of
    one PID reach :meth:`Known.keep`, each holding its own descriptors. Both may not be
    kept under that PID: the one not kept must close its own."""
    first, second = _fork(forker, 2)
    gc.collect()  # what earlier tests left to the collector goes now
    before, held = _fds(), _pidfds.held()
    entries = []
    for pid in (first, second):
        fd, statfd, stat = _counted(pid)
        entry = Entry(first, fd, stat, True, statfd, pidfd_inode(fd))  # both under one PID
        entry.parent = forker.pid
        entries.append(entry)
    known = Known()
    known.keep(entries)
    for entry in entries:  # the thaw's release, then the freeze's end
        _pidfds.release(entry)
    known.close()
    assert _fds() == before
    assert _pidfds.held() == held


def test_an_interrupt_while_a_freeze_hands_over_its_descriptors_leaks_none(
    forker: subprocess.Popen[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt (``KeyboardInterrupt``) that lands in :meth:`Known.keep`: the freeze
    thaws, and every descriptor, kept or borrowed, is still closed once, later."""
    kids = _fork(forker, 3)
    tree = [forker.pid, *kids]
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, tree)
    cap = _known._cap

    def interrupted() -> int:
        monkeypatch.setattr(_known, "_cap", cap)  # once
        raise KeyboardInterrupt

    monkeypatch.setattr(_known, "_cap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        guard.freeze()
    proc.assert_none_stopped(tree)
    _frozen_again(guard, tree)  # the guard still works, and lets nothing go twice
    guard.close()
    assert _fds() == before


class _HandlerLands:
    """A lock that runs ``handler`` (what a signal handler landing right there does) the
    first time this thread takes it once armed, and that fails rather than hangs if the
    lock is held by that very thread."""

    def __init__(self, lock: Any, handler: Any) -> None:
        self._lock = lock
        self._handler = handler
        self.armed = False

    def __enter__(self) -> bool:
        if not self._lock.acquire(timeout=5):
            raise AssertionError("the lock is held by this very thread: a deadlock")
        if self.armed:
            self.armed = False
            self._handler()
        return True

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_signal_handler_that_closes_the_guard_during_its_thaw_does_not_hang(
    forker: subprocess.Popen[Any],
) -> None:
    """A SIGTERM handler that closes the guard, landing while the thaw gives the kept
    descriptors back (under the lock that decides lending and closing): the close thaws
    and lets go of everything, and the thaw it interrupted ends."""
    kid = _fork(forker)[0]
    tree = [forker.pid, kid]
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, tree)
    guard.freeze()
    known = guard._memo.get("signal walk")
    assert isinstance(known, Known)
    probe = _HandlerLands(known._lock, guard.close)
    known._lock = probe  # type: ignore[assignment]
    probe.armed = True
    try:
        proc.assert_all_stopped(tree)
    finally:
        guard.release()
    assert not probe.armed  # the handler ran
    proc.assert_none_stopped(tree)
    guard.close()
    assert _fds() == before


# -- what was found sound, held to it -------------------------------------------------------

# A root whose one child (printed) starts a thread on SIGUSR1 that forks a grandchild
# (printed) and stays, and execs into a pausing Python on SIGUSR2.
_THREADER = r"""
import os, signal, sys, threading
if os.fork() == 0:
    def spawn():
        kid = os.fork()
        if kid == 0:
            signal.pause()
            os._exit(0)
        os.write(1, b"%d\n" % kid)
        threading.Event().wait()
    def again(*_):
        os.execv(sys.executable, [sys.executable, "-c", "import signal\nwhile 1: signal.pause()"])
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=spawn, daemon=True).start())
    signal.signal(signal.SIGUSR2, again)
    os.write(1, b"%d\n" % os.getpid())
    while True:
        signal.pause()
os.wait()
"""


@pytest.fixture
def threader() -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """The root of ``_THREADER`` and the PIDs it printed so far (its child first); all are
    killed after the test."""
    p = subprocess.Popen([sys.executable, "-c", _THREADER], stdout=subprocess.PIPE)
    assert p.stdout is not None
    pids = [int(p.stdout.readline())]
    try:
        yield p, pids
    finally:
        for pid in [*reversed(pids), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.stdout.close()
        p.wait()


def test_a_child_of_a_thread_made_since_the_last_freeze_is_stopped(
    threader: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    """The kept stat says one thread; the process has two now, and the second forked: the
    stat read again when verifying sees two, so the new thread's children file is read."""
    root, pids = threader
    child = pids[0]
    guard = ProcessesGuard(root=root.pid, include_root=True)
    _frozen_again(guard, [root.pid, child])
    os.kill(child, signal.SIGUSR1)
    assert root.stdout is not None
    pids.append(int(root.stdout.readline()))
    tree = [root.pid, *pids]
    assert set(_frozen_again(guard, tree)) == set(tree)
    assert guard.report.known == 1  # the child, met through what was kept
    guard.close()


def test_a_process_that_execd_since_is_met_through_what_was_kept(
    threader: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    """An exec keeps the process (its PID, its starttime, its /proc entry): the kept pidfd
    and stat file still name it, and it is stopped through them."""
    root, pids = threader
    child = pids[0]
    tree = [root.pid, child]
    guard = ProcessesGuard(root=root.pid, include_root=True)
    _frozen_again(guard, tree)
    cmdline = proc.read_text(f"/proc/{child}/cmdline")
    os.kill(child, signal.SIGUSR2)
    proc.wait_until(lambda: proc.read_text(f"/proc/{child}/cmdline") != cmdline, what="exec")
    assert set(_frozen_again(guard, tree)) == set(tree)
    assert guard.report.known == 1
    guard.close()


def test_a_guard_collected_while_frozen_again_thaws_and_closes_what_it_kept(
    forker: subprocess.Popen[Any],
) -> None:
    """Its thaw and the close of what it kept run as finalizers, in either order: the
    close waits for the thaw to give the descriptors back."""
    kids = _fork(forker, 2)
    tree = [forker.pid, *kids]
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, tree)
    guard.freeze()
    assert guard.report.known == len(kids)
    proc.assert_all_stopped(tree)
    del guard
    gc.collect()
    proc.assert_none_stopped(tree)
    assert _fds() == before


def test_a_token_keeps_nothing_open(forker: subprocess.Popen[Any]) -> None:
    """The guard behind a token hands its freeze over (its entries give back what they
    borrowed) and is gone once the token is made: so is what it kept."""
    kids = _fork(forker, 2)
    tree = [forker.pid, *kids]
    before = _settled_fds(forker.pid)
    token = treeguard.freeze(forker.pid, include_root=True)
    try:
        proc.assert_all_stopped(tree)
        assert _fds() == before
    finally:
        treeguard.thaw(token)
    proc.assert_none_stopped(tree)
