"""ProcessesGuard on real trees, checked through /proc (tests.proc reads it independently)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest

import treeguard
from tests import proc
from tests.conftest import require_root, slot
from treeguard import ProcessesGuard, Skip
from treeguard._workers import SLOTS, WorkerTree, chain, demo_spec, wide

MakeTree = Callable[..., WorkerTree]


def frozen_and_still(tree: WorkerTree, pids: list[int] | None = None) -> None:
    """Every task of ``pids`` (default: the tree) is stopped and none of their counters move."""
    pids = pids or tree.pids
    proc.assert_all_stopped(pids)
    first = [tree.pids.index(p) * SLOTS for p in pids]

    def counters() -> list[int]:
        now = tree.counters()
        return [c for i in first for c in now[i : i + SLOTS]]

    assert proc.counters_still(counters, tree.period), "a counter moved while frozen"


def running_again(tree: WorkerTree, pids: list[int] | None = None) -> None:
    proc.assert_none_stopped(pids or tree.pids)
    indexes = [slot(tree.pids.index(p)) for p in (pids or tree.pids)]
    proc.counters_moving(tree.counters, indexes)


def test_wide_tree_with_threads(make_tree: MakeTree) -> None:
    tree = make_tree(wide(40, threads=2))
    with ProcessesGuard() as guard:
        frozen_and_still(tree)
        assert sorted(guard.pids) == sorted(tree.pids)
        assert guard.frozen
        report = guard.report
        assert report.stopped == 40 and report.tasks == 40 * 3 and report.passes == 1
        assert report.freeze_seconds > 0 and not report.skipped
    assert not guard.frozen
    running_again(tree)


def test_more_children_than_fit_in_a_page(make_tree: MakeTree) -> None:
    # The kernel hands a children file out a page at a time: 1,100 PIDs take two pages.
    tree = make_tree(wide(1101), mode="idle")
    assert len(" ".join(map(str, tree.pids[1:]))) > 4096
    with ProcessesGuard(root=tree.root) as guard:
        assert sorted(guard.pids) == sorted(tree.pids[1:])
        assert not proc.not_stopped(tree.pids[1:])
    assert not proc.stopped(tree.pids)


def test_stops_parents_before_children(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    with ProcessesGuard() as guard:
        order = {pid: i for i, pid in enumerate(guard.pids)}
        for pid in tree.pids[1:]:
            assert order[proc.ppid(pid)] < order[pid]


def test_deep_chain(make_tree: MakeTree) -> None:
    tree = make_tree(chain(60))
    with ProcessesGuard(root=tree.root, include_root=True) as guard:
        frozen_and_still(tree)
        assert guard.pids == tuple(tree.pids)  # parent-first is the chain's own order
    running_again(tree)


def test_child_forked_by_a_secondary_thread(make_tree: MakeTree) -> None:
    tree = make_tree({"threads": 1, "fork_from_thread": True, "children": [{}, {"threads": 1}]})
    assert proc.children(tree.root) == [], "the main thread must not be the one that forked"
    with ProcessesGuard() as guard:
        frozen_and_still(tree)
        assert set(tree.pids) <= set(guard.pids)
    running_again(tree)


def test_zombie_child_is_skipped(make_tree: MakeTree) -> None:
    tree = make_tree({"children": [{"zombies": 1, "threads": 1}, {}]})
    (zombie,) = tree.zombies
    proc.wait_until(lambda: set(proc.task_states(zombie).values()) == {"Z"})
    with ProcessesGuard() as guard:
        frozen_and_still(tree)
        assert guard.report.skipped == {zombie: Skip.ZOMBIE}
        assert zombie not in guard.pids
    running_again(tree)


def test_process_stopped_before_stays_stopped(make_tree: MakeTree) -> None:
    tree = make_tree(wide(4))
    stopped_by_someone = tree.pids[2]
    os.kill(stopped_by_someone, signal.SIGSTOP)
    try:
        proc.wait_until(lambda: proc.stopped([stopped_by_someone]))
        with ProcessesGuard() as guard:
            frozen_and_still(tree)
            assert guard.report.skipped == {stopped_by_someone: Skip.ALREADY_STOPPED}
            assert [p for p, _ in guard.already_stopped] == [stopped_by_someone]
        others = [p for p in tree.pids if p != stopped_by_someone]
        running_again(tree, others)
        proc.assert_all_stopped([stopped_by_someone])
    finally:
        os.kill(stopped_by_someone, signal.SIGCONT)


def test_monitor_and_its_subtree_are_left_running(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    monitor = tree.pids[1]  # demo_spec: process 1 has children 2 and 3
    subtree = tree.pids[1:4]
    with treeguard.freeze_child_processes(monitor) as guard:
        rest = [p for p in tree.pids if p not in subtree]
        frozen_and_still(tree, rest)
        proc.assert_none_stopped(subtree)
        assert not set(subtree) & set(guard.pids)
        assert guard.report.skipped == {monitor: Skip.EXCLUDED}
    running_again(tree)


class _Journal:
    """Told of each process before it is stopped; acts on the n-th one (fault injection)."""

    def __init__(self, at: int, act: Callable[[int], None]) -> None:
        self.at, self.act, self.seen = at, act, 0

    def stopping(self, pid: int, starttime: int, inode: int = 0) -> None:
        self.seen += 1
        if self.seen == self.at:
            self.act(pid)

    def watching(self, pid: int, starttime: int) -> None:
        pass

    def freezing_cgroup(self, version: int, path: str, inode: int) -> None:
        pass

    def check(self) -> None:
        pass

    def released(self) -> None:
        pass


def test_process_exiting_during_the_freeze(make_tree: MakeTree) -> None:
    tree = make_tree(wide(6))
    victims = tree.pids[3], tree.pids[1]

    def kill(pid: int) -> None:
        # Kill one process just before it is stopped, and one that is already stopped.
        for v in victims:
            os.kill(v, signal.SIGKILL)

    guard = ProcessesGuard()
    guard._journal = _Journal(at=4, act=kill)
    with guard:
        alive = [p for p in tree.pids if p not in victims]
        proc.wait_until(lambda: not any(proc.task_states(v) for v in victims))
        proc.assert_all_stopped(alive)
        # Both were met (one was even signalled), both died before their proof: both are
        # reported exited, neither is listed as frozen.
        assert {guard.report.skipped.get(v) for v in victims} == {Skip.EXITED}
        assert not set(victims) & set(guard.pids)
    proc.assert_none_stopped(alive)


def test_a_process_that_dies_a_zombie_during_the_freeze_is_reported_exited(
    make_tree: MakeTree,
) -> None:
    # Its parent keeps its dead children as zombies, and is stopped before them: a child
    # killed just before its own stop stays a zombie (Z) while the freeze proves the rest.
    # A zombie never runs again: it is reported exited, not counted as frozen.
    tree = make_tree({"zombies": 1, "children": [{}, {}, {}]})
    victim = tree.pids[2]
    guard = ProcessesGuard(tree.root, include_root=True)
    guard._journal = _Journal(at=3, act=lambda pid: os.kill(victim, signal.SIGKILL))
    with guard:
        assert proc.task_states(victim) == {victim: "Z"}  # the stopped root reaps nothing
        alive = [p for p in tree.pids if p != victim]
        proc.assert_all_stopped(alive)
        assert guard.report.skipped.get(victim) is Skip.EXITED
        assert victim not in guard.pids
    proc.assert_none_stopped(alive)


@pytest.mark.parametrize("backend", ["signal", "ptrace"])
def test_a_process_killed_once_its_stop_was_sent_is_reported_exited_by_every_backend(
    make_tree: MakeTree, backend: str
) -> None:
    # Killed when its next sibling is recorded (its own stop, or seize, sent already, its
    # proof not read yet), kept a zombie by its stopped parent: it never runs again, so
    # neither backend may count it among the frozen.
    if backend == "ptrace":
        require_root("the ptrace backend")
    tree = make_tree({"zombies": 1, "children": [{}, {}, {}]})
    victim = tree.pids[2]
    guard = ProcessesGuard(tree.root, include_root=True, backend=backend)  # type: ignore[arg-type]
    guard._journal = _Journal(at=4, act=lambda pid: os.kill(victim, signal.SIGKILL))
    with guard:
        assert proc.task_states(victim) == {victim: "Z"}  # the stopped root reaps nothing
        alive = [p for p in tree.pids if p != victim]
        assert set(proc.states_of(alive).values()) == {"T" if backend == "signal" else "t"}
        assert guard.report.skipped.get(victim) is Skip.EXITED
        assert victim not in guard.pids
        assert guard.report.stopped == len(alive) == guard.report.tasks
    proc.assert_none_stopped(alive)


# A process whose main thread exits alone (SYS_exit, not exit_group): its leader is a
# zombie (Z) while its other thread runs, and prints its TID; it ends at a byte on stdin.
_LEADER_EXITS = """
import ctypes, os, threading
def serve():
    os.write(1, b"%d\\n" % threading.get_native_id())
    os.read(0, 1)
    os._exit(0)
