"""What a snapshot says each process is (command line, user, RSS, PSS, CPU times), checked
against /proc read here, and what it says when a process is gone or may not be read."""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import proc
from tests.conftest import require_root
from tests.integration.test_cli import run
from treeguard import ProcessesGuard
from treeguard._describe import describe
from treeguard._snapshot_read import snapshot
from treeguard._workers import WorkerTree
from treeguard.errors import InvalidArgumentError
from treeguard.procfs import ProcFS

MakeTree = Callable[..., WorkerTree]
DESCRIPTION = ("cmdline", "user", "rss", "pss", "cpu_user", "cpu_system")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _cmdline(pid: int) -> tuple[str, ...]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        data = f.read()
    return tuple(os.fsdecode(arg) for arg in data.split(b"\0")[:-1])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE  # resident pages (proc(5))


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for {pid}")


def test_a_frozen_tree_described(make_tree: MakeTree) -> None:
    """While frozen nothing of it moves: every value equals what /proc says now."""
    tree = make_tree({"threads": 1, "children": [{"children": [{}]}, {}]})
    with ProcessesGuard(tree.root, include_root=True) as guard:
        snap = guard.snapshot(pss=True)
        proc.assert_all_stopped(tree.pids)
        assert snap.consistent and list(snap.pids) == tree.pids
        for record in snap:
            pid = record.pid
            fields = proc.stat_fields(pid)
            assert fields is not None
            assert record.cmdline == _cmdline(pid) and record.cmdline
            assert record.user == pwd.getpwuid(os.geteuid()).pw_name
            assert record.rss == _rss(pid) and record.rss > 0
            # A shared page's share changes with its sharers machine-wide (another
            # interpreter starting maps the same libraries), frozen or not: close, not equal.
            assert record.pss is not None and 0 < record.pss <= record.rss
            assert abs(record.pss - _pss(pid)) <= record.pss // 10
            assert record.cpu_user == int(fields[11]) / TICKS  # utime, stime (proc(5))
            assert record.cpu_system == int(fields[12]) / TICKS
        memory = snap.memory
        assert memory["rss"] == sum(_rss(pid) for pid in tree.pids)
        assert memory["pss"] == sum(r.pss for r in snap if r.pss is not None)
        assert memory["unread"] == []
        assert json.loads(snap.to_json())["memory"] == memory
        # Asked for less, read less.
        plain = guard.snapshot()
        assert all(r.pss is None and r.rss is not None for r in plain)
        bare = guard.snapshot(describe=False)
        assert all(getattr(r, key) is None for r in bare for key in DESCRIPTION)
    proc.assert_none_stopped(tree.pids)


def test_a_running_tree_described(make_tree: MakeTree) -> None:
    tree = make_tree({"children": [{}, {}]}, mode="idle")
    snap = snapshot(tree.root)
    assert [r.cmdline for r in snap] == [_cmdline(pid) for pid in tree.pids]
    assert all(r.rss is not None and r.pss is None for r in snap)
    assert snapshot(tree.root, pss=True).memory["pss"] is not None
    bare = snapshot(tree.root, describe=False)
    assert all(getattr(r, key) is None for r in bare for key in DESCRIPTION)


