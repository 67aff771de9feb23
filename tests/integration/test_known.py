"""A guard frozen again with signals meets the processes it stopped last time through the
pidfd and stat file it kept: every change since (a fork, an exit, a PID reused, a stop or a
tracer from someone else) is met afresh, and what it keeps is let go of on close."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from tests import proc
from tests.conftest import require_root
from tests.integration.conftest import FORK_ON_F, fork_one
from treeguard import ProcessesGuard, Skip
from treeguard._backends import _known, _signal
from treeguard._backends._known import Known, _files, _Proc
from treeguard.errors import FreezePermissionError
from treeguard.procfs import ProcFS

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds here")


@pytest.fixture
def forker() -> Iterator[subprocess.Popen[Any]]:
    """A process that forks a child (which waits for a signal) for each ``f`` written to
    it; it and every child are killed after the test."""
    p = subprocess.Popen(
        [sys.executable, "-c", FORK_ON_F], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    kids: list[int] = []
    p.kids = kids  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        for pid in [*kids, p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        p.stdout.close()
        p.wait()  # its children are reaped by init once it is gone


def _fork(forker: subprocess.Popen[Any], n: int = 1) -> list[int]:
    new = [fork_one(forker) for _ in range(n)]
    forker.kids.extend(new)  # type: ignore[attr-defined]
    return new


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


#: The pidfd a guard keeps of its root (another process than the caller) from its first
#: freeze to its close: the next freeze's check of the root polls it.
ROOT_FD = 1


def _settled_fds(root: int) -> int:
    """Descriptors open once a freeze of this process made what it keeps for every freeze
    (the thaw's reserve, ...), with no guard keeping anything."""
    with ProcessesGuard(root=root, include_root=True) as guard:
        pass
    guard.close()
    gc.collect()  # what earlier tests left to the collector (kept descriptors) goes now
    return _fds()


def _frozen_again(guard: ProcessesGuard, tree: list[int]) -> tuple[int, ...]:
    """Freeze, check every process of ``tree`` stopped, release: the PIDs frozen."""
    guard.freeze()
    try:
        pids = guard.pids
        proc.assert_all_stopped(tree)
    finally:
        guard.release()
    proc.assert_none_stopped(tree)
    return pids


def _kept_after_a_freeze(root: int, kid: int) -> tuple[ProcessesGuard, Known]:
    """A guard that froze ``root`` and its child ``kid`` once, and what it keeps."""
    guard = ProcessesGuard(root=root, include_root=True)
    _frozen_again(guard, [root, kid])
    known = guard._memo.get("signal walk")
    assert isinstance(known, Known)
    return guard, known


def test_a_guard_frozen_again_meets_its_processes_through_what_it_kept(
    forker: subprocess.Popen[Any],
) -> None:
    kids = _fork(forker, 3)
    tree = [forker.pid, *kids]
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, tree)
    assert guard.report.known == 0  # a first freeze opens everything
    assert _fds() == before + 2 * len(kids) + ROOT_FD  # a pidfd and a stat file each, kept
    for _ in range(3):
        _frozen_again(guard, tree)
        assert guard.report.known == len(kids)  # the root is where the walk starts: met afresh
        assert guard.report.stopped == len(tree)
    guard.close()
    assert _fds() == before


def test_a_process_forked_or_exited_since_is_met_afresh(forker: subprocess.Popen[Any]) -> None:
    kids = _fork(forker, 3)
    with ProcessesGuard(root=forker.pid, include_root=True) as guard:
        pass
    newcomer = _fork(forker)[0]
    os.kill(kids[0], signal.SIGKILL)  # a zombie: the forker never reaps
    proc.wait_until(lambda: proc.state(kids[0]) == "Z", what="the child is a zombie")
    live = [forker.pid, *kids[1:], newcomer]
    pids = _frozen_again(guard, live)
    assert guard.report.known == 2
    assert guard.report.skipped == {kids[0]: Skip.ZOMBIE}
    assert set(pids) == set(live)
    guard.close()