threading.Thread(target=serve).start()
ctypes.CDLL(None).syscall({"x86_64": 60, "aarch64": 93}[os.uname().machine], 0)
"""


def test_a_process_whose_main_thread_exited_is_a_root_that_freezes() -> None:
    # Its leader shows Z, but a thread of it runs: it is no zombie (the walk freezes such
    # a process met below a root alike), so as the root it must be frozen, not refused as
    # a process that does not exist.
    child = subprocess.Popen(
        [sys.executable, "-c", _LEADER_EXITS], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        tid = int(child.stdout.readline())
        proc.wait_until(lambda: proc.state(child.pid) == "Z", what="the main thread to exit")
        with ProcessesGuard(child.pid, include_root=True) as guard:
            assert guard.pids == (child.pid,)
            assert proc.task_states(child.pid) == {child.pid: "Z", tid: "T"}
        proc.assert_none_stopped([child.pid])
        child.stdin.write(b"x")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def test_freeze_failing_half_way_leaves_nothing_stopped(make_tree: MakeTree) -> None:
    tree = make_tree(wide(8))

    def fail(pid: int) -> None:
        # the first four really were stopped (their SIGSTOP may still be landing)
        proc.wait_until(lambda: not proc.not_stopped(tree.pids[:4]), what="4 stopped")
        proc.assert_all_stopped(tree.pids[:4])
        raise RuntimeError("injected")

    guard = ProcessesGuard(root=tree.root, include_root=True)
    guard._journal = _Journal(at=5, act=fail)
    with pytest.raises(RuntimeError, match="injected"):
        guard.freeze()
    assert not guard.frozen
    running_again(tree)


def test_garbage_collected_guard_thaws(make_tree: MakeTree) -> None:
    tree = make_tree(wide(5))
    guard = ProcessesGuard().freeze()
    frozen_and_still(tree)
    del guard
    gc.collect()
    running_again(tree)


def test_release_is_idempotent_and_guard_refreezes(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3, threads=1))
    guard = ProcessesGuard()
    for _ in range(3):
        guard.freeze()
        frozen_and_still(tree)
        with pytest.raises(treeguard.FreezeError, match="frozen already"):
            guard.freeze()
        guard.release()
        guard.release()
        running_again(tree)


def test_fallback_enumeration_without_children_files(
    make_tree: MakeTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree({"threads": 1, "fork_from_thread": True, "children": [{"children": [{}]}]})
    monkeypatch.setattr("treeguard.procfs.ProcFS.has_children_files", lambda self: False)
    with ProcessesGuard() as guard:
        frozen_and_still(tree)
        assert sorted(guard.pids) == sorted(tree.pids)
    running_again(tree)


FORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    signal_fd = int(sys.argv[1])
    os.write(signal_fd, b"ready\\n")
    kids = []
    for i in range(400):  # keeps forking, bounded: each child lives until killed
        pid = os.fork()
        if pid == 0:
            while True:
                time.sleep(3600)
        kids.append(pid)
        time.sleep(0.002)
    while True:
        time.sleep(3600)
    """
)


