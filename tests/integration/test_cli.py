"""The real ``treeguard`` console script, run in subprocesses against real trees."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import treeguard
from tests import proc
from tests.conftest import MakeCgroup, require_root, slot
from treeguard._snapshot_read import snapshot
from treeguard._statefile import parse_state
from treeguard._subreaper import is_subreaper, set_subreaper
from treeguard._thaw import pidfd_inode
from treeguard._token import Token
from treeguard._token import freeze as freeze_token
from treeguard._token import thaw as thaw_token
from treeguard._workers import WorkerTree, wide
from treeguard.cgroup import Cgroup
from treeguard.procfs import HELPER_COMM

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
    if not result.stderr.startswith("usage: "):  # argparse prints one before the error
        assert len(lines) == 1, result.stderr


def paused_token(state: Path) -> Token:
    """The token of a completed pause, from its state file (a journal)."""
    token = parse_state(state.read_bytes()).token
    assert token is not None, "the pause did not complete"
    return token


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
    assert text.stdout.splitlines()[0].startswith(f"tg-worker-0 [{tree.root}] S, 2 threads, RSS ")


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
        (("pause", "4194304", "--state", "{tmp}/s"), 3, "no such process"),
        (("status", "4194304"), 3, "no such process"),
        (("tree", "x"), 2, "not a PID"),
        (("pause", "{root}", "--state", "{tmp}/s", "--timeout", "0"), 2, "--timeout: must"),
        (("pause", "{root}", "--state", "{tmp}/s", "--exclude", "99999999"), 2, "--exclude:"),
        # freeze passes CMD's status through: its own failures are 125, as timeout(1)'s.
        (("freeze", "4194304", "--", "true"), 125, "no such process"),
        (("freeze", "1", "--timeout", "0", "--", "true"), 125, "--timeout: must"),
        (("freeze", "{root}", "--exclude", "99999999", "--", "true"), 125, "--exclude:"),
        (("freeze", "{root}"), 125, "CMD"),
        (("freeze", "x", "--", "true"), 125, "not a PID"),
        (("freeze", "{root}", "--bogus", "--", "true"), 125, "unrecognized arguments"),
        (("freeze", "{root}", "--", "/nonexistent/cmd"), 127, "cannot run"),
        (("freeze", "{root}", "--", "{tmp}/not-executable"), 126, "Permission denied"),
        (("freeze", "{root}", "--", "{tmp}"), 126, "cannot run"),
    ],
)
def test_errors(
    make_tree: MakeTree, tmp_path: Path, args: tuple[str, ...], status: int, text: str
) -> None:
    tree = make_tree({}, mode="idle")
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)  # no execute bit: execve(2) says EACCES, even to root
    result = run(*(a.format(root=tree.root, tmp=tmp_path) for a in args))
    assert_clean_error(result, status, text)
    # Python's option names (timeout=, max_frozen=) never show: the flags do.
    assert not any(f"{name}:" in result.stderr for name in ("max_frozen", "partial_ok", "root"))
    assert "error: timeout:" not in result.stderr and "error: exclude:" not in result.stderr
    assert not (tmp_path / "s").exists()
    proc.assert_none_stopped(tree.pids)


def test_exit_status_125_is_cmds_own_when_it_runs(make_tree: MakeTree) -> None:
    tree = make_tree({}, mode="idle")
    result = run("freeze", str(tree.root), "--", "sh", "-c", "exit 125")
    assert result.returncode == 125 and result.stderr == "", result


def test_version() -> None:
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"treeguard {version('treeguard')}"


def test_forgotten_double_dash_gets_a_hint(make_tree: MakeTree) -> None:
    tree = make_tree({}, mode="idle")
    root = str(tree.root)
    result = run("freeze", root, "sleep", "5", "--timeout", "2")
    assert_clean_error(
        result, 125, f"did you mean `treeguard freeze {root} --timeout 2 -- sleep 5`"
    )
    # The usage of freeze, not the top-level one.
    assert result.stderr.startswith("usage: treeguard freeze "), result.stderr
    proc.assert_none_stopped(tree.pids)


def test_tree_json_into_a_closed_pipe_exits_quietly() -> None:
    """`treeguard tree --json | head -1` stops quietly as ps does: no traceback, no error
    line, the status a shell shows for a process ended by SIGPIPE (128 + 13)."""
    rfd, wfd = os.pipe()
    os.close(rfd)  # the reader is gone before anything is written: every write is EPIPE
    try:
        result = subprocess.run(
            [*_script(), "tree", "1", "--json"],
            stdout=wfd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(wfd)
    assert result.returncode == 141 and result.stderr == "", result
    # With a reader that stops after the first line (head -1), the same.
    shell = f"{shlex.join([*_script(), 'tree', '1', '--json'])} 2>&1 | head -1"
    piped = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=60
    )
    assert piped.stdout == "{\n" and piped.returncode in (0, 141), piped


def test_help_for_every_subcommand() -> None:
    for sub in ("", "demo", "tree", "freeze", "pause", "resume", "status"):
        for flag in ("--help", "-h"):
            result = run(*([sub] if sub else []), flag)
            assert result.returncode == 0, result.stderr
            assert "exit status:" in result.stdout and "6    unsafe state file" in result.stdout
            for status in ("7    pause", "8    status", "125  treeguard freeze", "126  CMD"):
                assert status in result.stdout, result.stdout
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
    token = paused_token(state)
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


_SIGNALLED_AS_CREATED = """
import os, signal, sys
from treeguard import _cli, _statefile