def test_a_pid_that_names_another_process_now_is_never_taken_for_the_one_kept(
    forker: subprocess.Popen[Any],
) -> None:
    """The kept stat file of a process that was reaped no longer reads, whatever its PID
    holds now: a child under that PID (of the same parent) is met afresh, and stopped."""
    kid = _fork(forker)[0]
    guard, known = _kept_after_a_freeze(forker.pid, kid)
    kept = known._procs[kid]
    # The PID reused: what is kept under it is a process reaped since (made and reaped
    # here, by this test), the child listed under it is the live one.
    gone = subprocess.Popen(["true"])
    gone_fd, gone_stat = os.pidfd_open(gone.pid), os.open(f"/proc/{gone.pid}/stat", os.O_RDONLY)
    gone.wait()
    files = _files(gone_fd, gone_stat)
    os.close(kept.fd), os.close(kept.statfd)  # (counted still: the guard closes these)
    known._procs[kid] = _Proc(forker.pid, gone_fd, gone_stat, kept.stat, kept.inode, files)
    assert kid in _frozen_again(guard, [forker.pid, kid])
    assert guard.report.known == 0
    guard.close()


def test_a_process_stopped_by_someone_else_since_is_left_to_them(
    forker: subprocess.Popen[Any],
) -> None:
    kids = _fork(forker, 2)
    with ProcessesGuard(root=forker.pid, include_root=True) as guard:
        pass
    os.kill(kids[0], signal.SIGSTOP)
    try:
        proc.wait_until(lambda: proc.state(kids[0]) == "T", what="stopped by the test")
        _frozen_again(guard, [forker.pid, kids[1]])
        assert guard.report.skipped == {kids[0]: Skip.ALREADY_STOPPED}
        assert guard.report.known == 1
        assert proc.state(kids[0]) == "T"  # not resumed: not ours
    finally:
        os.kill(kids[0], signal.SIGCONT)
    guard.close()


