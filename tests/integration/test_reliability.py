"""The signal backend's two promises under attack: every task stopped when a freeze returns,
and everything it stopped running again afterwards, whatever happens (an interrupt at any
bytecode, a full descriptor table, a fork of the supervisor, a tracer, a job-control relay,
a /proc of another PID namespace). Every check reads /proc through tests/proc.py."""

from __future__ import annotations

import gc
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import treeguard
from tests import proc
from tests.conftest import require_root, slot
from treeguard import FreezePermissionError, NoSuchProcessError, ProcessesGuard, Skip
from treeguard._workers import WorkerTree, wide

MakeTree = Callable[..., WorkerTree]
ROOT = str(Path(__file__).resolve().parents[2])


def _run_script(
    tmp_path: Path, text: str, *args: str, namespace: tuple[str, ...] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``text`` as a Python script (given the repository and ``args``); with
    ``namespace``, in a fresh PID namespace made by ``unshare`` with those extra flags. It
    must exit 0."""
    prefix: list[str] = []
    if namespace is not None:
        require_root("a PID namespace")
        unshare = shutil.which("unshare")
        assert unshare, "util-linux unshare is needed (CI has it)"
        prefix = [unshare, "--pid", "--fork", *namespace]
    script = tmp_path / "script.py"
    script.write_text(text)
    done = subprocess.run(
        [*prefix, sys.executable, str(script), ROOT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def _verdict(done: subprocess.CompletedProcess[str]) -> object:
    return json.loads(done.stdout.strip().splitlines()[-1])


def _running(tree: WorkerTree, *pids: int) -> None:
    """Nothing of ``tree`` is stopped; the main-thread counters of ``pids`` move."""
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the tree to run again")
    slots = [slot(tree.pids.index(pid)) for pid in pids]
    proc.counters_moving(tree.counters, slots)


# -- an interrupt at any point of freeze() or release() -----------------------------------------


class _Interrupt(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[Callable[[float], None]]:
    """``alarm(seconds)``: raise an exception (from a signal handler, at whatever bytecode
    runs then) after ``seconds``; disarmed after the test."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)

    def arm(seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, seconds)

    try:
        yield arm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# An interrupt that lands while the garbage collector runs some other object's finalizer
# (a Popen's __del__) is printed by Python as "Exception ignored", not raised: that trial
# then tests an uninterrupted call, and the report of it is no failure of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("where", ["freeze", "release"])
def test_an_interrupt_anywhere_leaves_nothing_stopped(
    make_tree: MakeTree, alarm: Callable[[float], None], where: str
) -> None:
    """Interrupts land at 40 points spread over a freeze (or a release) of 60 processes. After
    each, at most one more release() is needed, and then nothing is stopped."""
    tree = make_tree(wide(60, threads=1), mode="idle")
    guard = ProcessesGuard(tree.root, include_root=True, timeout=5.0)
    guard.freeze()  # measure how long each takes here
    took = {"freeze": guard.report.freeze_seconds}
    guard.release()
    took["release"] = max(guard.report.thaw_seconds, 1e-4)
    landed = 0
    for i in range(40):
        delay = took[where] * (i + 1) / 30
        try:
            if where == "freeze":
                alarm(delay)
                guard.freeze()
                alarm(0)
            else:
                guard.freeze()
                alarm(delay)
                guard.release()
                alarm(0)
        except KeyboardInterrupt:
            landed += 1
        alarm(0)
        guard.release()  # finishes what an interrupt cut short; a no-op otherwise
        assert not guard.frozen
        # (a wake-up may be queued on another CPU for a moment; a task left stopped stays so)
        proc.wait_until(
            lambda: not proc.stopped(tree.pids), 5, f"trial {i} ({delay * 1e3:.2f} ms) to run"
        )
    assert landed, "no interrupt landed inside the call: the trial tested nothing"
    _running(tree)


# -- out of descriptors when it thaws --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["signal", "cgroup v2", "cgroup v1"])
def test_a_full_descriptor_table_does_not_stop_the_thaw(
    request: pytest.FixtureRequest, make_tree: MakeTree, backend: str
) -> None:
    """236 free descriptor slots and 200 processes: most are held by short-lived pidfds
    (signal), or the cgroup's control file must be opened to thaw. The table is then filled
    to the last slot; release() must still resume every process. The limit counts what the
    process already holds (a guard an earlier test left alive keeps descriptors), and a
    reserve opened above the lowered limit must be moved under it."""
    spawn = None
    if backend != "signal":
        make_cgroup = request.getfixturevalue("cgroup")
        spawn = make_cgroup(2 if backend.endswith("v2") else 1).spawn
    tree = make_tree(wide(200), mode="idle", **({"spawn": spawn} if spawn else {}))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    gc.collect()  # earlier tests' garbage holds descriptors of its own
    held = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (held + 236, hard))
    try:
        guard = ProcessesGuard(
            tree.root, include_root=True, timeout=5.0, backend=backend.split()[0]
        )
        guard.freeze()
        assert not proc.not_stopped(tree.pids) or backend != "signal"
        while True:
            try:
                filler.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        guard.release()
        for fd in filler:
            os.close(fd)
        filler = []
        assert not guard.frozen
        proc.assert_none_stopped(tree.pids)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    proc.wait_until(lambda: not proc.stopped(tree.pids), 10, "the tree to run again")


