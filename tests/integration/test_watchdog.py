"""The watchdog helper, the lease and the subreaper switch, driven from this process.

(What happens when a supervisor dies is in test_exit_paths.py: that needs a supervisor that
is not the test runner.)
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import proc
from treeguard import ProcessesGuard, Skip
from treeguard._subreaper import is_subreaper, set_subreaper
from treeguard._thaw import has_pidfs, pidfd_inode
from treeguard._watchdog import Watchdog, helper_pids
from treeguard._workers import WorkerTree, wide
from treeguard.errors import WatchdogError
from treeguard.procfs import HELPER_COMM

MakeTree = Callable[..., WorkerTree]


def sig_mask(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


starttime = proc.starttime


def reaped(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture
def dog() -> Iterator[Watchdog]:
    watchdog = Watchdog.start()
    try:
        yield watchdog
    finally:
        watchdog.close()


def test_helper_is_isolated_and_reaped(tmp_path: Path) -> None:
    leak = os.open(tmp_path / "leak", os.O_RDWR | os.O_CREAT)
    os.set_inheritable(leak, True)  # a descriptor a careless fork+exec would pass on
    try:
        dog = Watchdog.start()
    finally:
        os.close(leak)
    try:
        pid = dog.pid
        # its own process group (no terminal or group signal), in our session (a new one
        # is a new autogroup, which a busy machine may keep off the CPU for seconds)
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert os.getsid(pid) == os.getsid(0) or sys.version_info < (3, 11)
        targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        # Its journal, its pipes, a pidfd of this process, /dev/null and our stderr: no more.
        stderr = os.readlink("/proc/self/fd/2")
        for target in targets:
            assert target in ("/dev/null", stderr, "anon_inode:[pidfd]") or target.startswith(
                ("pipe:", "/memfd:treeguard-watchdog")
            ), target
        # Terminal signals are ignored (bit N-1 of SigIgn is signal N).
        ignored = sig_mask(pid, "SigIgn")
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            assert ignored >> (sig - 1) & 1, sig
        os.kill(pid, signal.SIGINT)
        assert not reaped(pid) and not dog.lease_expired()
    finally:
        dog.close()
    assert reaped(pid)  # close() waited for it
    dog.close()  # idempotent


def test_helper_is_never_frozen_and_reused(make_tree: MakeTree) -> None:
    tree = make_tree(wide(4, threads=1))
    guard = ProcessesGuard(watchdog=True)  # every descendant of this process: helper too
    with guard:
        helper = guard.helper_pid or -1
        assert guard.report.skipped[helper] is Skip.SUPERVISOR
        assert helper not in guard.pids
        assert not proc.stopped([helper])
        proc.assert_all_stopped(tree.pids)
    proc.assert_none_stopped(tree.pids)
    for _ in range(3):  # one helper per guard, not per freeze
        with guard:
            proc.assert_all_stopped(tree.pids)
            assert guard.helper_pid == helper
        assert not guard.report.lease_expired
    proc.assert_none_stopped(tree.pids)
    guard.close()
    assert reaped(helper)


def test_lease_thaws_a_stuck_supervisor(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3, threads=1))
    guard = ProcessesGuard(root=tree.root, include_root=True, max_frozen=0.2)
    with guard:
        proc.assert_all_stopped(tree.pids)
        # The body is "stuck": the helper thaws the tree when the lease runs out.
        proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the lease to thaw the tree")
        proc.counters_moving(tree.counters, range(0, 3 * 8, 8))
    assert guard.report.lease_expired
    # The next freeze of the same guard starts a new lease; released in time, it holds.
    guard2 = ProcessesGuard(root=tree.root, include_root=True, max_frozen=30)
    with guard2:
        proc.assert_all_stopped(tree.pids)
    assert not guard2.report.lease_expired
    with guard:
        proc.assert_all_stopped(tree.pids)
        proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the lease to thaw again")
    assert guard.report.lease_expired
    proc.assert_none_stopped(tree.pids)
    for g in (guard, guard2):
        g.close()


@pytest.mark.parametrize("backend", ["signal", "cgroup"])
def test_lease_running_out_during_the_freeze(request: pytest.FixtureRequest, backend: str) -> None:
    # The cgroup fixture first, so that it is torn down after the tree.
    cg = request.getfixturevalue("cgroup")() if backend == "cgroup" else None
    make_tree: MakeTree = request.getfixturevalue("make_tree")
    if cg is not None:
        tree = make_tree(wide(40), mode="idle", spawn=cg.spawn)

        def thawed() -> bool:
            return not cg.frozen
    else:
        tree = make_tree(wide(40), mode="idle")

        def thawed() -> bool:
            return not proc.stopped(tree.pids)

    guard = ProcessesGuard(root=tree.root, include_root=True, backend=backend, max_frozen=1e-6)
    outcomes = set()
    try:
        # The path under test is the refusal (the lease ran out while freezing); a freeze
        # that wins the race is checked too. Freeze until the refusal was seen.
        for _ in range(50):
            if "refused" in outcomes:
                break
            try:
                guard.freeze()
            except WatchdogError as err:
                outcomes.add("refused")
                assert "max_frozen" in str(err)
                assert not guard.frozen
            else:
                outcomes.add("expired after")  # the freeze won the race; the lease runs out now
                proc.wait_until(thawed, 10, "the lease to thaw")
                guard.release()
                assert guard.report.lease_expired
            assert thawed()
            proc.assert_none_stopped(tree.pids)
    finally:
        guard.close()
    assert "refused" in outcomes


def inode_of(pid: int) -> int:
    fd = os.pidfd_open(pid)
    try:
        return pidfd_inode(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("wrong", ["starttime", "pidfs inode"])
def test_helper_checks_identities(wrong: str, make_tree: MakeTree, dog: Watchdog) -> None:
    """Records whose starttime (a recycled PID), or pidfs inode (a PID reused within one
    clock tick keeps pid and starttime), is not the process's are never signalled;
    matching ones are."""
    if wrong == "pidfs inode":
        assert has_pidfs(), "this kernel (6.9+) has pidfs"

    def record(pid: int, off: int) -> tuple[int, ...]:
        if wrong == "starttime":
            return (pid, starttime(pid) + off)
        return (pid, starttime(pid), inode_of(pid) + off)

    tree = make_tree(wide(3))
    guard = ProcessesGuard(root=tree.root, include_root=True)  # freezes; no watchdog
    with guard:
        dog.arm(0.01)
        for pid in tree.pids:
            dog.journal.stopping(*record(pid, 1))
        proc.wait_until(dog.lease_expired, 10, "the lease to run out")
        dog.journal.released()
        assert proc.counters_still(tree.counters, tree.period, ticks=6)
        proc.assert_all_stopped(tree.pids)
        dog.arm(0.01)
        for pid in tree.pids:
            dog.journal.stopping(*record(pid, 0))
        proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the helper to thaw")
        assert dog.lease_expired()
        dog.journal.released()
    proc.assert_none_stopped(tree.pids)


def test_sigterm_to_the_helper_thaws_first(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    guard = ProcessesGuard(root=tree.root, include_root=True, watchdog=True)
    guard.freeze()
    try:
        helper = guard.helper_pid
        assert helper is not None
        os.kill(helper, signal.SIGTERM)
        proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the helper to thaw")
        proc.wait_until(
            lambda: set(proc.task_states(helper).values()) <= {"Z"}, 10, "the helper to exit"
        )
    finally:
        guard.release()
    # A guard whose helper is gone refuses to freeze rather than freeze unprotected.
    with pytest.raises(WatchdogError, match="gone"):
        guard.freeze()
    proc.assert_none_stopped(tree.pids)
    assert not guard.frozen
    guard.close()
    assert reaped(helper)


def test_journal_refuses_after_expiry(dog: Watchdog) -> None:
    dog.arm(1e-6)
    proc.wait_until(dog.lease_expired, 10, "the lease to run out")
    with pytest.raises(WatchdogError, match="lease"):
        dog.journal.stopping(os.getpid(), starttime(os.getpid()))
    dog.journal.released()
    dog.arm(None)  # a new freeze forgets the expiry
    assert not dog.lease_expired()
    dog.journal.released()


SUBREAPER = r"""
import json, os, sys, time
from treeguard import ProcessesGuard
from treeguard._subreaper import is_subreaper
guard = ProcessesGuard(subreaper=sys.argv[1] == "1")
r, w = os.pipe()
middle = os.fork()
if middle == 0:  # a daemon's double fork: the grandchild outlives its parent
    if os.fork() == 0:
        os.close(r)
        os.write(w, b"x")
        while True:
            time.sleep(3600)
    os._exit(0)
