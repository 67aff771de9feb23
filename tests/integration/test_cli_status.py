"""``treeguard status``, through the real console script, against real trees."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests import proc
from tests.conftest import MakeCgroup
from tests.integration import test_cli
from tests.integration.test_cli import SPEC, MakeTree, assert_clean_error, run

paused_cleanup = test_cli.paused_cleanup  # a fixture: resumes what a test left paused


def status(*args: str) -> tuple[int, dict[str, Any]]:
    result = run("status", *args, "--json")
    assert result.stderr == "", result
    return result.returncode, json.loads(result.stdout)


def held(data: dict[str, Any]) -> dict[int, str | None]:
    return {p["pid"]: p["held"] for p in data["processes"]}


def test_status_of_a_paused_state_file(
    make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    tree = make_tree(SPEC, mode="idle")
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    before = time.time()
    assert run("pause", str(tree.root), "--state", str(state)).returncode == 0
    code, data = status("--state", str(state))
    assert code == 0, data
    assert data["state"] == "frozen" and data["frozen"] and data["backend"] == "signal"
    assert held(data) == dict.fromkeys(tree.pids, "signal")
    assert data["lease"] is None and data["completed"]
    mtime = state.stat().st_mtime
    assert data["since"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(mtime)))
    assert int(before) <= int(mtime)
    text = run("status", "--state", str(state))
    assert text.returncode == 0
    assert text.stdout.startswith(f"frozen by signal: {len(tree.pids)} of {len(tree.pids)}")
    # Someone resumes one process: the tree is frozen no more (status 8).
    os.kill(tree.pids[-1], signal.SIGCONT)  # our own tree's process
    proc.wait_until(lambda: proc.state(tree.pids[-1]) != "T", 10, "it to run")
    code, data = status("--state", str(state))
    assert code == 8 and data["state"] == "partly frozen" and not data["frozen"]
    assert held(data)[tree.pids[-1]] is None
    assert run("resume", "--state", str(state)).returncode == 0
    proc.assert_none_stopped(tree.pids)
    assert_clean_error(run("status", "--state", str(state)), 6, "does not exist")


def test_status_of_a_pid(make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]) -> None:
    tree = make_tree(SPEC, mode="idle")
    code, data = status(str(tree.root))
    assert code == 8 and data["state"] == "running" and data["backend"] is None
    assert held(data) == dict.fromkeys(tree.pids)
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    assert run("pause", str(tree.root), "--state", str(state)).returncode == 0
    code, data = status(str(tree.root))
    assert code == 0 and data["state"] == "frozen" and data["backend"] == "signal"
    assert held(data) == dict.fromkeys(tree.pids, "signal")
    assert run("resume", "--state", str(state)).returncode == 0


def test_status_while_held_by_ptrace(make_tree: MakeTree) -> None:
    tree = make_tree(SPEC, mode="idle")
    # CMD is `treeguard status PID --json`: its status and output pass through freeze.
    result = run("freeze", "--backend", "ptrace", str(tree.root), "--", *_status_cmd(tree.root))
    assert result.returncode == 0, result
    data = json.loads(result.stdout)
    assert data["state"] == "frozen" and data["backend"] == "ptrace"
    assert held(data) == dict.fromkeys(tree.pids, "ptrace")
    proc.assert_none_stopped(tree.pids)


def _status_cmd(pid: int) -> list[str]:
    return [sys.executable, "-m", "treeguard", "status", str(pid), "--json"]


def test_status_of_a_cgroup_pause(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    cg = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn, mode="idle")
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = run("pause", "--backend", "cgroup", str(tree.root), "--state", str(state))
    assert result.returncode == 0, result.stderr
    code, data = status("--state", str(state))
    assert code == 0 and data["backend"] == "cgroup", data
    assert data["cgroup"] == {"version": 2, "path": cg.path, "exists": True, "frozen": True}
    assert sorted(held(data)) == sorted(tree.pids)
    assert set(held(data).values()) == {"cgroup"}
    # A PID's tree: its tasks show S (a frozen cgroup's tasks sleep), the cgroup tells.
    code, data = status(str(tree.root))
    assert code == 0 and held(data) == dict.fromkeys(tree.pids, "cgroup")
    assert run("resume", "--state", str(state)).returncode == 0
    assert not cg.frozen
    assert status(str(tree.root))[0] == 8
    # backend auto chooses the cgroup (the tree is alone in a treeguard cgroup): status
    # says what froze.
    result = run("pause", "--backend", "auto", str(tree.root), "--state", str(state))
    assert result.returncode == 0 and "with the cgroup backend" in result.stdout, result
    code, data = status("--state", str(state))
    assert code == 0 and data["backend"] == "cgroup" and data["cgroup"]["frozen"], data
    assert run("resume", "--state", str(state)).returncode == 0
    assert not cg.frozen


def test_status_of_a_lease(make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]) -> None:
    tree = make_tree({}, mode="idle")
    state = tmp_path / "lease.json"
    paused_cleanup.append(state)
    before = time.time()
    helper = test_cli.pause_with_lease(tree.root, state, "600")
    after = time.time()
    code, data = status("--state", str(state))
    assert code == 0 and data["lease"]["helper"] == helper and data["lease"]["running"], data
    # when the helper thaws: 600 s after the lease was armed, within the pause command's run
    ends = datetime.datetime.fromisoformat(data["lease"]["ends"].replace("Z", "+00:00"))
    assert int(before) + 600 <= ends.timestamp() <= after + 600 + 1
    text = run("status", "--state", str(state)).stdout
    assert (
        f"lease: helper PID {helper} running; it thaws the tree by {data['lease']['ends']}" in text
    )
    assert run("resume", "--state", str(state)).returncode == 0
    proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "resume to end it")


def test_status_checks_identity_not_pid(tmp_path: Path) -> None:
    """A state file naming a stopped process's PID with another starttime (the PID reused)
    says that process is gone: a bare PID is never trusted."""
    with proc.stopped_sleeper() as victim:
        real = proc.starttime(victim.pid)
        for attempt, starttime in enumerate((real + 1, real)):
            state = tmp_path / f"state-{attempt}.json"
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b'{"format":"treeguard-pause","version":2}\n')
            os.write(fd, json.dumps(["stop", victim.pid, starttime, 0]).encode() + b"\n")
            os.close(fd)
            code, data = status("--state", str(state))
            want = "gone" if starttime != real else "signal"
            assert held(data) == {victim.pid: want}, data
            assert code == (8 if want == "gone" else 0)
            assert not data["completed"]  # a journal without its token: cut short
        assert proc.stopped([victim.pid])  # status signals nothing


def test_status_needs_pid_or_state() -> None:
    assert_clean_error(run("status"), 2, "one of the arguments PID --state is required")
    assert_clean_error(run("status", "1", "--state", "x"), 2, "not allowed with argument")
