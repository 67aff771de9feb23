"""Snapshots of real trees: order, threads, signal state, freezability, consistency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

import treeguard._snapshot_read as snapshot_module
from tests import proc
from tests.conftest import require_root
from treeguard import ProcessesGuard
from treeguard._snapshot_read import snapshot
from treeguard._workers import WorkerTree
from treeguard.errors import InvalidArgumentError, NoSuchProcessError

MakeTree = Callable[..., WorkerTree]

# A process with known signal state: SIGCONT and SIGCHLD caught, SIGUSR2 ignored, SIGUSR1
# and SIGRTMIN+3 blocked and pending (process-wide), and a second thread that blocks SIGINT
# and has SIGURG pending for itself (pthread_kill).
_SIGNALLED = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    signal.signal(signal.SIGCONT, lambda *a: None)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    rt3 = signal.SIGRTMIN + 3
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, rt3, signal.SIGURG})
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), rt3)
    ready = threading.Event()
    def other():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.pthread_kill(threading.get_ident(), signal.SIGURG)
        ready.set()
        time.sleep(3600)
    t = threading.Thread(target=other, daemon=True)
    t.start()
    ready.wait()
    print(t.native_id, flush=True)
    time.sleep(3600)
    """
)


@pytest.fixture
def signalled() -> Iterator[tuple[subprocess.Popen[str], int]]:
    child = subprocess.Popen([sys.executable, "-c", _SIGNALLED], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        tid = int(child.stdout.readline())
        yield child, tid
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_worker_tree_in_preorder(make_tree: MakeTree) -> None:
    spec = {
        "threads": 1,
        "zombies": 1,
        "children": [{"threads": 2, "children": [{}]}, {}],
    }
    tree = make_tree(spec, mode="idle")
    snap = snapshot(tree.root)
    assert snap.consistent and snap.consistency == "two passes agree"
    zombie = tree.zombies[0]
    # The zombie was forked first, so it comes first among the root's children.
    assert list(snap.pids) == [tree.root, zombie, *tree.pids[1:]]
    by_pid = {r.pid: r for r in snap}
    assert [by_pid[p].depth for p in tree.pids] == [0, 1, 2, 1]
    assert by_pid[zombie].depth == 1
    for index, pid in enumerate(tree.pids):
        rec = by_pid[pid]
        assert rec.name == f"tg-worker-{index}"
        assert rec.tgid == pid and rec.uid == os.geteuid()
        assert rec.freezable and rec.reason is None
        # The same tasks as /proc lists; their states may change between the two reads.
        assert {t.tid for t in rec.threads} == set(proc.task_states(pid))
        assert all(t.state in "RSD" for t in rec.threads)
    assert [len(by_pid[p].threads) for p in tree.pids] == [2, 3, 1, 1]
    assert by_pid[tree.pids[1]].ppid == tree.root
    assert by_pid[zombie].state == "Z" and by_pid[zombie].reason == "zombie"
    # Below the root only, and with a subtree excluded.
    below = snapshot(tree.pids[1], include_root=False, exclude=[tree.pids[2]])
    assert list(below.pids) == []
    below = snapshot(tree.root, include_root=False, exclude=[tree.pids[1]])
    assert list(below.pids) == [zombie, tree.pids[3]]
    assert [r.depth for r in below] == [0, 0]


def test_signal_state_decoded(signalled: tuple[subprocess.Popen[str], int]) -> None:
    child, tid = signalled
    snap = snapshot(child.pid)
    rec = snap[child.pid]
    sig = rec.signals
    assert {"SIGCONT", "SIGCHLD"} <= set(sig.caught)
    assert "SIGUSR2" in sig.ignored
    assert set(sig.shared_pending) == {"SIGUSR1", "SIGRTMIN+3"}
    assert {"SIGUSR1", "SIGRTMIN+3", "SIGURG"} <= set(sig.blocked)
    other = next(t for t in rec.threads if t.tid == tid)
    assert other.pending == ("SIGURG",)
    assert "SIGINT" in other.blocked
    main = next(t for t in rec.threads if t.tid == child.pid)
    assert "SIGINT" not in main.blocked and main.pending == ()
    kinds = {w["kind"] for w in snap.warnings if w["pid"] == child.pid}
    assert kinds == {"catches SIGCONT", "catches SIGCHLD"}
    data = json.loads(snap.to_json())
    assert data["processes"][0]["signals"]["shared_pending"] == ["SIGUSR1", "SIGRTMIN+3"]


def test_guard_snapshot_is_consistent_while_frozen(make_tree: MakeTree) -> None:
    tree = make_tree({"threads": 1, "children": [{"children": [{}]}, {"threads": 2}]})
    with ProcessesGuard(tree.root, include_root=True) as guard:
        snap = guard.snapshot()
        assert snap.consistent and snap.consistency == "frozen"
        assert list(snap.pids) == tree.pids
        assert [r.depth for r in snap] == [0, 1, 2, 1]
        assert all(t.state == "T" for r in snap for t in r.threads)
        assert sum(len(r.threads) for r in snap) == 2 + 1 + 1 + 3
        proc.assert_all_stopped(tree.pids)
    after = guard.snapshot()
    assert not after.consistent and after.consistency == "not frozen"
    proc.assert_none_stopped(tree.pids)


def test_changed_tree_is_inconsistent(make_tree: MakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree({"children": [{}, {}]}, mode="idle")
    leaf = tree.pids[2]
    starttime = snapshot(leaf)[leaf].starttime
    real_pass = snapshot_module._pass

    def killing_pass(*args: object, **kwargs: object) -> object:
        if args[-1] is None:  # the second pass: let a leaf die first
            fd = os.pidfd_open(leaf)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
            proc.wait_until(lambda: set(proc.task_states(leaf).values()) <= {"Z"}, 10)
            proc.wait_until(lambda: not proc.task_states(leaf), 10, "the leaf to be reaped")
        return real_pass(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_module, "_pass", killing_pass)
    snap = snapshot(tree.root)
    assert not snap.consistent and snap.consistency == "changed"
    assert snap.difference == {"appeared": [], "vanished": [[leaf, starttime]]}
    assert "INCONSISTENT" in snap.render()


def test_caller_and_bad_input() -> None:
    me = snapshot()
    assert me.pids[0] == os.getpid() and me[os.getpid()].reason == "caller"
    with pytest.raises(NoSuchProcessError):
        snapshot(4 * 1024 * 1024)
    for bad in (0, -1, "1", True):
        with pytest.raises(InvalidArgumentError):
            snapshot(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        snapshot(exclude="12")  # type: ignore[arg-type]


def test_other_pid_namespace() -> None:
    require_root("a new PID namespace")
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "sleep", "3600"],
        stdin=subprocess.DEVNULL,
    )
    inner: list[int] = []
    try:

        def started() -> bool:
            snap = snapshot(outer.pid)
            inner[:] = snap.pids[1:]
            return [r.name for r in snap] == ["unshare", "sleep"]

        proc.wait_until(started, 10, "unshare to start its child")
        snap = snapshot(outer.pid)
        assert snap[outer.pid].reason is None
        rec = snap[inner[0]]
        assert rec.reason == "other PID namespace" and not rec.freezable
    finally:
        # unshare ignores SIGTERM while it waits, and a SIGKILL would orphan the sleep (a
        # zombie for good where PID 1 does not reap): end the sleep, unshare follows it.
        for pid in inner:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
        try:
            outer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            outer.kill()
            outer.wait()


def test_no_permission_as_another_user() -> None:
    """A snapshot taken by an unprivileged user marks a root process as not freezable."""
    require_root("switching to another user")
    target = subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL)
    try:

        def taken() -> object:
            rec = snapshot(target.pid)[target.pid]
            return [rec.reason, rec.uid]

        assert proc.as_nobody(taken) == ["no permission", 0]
    finally:
        target.kill()
        target.wait()


def test_guard_snapshot_with_the_cgroup_backend(make_tree: MakeTree) -> None:
    """Tasks frozen by the cgroup v2 freezer show S, not T: still a consistent snapshot."""
    require_root("a cgroup")
    from treeguard.cgroup import Cgroup

    cg = Cgroup.create(version=2)
    try:
        tree = make_tree({"threads": 1, "children": [{}]}, spawn=cg.spawn)
        with ProcessesGuard(tree.root, include_root=True, backend="cgroup") as guard:
            snap = guard.snapshot()
            assert snap.consistent and snap.consistency == "frozen"
            assert sorted(snap.pids) == sorted(tree.pids)
            assert proc.counters_still(tree.counters, tree.period)
    finally:
        try:
            cg.kill()
        finally:
            cg.remove()
