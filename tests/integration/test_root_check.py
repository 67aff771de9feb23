"""A guard's root (another process than the caller) is held by a pidfd from its first
freeze: a later freeze checks it with one poll, a root that exited stays gone even when its
PID names a new process, and a descriptor number taken over by another file is not trusted."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests import proc
from tests.integration.test_reliability import _run_script, _verdict
from treeguard import ProcessesGuard, _tree
from treeguard._thaw import has_pidfs
from treeguard._workers import WorkerTree, wide
from treeguard.errors import NoSuchProcessError

pytestmark = pytest.mark.skipif(not has_pidfs(), reason="the root is kept only with pidfs")


@contextlib.contextmanager
def _child() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping child of this process (a zombie once killed, until it is reaped here);
    killed and reaped afterwards, whatever happened."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


REUSED = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from tests.proc import state, wait_until
    from treeguard import ProcessesGuard
    from treeguard.errors import NoSuchProcessError

    assert os.getpid() == 1, "run me as PID 1 of a fresh PID namespace"

    def sleeper():
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(1)
        return pid

    root = sleeper()
    guard = ProcessesGuard(root, include_root=True)
    with guard:
        pass
    os.kill(root, 9)
    os.waitpid(root, 0)
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(root - 1))
    newcomer = sleeper()
    wait_until(lambda: state(newcomer) == "S", 10)
    verdict = {"same_pid": newcomer == root, "raised": [], "stopped": []}
    for _ in range(2):
        try:
            guard.freeze()
        except NoSuchProcessError:
            verdict["raised"].append(True)
        else:
            verdict["raised"].append(False)
            verdict["stopped"].append(list(guard.pids))
            guard.release()
        verdict["state"] = state(newcomer)
    guard.close()
    os.kill(newcomer, 9)
    os.waitpid(newcomer, 0)
    print(json.dumps(verdict), flush=True)
    """
)


def test_a_root_reaped_is_not_taken_for_the_process_that_gets_its_pid(
    tmp_path: Path,
) -> None:
    """Once the root of a guard is reaped, a new process under its PID is a stranger: every
    later freeze raises NoSuchProcessError and stops nothing."""
    verdict = _verdict(_run_script(tmp_path, REUSED, namespace=("--mount-proc",)))
    assert verdict == {"same_pid": True, "raised": [True, True], "stopped": [], "state": "S"}


def test_a_root_that_exited_raises_at_every_freeze() -> None:
    """Exited and not reaped yet (a zombie of its parent): gone for the guard all the same,
    through the poll of its pidfd as through the stat read of the first check."""
    with _child() as child:
        guard = ProcessesGuard(child.pid, include_root=True)
        try:
            with guard:
                proc.assert_all_stopped([child.pid])
            child.kill()  # not waited for yet: a zombie of this process
            proc.wait_until(lambda: proc.state(child.pid) == "Z", what="the child is a zombie")
            for _ in range(2):
                with pytest.raises(NoSuchProcessError):
                    guard.freeze()
        finally:
            guard.close()


@pytest.mark.parametrize("taken", ["closed", "another file"])
def test_a_kept_descriptor_closed_by_someone_else_is_not_trusted(
    taken: Literal["closed", "another file"],
) -> None:
    """Code that closes descriptors it did not open may close the kept pidfd, and give its
    number to another file (here a pipe with data: readable, as an exited root's pidfd
    is): the root is checked afresh, and that file is neither closed nor taken for it."""
    with WorkerTree(wide(1), mode="idle") as tree:
        guard = ProcessesGuard(tree.root, include_root=True)
        r, w = os.pipe()
        try:
            with guard:
                pass
            kept = guard._root_check._fd
            os.fstat(kept)  # held
            if taken == "closed":
                os.close(kept)
            else:
                os.write(w, b"x")
                os.dup2(r, kept)  # (closes the pidfd under that number)
            for _ in range(2):
                with guard:
                    proc.assert_all_stopped(tree.pids)
            proc.assert_none_stopped(tree.pids)
            if taken == "another file":
                assert os.read(kept, 1) == b"x"  # still the pipe, never closed by the guard
                os.close(kept)
        finally:
            guard.close()
            os.close(r)
            os.close(w)


