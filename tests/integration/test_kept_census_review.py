"""Review of the census a guard keeps between freezes (:mod:`treeguard._backends._kept`): ways a
census kept could let a freeze return with a task of the tree running in another cgroup."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests import proc
from tests.conftest import MakeCgroup, require_root
from tests.integration.conftest import FORK_ON_F
from treeguard import ProcessesGuard
from treeguard._backends._census import _Census
from treeguard.cgroup import Cgroup
from treeguard.errors import CgroupError
from treeguard.procfs import ProcFS

# A process with a second thread, which prints its TID and sleeps.
_TWO_THREADS = """
import os, threading
done = threading.Event()
def run():
    os.write(1, b"%d\\n" % threading.get_native_id())
    done.wait()
threading.Thread(target=run, daemon=True).start()
done.wait()
"""

# A process whose leader exits alone (SYS_exit, not exit_group: it stays a zombie while the
# process lives on in its other threads); its second thread starts a new thread on each
# byte read from stdin and prints the new thread's TID.
_LEADER_GONE = """
import ctypes, os, threading
def sleep():
    threading.Event().wait()
def serve():
    os.write(1, b"%d\\n" % threading.get_native_id())
    while os.read(0, 1):
        t = threading.Thread(target=sleep, daemon=True)
        t.start()
        os.write(1, b"%d\\n" % t.native_id)
    os._exit(0)
threading.Thread(target=serve).start()
ctypes.CDLL(None).syscall(60, 0)  # SYS_exit (x86-64): this thread only
"""

# The root of a tree whose two children are spawned into the cgroup whose cgroup.procs is
# argv[1]: one sleeps, the other runs _LEADER_GONE on the root's stdin and stdout; their
# PIDs go to stderr. The root waits for both.
_ROOT = """
import os, signal, subprocess, sys
def enter():
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)
sleeper = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           preexec_fn=enter)
gone = subprocess.Popen([sys.executable, "-c", sys.argv[2]], preexec_fn=enter)
os.write(2, b"%d %d\\n" % (sleeper.pid, gone.pid))
sleeper.wait()
gone.wait()
"""


def _move_thread(tid: int, to: Cgroup) -> None:
    """Move one thread (not its process) into a v1 freezer cgroup."""
    with open(os.path.join(to.path, "tasks"), "w") as f:
        f.write(str(tid))


def _freezer_of(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "freezer" in controllers.split(","):
                return path
    raise AssertionError(f"task {tid} is in no freezer cgroup")


@pytest.fixture
def two_threads(cgroup: MakeCgroup) -> Iterator[tuple[Cgroup, Cgroup, int, int]]:
    """A process in a v1 freezer cgroup whose second thread is in another one."""
    require_root("process events")
    cg, other = cgroup(1), cgroup(1)
    worker = cg.spawn([sys.executable, "-c", _TWO_THREADS], stdout=subprocess.PIPE)
    assert worker.stdout is not None
    try:
        tid = int(worker.stdout.readline())
        _move_thread(tid, other)
        assert _freezer_of(worker.pid, tid).endswith(other.name)
        yield cg, other, worker.pid, tid
    finally:
        worker.stdout.close()
        cg.kill()


def test_an_interrupt_once_frozen_never_keeps_a_census_not_proven(
    two_threads: tuple[Cgroup, Cgroup, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The census of the second freeze is read in full and would be refused (a thread of
    # the tree is in another cgroup), but an interrupt lands as it is checked, once
    # frozen. The next freeze must not take over that census: taken over, its threads are
    # not counted again.
    cg, other, pid, tid = two_threads
    guard = ProcessesGuard(pid, include_root=True, backend="cgroup")
    try:
        with pytest.raises(CgroupError, match="threads of the tree are in another cgroup"):
            guard.freeze()

        def interrupted(self: _Census) -> str | None:
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(_Census, "problem", interrupted)
            with pytest.raises(KeyboardInterrupt):
                guard.freeze()
        assert not guard.frozen and not cg.frozen
        with pytest.raises(
            CgroupError, match=f"threads of the tree are in another cgroup: thread {tid} "
        ):
            guard.freeze()
        assert not cg.frozen
    finally:
        guard.close()
    assert not cg.frozen and not other.frozen
    assert proc.state(pid, tid) in ("S", "R")


@pytest.fixture
def leader_gone(
    cgroup: MakeCgroup,
) -> Iterator[tuple[Cgroup, Cgroup, subprocess.Popen[Any], int, int]]:
    """A root outside a v1 freezer cgroup with two children in it: a sleeper, and a process
    whose leader exited (its thread ``serve`` starts threads on request)."""
    require_root("process events")
    cg, other = cgroup(1), cgroup(1)
    root = subprocess.Popen(
        [sys.executable, "-c", _ROOT, os.path.join(cg.path, "cgroup.procs"), _LEADER_GONE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert root.stdin is not None and root.stdout is not None and root.stderr is not None
    try:
        _, gone = map(int, root.stderr.readline().split())
        serve = int(root.stdout.readline())
        proc.wait_until(lambda: proc.state(gone) == "Z", what="the leader exited alone")
        yield cg, other, root, gone, serve
    finally:
        root.stdin.close()
        root.stdout.close()
        root.stderr.close()
        cg.kill()
        other.kill()
        root.kill()
        root.wait()


def test_a_thread_born_to_a_process_whose_leader_exited_is_heard_of(
    leader_gone: tuple[Cgroup, Cgroup, subprocess.Popen[Any], int, int],
) -> None:
    # The fork event of a thread names the process's parent (the root, outside the
    # cgroup), the thread, and the thread group, whose leader is in no task list once it
    # exited: only the process itself (cgroup.procs) says the event is about the tree.
    cg, other, root, gone, serve = leader_gone
    assert root.stdin is not None and root.stdout is not None
    guard = ProcessesGuard(root.pid, backend="cgroup")
    try:
        for _ in range(2):  # subscribed at the second freeze: the census is kept from it
            with guard:
                assert cg.frozen
        root.stdin.write(b"x")
        root.stdin.flush()
        newcomer = int(root.stdout.readline())
        _move_thread(newcomer, other)
        assert _freezer_of(gone, newcomer).endswith(other.name)
        with pytest.raises(CgroupError, match=f"thread {newcomer} of PID {gone} "):
            guard.freeze()
        assert not cg.frozen
    finally:
        guard.close()
    assert proc.state(gone, serve) in ("S", "R")


# A subreaper (the tree's root) whose child, the monitor, runs _MONITOR on its stdin and
# stdout; the monitor's PID goes to stderr. The subreaper reaps what it adopts.
_SUBREAPER = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
monitor = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
os.write(2, b"%d\\n" % monitor.pid)
while True:
    try:
        os.wait()
    except ChildProcessError:
        signal.pause()
"""