def test_process_that_keeps_forking() -> None:
    rfd, wfd = os.pipe()
    forker = subprocess.Popen([sys.executable, "-c", FORKER, str(wfd)], pass_fds=(wfd,))
    os.close(wfd)
    try:
        assert os.read(rfd, 6) == b"ready\n"
        proc.wait_until(lambda: len(proc.children(forker.pid)) >= 5)
        with ProcessesGuard() as guard:
            family = [forker.pid, *proc.children(forker.pid)]
            proc.assert_all_stopped(family)
            assert set(family) == set(guard.pids)
            before = len(family)
            assert proc.counters_still(lambda: [len(proc.children(forker.pid))], 0.005)
        proc.assert_none_stopped(family)
        proc.wait_until(lambda: len(proc.children(forker.pid)) > before)  # forking again
    finally:
        os.close(rfd)
        # Children first (their parent reaps them), so that none is orphaned.
        forker.send_signal(signal.SIGSTOP)
        proc.wait_until(lambda: proc.stopped([forker.pid]))
        for kid in proc.children(forker.pid):
            os.kill(kid, signal.SIGKILL)
        proc.wait_until(lambda: not proc.children(forker.pid))
        forker.kill()
        forker.wait()


EPERM = textwrap.dedent(
    """
    import json, os, sys, time
    import treeguard
    from tests import proc
    # treeguard's names load on first use: load them while the interpreter's files are
    # readable (root's), as a supervisor that drops privileges would.
    from treeguard import FreezePermissionError, ProcessesGuard
    partial_ok = sys.argv[1] == "1"
    rfd, wfd = os.pipe()
    ready_r, ready_w = os.pipe()
    kids = []
    for uid in (65533, 65534):  # one child of another user, one of ours
        pid = os.fork()
        if pid == 0:
            os.close(wfd)
            os.setresuid(uid, uid, uid)
            os.write(ready_w, b"r")  # only now is it the user the test expects
            os.read(rfd, 1)  # runs until the supervisor closes the pipe
            os._exit(0)
        kids.append(pid)
    os.close(rfd)
    assert os.read(ready_r, 1) + os.read(ready_r, 1) == b"rr"
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    proc.wait_until(lambda: all(proc.task_states(k) for k in kids))
    out = {"kids": kids}
    try:
        with treeguard.ProcessesGuard(partial_ok=partial_ok) as guard:
            out["stopped_while_frozen"] = sorted(p for p, _ in proc.stopped(kids))
            out["skipped"] = {str(k): str(v) for k, v in guard.report.skipped.items()}
    except treeguard.FreezePermissionError as err:
        out["error"] = list(err.pids)
        out["is_permission_error"] = isinstance(err, PermissionError)
    out["stopped_after"] = sorted(p for p, _ in proc.stopped(kids))
    os.close(wfd)
    for k in kids:
        os.waitpid(k, 0)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("partial_ok", [False, True])
def test_permission_denied(partial_ok: bool) -> None:
    require_root("running the target as another user")
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", EPERM, "1" if partial_ok else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=here,
        env={**os.environ, "PYTHONPATH": here},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    other, ours = out["kids"]
    assert out["stopped_after"] == []
    if partial_ok:
        assert out["stopped_while_frozen"] == [ours]
        assert out["skipped"] == {str(other): "permission"}
    else:
        assert out["error"] == [other] and out["is_permission_error"]
        assert "stopped_while_frozen" not in out


VFORK_C = r"""
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    pid_t child = vfork();
    if (child == 0) {
        for (;;) pause();   /* the parent waits in D until we exec or exit */
    }
    waitpid(child, NULL, 0);
    for (;;) pause();
}
"""


def test_parent_blocked_in_vfork_counts_as_stopped(tmp_path: os.PathLike[str]) -> None:
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        if os.environ.get("CI"):
            pytest.fail("CI has a C compiler")
        pytest.skip("needs a C compiler")
    src, exe = f"{tmp_path}/vfork.c", f"{tmp_path}/vfork"
    with open(src, "w") as f:
        f.write(VFORK_C)
    subprocess.run([cc, "-O1", "-o", exe, src], check=True)
    parent = subprocess.Popen([exe])
    child = 0
    try:
        proc.wait_until(lambda: proc.children(parent.pid))
        (child,) = proc.children(parent.pid)
        proc.wait_until(lambda: proc.task_states(parent.pid) == {parent.pid: "D"})
        with ProcessesGuard() as guard:
            proc.assert_all_stopped([child])
            assert guard.report.blocked_in_vfork == [parent.pid]
            assert set(guard.pids) == {parent.pid, child}
        proc.assert_none_stopped([parent.pid, child])
    finally:
        if child:
            os.kill(child, signal.SIGKILL)  # the parent reaps it
            proc.wait_until(lambda: not proc.task_states(child))
        parent.kill()
        parent.wait()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root": 0}, "root"),
        ({"root": -5}, "root"),
        ({"root": 2**40}, "root"),
        ({"root": "12"}, "root"),
        ({"root": True}, "root"),
        ({"root": 1.5}, "root"),
        ({"exclude": [0]}, "exclude"),
        ({"exclude": "12"}, "exclude"),
        ({"exclude": 12}, "exclude"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"max_passes": 0}, "max_passes"),
        ({"max_passes": 1.0}, "max_passes"),
        ({"partial_ok": 1}, "partial_ok"),
        ({"include_root": True}, "include_root"),
        ({"root": 1, "include_root": True}, "include_root"),
        ({"backend": "magic"}, "backend"),
        ({"scope": "world"}, "scope"),
        ({"max_frozen": 0}, "max_frozen"),
    ],
)
def test_bad_input_is_one_clear_error(
    make_tree: MakeTree, kwargs: dict[str, object], message: str
) -> None:
    tree = make_tree(wide(2))
    with pytest.raises(treeguard.InvalidArgumentError, match=message) as info:
        ProcessesGuard(**kwargs).freeze()  # type: ignore[arg-type]
    assert isinstance(info.value, treeguard.FreezeError)
    assert isinstance(info.value, ValueError)
    proc.assert_none_stopped(tree.pids)


def test_root_that_does_not_exist() -> None:
    with pytest.raises(treeguard.NoSuchProcessError) as info:
        ProcessesGuard(root=4194304).freeze()
    assert isinstance(info.value, ProcessLookupError) and info.value.pid == 4194304
    with pytest.raises(treeguard.InvalidArgumentError):
        treeguard.freeze_child_processes(-1)


def test_include_root_of_a_foreign_tree(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    sub = tree.pids[4]  # demo_spec: process 4 -> 5 -> 6
    with ProcessesGuard(root=sub, include_root=True) as guard:
        assert guard.pids == (sub, tree.pids[5], tree.pids[6])
        proc.assert_all_stopped(guard.pids)
        proc.assert_none_stopped([p for p in tree.pids if p not in guard.pids])


def test_errors_pickle_with_their_data() -> None:
    import pickle

    for err in (
        treeguard.StopTimeoutError(1.0, [(1, 2, "D")]),
        treeguard.TreeUnstableError(3, [7, 8]),
        treeguard.FreezePermissionError([5]),
        treeguard.NoSuchProcessError(9),
    ):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and again.args == err.args and str(again) == str(err)


def test_the_stat_files_of_threads_are_kept_only_while_their_process_is_waited_for(
    make_tree: Callable[..., WorkerTree], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for a process with threads, each look reads its threads' stat files through
    descriptors kept open; once it is proven stopped they are closed."""
    from treeguard.procfs import ProcFS

    opened: list[str] = []
    real = ProcFS.open_read

    def counted(self: ProcFS, path: str) -> tuple[int, bytes] | None:
        opened.append(path)
        return real(self, path)

    monkeypatch.setattr(ProcFS, "open_read", counted)
    from treeguard._backends._signal import SignalBackend

    still_open: list[int] = []  # processes proven stopped with their threads' files open
    real_check = SignalBackend._check

    def check(self: SignalBackend, entry: Any) -> list[tuple[int, int, str]]:
        late = real_check(self, entry)
        if not late and entry.taskfds:
            still_open.append(entry.pid)
        return late

    monkeypatch.setattr(SignalBackend, "_check", check)
    tree = make_tree(wide(4, threads=3))

    def task_files() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue  # (listdir's own, closed since)
            if "/task/" in target and target.endswith("/stat"):
                found.append(target)
        return found

    mine = [f"/proc/{pid}/task/" for pid in tree.pids]
    with ProcessesGuard(tree.root, include_root=True) as guard:
        proc.assert_all_stopped(tree.pids)
        assert guard.report.tasks == 4 * 4  # each of the 4 workers: 3 threads and its main one
        assert any(path.endswith("/stat") for path in opened)  # kept while waited for...
        # ... and closed as soon as it is proven stopped (not only when the freeze ends)
        assert still_open == []
        assert [f for f in task_files() if f.startswith(tuple(mine))] == []
    proc.assert_none_stopped(tree.pids)


def test_two_threads_releasing_a_guard_at_once_thaw_one_after_the_other(
    make_tree: Callable[..., WorkerTree], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two releases of one guard from two threads: the second waits for the first's thaw
    (two thaws at once would resume, forget and close the same entries twice)."""
    from treeguard._backends import _pidfds

    tree = make_tree(wide(5))
    guard = ProcessesGuard(tree.root, include_root=True)
    guard.freeze()
    inside: set[int] = set()
    overlapped = threading.Event()
    real = _pidfds.resignal

    def slow(entry: _pidfds.Entry, sig: int) -> bool:
        inside.add(threading.get_ident())
        if len(inside) > 1:
            overlapped.set()
        overlapped.wait(0.05)  # long enough for the other thread to come in, if it may
        inside.discard(threading.get_ident())
        return real(entry, sig)

    monkeypatch.setattr(_pidfds, "resignal", slow)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def release() -> None:
        start.wait()
        try:
            guard.release()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=release) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not overlapped.is_set(), "two thaws of one guard ran at once"
    proc.assert_none_stopped(tree.pids)
    guard.close()
