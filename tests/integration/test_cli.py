"""The real ``treeguard`` console script, run in subprocesses against real trees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import proc
from tests.conftest import MakeCgroup, require_root, slot
from treeguard._token import Token
from treeguard._workers import WorkerTree

MakeTree = Callable[..., WorkerTree]
SPEC = {"threads": 1, "children": [{"children": [{}]}, {"threads": 1}]}


def _script() -> list[str]:
    found = shutil.which("treeguard") or shutil.which(
        "treeguard", path=os.path.dirname(sys.executable)
    )
    return [found] if found else [sys.executable, "-m", "treeguard"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_script(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    """One line on stderr, the documented status, no traceback."""
    assert result.returncode == status, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(("treeguard: error:", "treeguard ")), result.stderr
    assert text in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    if status != 2:  # argparse prints its usage line before the error
        assert len(lines) == 1, result.stderr


@pytest.fixture
def paused_cleanup() -> Iterator[list[Path]]:
    """State files whose trees must be resumed at teardown, whatever a test did."""
    files: list[Path] = []
    yield files
    for path in files:
        if path.exists() and not path.is_symlink():
            os.chown(path, os.geteuid(), os.getegid())
            path.chmod(0o600)
            run("resume", "--state", str(path))


def test_tree_json(make_tree: MakeTree) -> None:
    tree = make_tree(SPEC, mode="idle")
    result = run("tree", str(tree.root), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["consistent"]
    assert [p["pid"] for p in data["processes"]] == tree.pids
    assert [len(p["threads"]) for p in data["processes"]] == [2, 1, 1, 2]
    text = run("tree", str(tree.root))
    assert text.returncode == 0
    assert text.stdout.splitlines()[0] == f"tg-worker-0 [{tree.root}] S, 2 threads"


def test_freeze_runs_cmd_while_frozen(make_tree: MakeTree) -> None:
    tree = make_tree(SPEC)
    # CMD checks every task of the tree through /proc and reports with its exit status.
    check = textwrap.dedent(
        f"""
        import os, sys
        states = []
        for pid in {tree.pids!r}:
            for tid in os.listdir(f"/proc/{{pid}}/task"):
                data = open(f"/proc/{{pid}}/task/{{tid}}/stat", "rb").read()
                states.append(chr(data[data.rindex(b")") + 2]))
        sys.exit(7 if set(states) == {{"T"}} and len(states) == 6 else 1)
        """
    )
    exclude = str(os.getpid())  # never in the tree: only checks that --exclude parses
    result = run("freeze", str(tree.root), "--exclude", exclude, "--", sys.executable, "-c", check)
    assert result.returncode == 7, result.stderr
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_cmd_still_thaws(make_tree: MakeTree, sig: signal.Signals) -> None:
    tree = make_tree(SPEC, mode="idle")
    # CMD signals treeguard (its parent) and sleeps until treeguard passes the signal on.
    cmd = (
        "import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        f"os.kill(os.getppid(), {int(sig)}); time.sleep(60)"
    )
    result = run("freeze", str(tree.root), "--", sys.executable, "-c", cmd)
    assert result.returncode == 128 + sig, result
    assert sig.name in result.stderr and "Traceback" not in result.stderr
    proc.assert_none_stopped(tree.pids)


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (("tree", "4194304"), 3, "no such process"),
        (("freeze", "4194304", "--", "true"), 3, "no such process"),
        (("freeze", "1", "--timeout", "0", "--", "true"), 2, "timeout"),
        (("freeze", "{root}"), 2, "CMD"),
        (("tree", "x"), 2, "not a PID"),
        (("freeze", "{root}", "--", "/nonexistent/cmd"), 127, "cannot run"),
    ],
)
def test_errors(make_tree: MakeTree, args: tuple[str, ...], status: int, text: str) -> None:
    tree = make_tree({}, mode="idle")
    result = run(*(a.format(root=tree.root) for a in args))
    assert_clean_error(result, status, text)
    proc.assert_none_stopped(tree.pids)


def test_help_for_every_subcommand() -> None:
    for sub in ("", "demo", "tree", "freeze", "pause", "resume"):
        result = run(*([sub] if sub else []), "--help")
        assert result.returncode == 0, result.stderr
        assert "exit status:" in result.stdout and "6    unsafe state file" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "treeguard", "tree", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: " in result.stdout


def test_pause_and_resume(make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]) -> None:
    tree = make_tree(SPEC)
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = run("pause", str(tree.root), "--state", str(state))
    assert result.returncode == 0, result.stderr
    proc.assert_all_stopped(tree.pids)
    info = state.lstat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    token = Token.from_json(state.read_text())
    assert sorted(token.pids) == sorted(tree.pids)
    # A second pause never overwrites the file, and stops nothing more.
    before = state.read_bytes()
    again = run("pause", str(tree.pids[1]), "--state", str(state))
    assert_clean_error(again, 6, "exists already")
    assert state.read_bytes() == before
    result = run("resume", "--state", str(state))
    assert result.returncode == 0, result.stderr
    proc.assert_none_stopped(tree.pids)
    assert not state.exists()
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])
    assert_clean_error(run("resume", "--state", str(state)), 6, "does not exist")


def test_malicious_state_files(
    make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    require_root("a state file owned by another user")
    tree = make_tree({"children": [{}]}, mode="idle")
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    assert run("pause", str(tree.root), "--state", str(state)).returncode == 0
    proc.assert_all_stopped(tree.pids)

    link = tmp_path / "link.json"
    link.symlink_to(state)
    assert_clean_error(run("resume", "--state", str(link)), 6, "symbolic link")

    state.chmod(0o622)
    assert_clean_error(run("resume", "--state", str(state)), 6, "writable by group or others")
    state.chmod(0o600)

    os.chown(state, 65534, 65534)
    assert_clean_error(run("resume", "--state", str(state)), 6, "owned by UID 65534")
    os.chown(state, os.geteuid(), os.getegid())

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert_clean_error(run("resume", "--state", str(fifo)), 6, "not a regular file")

    proc.assert_all_stopped(tree.pids)  # none of that thawed anything
    assert run("resume", "--state", str(state)).returncode == 0
    proc.assert_none_stopped(tree.pids)

    # pause never writes through a symlink, dangling or not, and then freezes nothing.
    target = tmp_path / "target"
    trap = tmp_path / "trap.json"
    trap.symlink_to(target)
    assert_clean_error(run("pause", str(tree.root), "--state", str(trap)), 6, "exists already")
    assert not target.exists()
    proc.assert_none_stopped(tree.pids)


def test_tampered_token_never_signals_another_process(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        proc.wait_until(lambda: proc.task_states(victim.pid), 10)
        victim.send_signal(signal.SIGSTOP)
        proc.wait_until(lambda: proc.stopped([victim.pid]), 10, "the victim to stop")
        real = proc.starttime(victim.pid)
        # A well-formed token (its digest recomputed) naming the victim's PID with another
        # starttime: as if the PID had been recycled, or the file edited.
        forged = Token("signal", {"stopped": [[victim.pid, real + 1]], "already_stopped": []})
        state = tmp_path / "forged.json"
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, forged.to_json().encode())
        os.close(fd)
        assert run("resume", "--state", str(state)).returncode == 0
        assert proc.stopped([victim.pid]), "resume signalled a process it did not freeze"
        # An edited token whose digest no longer matches is refused outright.
        edited = json.loads(forged.to_json())
        edited["payload"]["stopped"][0][1] = real
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, json.dumps(edited).encode())
        os.close(fd)
        assert_clean_error(run("resume", "--state", str(state)), 6, "digest mismatch")
        assert proc.stopped([victim.pid])
    finally:
        victim.kill()
        victim.wait()


def test_permission_denied_as_another_user(make_tree: MakeTree) -> None:
    """As an unprivileged user, freezing root's tree fails with status 4, nothing stopped.

    The interpreter is not reachable by other users here, so the command line runs in a
    forked child that drops its privileges, with the same ``main``."""
    require_root("switching to another user")
    tree = make_tree({"children": [{}]}, mode="idle")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        status = 99
        try:
            os.close(rfd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            from treeguard._cli import main

            status = main(["freeze", str(tree.root), "--", "true"])
        finally:
            os.write(wfd, str(status).encode())
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as reader:
        status = int(reader.read())
    os.waitpid(pid, 0)
    assert status == 4
    proc.assert_none_stopped(tree.pids)


def test_demo() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout and "FAILED" not in result.stdout
    assert " T, " in result.stdout  # the frozen tree, drawn with each process's state


def test_freeze_and_pause_with_the_cgroup_backend(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    # A tree spawned into a treeguard cgroup, frozen by the kernel through the command line.
    cg = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn)
    events = os.path.join(cg.path, "cgroup.events")
    check = f"import sys; sys.exit(7 if 'frozen 1' in open({events!r}).read() else 1)"
    result = run("freeze", "--backend", "cgroup", str(tree.root), "--", sys.executable, "-c", check)
    assert result.returncode == 7, result.stderr
    assert not cg.frozen
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = run("pause", "--backend", "cgroup", str(tree.root), "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert cg.frozen
    assert proc.counters_still(tree.counters, tree.period)
    assert Token.from_json(state.read_text()).backend == "cgroup"
    result = run("resume", "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert not cg.frozen
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])