sig, ignored = signal.Signals[sys.argv[1]], sys.argv[2] == "ignored"
if ignored:
    signal.signal(sig, signal.SIG_IGN)  # as nohup(1) starts it for SIGHUP
create = _statefile.create_exclusive

def create_then_signalled(path):
    fd = create(path)
    os.kill(os.getpid(), sig)  # Ctrl-C, or the terminal hanging up, as the file exists
    return fd

_statefile.create_exclusive = create_then_signalled
sys.exit(_cli.main(sys.argv[3:]))
"""


def pause_signalled_as_created(
    sig: str, ignored: bool, root: int, state: Path
) -> subprocess.CompletedProcess[str]:
    """``treeguard pause ROOT --state STATE`` in a process that sends itself ``sig`` (one it
    ignores, if ``ignored``) as the state file has just been created."""
    how = "ignored" if ignored else "heeded"
    argv = [sig, how, "pause", str(root), "--state", str(state)]
    return proc.run_python(_SIGNALLED_AS_CREATED, argv)


def test_pause_interrupted_as_its_state_file_is_made(
    make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    """An interrupt that comes as the state file is created undoes the pause, as one that
    comes while it freezes: nothing stopped, no state file (never an empty one that
    blocks the path and resumes nothing)."""
    tree = make_tree(SPEC)
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = pause_signalled_as_created("SIGINT", False, tree.root, state)
    assert result.returncode == 128 + signal.SIGINT, result
    assert "SIGINT received while frozen; the tree was thawed" in result.stderr
    assert not state.exists()
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


_REPLACED_WHILE_PAUSING = """
import os, signal, sys
from treeguard import _cli, _statefile

create = _statefile.create_exclusive

def create_then_replaced(path):
    fd = create(path)
    # While the pause runs, a resume takes its file away and another pause makes its own
    # at the same path; then this pause is interrupted.
    os.unlink(path)
    with open(path, "x") as other:
        other.write("another pause's state file")
    os.kill(os.getpid(), signal.SIGINT)
    return fd