def test_a_kept_number_taken_by_a_file_never_readable_is_not_taken_for_a_live_root() -> None:
    """The root exits, and code that closes descriptors it did not open gives the kept
    pidfd's number to a file that is not readable (an empty pipe): its silence under poll
    says nothing of the root, which is gone. Every later freeze raises NoSuchProcessError,
    and that file is neither closed nor taken for the root."""
    with _child() as child:
        guard = ProcessesGuard(child.pid, include_root=True)
        r, w = os.pipe()
        pipes = [r, w]
        try:
            with guard:
                proc.assert_all_stopped([child.pid])
            kept = guard._root_check._fd
            child.kill()  # not waited for yet: a zombie of this process
            proc.wait_until(lambda: proc.state(child.pid) == "Z", what="the child is a zombie")
            os.dup2(r, kept)  # (closes the pidfd under that number)
            pipes.append(kept)
            for _ in range(2):
                with pytest.raises(NoSuchProcessError):
                    guard.freeze()
            guard.close()
            assert os.fstat(kept).st_ino == os.fstat(r).st_ino  # still the pipe, never closed
        finally:
            guard.close()
            for fd in pipes:
                os.close(fd)


def test_a_file_of_another_device_with_the_kept_inode_number_is_not_taken_for_the_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kept number given to a file whose inode number is the pidfd's, on another file
    system (inode numbers are per device): that file is not the root's pidfd. The live root
    is frozen, and that file (readable, as an exited root's pidfd is) is never closed."""
    with WorkerTree(wide(1), mode="idle") as tree:
        guard = ProcessesGuard(tree.root, include_root=True)
        r, w = os.pipe()
        fds = [r, w]
        try:
            with guard:
                pass
            kept = guard._root_check._fd
            number = os.fstat(kept).st_ino
            os.write(w, b"x")
            os.dup2(r, kept)  # (closes the pidfd under that number)
            fds.append(kept)
            fstat = os.fstat

            def same_number(fd: int) -> os.stat_result:
                found = fstat(fd)
                if fd != kept:
                    return found
                fields = list(found[:10])
                fields[1] = number  # st_ino; st_dev stays the pipe's
                return os.stat_result(fields)

            monkeypatch.setattr(os, "fstat", same_number)
            try:
                with guard:
                    proc.assert_all_stopped(tree.pids)
                guard.close()
            finally:
                monkeypatch.undo()
            proc.assert_none_stopped(tree.pids)
            assert os.read(kept, 1) == b"x"  # still the pipe, never closed by the guard
        finally:
            guard.close()
            for fd in fds:
                os.close(fd)


def test_the_kept_root_is_its_pidfd_and_is_let_go_on_close() -> None:
    with WorkerTree(wide(1), mode="idle") as tree:
        guard = ProcessesGuard(tree.root, include_root=True)
        with guard:
            pass
        kept = guard._root_check._fd
        fresh = os.pidfd_open(tree.root)
        try:
            inode = os.fstat(kept).st_ino
            assert inode == os.fstat(fresh).st_ino  # pidfs: one inode per process
        finally:
            os.close(fresh)
        guard.close()
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(kept)  # closed (nothing opened since to take its number)


def test_a_guard_closed_while_its_freeze_checks_the_root_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``guard.close()`` from another thread finds the guard not frozen yet and closes what
    it keeps while a freeze, begun just then, checks the root: the pidfd that check opens
    is closed by the guard's next close all the same."""
    with WorkerTree(wide(1), mode="idle") as tree:
        guard = ProcessesGuard(tree.root, include_root=True)
        with guard:  # (what a freeze makes once for the whole process is made by now)
            pass
        guard.close()
        before = len(os.listdir("/proc/self/fd"))
        check = _tree.check_process

        def closed_meanwhile(*args: object, **kwargs: object) -> int:
            closer = threading.Thread(target=guard.close)
            closer.start()
            closer.join(10)
            return check(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(_tree, "check_process", closed_meanwhile)
        try:
            with guard:
                proc.assert_all_stopped(tree.pids)
        finally:
            monkeypatch.undo()
            guard.close()
        proc.assert_none_stopped(tree.pids)
        assert len(os.listdir("/proc/self/fd")) == before


MANY_GUARDS = textwrap.dedent(
    """
    import os, resource, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from treeguard import ProcessesGuard

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    guards = []
    try:
        for _ in range(100):  # each kept (not closed, not collected)
            guards.append(ProcessesGuard(child.pid, include_root=True))
            with guards[-1]:
                pass
        print(len(os.listdir("/proc/self/fd")), flush=True)
    finally:
        for guard in guards:
            guard.close()
        child.kill()
        child.wait()
    """
)


def test_the_roots_every_guard_keeps_together_have_a_cap() -> None:
    """A program that keeps many guards (a hundred, of a table of 64 descriptors) freezes
    with each: past a few, a guard checks its root afresh at each freeze, keeping nothing."""
    done = proc.run_python(MANY_GUARDS, [str(Path(__file__).resolve().parents[2])])
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) <= 32