# On each byte read, fork a child that forks a grandchild (which sleeps) and exits at once:
# the grandchild, orphaned, goes to the closest subreaper above. Prints its PID.
_MONITOR = """
import os, signal
while os.read(0, 1):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            signal.pause()
            os._exit(0)
        os.write(w, b"%d\\n" % grandchild)
        os._exit(0)
    os.waitpid(child, 0)
    os.close(w)
    os.write(1, os.read(r, 64))
    os.close(r)
"""


def _spawn_subreaper(cg: Cgroup, script: str) -> subprocess.Popen[bytes]:
    """A subreaper root started in ``cg``, running ``script``, its standard streams piped."""
    return cg.spawn(
        [sys.executable, "-c", _SUBREAPER, script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_an_orphan_of_an_excluded_monitor_adopted_by_a_subreaper_of_the_tree_is_found(
    cgroup: MakeCgroup,
) -> None:
    # The monitor is excluded and lives in another cgroup: its forks and exits name no
    # task of the census. An orphan of its subtree is adopted by the closest subreaper
    # (find_new_reaper), here the tree's root: a child of the tree in another cgroup, of
    # which no event names a task of the tree.
    require_root("process events")
    cg, other = cgroup(2), cgroup(2)
    root = _spawn_subreaper(cg, _MONITOR)
    assert root.stdin is not None and root.stdout is not None and root.stderr is not None
    try:
        monitor = int(root.stderr.readline())
        assert other.adopt([monitor]) == [monitor]
        guard = ProcessesGuard(root.pid, include_root=True, exclude=[monitor], backend="cgroup")
        try:
            for _ in range(2):  # subscribed at the second freeze: the census is kept from it
                with guard:
                    assert guard.pids == (root.pid,)
            root.stdin.write(b"x")
            root.stdin.flush()
            orphan = int(root.stdout.readline())
            proc.wait_until(lambda: proc.ppid(orphan) == root.pid, what="the adoption")
            assert orphan in other.pids()
            with pytest.raises(CgroupError, match=f"in another cgroup: {orphan} "):
                guard.freeze()
            assert not cg.frozen
        finally:
            guard.close()
    finally:
        root.stdin.close()
        root.stdout.close()
        root.stderr.close()
        other.kill()
        cg.kill()


def test_a_census_raced_while_read_is_not_kept_for_the_next_freeze(
    cgroup: MakeCgroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # backend="auto" reads the census before the freeze. Right after the children files
    # are read, a child of the tree forks, its child is moved to another cgroup, and the
    # parent exits: the orphan is adopted by the subreaper root, whose file was read
    # already. That freeze misses it (a race the census documents); its events name a
    # task it read, though, which then exited: the census must not be kept, or every
    # later freeze would miss the orphan too.
    require_root("process events")
    cg, other = cgroup(2), cgroup(2)
    root = _spawn_subreaper(cg, FORK_ON_F)
    assert root.stdin is not None and root.stdout is not None and root.stderr is not None
    stdin, stdout = root.stdin, root.stdout
    escaped: list[int] = []
    try:
        child = int(root.stderr.readline())
        guard = ProcessesGuard(root.pid, include_root=True, backend="auto")
        try:
            with guard:
                assert sorted(guard.pids) == sorted([root.pid, child])
            real = ProcFS.children
            reads: list[int] = []

            def racing(self: ProcFS, pid: int, tid: int | None = None) -> list[int] | None:
                found = real(self, pid, tid)
                reads.append(pid)
                if len(reads) == 2:  # both files read: the race
                    stdin.write(b"f")
                    stdin.flush()
                    orphan = int(stdout.readline())
                    escaped.append(orphan)
                    assert other.adopt([orphan]) == [orphan]
                    stdin.write(b"x")
                    stdin.flush()
                    proc.wait_until(lambda: proc.ppid(orphan) == root.pid, what="the adoption")
                return found

            with monkeypatch.context() as patch:
                patch.setattr(ProcFS, "children", racing)
                with guard:  # subscribed here: the census is read in full
                    assert guard.report.backend == "cgroup"
            assert escaped
            with guard:
                assert escaped[0] in guard.pids
                assert proc.state(escaped[0]) in ("t", "T")
        finally:
            guard.close()
    finally:
        stdin.close()
        stdout.close()
        root.stderr.close()
        other.kill()
        cg.kill()