_statefile.create_exclusive = create_then_replaced
sys.exit(_cli.main(sys.argv[1:]))
"""


def test_a_pause_undone_removes_its_own_state_file_only(
    make_tree: MakeTree, tmp_path: Path
) -> None:
    """A pause undone removes the state file it made, never another file put at its path
    since (that of another pause: its tree would stay stopped with nothing to resume it)."""
    tree = make_tree(SPEC)
    state = tmp_path / "paused.json"
    argv = ["pause", str(tree.root), "--state", str(state)]
    result = subprocess.run(
        [sys.executable, "-c", _REPLACED_WHILE_PAUSING, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 128 + signal.SIGINT, result
    assert "SIGINT received while frozen; the tree was thawed" in result.stderr
    assert state.read_text() == "another pause's state file"
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


def test_a_pause_goes_on_through_a_signal_it_ignores(
    make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    """A signal the pause was started ignoring (SIGHUP under nohup, SIGINT in a background
    job of a script) does not undo it, blocked while it freezes or not."""
    tree = make_tree(SPEC)
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = pause_signalled_as_created("SIGHUP", True, tree.root, state)
    assert result.returncode == 0, result
    proc.assert_all_stopped(tree.pids)
    assert run("resume", "--state", str(state)).returncode == 0
    assert not state.exists()
    proc.assert_none_stopped(tree.pids)


@pytest.mark.parametrize("by", ["pid", "cgroup"])
def test_freeze_goes_on_through_a_signal_it_ignores(
    make_tree: MakeTree, cgroup: MakeCgroup, by: str
) -> None:
    """Started ignoring SIGHUP (nohup(1)), freeze goes on ignoring it: a hangup while CMD
    runs neither ends CMD nor thaws early; CMD's status passes through."""
    if by == "cgroup":
        cg = cgroup(2)
        tree = make_tree(SPEC, spawn=cg.spawn)
        what = ["--cgroup", cg.path]
        events = os.path.join(cg.path, "cgroup.events")
        frozen = f"'frozen 1' in open({events!r}).read()"
    else:
        tree = make_tree(SPEC)
        what = [str(tree.root)]
        frozen = f"not proc.not_stopped({tree.pids!r})"
    # CMD hangs up on treeguard (its parent), then says whether the tree is still frozen.
    cmd = (
        "import os, signal, sys; from tests import proc; "
        "os.kill(os.getppid(), signal.SIGHUP); "
        f"sys.exit(7 if {frozen} else 1)"
    )
    result = subprocess.run(
        [*_script(), "freeze", *what, "--", sys.executable, "-c", cmd],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup does
    )
    assert result.returncode == 7, result
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


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
    with proc.stopped_sleeper() as victim:
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


def test_permission_denied_as_another_user(make_tree: MakeTree) -> None:
    """As an unprivileged user, freezing root's tree fails with status 4, nothing stopped.

    Neither this checkout nor its interpreter need be reachable by other users (a clone in a
    private home), so the command line runs in a forked child that drops its privileges and
    runs a copy of the package in a directory that user may read, with the system's
    interpreter for its watchdog helper (which needs nothing but the standard library)."""
    require_root("switching to another user")
    tree = make_tree({"children": [{}]}, mode="idle")
    with _package_readable_by_all() as readable:
        status = _main_as_nobody(readable, ["freeze", str(tree.root), "--", "true"])
    assert status == 125  # freeze: its own failure (4 in the other subcommands)
    proc.assert_none_stopped(tree.pids)


@contextlib.contextmanager
def _package_readable_by_all() -> Iterator[str]:
    """A copy of the package in a temporary directory every user may read (the checkout
    may sit in one only its owner can), removed afterwards."""
    readable = tempfile.mkdtemp(prefix="treeguard-other-user-")
    try:
        os.chmod(readable, 0o755)
        package = Path(treeguard.__file__).parent
        shutil.copytree(
            package, Path(readable) / "treeguard", ignore=shutil.ignore_patterns("__pycache__")
        )
        yield readable
    finally:
        shutil.rmtree(readable)