os.close(w)
os.read(r, 1)
os.waitpid(middle, 0)
kids = []
while not kids:  # the grandchild is re-parented once its parent exited
    with open("/proc/self/task/%d/children" % os.getpid()) as f:
        kids = [int(k) for k in f.read().split()]
    if sys.argv[1] == "0":
        break
with guard:
    frozen = list(guard.pids)
print(json.dumps({"subreaper": is_subreaper(), "frozen": frozen, "kids": kids}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("subreaper", [True, False])
def test_subreaper_keeps_a_double_forked_daemon_in_the_tree(subreaper: bool) -> None:
    was = is_subreaper()
    set_subreaper(True)  # orphans of the control case come to us, not to PID 1
    sup = subprocess.Popen(
        [sys.executable, "-c", SUBREAPER, "1" if subreaper else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    daemon = -1
    try:
        assert sup.stdout is not None and sup.stdin is not None
        said = json.loads(sup.stdout.readline())
        assert said["subreaper"] is subreaper
        if subreaper:
            (daemon,) = said["kids"]
            assert said["frozen"] == [daemon]  # it was found, and frozen with the tree
        else:
            assert said["kids"] == [] and said["frozen"] == []  # it escaped the tree
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                ours = [int(k) for k in f.read().split()]
            (daemon,) = [
                k for k in ours if k != sup.pid and set(proc.task_states(k).values()) - {"Z"}
            ]
        proc.assert_none_stopped([daemon])
        sup.stdin.close()
        assert sup.wait(timeout=10) == 0
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.wait()
        if daemon > 0:
            os.kill(daemon, signal.SIGKILL)  # ours: it was re-parented to us either way
            os.waitpid(daemon, 0)
        for stream in (sup.stdin, sup.stdout):
            if stream is not None:
                stream.close()
        set_subreaper(was)
    assert is_subreaper() is was


def test_set_subreaper_round_trip() -> None:
    was = is_subreaper()
    try:
        set_subreaper(True)
        assert is_subreaper()
        set_subreaper(False)
        assert not is_subreaper()
    finally:
        set_subreaper(was)


# -- every helper is recognisable, and never stopped by any guard --------------------------


def comm(pid: int) -> bytes:
    with open(f"/proc/{pid}/comm", "rb") as f:
        return f.read().rstrip(b"\n")


def test_helper_names_itself_and_is_listed(dog: Watchdog) -> None:
    assert comm(dog.pid) == HELPER_COMM  # set before it said ready
    assert dog.pid in helper_pids()
    second = Watchdog.start()
    try:
        assert {dog.pid, second.pid} <= helper_pids()
    finally:
        second.close()
    assert second.pid not in helper_pids() and dog.pid in helper_pids()


def test_two_guards_in_one_process(make_tree: MakeTree) -> None:
    """Guard B freezes every descendant of this process: guard A's helper is one of them,
    and must be left running (else nothing thaws A's tree if this process dies)."""
    tree_a = make_tree(wide(2))
    tree_b = make_tree(wide(2))
    a = ProcessesGuard(root=tree_a.root, include_root=True, watchdog=True)
    b = ProcessesGuard()
    with a:
        helper = a.helper_pid
        assert helper is not None
        with b:
            proc.assert_all_stopped(tree_a.pids + tree_b.pids)
            assert helper not in b.pids
            assert b.report.skipped[helper] is Skip.SUPERVISOR
            assert not proc.stopped([helper])
        assert a._watchdog.alive()
    proc.assert_none_stopped(tree_a.pids + tree_b.pids)
    a.close()


# -- a lease of any length; a helper that died is noticed --------------------------------


def pipe_unread(fd: int) -> int:
    """Bytes waiting in the pipe of ``fd`` (FIONREAD works on either end, pipe(7))."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def test_a_lease_of_thirty_days(make_tree: MakeTree) -> None:
    """poll(2) takes an int of milliseconds (about 24.8 days): a longer lease must not
    kill the helper when it starts waiting for it."""
    tree = make_tree(wide(2))
    guard = ProcessesGuard(root=tree.root, include_root=True, max_frozen=30 * 86400.0)
    with guard:
        dog = guard._watchdog
        assert dog is not None
        # The helper read the arm command and sleeps again (in poll), or died of it.
        proc.wait_until(
            lambda: pipe_unread(dog._cmd) == 0 and proc.state(dog.pid) in ("S", "Z"),
            10,
            "the helper to take the lease",
        )
        assert proc.state(dog.pid) == "S" and dog.alive()
        proc.assert_all_stopped(tree.pids)
    assert not guard.report.lease_expired and not guard.report.watchdog_lost
    proc.assert_none_stopped(tree.pids)
    dog.close()


def test_a_helper_killed_while_frozen_is_reported(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    guard = ProcessesGuard(root=tree.root, include_root=True, watchdog=True)
    with guard:
        helper = guard.helper_pid
        assert helper is not None
        os.kill(helper, signal.SIGKILL)  # ours: the test's own guard's helper
        proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "the helper to die")
        proc.assert_all_stopped(tree.pids)  # the supervisor still holds the tree
    assert guard.report.watchdog_lost  # the freeze ran without its safety net: said so
    proc.assert_none_stopped(tree.pids)
    assert helper not in helper_pids()  # reaped: its PID is no longer ours to skip
    with pytest.raises(WatchdogError, match="gone"):
        guard.freeze()
    proc.assert_none_stopped(tree.pids)
    assert not guard.frozen


def test_a_handed_over_freeze_is_thawed_by_the_lease_only(make_tree: MakeTree) -> None:
    """After hand_over() the supervisor's end of the command pipe is closed (as when it
    exits): the helper keeps the tree frozen until the lease runs out, then thaws, exits."""
    tree = make_tree(wide(3))
    guard = ProcessesGuard(root=tree.root, include_root=True, max_frozen=1.5)
    guard.freeze()
    dog = guard._watchdog
    assert dog is not None
    helper = dog.pid
    try:
        dog.hand_over()
        guard._detach()
        assert helper not in helper_pids()
        # Past the pipe's EOF: still frozen (a supervised helper would thaw at once).
        proc.wait_until(lambda: proc.state(helper) == "S", 10, "the helper to sleep")
        assert proc.counters_still(tree.counters, tree.period, ticks=6)
        proc.assert_all_stopped(tree.pids)
        proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the lease to thaw")
        proc.wait_until(lambda: proc.state(helper) == "Z", 10, "the helper to exit")
    finally:
        for pid in tree.pids:  # whatever happened, nothing stays stopped
            os.kill(pid, signal.SIGCONT)
        if proc.state(helper) not in (None, "Z"):
            os.kill(helper, signal.SIGKILL)
        os.waitpid(helper, 0)  # handed over: nobody else reaps it here
    proc.counters_moving(tree.counters, [8 * i for i in range(len(tree.pids))])
    with pytest.raises(WatchdogError):
        dog.hand_over()


def test_helper_unblocks_what_its_supervisor_blocked() -> None:
    """``treeguard pause`` blocks SIGTERM while it freezes; its helper (which thaws on
    SIGTERM) must not inherit the mask through fork and execve."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        dog = Watchdog.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        assert sig_mask(dog.pid, "SigBlk") == 0
    finally:
        dog.close()


def test_a_helper_killed_between_freezes_refuses_the_next(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    guard = ProcessesGuard(root=tree.root, include_root=True, max_frozen=60.0)
    with guard:
        proc.assert_all_stopped(tree.pids)
    assert not guard.report.watchdog_lost
    helper = guard.helper_pid
    assert helper is not None
    os.kill(helper, signal.SIGKILL)
    proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "the helper to die")
    with pytest.raises(WatchdogError, match="gone"):
        guard.freeze()  # never frozen without its safety net
    assert not guard.frozen
    proc.assert_none_stopped(tree.pids)
    assert helper not in helper_pids()