# -- a forked child of the supervisor ----------------------------------------------------------

FORKED = textwrap.dedent(
    """
    import gc, json, os, sys
    sys.path.insert(0, sys.argv[1])
    from tests import proc
    from treeguard import ProcessesGuard
    from treeguard._workers import WorkerTree, wide

    with WorkerTree(wide(3), mode="idle") as tree:
        guard = ProcessesGuard(tree.root, include_root=True, watchdog=sys.argv[2] == "1")
        guard.freeze()
        verdict = {}
        for how in ("release", "gc", "exit"):
            child = os.fork()
            if child == 0:  # the child inherits the guard, its finalizer, its pidfds
                if how == "release":
                    guard.release()
                    guard.__exit__(None, None, None)
                elif how == "gc":
                    del guard
                    gc.collect()
                sys.exit(0)  # interpreter exit: finalizers and atexit run
            os.waitpid(child, 0)
            verdict[how] = sorted(proc.stopped(tree.pids)) == sorted(
                proc.states_of(tree.pids)
            )
        guard.release()
        verdict["released"] = not proc.stopped(tree.pids)
        print(json.dumps(verdict))
    """
)


@pytest.mark.parametrize("watchdog", [False, True])
def test_a_forked_child_never_thaws(tmp_path: Path, watchdog: bool) -> None:
    verdict = _verdict(_run_script(tmp_path, FORKED, "1" if watchdog else "0"))
    assert verdict == {"release": True, "gc": True, "exit": True, "released": True}, verdict


# -- a traced process ----------------------------------------------------------------------------


@pytest.fixture
def strace() -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    """``strace(pid)``: attach strace to a process; detached after the test."""
    exe = shutil.which("strace")
    assert exe, "strace is needed (CI has it)"
    tracers: list[subprocess.Popen[bytes]] = []

    def attach(pid: int) -> subprocess.Popen[bytes]:
        tracer = subprocess.Popen(
            [exe, "-q", "-o", "/dev/null", "-p", str(pid)], stderr=subprocess.DEVNULL
        )
        tracers.append(tracer)
        proc.wait_until(lambda: _tracer_of(pid) == tracer.pid, 10, "strace to attach")
        return tracer

    try:
        yield attach
    finally:
        for tracer in tracers:
            tracer.terminate()  # strace detaches on SIGTERM
            tracer.wait()


def _tracer_of(pid: int) -> int:
    for line in proc.read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def test_a_traced_process_is_refused_not_taken_for_stopped(
    make_tree: MakeTree, strace: Callable[[int], subprocess.Popen[bytes]]
) -> None:
    require_root("tracing a process")
    tree = make_tree(wide(3), period=0.002)
    traced = tree.pids[2]
    tracer = strace(traced)
    for _ in range(10):  # it shows `t` only now and then: every freeze must see it
        with pytest.raises(FreezePermissionError) as info:
            ProcessesGuard(tree.root, include_root=True).freeze()
        assert info.value.pids == (traced,)
        assert f"traced by PID {tracer.pid}" in str(info.value)
        proc.wait_until(lambda: not proc.stopped([p for p in tree.pids if p != traced]), 5)
    with ProcessesGuard(tree.root, include_root=True, partial_ok=True) as guard:
        assert guard.report.skipped[traced] is Skip.TRACED
        assert traced not in guard.pids
        proc.assert_all_stopped([p for p in tree.pids if p != traced])
    _running(tree, *tree.pids)