def _main_as_nobody(path: str, argv: list[str]) -> int:
    """``treeguard._cli.main(argv)`` in a forked child running as uid 65534, importing the
    package from ``path``; its exit status."""
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
            os.chdir("/")
            for name in [m for m in sys.modules if m == "treeguard" or m.startswith("treeguard.")]:
                del sys.modules[name]
            sys.path.insert(0, path)
            if not os.access(sys.executable, os.X_OK):
                sys.executable = shutil.which("python3", path="/usr/local/bin:/usr/bin") or ""
            from treeguard._cli import main

            status = main(argv)
        finally:
            os.write(wfd, str(status).encode())
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as reader:
        status = int(reader.read())
    os.waitpid(pid, 0)
    return status


def test_demo() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout and "FAILED" not in result.stdout
    assert " T, " in result.stdout  # the frozen tree, drawn with each process's state


def _exits_7_if_frozen(cg: Cgroup) -> list[str]:
    """A CMD for ``freeze`` that exits 7 if the kernel says ``cg`` is frozen while it runs
    (``frozen 1`` in cgroup.events), 1 otherwise."""
    events = os.path.join(cg.path, "cgroup.events")
    return [
        sys.executable,
        "-c",
        f"import sys; sys.exit(7 if 'frozen 1' in open({events!r}).read() else 1)",
    ]


def test_freeze_and_pause_with_the_cgroup_backend(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    # A tree spawned into a treeguard cgroup, frozen by the kernel through the command line.
    cg = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn)
    check = _exits_7_if_frozen(cg)
    result = run("freeze", "--backend", "cgroup", str(tree.root), "--", *check)
    assert result.returncode == 7, result.stderr
    assert not cg.frozen
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = run("pause", "--backend", "cgroup", str(tree.root), "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert cg.frozen
    assert proc.counters_still(tree.counters, tree.period)
    assert paused_token(state).backend == "cgroup"
    result = run("resume", "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert not cg.frozen
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


# -- control characters in names -------------------------------------------------------

EVIL = b"ev\x1b[2Jil\x07"  # clear the screen, ring the bell: 10 bytes, within comm's 15


def test_names_are_escaped_in_human_output() -> None:
    # A process that names itself with a terminal escape sequence (proc(5): it may).
    code = f"open('/proc/self/comm', 'wb').write({EVIL!r}); print('ok', flush=True); input()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ok\n"
        result = run("tree", str(child.pid))
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
        assert result.stdout.splitlines()[0].startswith(r"ev\x1b[2Jil\x07 [")
        assert "\x1b" not in snapshot(child.pid).render()
        # The JSON keeps the name exactly (escaped the JSON way).
        data = json.loads(run("tree", str(child.pid), "--json").stdout)
        assert data["processes"][0]["name"] == EVIL.decode()
    finally:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


# -- the command line always has a watchdog ---------------------------------------------


def comm(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n")
    except (FileNotFoundError, ProcessLookupError):
        return b""


def helpers_of(pid: int) -> list[int]:
    return [k for k in proc.children(pid) if comm(k) == HELPER_COMM]


@pytest.fixture
def orphans() -> Iterator[list[int]]:
    """Make this process a child subreaper, so that what a killed command line leaves
    (its CMD, its helper) comes to us; the PIDs listed are killed (if not gone) and reaped
    at teardown."""
    was = is_subreaper()
    set_subreaper(True)
    listed: list[int] = []
    try:
        yield listed
    finally:
        for pid in listed:
            try:
                if proc.state(pid) not in (None, "Z"):
                    os.kill(pid, signal.SIGKILL)  # our child: its PID cannot be reused
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        set_subreaper(was)


def test_freeze_killed_with_sigkill_is_thawed(make_tree: MakeTree, orphans: list[int]) -> None:
    tree = make_tree(SPEC)
    cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
    cli = subprocess.Popen([*_script(), "freeze", str(tree.root), "--", *cmd])
    try:
        proc.wait_until(lambda: len(proc.children(cli.pid)) == 2, 30, "CMD to start")
        (helper,) = helpers_of(cli.pid)
        orphans += proc.children(cli.pid)
        proc.assert_all_stopped(tree.pids)
        assert proc.counters_still(tree.counters, tree.period)
    finally:
        cli.kill()  # no handler, no finalizer: only the helper can thaw now
        cli.wait()
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the helper to thaw")
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])
    proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "the helper to exit")


