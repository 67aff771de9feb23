"""``backend="ptrace"``: every task seized and held in a ptrace-stop, invisible to the tree,
nothing lost on release; checked through /proc and through the observers' own behaviour."""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import treeguard
from tests import proc
from tests.conftest import Ticker, require_root, slot
from treeguard import ProcessesGuard, Skip
from treeguard._drive import run_sync
from treeguard._storms import descendants
from treeguard._workers import SLOTS, WorkerTree, demo_spec, wide

MakeTree = Callable[..., WorkerTree]
SPEC = {  # threads, grandchildren, a child forked by a secondary thread
    "threads": 2,
    "children": [
        {"threads": 1, "children": [{"threads": 2}, {}]},
        {"fork_from_thread": True, "children": [{"threads": 1}]},
        {},
    ],
}


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root("ptrace tests (a tree of this user, or CAP_SYS_PTRACE under Yama)")


def held(tree: WorkerTree, pids: list[int] | None = None) -> None:
    """Every task of ``pids`` (default: the tree) is ptrace-stopped, no counter moves."""
    pids = pids or tree.pids
    states = proc.states_of(pids)
    assert states and set(states.values()) == {"t"}, states
    first = [tree.pids.index(p) * SLOTS for p in pids]

    def counters() -> list[int]:
        now = tree.counters()
        return [c for i in first for c in now[i : i + SLOTS]]

    assert proc.counters_still(counters, tree.period), "a counter moved while held"


def running(tree: WorkerTree, pids: list[int] | None = None) -> None:
    pids = pids or tree.pids
    proc.wait_until(lambda: not proc.stopped(pids), what="nothing t or T")
    proc.counters_moving(tree.counters, [slot(tree.pids.index(p)) for p in pids])


@pytest.mark.parametrize("include_root", [True, False])
def test_freezes_every_task_and_thaws(make_tree: MakeTree, include_root: bool) -> None:
    tree = make_tree(SPEC)
    frozen = tree.pids if include_root else tree.pids[1:]
    guard = ProcessesGuard(root=tree.root, include_root=include_root, backend="ptrace")
    with guard:
        held(tree, frozen)
        assert sorted(guard.pids) == sorted(frozen)
        report = guard.report
        assert report.backend == "ptrace" and report.stopped == len(frozen)
        assert report.tasks == len(proc.states_of(frozen)) and not report.skipped
        if not include_root:
            assert proc.state(tree.root) in "RS"
    assert not guard.frozen
    running(tree)
    guard.release()  # idempotent
    with guard:  # and a guard freezes again
        held(tree, frozen)
    running(tree)


# -- invisible to parents and handlers ----------------------------------------------------

OBSERVED = r"""
import ctypes, mmap, os, signal, sys, time
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
mem = mmap.mmap(int(sys.argv[1]), 8)
def say(who, what):
    os.write(1, f"{who}: {what}\n".encode())
child = os.fork()
if child == 0:
    libc.prctl(1, signal.SIGKILL)
    for sig in (signal.SIGCONT, signal.SIGTERM, signal.SIGRTMIN):
        signal.signal(sig, lambda s, f: say("child", signal.Signals(s).name))
    say("child", "ready")
    n = 0
    while True:
        n += 1
        mem[:8] = n.to_bytes(8, "little")
        time.sleep(0.002)
signal.signal(signal.SIGCHLD, lambda s, f: say("parent", "SIGCHLD"))
signal.signal(signal.SIGRTMIN, lambda s, f: say("parent", "SIGRTMIN"))
say("ready", child)
while True:
    try:
        pid, status = os.waitpid(child, os.WUNTRACED | os.WCONTINUED)
    except ChildProcessError:  # the test killed the child, and this reaped it
        os._exit(0)
    say("parent", f"waitpid {status:#x}")
"""