def test_what_a_guard_keeps_has_a_cap(
    forker: subprocess.Popen[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    kids = _fork(forker, 4)
    before = _settled_fds(forker.pid)
    monkeypatch.setattr(_known, "_cap", lambda: 4)
    monkeypatch.setattr(_known, "_ALL", weakref.WeakSet())  # guards of other tests aside
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, [forker.pid, *kids])
    assert _fds() == before + 4 + ROOT_FD
    _frozen_again(guard, [forker.pid, *kids])
    assert guard.report.known == 2
    guard.close()
    assert _fds() == before


def test_a_freeze_short_of_descriptors_gives_back_what_it_borrowed(
    forker: subprocess.Popen[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its budget a freeze lets go of pidfds as it goes: those it borrowed stay the
    guard's until the next keep, which closes them; nothing leaks, nothing is closed twice."""
    kids = _fork(forker, 4)
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, [forker.pid, *kids])
    monkeypatch.setattr(_signal, "budget", lambda: 0)
    _frozen_again(guard, [forker.pid, *kids])
    assert guard.report.known == len(kids)
    assert _fds() == before + ROOT_FD  # nothing kept: no pidfd was held to the end
    monkeypatch.undo()
    _frozen_again(guard, [forker.pid, *kids])
    assert guard.report.known == 0
    guard.close()
    assert _fds() == before


def test_closed_while_lent_it_closes_once_given_back(forker: subprocess.Popen[Any]) -> None:
    kid = _fork(forker)[0]
    before = _settled_fds(forker.pid)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, [forker.pid, kid])
    guard.freeze()
    try:
        known = guard._memo.get("signal walk")
        assert isinstance(known, Known)
        during = _fds()
        known.close()  # while the freeze borrows its descriptors: not now
        assert _fds() == during
        proc.assert_all_stopped([forker.pid, kid])
    finally:
        guard.release()  # signals through the borrowed pidfd, then gives it back
    proc.assert_none_stopped([forker.pid, kid])
    assert _fds() == before + ROOT_FD
    guard.close()
    assert _fds() == before


def test_a_forked_child_keeps_nothing(forker: subprocess.Popen[Any]) -> None:
    kid = _fork(forker)[0]
    guard = ProcessesGuard(root=forker.pid, include_root=True)

    def work() -> str:
        before = _settled_fds(forker.pid)
        reports = []
        for _ in range(2):
            guard.freeze()
            guard.release()
            reports.append(guard.report.known)
        return f"{reports} {_fds() - before}"

    assert proc.in_child(work) == "[0, 0] 0"
    proc.assert_none_stopped([forker.pid, kid])
    guard.close()


def test_known_meets_only_a_running_child_of_the_same_parent(
    forker: subprocess.Popen[Any],
) -> None:
    kid = _fork(forker)[0]
    guard, known = _kept_after_a_freeze(forker.pid, kid)
    fs = ProcFS()
    assert known.meet(kid, forker.pid + 1, fs) is None  # listed by another parent
    assert known.meet(forker.pid, 0, fs) is None  # never kept: where the walk starts
    entry = known.meet(kid, forker.pid, fs)
    assert entry is not None and entry.borrowed and entry.pid == kid
    os.kill(kid, signal.SIGSTOP)
    try:
        proc.wait_until(lambda: proc.state(kid) == "T", what="stopped by the test")
        assert known.meet(kid, forker.pid, fs) is None  # someone else's stop: met afresh
    finally:
        os.kill(kid, signal.SIGCONT)
    guard.close()


# Seize a process and hold it in a ptrace stop (``t``) until told to go.
_HOLD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
pid = int(sys.argv[1])
if libc.ptrace(0x4206, pid, None, None) or libc.ptrace(0x4207, pid, None, None):
    sys.exit(f"seize failed: errno {ctypes.get_errno()}")  # PTRACE_SEIZE, PTRACE_INTERRUPT
os.waitpid(pid, 0x40000000)  # __WALL: the interrupt's stop
print("held", flush=True)
sys.stdin.readline()
"""


def _pending(pid: int) -> int:
    """The signals pending for the whole process (ShdPnd), as a mask."""
    for line in proc.read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no ShdPnd for {pid}")


def test_a_process_a_tracer_holds_since_is_never_signalled(
    forker: subprocess.Popen[Any],
) -> None:
    """Met afresh, it is refused before any signal: a SIGSTOP sent to it would wait,
    pending, for its tracer (and be reported to it)."""
    require_root("tracing a process")
    kids = _fork(forker, 2)
    guard = ProcessesGuard(root=forker.pid, include_root=True)
    _frozen_again(guard, [forker.pid, *kids])
    tracer = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(kids[0])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tracer.stdout is not None and tracer.stdout.readline() == "held\n"
        assert proc.state(kids[0]) == "t"
        with pytest.raises(FreezePermissionError) as info:
            guard.freeze()
        assert info.value.pids == (kids[0],)
        assert not _pending(kids[0]) & (1 << (signal.SIGSTOP - 1))
        proc.assert_none_stopped([forker.pid, kids[1]])
    finally:
        tracer.kill()  # the kernel lets its tracee go
        tracer.wait()
        for stream in (tracer.stdin, tracer.stdout):
            if stream is not None:
                stream.close()
    guard.close()


def test_a_kept_descriptor_number_someone_else_reused_is_never_signalled_through(
    forker: subprocess.Popen[Any],
) -> None:
    """Code that closes descriptors it did not open may give their numbers to other files
    (here: a pidfd of a process outside the tree, while the stat file still reads as the
    kept process's). The guard checks what each number names before it uses or closes it."""
    kid = _fork(forker)[0]
    guard, known = _kept_after_a_freeze(forker.pid, kid)
    kept = known._procs[kid]
    outsider = subprocess.Popen(["sleep", "60"])
    try:
        other = os.pidfd_open(outsider.pid)
        os.dup2(other, kept.fd)  # closes ours, gives its number to the outsider's pidfd
        os.close(other)
        pids = _frozen_again(guard, [forker.pid, kid])
        assert kid in pids and outsider.pid not in pids
        assert guard.report.known == 0  # met afresh
        assert proc.state(outsider.pid) in ("S", "R")
        guard.close()
        os.fstat(kept.fd)  # the outsider's pidfd: left open
    finally:
        os.close(kept.fd)
        outsider.kill()
        outsider.wait()