def test_a_process_traced_since_a_guard_last_froze_it_is_refused_not_signalled(
    make_tree: MakeTree, strace: Callable[[int], subprocess.Popen[bytes]]
) -> None:
    """A guard frozen again meets the processes it kept through their kept descriptors:
    one that a tracer took since is refused (or skipped) as at a first freeze."""
    require_root("tracing a process")
    tree = make_tree(wide(3), period=0.002)
    traced = tree.pids[2]
    guard = ProcessesGuard(tree.root, include_root=True)
    with guard:
        pass
    strace(traced)
    for _ in range(10):
        with pytest.raises(FreezePermissionError) as info:
            guard.freeze()
        assert info.value.pids == (traced,)
        proc.wait_until(lambda: not proc.stopped([p for p in tree.pids if p != traced]), 5)
    partial = ProcessesGuard(tree.root, include_root=True, partial_ok=True)
    with partial:
        pass
    for _ in range(3):
        with partial:
            assert partial.report.skipped[traced] is Skip.TRACED
            proc.assert_all_stopped([p for p in tree.pids if p != traced])
    guard.close()
    partial.close()
    _running(tree, *tree.pids)


# -- job-control relays ------------------------------------------------------------------------


def _relay(kind: str) -> list[str]:
    exe = shutil.which(kind)
    assert exe, f"{kind} is needed (CI has it)"
    return [
        exe,
        "root",
        "-s",
        "/bin/sh",
        "-c",
        f"exec {sys.executable} -c 'import time; time.sleep(600)'",
    ]