def test_a_process_gone_or_replaced_is_not_described(make_tree: MakeTree) -> None:
    tree = make_tree({"children": [{}, {}]}, mode="idle")
    snap = snapshot(tree.root, describe=False)
    leaf = snap[tree.pids[2]]
    # Its PID naming another process now (another start time): nothing read is kept.
    other = dataclasses.replace(leaf, starttime=leaf.starttime + 1)
    (replaced,) = describe((other,), ProcFS(), pss=True)
    assert all(getattr(replaced, key) is None for key in DESCRIPTION if key != "user")
    assert replaced.user == pwd.getpwuid(leaf.uid).pw_name  # named from the snapshot's uid
    # Gone: killed and reaped (workers ignore SIGCHLD, so the kernel reaps it).
    fd = os.pidfd_open(leaf.pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    proc.wait_until(lambda: proc.starttime(leaf.pid) != leaf.starttime, 10, "the leaf to go")
    (gone,) = describe((leaf,), ProcFS(), pss=True)
    assert all(getattr(gone, key) is None for key in DESCRIPTION if key != "user")


def _wait_asleep(pid: int, program: str) -> None:
    """Wait until ``pid`` runs ``program`` past its start: the loader is done mapping and
    relocating (which changes its RSS) once it sleeps (S) in the program with the same RSS
    on two reads in a row."""
    seen: list[int] = []

    def asleep() -> bool:
        if proc.state(pid) != "S" or os.path.realpath(f"/proc/{pid}/exe") != program:
            return False
        seen.append(_rss(pid))
        return len(seen) >= 2 and seen[-1] == seen[-2]

    proc.wait_until(asleep, 10, f"{program} ({pid}) to sleep in its own code")


def test_what_may_not_be_read_is_absent() -> None:
    """Another user may read a root process's command line and RSS, not its PSS."""
    require_root("switching to another user")
    sleep = shutil.which("sleep")
    assert sleep is not None
    target = subprocess.Popen([sleep, "3600"], stdin=subprocess.DEVNULL)
    try:
        _wait_asleep(target.pid, os.path.realpath(sleep))
        before = _rss(target.pid)
        # Imported while still root: nobody may not be able to read this interpreter's
        # packages, and describe() imports psutil only when asked.
        import psutil  # noqa: F401

        def taken() -> object:
            snap = snapshot(target.pid, pss=True)
            return [snap[target.pid].to_dict(), snap.memory]

        record, memory = proc.as_nobody(taken)
        after = _rss(target.pid)
        assert record["cmdline"] == [sleep, "3600"]
        # sleep touches no new memory while it sleeps; should a page still come or go (the
        # kernel may reclaim one), the value read lies between the reads around it.
        assert record["user"] == "root"
        assert min(before, after) <= record["rss"] <= max(before, after)
        assert record["pss"] is None  # smaps_rollup needs ptrace read access
        assert memory["unread"] == [] and memory["pss"] is None
    finally:
        target.kill()
        target.wait()


def test_tree_command_shows_memory_and_command_lines(make_tree: MakeTree) -> None:
    tree = make_tree({"children": [{}]}, mode="idle")
    result = run("tree", str(tree.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    shown = " ".join(_cmdline(tree.root)[:2])  # the interpreter and -c: no newline yet
    assert lines[0].startswith(f"tg-worker-0 [{tree.root}] S, 1 thread, RSS ")
    assert f"  cmd: {shown}" in lines[0]
    assert "2 processes, 2 tasks, RSS " in lines[-2] and "PSS" not in lines[-2]
    assert "PSS " in run("tree", str(tree.root), "--pss").stdout
    data = json.loads(run("tree", str(tree.root), "--json", "--pss").stdout)
    assert [p["cmdline"] for p in data["processes"]] == [list(_cmdline(p)) for p in tree.pids]
    assert all(p["pss"] > 0 for p in data["processes"])
    assert data["memory"]["pss"] == sum(p["pss"] for p in data["processes"])
    # Nothing in the tree was stopped to read it.
    assert not proc.stopped(tree.pids)


def test_the_describe_benchmark_runs() -> None:
    """benchmarks/describe.py --quick: every variant timed on a real tree."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "describe.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr[-3000:]
    values = dict(line.rsplit(None, 1) for line in done.stdout.splitlines())
    assert values["processes"] == "100"
    for key in ("walk only ms", "described ms", "described, PSS ms", "treeguard tree ms"):
        assert float(values[key]) > 0


def test_options_that_are_not_booleans_are_refused(make_tree: MakeTree) -> None:
    tree = make_tree({}, mode="idle")
    for options in ({"describe": "yes"}, {"pss": 1}, {"describe": None}):
        with pytest.raises(InvalidArgumentError, match="must be True or False"):
            snapshot(tree.root, **options)
    with ProcessesGuard(tree.root, include_root=True) as guard:
        with pytest.raises(InvalidArgumentError, match="pss"):
            guard.snapshot(pss="no")  # type: ignore[arg-type]
        proc.assert_all_stopped(tree.pids)
    proc.assert_none_stopped(tree.pids)


def _passwd_name(uid: int) -> str | None:
    """The first name /etc/passwd gives ``uid``, read here (as NSS's files source does)."""
    with open("/etc/passwd") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if len(fields) >= 3 and fields[2] == str(uid):
                return fields[0]
    return None


def test_a_frozen_snapshot_asks_no_daemon_and_locks_no_unproven_map(
    make_tree: MakeTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While frozen, user names come from /etc/passwd (an NSS daemon such as sssd may be one
    of the frozen processes), and a process not proven stopped (here resumed behind the
    guard's back) gets no command line or PSS: its memory-map lock may be held by a task
    sleeping in the kernel. What cannot block (RSS, CPU times) is still read."""

    def nss(uid: int) -> object:
        raise AssertionError(f"NSS asked for UID {uid} while the tree was frozen")

    monkeypatch.setattr(pwd, "getpwuid", nss)
    tree = make_tree({"children": [{}]}, mode="idle")
    root, child = tree.pids
    with ProcessesGuard(tree.root, include_root=True, backend="signal") as guard:
        proc.assert_all_stopped(tree.pids)
        os.kill(child, signal.SIGCONT)  # a process of this test's own tree
        proc.wait_until(lambda: proc.state(child) == "S", 10, "the child to run again")
        snap = guard.snapshot(pss=True)
        assert proc.state(root) == "T"
    assert not snap.consistent and snap.consistency == "changed"
    held, loose = snap[root], snap[child]
    assert held.cmdline == _cmdline(root) and held.pss is not None
    assert loose.cmdline is None and loose.pss is None
    assert loose.rss is not None and loose.rss > 0 and loose.cpu_user is not None
    assert {held.user, loose.user} == {_passwd_name(os.getuid())}