# -- pause: a journal first, a watchdog while freezing, a lease if asked ------------------


def start_pause(root: int, state: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*_script(), "pause", str(root), "--state", str(state), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def wait_journal(state: Path, lines: int, timeout: float = 30.0) -> bool:
    """Poll (finely: the freeze takes a fraction of a second) until the journal has
    ``lines`` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists() and state.read_bytes().count(b"\n") >= lines:
            return True
        time.sleep(0.0002)
    return False


BIG = 2000


def test_pause_killed_half_way_is_undone_by_resume(
    make_tree: MakeTree, tmp_path: Path, orphans: list[int], paused_cleanup: list[Path]
) -> None:
    """SIGKILL of the pause (and of its helper, so that only the journal is left) while it
    freezes a tree of 2,000 processes: resume thaws every process that was stopped."""
    tree = make_tree(wide(BIG), mode="idle")
    for attempt in range(5):
        state = tmp_path / f"paused-{attempt}.json"
        paused_cleanup.append(state)
        cli = start_pause(tree.root, state)
        try:
            assert wait_journal(state, 500), "the pause journaled nothing"
            (helper,) = helpers_of(cli.pid)
            orphans.append(helper)
            os.kill(helper, signal.SIGKILL)
        finally:
            cli.kill()
            cli.wait()
        journal = parse_state(state.read_bytes())
        if journal.token is None:
            break  # cut short, as wanted (else the freeze won the race: try again)
        assert run("resume", "--state", str(state)).returncode == 0
    assert journal.token is None, "every pause completed before it could be killed"
    stopped = {pid for pid, _ in proc.stopped(tree.pids)}
    assert stopped, "the pause was killed before it stopped anything"
    journaled = {pid for pid, _, _ in journal.stopped}
    assert stopped <= journaled < set(tree.pids)  # what was stopped was journaled first
    result = run("resume", "--state", str(state))
    assert result.returncode == 0, result.stderr
    proc.assert_none_stopped(tree.pids)
    assert not state.exists()


def test_pause_killed_while_freezing_is_thawed_by_its_helper(
    make_tree: MakeTree, tmp_path: Path, orphans: list[int], paused_cleanup: list[Path]
) -> None:
    tree = make_tree(wide(500), mode="idle")
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    cli = start_pause(tree.root, state)
    try:
        assert wait_journal(state, 10), "the pause journaled nothing"
        orphans += helpers_of(cli.pid)
    finally:
        cli.kill()
        cli.wait()
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the helper to thaw")
    result = run("resume", "--state", str(state))  # harmless once thawed
    assert result.returncode == 0, result.stderr
    proc.assert_none_stopped(tree.pids)


def pause_with_lease(root: int, state: Path, seconds: str) -> int:
    """``treeguard pause ROOT --max-frozen SECONDS``; the lease helper's PID, checked by
    the name every helper takes."""
    result = run("pause", str(root), "--state", str(state), "--max-frozen", seconds)
    assert result.returncode == 0, result.stderr
    recorded = parse_state(state.read_bytes()).helper
    assert recorded is not None
    assert comm(recorded[0]) == HELPER_COMM
    return recorded[0]


def test_pause_with_a_lease(
    make_tree: MakeTree, tmp_path: Path, orphans: list[int], paused_cleanup: list[Path]
) -> None:
    tree = make_tree(SPEC)
    indexes = [slot(i) for i in range(len(tree.pids))]
    # A lease that runs out: the helper, which outlived the command line, thaws.
    state = tmp_path / "lease.json"
    paused_cleanup.append(state)
    helper = pause_with_lease(tree.root, state, "3")
    orphans.append(helper)
    proc.assert_all_stopped(tree.pids)
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the lease to thaw")
    proc.counters_moving(tree.counters, indexes)
    proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "the helper to exit")
    assert run("resume", "--state", str(state)).returncode == 0  # still works
    assert not state.exists()
    # Resumed before the lease runs out: resume thaws and stops the helper.
    state = tmp_path / "resumed.json"
    paused_cleanup.append(state)
    helper = pause_with_lease(tree.root, state, "600")
    orphans.append(helper)
    proc.assert_all_stopped(tree.pids)
    proc.wait_until(lambda: proc.state(helper) == "S", 10, "the helper to wait for its lease")
    result = run("resume", "--state", str(state))
    assert result.returncode == 0, result.stderr
    proc.assert_none_stopped(tree.pids)
    proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "resume to end it")
    proc.counters_moving(tree.counters, indexes)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "1e400", "x"])
def test_pause_refuses_a_bad_lease(make_tree: MakeTree, tmp_path: Path, value: str) -> None:
    tree = make_tree({}, mode="idle")
    state = tmp_path / "paused.json"
    result = run("pause", str(tree.root), "--state", str(state), "--max-frozen", value)
    assert_clean_error(result, 2, "max")
    assert not state.exists()
    proc.assert_none_stopped(tree.pids)


def test_resume_reads_a_version_1_state_file(make_tree: MakeTree, tmp_path: Path) -> None:
    """A state file written by an earlier treeguard (one line: the token)."""
    tree = make_tree(SPEC)
    state = tmp_path / "old.json"
    token = freeze_token(tree.root, include_root=True)
    try:
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, token.to_json().encode() + b"\n")
        os.close(fd)
        proc.assert_all_stopped(tree.pids)
        result = run("resume", "--state", str(state))
        assert result.returncode == 0, result.stderr
        proc.assert_none_stopped(tree.pids)
        assert not state.exists()
    finally:
        thaw_token(token)


def test_resume_checks_pidfs_inodes(tmp_path: Path) -> None:
    """A journal record naming the right PID and starttime but another pidfs inode (a PID
    reused within one clock tick) is never signalled by resume."""
    with proc.stopped_sleeper() as victim:
        fd = os.pidfd_open(victim.pid)
        inode = pidfd_inode(fd)
        os.close(fd)
        assert inode, "this kernel (6.9+) has pidfs"
        record = [victim.pid, proc.starttime(victim.pid)]
        for attempt, given in enumerate((inode + 1, inode)):
            state = tmp_path / f"state-{attempt}.json"
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b'{"format":"treeguard-pause","version":2}\n')
            os.write(fd, json.dumps(["stop", *record, given]).encode() + b"\n")
            os.close(fd)
            assert run("resume", "--state", str(state)).returncode == 0
            assert not state.exists()
            if given != inode:
                assert proc.stopped([victim.pid]), "resume signalled another process"
        proc.assert_none_stopped([victim.pid])  # the right inode: resumed


# -- pause refuses what it cannot hold; backends and --partial-ok ---------------------------


def test_pause_of_a_tree_frozen_already_fails(
    make_tree: MakeTree, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    """Every process stopped by someone else: nothing to stop, no state file (which would
    resume nothing), status 7; the processes stay as they were."""
    tree = make_tree(SPEC, mode="idle")
    for pid in tree.pids:
        os.kill(pid, signal.SIGSTOP)  # our own tree: "someone else" stops it
    try:
        proc.wait_until(lambda: not proc.not_stopped(tree.pids), 10, "the tree to stop")
        state = tmp_path / "paused.json"
        paused_cleanup.append(state)
        result = run("pause", str(tree.root), "--state", str(state))
        assert_clean_error(result, 7, "nothing to pause: every process was stopped already")
        assert not state.exists()
        proc.assert_all_stopped(tree.pids)
    finally:
        for pid in tree.pids:
            os.kill(pid, signal.SIGCONT)
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the tree to run")


def test_pause_with_the_cgroup_backend_reports_and_refuses(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    cg = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn, mode="idle")  # 4 processes, 6 tasks
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = run("pause", "--backend", "cgroup", str(tree.root), "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert "froze 4 process(es) (6 tasks)" in result.stdout, result.stdout
    assert "with the cgroup backend" in result.stdout
    assert run("resume", "--state", str(state)).returncode == 0
    assert not cg.frozen
    assert "frozen by its cgroup" not in run("tree", str(tree.root)).stdout
    # A cgroup frozen already (by someone else): nothing to pause, and it stays frozen.
    cg.freeze()
    try:
        result = run("pause", "--backend", "cgroup", str(tree.root), "--state", str(state))
        assert_clean_error(result, 7, "was frozen already")
        assert not state.exists()
        assert cg.frozen
        # tree says what holds them (their tasks show S, which reads as running).
        drawn = run("tree", str(tree.root)).stdout.splitlines()[: len(tree.pids)]
        assert all(line.endswith("  frozen by its cgroup") for line in drawn), drawn
    finally:
        cg.thaw()


def test_pause_with_ptrace_is_refused(make_tree: MakeTree, tmp_path: Path) -> None:
    tree = make_tree({}, mode="idle")
    state = tmp_path / "paused.json"
    result = run("pause", "--backend", "ptrace", str(tree.root), "--state", str(state))
    assert_clean_error(result, 2, "--backend: ptrace cannot pause: a ptrace hold ends when")
    assert "treeguard freeze --backend ptrace PID -- CMD" in result.stderr
    assert not state.exists()
    proc.assert_none_stopped(tree.pids)


def test_freeze_with_ptrace_runs_cmd_while_held(make_tree: MakeTree) -> None:
    tree = make_tree(SPEC)
    # Every task in tracing stop ("t"), traced by a thread of treeguard (CMD's parent).
    check = (
        "import os, sys\n"
        f"pids = {tree.pids!r}\n"
        "tasks = [(p, t) for p in pids for t in os.listdir(f'/proc/{p}/task')]\n"
        "states = {open(f'/proc/{p}/task/{t}/stat', 'rb').read().rsplit(b')', 1)[1][1:2]"
        " for p, t in tasks}\n"
        "def field(p, name):\n"
        "    return next(l.split()[1] for l in open(f'/proc/{p}/status') if l.startswith(name))\n"
        "tracers = {field(field(p, 'TracerPid:'), 'Tgid:') for p in pids}\n"
        "sys.exit(7 if states == {b't'} and tracers == {str(os.getppid())} else 1)\n"
    )
    result = run("freeze", "--backend", "ptrace", str(tree.root), "--", sys.executable, "-c", check)
    assert result.returncode == 7, result.stderr
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


def test_partial_ok_skips_what_may_not_be_signalled(make_tree: MakeTree) -> None:
    """As another user, root's tree may not be signalled: freeze fails (125) without
    --partial-ok, and runs CMD with every process skipped with it; pause refuses a tree
    it could stop nothing of (7). Nothing is stopped."""
    require_root("switching to another user")
    tree = make_tree({"children": [{}]}, mode="idle")
    root = str(tree.root)
    with _package_readable_by_all() as readable:
        refused = _main_as_nobody(readable, ["freeze", root, "--", "true"])
        skipped = _main_as_nobody(
            readable, ["freeze", "--partial-ok", root, "--", "sh", "-c", "exit 7"]
        )
        state = f"/tmp/treeguard-{os.getpid()}-partial.json"  # nobody may create it
        nothing = _main_as_nobody(readable, ["pause", "--partial-ok", root, "--state", state])
        # Looking needs no permission to signal: tree and status work (running: 8).
        looked = _main_as_nobody(readable, ["tree", root])
        running = _main_as_nobody(readable, ["status", root])
    assert (refused, skipped, nothing, looked, running) == (125, 7, 7, 0, 8)
    assert not os.path.exists(state)
    proc.assert_none_stopped(tree.pids)


def test_help_lists_the_exit_statuses() -> None:
    """``--help`` names every exit status (the documentation's command-line reference
    renders its table from the same epilog)."""
    helped = run("--help").stdout.split("exit status:")[1]
    listed = {int(m) for m in re.findall(r"^  (\d+) ", helped, re.MULTILINE)}
    assert listed == {0, 1, 2, 3, 4, 5, 6, 7, 8, 125, 126, 127, 141}


# -- an existing cgroup, frozen whole -------------------------------------------------------


def test_freeze_and_pause_a_cgroup_by_path(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    cg = cgroup(2)
    tree = make_tree(SPEC, spawn=cg.spawn)
    check = _exits_7_if_frozen(cg)
    result = run("freeze", "--cgroup", cg.path, "--", *check)
    assert result.returncode == 7, result.stderr
    assert not cg.frozen
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    result = run("pause", "--cgroup", cg.path, "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert f"froze 4 process(es) (6 tasks) in cgroup {cg.path}" in result.stdout
    assert cg.frozen
    assert proc.counters_still(tree.counters, tree.period)
    journal = parse_state(state.read_bytes())
    assert journal.cgroups == [(2, cg.path, os.stat(cg.path).st_ino)]  # before the freeze
    assert journal.token is not None and journal.token.backend == "cgroup"
    # Frozen already: nothing to pause.
    again = tmp_path / "again.json"
    assert_clean_error(run("pause", "--cgroup", cg.path, "--state", str(again)), 7, "frozen")
    assert not again.exists()
    result = run("resume", "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert not cg.frozen
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (("freeze", "--cgroup", "{cg}", "{root}", "--", "true"), 125, "--cgroup: give PID or"),
        (("freeze", "--cgroup", "{cg}", "--exclude", "{root}", "--", "true"), 125, "--exclude"),
        (("pause", "--cgroup", "{cg}", "--backend", "signal", "--state", "{tmp}/s"), 2, "--ba"),
        (("pause", "--cgroup", "{tmp}", "--state", "{tmp}/s"), 1, "not a non-root"),
        (("freeze", "--cgroup", "{tmp}", "--", "true"), 125, "not a non-root"),
        (("pause", "--state", "{tmp}/s"), 2, "PID: give the root of the tree, or --cgroup"),
        (("pause", "--cgroup", "{cg}", "--state", "{tmp}/s", "--timeout", "0"), 2, "--timeout"),
    ],
)
def test_cgroup_by_path_errors(
    make_tree: MakeTree,
    cgroup: MakeCgroup,
    tmp_path: Path,
    args: tuple[str, ...],
    status: int,
    text: str,
) -> None:
    cg = cgroup(2)
    tree = make_tree({}, spawn=cg.spawn, mode="idle")
    result = run(*(a.format(cg=cg.path, root=tree.root, tmp=tmp_path) for a in args))
    assert_clean_error(result, status, text)
    assert not cg.frozen and not (tmp_path / "s").exists()
    proc.assert_none_stopped(tree.pids)


def test_freeze_of_a_cgroup_killed_is_thawed(
    make_tree: MakeTree, cgroup: MakeCgroup, orphans: list[int]
) -> None:
    cg = cgroup(2)
    tree = make_tree({"children": [{}]}, spawn=cg.spawn)
    cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
    cli = subprocess.Popen([*_script(), "freeze", "--cgroup", cg.path, "--", *cmd])
    try:
        proc.wait_until(lambda: len(proc.children(cli.pid)) == 2, 30, "CMD to start")
        orphans += proc.children(cli.pid)
        assert cg.frozen
    finally:
        cli.kill()  # no handler, no finalizer: only the helper can thaw now
        cli.wait()
    proc.wait_until(lambda: not cg.frozen, 10, "the helper to thaw the cgroup")
    proc.counters_moving(tree.counters, [slot(i) for i in range(len(tree.pids))])


def test_tree_says_which_freeze_the_tree_would_not_notice(make_tree: MakeTree) -> None:
    tree = make_tree({"children": [{}]}, mode="idle")  # workers that handle no SIGCONT
    result = run("tree", str(tree.root))
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("a freeze it would not notice: cgroup (")
    assert "ptrace (" in last