@pytest.fixture
def relay() -> Iterator[Callable[[str], tuple[int, int]]]:
    """``relay("su")``: start ``su root -c sleeper``; returns (su's PID, the sleeper's)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(kind: str) -> tuple[int, int]:
        require_root(f"{kind} to root without a password")
        relay = subprocess.Popen(_relay(kind), stdin=subprocess.DEVNULL)
        started.append(relay)

        def exec_done() -> bool:  # the child runs the sleeper (it was a copy of su before)
            kids = proc.children(relay.pid)
            return bool(kids) and "python" in proc.read_text(f"/proc/{kids[0]}/comm")

        proc.wait_until(exec_done, 10, f"{kind} to start its child")
        return relay.pid, proc.children(relay.pid)[0]

    try:
        yield start
    finally:
        for relay in started:
            for kid in proc.children(relay.pid):
                os.kill(kid, signal.SIGKILL)
            os.kill(relay.pid, signal.SIGCONT)
            relay.wait(10)


def _relay_settled(relay: int, child: int) -> bool:
    """The relay is back asleep in waitpid() while its child runs: from there it can no
    longer see a stop (the thaw's SIGCONT cleared it), so it will not stop itself later. A
    relay that did take the stop in stays ``T`` and never gets here."""
    wchan = proc.read_text(f"/proc/{relay}/wchan")
    return proc.state(relay) == "S" and wchan == "do_wait" and not proc.stopped([child])


@pytest.mark.parametrize("kind", ["su", "runuser"])
@pytest.mark.parametrize("where", ["inside", "above the root", "the root, walked through"])
def test_a_job_control_relay_is_not_left_stopped(
    relay: Callable[[str], tuple[int, int]], kind: str, where: str
) -> None:
    """``su``/``runuser`` wait for their child with WUNTRACED and stop themselves when it
    stops. Inside the tree they are stopped first (so they never see it); as the parent of
    the tree, or its walked-through root, they are resumed after the thaw."""
    relay_pid, child = relay(kind)
    if where == "inside":
        guard = ProcessesGuard(relay_pid, include_root=True)
        frozen = [relay_pid, child]
    elif where == "above the root":
        guard = ProcessesGuard(child, include_root=True)
        frozen = [child]
    else:
        guard = ProcessesGuard(relay_pid)
        frozen = [child]
    for _ in range(20):
        with guard:
            proc.assert_all_stopped(frozen)
            if where != "inside":  # the relay reacts to its child's stop: let it do so
                proc.wait_until(lambda: proc.stopped([relay_pid]), 5, f"{kind} to relay")
        proc.wait_until(lambda: _relay_settled(relay_pid, child), 5, f"{kind} to run on")


@pytest.fixture
def interactive_shell() -> Iterator[tuple[Callable[[bytes], bytes], int, int]]:
    """An interactive bash on a pseudo-terminal (its controlling terminal: job control on)
    that reports a job's change of state at once (``set -b``), with one background job;
    ``(say, bash, job)`` where ``say(line)`` types a line and returns all bash printed since
    the last call, up to its next prompt."""
    setsid = shutil.which("setsid")
    assert setsid, "util-linux setsid is needed (CI has it)"
    master, slave = os.openpty()
    env = {"PS1": "PROMPT$ ", "PATH": os.environ["PATH"], "TERM": "dumb"}
    bash = subprocess.Popen(
        [setsid, "-c", "bash", "--norc", "--noprofile", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)

    def until_prompt() -> bytes:
        out = b""
        deadline = time.monotonic() + 10
        while not out.endswith(b"PROMPT$ "):
            assert time.monotonic() < deadline, f"no prompt from bash: {out!r}"
            if select.select([master], [], [], 0.1)[0]:
                out += os.read(master, 4096)
        return out

    def say(line: bytes) -> bytes:
        os.write(master, line + b"\n")
        return until_prompt()

    try:
        until_prompt()
        say(b"set -b")
        say(b"sleep 600 &")
        proc.wait_until(lambda: proc.children(bash.pid), 10, "the job to start")
        yield say, bash.pid, proc.children(bash.pid)[0]
    finally:
        for kid in proc.children(bash.pid):
            os.kill(kid, signal.SIGKILL)
        bash.kill()
        bash.wait()
        os.close(master)


def _settled(pid: int) -> bool:
    """``pid`` sleeps, with no SIGCHLD pending (bit 16 of SigPnd and ShdPnd, proc(5))."""
    status = dict(
        line.split(":\t", 1)
        for line in proc.read_text(f"/proc/{pid}/status").splitlines()
        if ":\t" in line
    )
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return status["State"].startswith("S") and not pending >> (signal.SIGCHLD - 1) & 1


@pytest.mark.parametrize(
    ("backend", "where", "seen"),
    [
        ("signal", "inside", False),
        ("ptrace", "inside", False),
        ("ptrace", "outside", False),
        ("signal", "outside", True),  # the control: a shell outside sees a signal freeze
    ],
)
def test_an_interactive_shell_reports_no_stop(
    interactive_shell: tuple[Callable[[bytes], bytes], int, int],
    backend: str,
    where: str,
    seen: bool,
) -> None:
    """bash -i waits for its jobs with WUNTRACED and reports one that stops. Frozen with
    the shell (signals: the shell first, resumed last) or by ptrace, it sees nothing."""
    require_root("tracing the shell's job")
    say, bash, job = interactive_shell
    root = bash if where == "inside" else job
    printed = b""
    for _ in range(5):
        with ProcessesGuard(root, include_root=True, backend=backend):
            assert not proc.not_stopped([bash, job] if where == "inside" else [job])
            if where == "outside":
                # Held until the shell has taken in whatever it was told (SIGCHLD handled,
                # asleep again): a report it could see, it saw.
                proc.wait_until(lambda: _settled(bash), 5, "the shell to take SIGCHLD in")
        printed += say(b"jobs")
    assert (b"Stopped" in printed) == seen, printed
    assert printed.count(b"Running") >= 5


def test_the_snapshot_warns_of_a_relay(relay: Callable[[str], tuple[int, int]]) -> None:
    relay_pid, child = relay("su")
    snap = treeguard.snapshot(relay_pid, include_root=True)
    assert {(w["pid"], w["kind"]) for w in snap.warnings} >= {(relay_pid, "job-control relay")}
    assert not any(w["pid"] == child and w["kind"] == "job-control relay" for w in snap.warnings)


# -- a /proc of another PID namespace ------------------------------------------------------------


def test_a_proc_of_another_namespace_is_refused(tmp_path: Path) -> None:
    """Without --mount-proc, /proc still shows the parent namespace."""
    done = _run_script(tmp_path, OTHER_NAMESPACE, namespace=())
    assert done.stdout.startswith("refused:"), done.stdout
    assert "another PID namespace" in done.stdout


OTHER_NAMESPACE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import treeguard
    try:
        treeguard.ProcessesGuard()
    except treeguard.FreezeError as err:
        print("refused:", err)
    else:
        print("accepted")
    """
)