class Observed:
    """A parent that logs every SIGCHLD and every waitpid(WUNTRACED | WCONTINUED) report,
    and its ticking child, which logs every SIGCONT, SIGTERM and SIGRTMIN it handles."""

    def __init__(self) -> None:
        self.memfd = os.memfd_create("observed")
        os.ftruncate(self.memfd, 8)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OBSERVED, str(self.memfd)],
            pass_fds=(self.memfd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._partial = b""
        self.child = int(self.expect("ready").split()[1])
        self.expect("child: ready")  # its handlers are in place

    def counter(self) -> list[int]:
        return [int.from_bytes(os.pread(self.memfd, 8, 0), "little")]

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """Read lines until one starts with ``prefix``; the lines before it are kept."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            for i, line in enumerate(self.lines):
                if line.startswith(prefix):
                    del self.lines[i]
                    return line
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], f"no {prefix!r}"
            *complete, self._partial = (self._partial + os.read(fd, 4096)).split(b"\n")
            self.lines += (line.decode() for line in complete)

    def barrier(self) -> list[str]:
        """Everything both logged up to now. A real-time signal is handled after every
        standard signal pending before it (signal(7)), so the reply comes after them."""
        for who, pid in (("parent", self.proc.pid), ("child", self.child)):
            os.kill(pid, signal.SIGRTMIN)
            self.expect(f"{who}: SIGRTMIN")
        seen, self.lines = self.lines, []
        return seen

    def close(self) -> None:
        os.kill(self.child, signal.SIGKILL)  # its parent reaps it (blocked in waitpid)
        proc.wait_until(lambda: proc.state(self.child) is None, what="the child to be reaped")
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        os.close(self.memfd)


@pytest.fixture
def observed() -> Iterator[Observed]:
    o = Observed()
    try:
        yield o
    finally:
        o.close()


@pytest.mark.parametrize("backend", ["ptrace", "signal"])
def test_parent_and_handlers_notice_nothing(observed: Observed, backend: str) -> None:
    # The child alone is frozen; its parent runs on and would log any report at once.
    with ProcessesGuard(root=observed.proc.pid, backend=backend) as guard:
        assert guard.pids == (observed.child,)
        assert proc.counters_still(observed.counter, 0.002)
    proc.counters_moving(observed.counter, [0])
    seen = observed.barrier()
    if backend == "signal":  # the observers do see a signal freeze: the test can tell
        assert "parent: SIGCHLD" in seen and "child: SIGCONT" in seen, seen
        assert any(line.startswith("parent: waitpid") for line in seen), seen
    else:
        assert seen == []


@pytest.mark.parametrize("include_root", [False, True])
def test_su_never_notices(include_root: bool) -> None:
    # su waits for its command with WUNTRACED and stops itself when the command stops (to
    # pass job control on to its shell): after a SIGSTOP freeze it stays stopped.
    su = subprocess.Popen(["su", "root", "-c", "exec sleep 600"], stdin=subprocess.DEVNULL)
    try:
        proc.wait_until(lambda: proc.children(su.pid), what="su to start its command")
        (command,) = proc.children(su.pid)
        with ProcessesGuard(root=su.pid, include_root=include_root, backend="ptrace") as g:
            assert command in g.pids and (su.pid in g.pids) == include_root
            assert proc.state(command) == "t"
        # su would act on a stop report at once: look at it for a while.
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert proc.state(su.pid) not in ("T", "t")
            assert proc.state(command) not in ("T", "t")
            time.sleep(0.005)
    finally:
        for pid in proc.children(su.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(su.pid, signal.SIGCONT)
        su.wait()


def test_signal_sent_while_held_is_delivered_after(observed: Observed) -> None:
    with ProcessesGuard(root=observed.proc.pid, backend="ptrace"):
        os.kill(observed.child, signal.SIGTERM)
        assert proc.counters_still(observed.counter, 0.002)
        assert proc.state(observed.child) == "t"
        assert "child: SIGTERM" not in observed.lines
    observed.expect("child: SIGTERM")
    assert observed.barrier() == []


def test_signal_caught_while_seizing_is_delivered_again(
    observed: Observed, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A signal that arrives between PTRACE_SEIZE and PTRACE_INTERRUPT is reported to the
    # tracer as a signal-delivery-stop; unless the detach delivers it again, it is lost.
    from treeguard import _ptrace

    interrupt = _ptrace.interrupt

    def signal_first(tid: int) -> None:
        if tid == observed.child:
            os.kill(tid, signal.SIGTERM)
            proc.wait_until(lambda: proc.state(tid) == "t", what="the signal-delivery-stop")
        interrupt(tid)

    monkeypatch.setattr(_ptrace, "interrupt", signal_first)
    with ProcessesGuard(root=observed.proc.pid, backend="ptrace"):
        assert proc.counters_still(observed.counter, 0.002)
        assert "child: SIGTERM" not in observed.lines
    observed.expect("child: SIGTERM")


def test_stop_reported_to_another_thread_of_the_supervisor(make_tree: MakeTree) -> None:
    # Any thread of the tracer's process may wait for a tracee: a waitpid() on the tree's
    # root (as subprocess and asyncio's child watchers do) may take the report of its stop.
    # Which of the two waiters the kernel hands it to is a race: freeze until the other
    # thread has had it once (nearly always the first time); every freeze must hold.
    tree = make_tree(wide(2))
    taken: list[tuple[int, int]] = []
    waiter = threading.Thread(target=lambda: taken.append(os.waitpid(tree.root, 0)), daemon=True)
    waiter.start()
    wchan = f"/proc/self/task/{waiter.native_id}/wchan"
    proc.wait_until(lambda: proc.read_text(wchan) == "do_wait", what="the waiter to wait")
    for _ in range(50):
        with ProcessesGuard(root=tree.root, include_root=True, backend="ptrace"):
            held(tree)
        running(tree)
        if taken:
            break
    waiter.join(10)
    assert taken and os.WIFSTOPPED(taken[0][1])  # the other thread had the report


# -- nothing lost ---------------------------------------------------------------------------


def test_stopped_before_or_while_held_stays_stopped(make_tree: MakeTree) -> None:
    tree = make_tree(wide(4, threads=1))
    before, during = tree.pids[1], tree.pids[2]
    os.kill(before, signal.SIGSTOP)
    proc.wait_until(lambda: set(proc.task_states(before).values()) == {"T"})
    try:
        with ProcessesGuard(root=tree.root, include_root=True, backend="ptrace") as guard:
            held(tree)  # held like the rest, so a SIGCONT from elsewhere cannot run it
            assert guard.already_stopped == ((before, proc.starttime(before)),)
            assert guard.report.skipped == {before: Skip.ALREADY_STOPPED}
            assert before not in guard.pids
            os.kill(during, signal.SIGSTOP)
        for pid in (before, during):
            proc.wait_until(
                lambda p=pid: set(proc.task_states(p).values()) == {"T"}, what=f"{pid} in T"
            )
        running(tree, [tree.pids[0], tree.pids[3]])
    finally:
        for pid in (before, during):
            os.kill(pid, signal.SIGCONT)
    running(tree)


def test_process_killed_while_held_is_not_left_a_zombie(make_tree: MakeTree) -> None:
    tree = make_tree({"children": [{"children": [{}, {}]}]})
    victim = tree.pids[2]  # a grandchild: its real parent (not us) must hear of its death
    with ProcessesGuard(root=tree.root, include_root=True, backend="ptrace"):
        os.kill(victim, signal.SIGKILL)
        proc.wait_until(lambda: proc.state(victim) in (None, "Z"), what="the victim to die")
    proc.wait_until(lambda: proc.state(victim) is None, what="the victim to be reaped")
    running(tree, [p for p in tree.pids if p != victim])


VFORK = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGKILL)
# clone(CLONE_VFORK | SIGCHLD) without CLONE_VM: a copy of this process, like fork(), whose
# parent waits in the kernel until it execs or exits, as after vfork().
if libc.syscall(56, 0x4000 | 17, 0, 0, 0, 0) == 0:
    libc.prctl(1, signal.SIGKILL)
    print("child", flush=True)
    sys.stdin.readline()
    os._exit(0)
print("parent resumed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the clone syscall number is x86-64's")
def test_parent_blocked_in_vfork() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", VFORK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline() == "child\n"
        proc.wait_until(lambda: proc.state(p.pid) == "D", what="the parent to wait for its child")
        (child,) = proc.children(p.pid)
        with ProcessesGuard(root=p.pid, include_root=True, backend="ptrace") as guard:
            # The child is held; its parent cannot run before the child exits.
            assert guard.report.blocked_in_vfork == [p.pid]
            assert proc.state(child) == "t" and proc.state(p.pid) == "D"
        t0 = time.monotonic()
        assert proc.state(child) != "t"
        p.stdin.write("exit\n")  # the child exits: its parent goes on, not held by us
        p.stdin.flush()
        assert p.stdout.readline() == "parent resumed\n"
        proc.wait_until(lambda: proc.state(p.pid) == "S", what="the parent to run freely")
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


# -- refusals -------------------------------------------------------------------------------

TRACER = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:  # PTRACE_SEIZE, no stop
    sys.exit(f"seize failed: errno {ctypes.get_errno()}")
print("seized", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def traced() -> Iterator[Callable[[int], subprocess.Popen[str]]]:
    tracers: list[subprocess.Popen[str]] = []

    def trace(pid: int) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", TRACER, str(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        tracers.append(p)
        assert p.stdout is not None and p.stdout.readline() == "seized\n"
        return p

    try:
        yield trace
    finally:
        for p in tracers:
            p.kill()  # the kernel detaches its tracee
            p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()


def test_traced_by_another_tracer(
    make_tree: MakeTree, traced: Callable[[int], subprocess.Popen[str]]
) -> None:
    tree = make_tree(wide(4))
    target = tree.pids[2]
    tracer = traced(target)
    guard = ProcessesGuard(root=tree.root, include_root=True, backend="ptrace")
    with pytest.raises(treeguard.FreezePermissionError) as caught:
        guard.freeze()
    assert caught.value.pids == (target,)
    assert f"PID {target} is already traced by PID {tracer.pid}" in str(caught.value)
    assert not guard.frozen
    proc.wait_until(lambda: not proc.stopped(tree.pids), what="nothing left held")
    running(tree)
    # partial_ok: it is skipped, and runs on while the rest is held.
    with ProcessesGuard(
        root=tree.root, include_root=True, backend="ptrace", partial_ok=True
    ) as guard:
        assert guard.report.skipped == {target: Skip.PERMISSION}
        assert target not in guard.pids
        held(tree, [p for p in tree.pids if p != target])
        proc.counters_moving(tree.counters, [slot(2)])
    running(tree)


def test_two_guards_of_this_process(make_tree: MakeTree) -> None:
    # Both trace from this process, each from its own thread: the second must not take the
    # first's tracees for tasks the kernel attached to it.
    tree = make_tree(wide(3))
    with ProcessesGuard(root=tree.root, include_root=True, backend="ptrace"):
        second = ProcessesGuard(root=tree.root, include_root=True, backend="ptrace")
        with pytest.raises(treeguard.FreezePermissionError, match="another ptrace freeze"):
            second.freeze()
        held(tree)
    running(tree)


def _tracer_tid(pid: int) -> int:
    """The thread tracing ``pid`` (TracerPid names a thread), from /proc."""
    for line in proc.read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid in /proc/{pid}/status")


def test_freezes_one_after_another_share_a_tracer_thread(make_tree: MakeTree) -> None:
    # A thread costs more to start than a small tree to freeze: the one a freeze let go of
    # serves the next freeze, of any guard. Two freezes at once have a thread each.
    one, two = make_tree(wide(2)), make_tree(wide(2))
    seen = []
    for _ in range(3):
        with ProcessesGuard(root=one.root, include_root=True, backend="ptrace"):
            held(one)
            seen.append(_tracer_tid(one.root))
        running(one)
    assert 0 not in seen and len(set(seen)) < len(seen), seen
    with ProcessesGuard(root=one.root, include_root=True, backend="ptrace"):
        with ProcessesGuard(root=two.root, include_root=True, backend="ptrace"):
            held(one)
            held(two)
            assert _tracer_tid(one.root) != _tracer_tid(two.root)
    running(one)
    running(two)


def test_token_refuses_ptrace_before_touching_anything(make_tree: MakeTree) -> None:
    tree = make_tree(wide(2))
    with pytest.raises(treeguard.InvalidArgumentError, match="ptrace"):
        treeguard.freeze(tree.root, include_root=True, backend="ptrace")
    with pytest.raises(treeguard.TokenError, match="ptrace"):
        treeguard.Token("ptrace", {})
    running(tree)


# -- a fork storm ---------------------------------------------------------------------------

STORM = r"""
import ctypes, os, signal, sys, threading, time
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGKILL)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the storm's children