# -- a zombie root -------------------------------------------------------------------------------


def test_a_zombie_root_is_no_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait_until(lambda: proc.state(child.pid) == "Z", 10, "the child to exit")
    try:
        with pytest.raises(NoSuchProcessError):
            ProcessesGuard(child.pid, include_root=True)
        with pytest.raises(NoSuchProcessError):
            treeguard.freeze(child.pid)
    finally:
        child.wait()


# -- a PID recycled while the freeze runs --------------------------------------------------------

RECYCLED = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from tests.proc import state, starttime, wait_until
    from treeguard import ProcessesGuard

    assert os.getpid() == 1, "run me as PID 1 of a fresh PID namespace"
    order_r, order_w = os.pipe()
    ack_r, ack_w = os.pipe()
    root = os.fork()
    if root == 0:  # the tree's root: a zombie child A, a running child C
        a = os.fork()
        if a == 0:
            os._exit(0)
        c = os.fork()
        if c == 0:
            while True:
                time.sleep(1)
        os.write(ack_w, f"{a} {c}\\n".encode())
        os.read(order_r, 1)
        os.waitpid(a, 0)  # A's PID is free now: the next fork takes it
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(a - 1))
        b = os.fork()
        if b == 0:
            while True:
                time.sleep(1)
        os.write(ack_w, f"{b}\\n".encode())
        while True:
            time.sleep(1)
    a, c = map(int, os.read(ack_r, 64).split())
    wait_until(lambda: state(a) == "Z", 10)
    tick = starttime(a)
    # B must not share A's starttime (the same clock tick): wait until the clock moved on
    ticks = os.sysconf("SC_CLK_TCK")
    wait_until(lambda: float(open("/proc/uptime").read().split()[0]) * ticks > tick + 2)

    class Journal:  # told of every process before its SIGSTOP: the moment to recycle A's PID
        def stopping(self, pid, start, inode=0):
            if pid == c:
                os.write(order_w, b"x")
                journal.b = int(os.read(ack_r, 64))
        def watching(self, *args):
            pass
        def freezing_cgroup(self, *args):
            pass
        def check(self):
            pass
        def released(self):
            pass

    journal = Journal()
    guard = ProcessesGuard(root)
    guard._journal = journal
    with guard:
        b = journal.b
        verdict = {
            "recycled": b == a,
            "b_stopped": state(b) == "T",
            "c_stopped": state(c) == "T",
            "b_listed": guard.pids.count(b),
            "passes": guard.report.passes,
        }
    wait_until(lambda: state(b) == "S", 5)  # fails (exit status 1) if B stays stopped
    verdict["b_runs"] = True
    print(json.dumps(verdict), flush=True)
    """
)


def test_a_pid_recycled_during_the_freeze_is_a_new_process(tmp_path: Path) -> None:
    """A zombie met by the walk is reaped, and its PID goes to a new child of the (running)
    root while the freeze goes on: the newcomer is another process, and is stopped."""
    verdict = _verdict(_run_script(tmp_path, RECYCLED, namespace=("--mount-proc",)))
    assert verdict == {
        "recycled": True,
        "b_stopped": True,
        "c_stopped": True,
        "b_listed": 1,
        "passes": 2,
        "b_runs": True,
    }, verdict