def briefly():
    time.sleep(0.0005)

def storm():
    libc.prctl(1, signal.SIGKILL)
    def threads():
        while True:  # threads that come and go
            t = threading.Thread(target=briefly)
            t.start()
            t.join()
    threading.Thread(target=threads, daemon=True).start()
    while True:  # children that fork a grandchild and exit, as fast as it can
        if os.fork() == 0:
            if os.fork() == 0:
                os._exit(0)
            os._exit(0)

for _ in range(3):
    if os.fork() == 0:
        storm()
print("storming", flush=True)
sys.stdin.readline()
"""


def test_fork_storm_freezes() -> None:
    storm = subprocess.Popen(
        [sys.executable, "-c", STORM], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert storm.stdout is not None and storm.stdout.readline() == b"storming\n"
        for _ in range(40):
            # One pass: a child forked while its parent was being seized is found once the
            # parent stopped; every later child is attached by the kernel.
            guard = ProcessesGuard(
                root=storm.pid, include_root=True, backend="ptrace", timeout=10, max_passes=1
            )
            with guard:
                tree = [storm.pid, *descendants(storm.pid)]
                late = {k: s for k, s in proc.states_of(tree).items() if s not in "tZX"}
                assert not late, f"running while frozen: {late}"
                assert len(guard.pids) >= 4
            proc.wait_until(lambda: not proc.stopped([storm.pid, *descendants(storm.pid)]), 10)
    finally:
        storm.kill()  # PDEATHSIG takes the storm with it
        storm.wait()
        assert storm.stdin is not None and storm.stdout is not None
        storm.stdin.close()
        storm.stdout.close()


# -- the kernel is the watchdog, and every face -----------------------------------------------

SUPERVISOR = r"""
import sys
from treeguard import ProcessesGuard
guard = ProcessesGuard(root=int(sys.argv[1]), include_root=True, backend="ptrace").freeze()
print("frozen", flush=True)
sys.stdin.readline()
"""


def test_supervisor_killed_while_frozen(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    sup = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tree.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert sup.stdout is not None and sup.stdout.readline() == b"frozen\n"
        held(tree)
        killed = time.monotonic()
        sup.kill()
        proc.wait_until(lambda: not proc.stopped(tree.pids), what="the kernel to detach")
        print(f"\nptrace: supervisor SIGKILL to tree running: {time.monotonic() - killed:.4f} s")
        running(tree)
    finally:
        sup.kill()
        sup.wait()
        for stream in (sup.stdin, sup.stdout):
            if stream is not None:
                stream.close()


def test_thaw_from_another_thread_and_from_a_finalizer(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    guard = ProcessesGuard(root=tree.root, include_root=True, backend="ptrace").freeze()
    held(tree)
    thawer = threading.Thread(target=guard.release)
    thawer.start()
    thawer.join()
    assert not guard.frozen
    running(tree)
    guard.freeze()
    held(tree)
    del guard
    gc.collect()
    running(tree)


# An interrupt that lands in a callback of the garbage collector is reported and dropped by
# Python ("Exception ignored"): that trial is then simply not interrupted.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupted_freeze_or_thaw_leaves_nothing_held(make_tree: MakeTree) -> None:
    # KeyboardInterrupt at many points of freeze() and release(): the tracer thread finishes
    # what it was given, and the backend's thaw, run again, lets go of whatever is left.
    tree = make_tree(wide(12, threads=1))

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for trial in range(60):
            guard = ProcessesGuard(root=tree.root, include_root=True, backend="ptrace")
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.0001 + (trial % 30) * 0.0002)
                guard.freeze()
                guard.release()
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:  # wherever it landed (a one-shot timer: it fired)
                interrupted += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
            if guard._backend is not None:
                run_sync(guard._backend.thaw())
            guard.release()
            proc.wait_until(lambda: not proc.stopped(tree.pids), what="nothing left held")
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"\n{interrupted} of 60 trials interrupted")
    assert interrupted
    running(tree)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # the tracer thread
def test_forked_child_never_thaws(make_tree: MakeTree) -> None:
    tree = make_tree(wide(3))
    with ProcessesGuard(root=tree.root, include_root=True, backend="ptrace") as guard:
        pid = os.fork()
        if pid == 0:  # the child inherits the guard, not the hold
            try:
                run_sync(guard._backend.thaw())  # type: ignore[union-attr]
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        held(tree)
    running(tree)


def test_cli_freeze_with_ptrace(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec())
    check = textwrap.dedent(
        f"""
        import os, sys
        states = set()
        for pid in {tree.pids!r}:
            for tid in os.listdir(f"/proc/{{pid}}/task"):
                data = open(f"/proc/{{pid}}/task/{{tid}}/stat", "rb").read()
                states.add(chr(data[data.rindex(b")") + 2]))
        sys.exit(7 if states == {{"t"}} else 1)
        """
    )
    result = subprocess.run(
        [sys.executable, "-m", "treeguard", "freeze", "--backend", "ptrace", str(tree.root)]
        + ["--", sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 7, result.stderr
    running(tree)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("asyncio", {"debug": True}), id="asyncio"), pytest.param("trio", id="trio")],
)
async def test_async_face(make_tree: MakeTree, anyio_backend: Any) -> None:
    tree = make_tree(demo_spec())
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        async with treeguard.guard(root=tree.root, include_root=True, backend="ptrace") as g:
            assert g.report.backend == "ptrace"
            held(tree)
        assert not g.frozen
        tg.cancel_scope.cancel()
    assert ticker.ticks > 0
    running(tree)
