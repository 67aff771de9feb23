"""The exit-path matrix: every way a supervisor can leave a frozen section, and the tree runs.

Each test starts a supervisor SUBPROCESS (a small script run with ``sys.executable``) that
forks its own workers (one with a thread, one with a child), freezes them with a
:class:`ProcessesGuard` and leaves in one way. The test then checks through /proc that no
task of the tree is stopped and that every counter moves again, and measures the time from
the supervisor's exit (or the moment it was told to leave) to the tree running.

The workers outlive a supervisor that dies, so this process becomes a child subreaper for
the test: orphans are re-parented to it (not to PID 1, which here never reaps) and reaped by
PID in the teardown. The figures are printed, and written to ``exit-paths.json`` in the
session's temporary directory.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import proc
from tests.conftest import require_root
from treeguard._subreaper import is_subreaper, set_subreaper

WORKERS = 4  # worker 0 has a thread, worker 1 has worker 2 as its child
SLOTS_USED = (0, 1, 2, 4, 6)  # counter slots that tick: 2*i (main), 2*i+1 (thread)

SUPERVISOR = r"""
import gc, json, mmap, os, signal, struct, sys, threading, time
mode, memfile, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
extra = int(sys.argv[4])  # idle processes besides the ticking workers
flags = sys.argv[5:]
fd = os.open(memfile, os.O_RDWR)
mem = mmap.mmap(fd, 0)
os.close(fd)

def tick(slot):
    n = 0
    while True:
        n += 1
        struct.pack_into("q", mem, slot * 8, n)
        time.sleep(0.001)

def spawn(i, thread=False, child=None):
    pid = os.fork()
    if pid:
        return pid
    try:
        if child is not None:
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps its child
            spawn(child)
        if thread:
            threading.Thread(target=tick, args=(2 * i + 1,), daemon=True).start()
        tick(2 * i)
    finally:
        os._exit(0)

pids = [spawn(0, thread=True), spawn(1, child=2), spawn(3)]
for _ in range(extra):
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(3600)
    pids.append(pid)
foreign = []
if "foreign" in flags:  # last, so that a thaw (children first, last first) meets it first
    pid = os.fork()
    if pid == 0:
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)  # another user's process in the tree
        while True:
            time.sleep(3600)
    foreign.append(pid)
    def switched():
        with open(f"/proc/{pid}/status") as f:
            return "\nUid:\t65534\t" in f.read()
    while not switched():
        time.sleep(0.001)
# worker 2 is worker 1's child: find it through /proc (it may take a moment to be forked)
while True:
    with open(f"/proc/{pids[1]}/task/{pids[1]}/children") as f:
        kids = f.read().split()
    if kids:
        pids.insert(2, int(kids[0]))
        break
    time.sleep(0.001)

def say(**what):
    sys.stdout.write(json.dumps(what) + "\n")
    sys.stdout.flush()

from treeguard import ProcessesGuard

if mode == "sigterm_handler":
    def on_term(signum, frame):
        say(event="leaving", at=time.monotonic())
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, on_term)

if mode == "two_guards":  # guard A (options, with its watchdog) freezes worker 0 only
    options.update(root=pids[0], include_root=True)
guard = ProcessesGuard(**options)
guard.freeze()
helper = guard.helper_pid
second = []
if mode == "two_guards":
    # Guard B, without a watchdog, freezes every other descendant: A's helper is one.
    other = ProcessesGuard()
    other.freeze()
    second = list(other.pids)
say(
    event="frozen", pids=pids, helper=helper, stopped=list(guard.pids), at=time.monotonic(),
    foreign=foreign, second=second,
)

if mode in ("gc", "atexit", "lease"):
    sys.stdin.readline()
    if mode == "gc":
        say(event="leaving", at=time.monotonic())
        del guard
        gc.collect()
        say(event="collected", at=time.monotonic())
        sys.stdin.readline()
    elif mode == "lease":
        guard.release()
        say(event="released", lease_expired=guard.report.lease_expired)
    else:
        say(event="leaving", at=time.monotonic())
    sys.exit(0)  # atexit: the guard is still frozen here; its finalizer thaws at exit

with guard:  # frozen already: the with statement only releases
    line = sys.stdin.readline()  # KeyboardInterrupt, SIGTERM and SIGKILL arrive here
    say(event="leaving", at=time.monotonic())
    if mode == "exception":
        raise RuntimeError("the body failed")
    if mode == "os_exit":
        os._exit(3)
"""


class Supervisor:
    """A supervisor subprocess and what it reported."""

    def __init__(
        self,
        mode: str,
        memfile: Path,
        extra: int = 0,
        flags: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
        **options: Any,
    ) -> None:
        args = [mode, str(memfile), json.dumps(options), str(extra), *flags]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", SUPERVISOR, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buf = b""
        self.pids: list[int] = []
        self.helper: int | None = None
        self.foreign: list[int] = []  # processes of another user, never stopped
        self.starttimes: dict[int, int] = {}

    def read(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"the supervisor said nothing within {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"the supervisor exited ({self.proc.wait()}) before saying")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        said: dict[str, Any] = json.loads(line)
        return said

    def frozen(self) -> dict[str, Any]:
        said = self.read()
        assert said["event"] == "frozen", said
        self.pids = said["pids"]
        self.helper = said["helper"]
        self.foreign = said["foreign"]
        self.starttimes = {p: starttime(p) for p in self.pids + self.foreign}
        return said

    def tell(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


starttime = proc.starttime


def wait_running(pids: list[int], timeout: float = 10.0) -> float:
    """Poll (finely, to measure) until no task of ``pids`` is stopped; the time it happened."""
    deadline = time.monotonic() + timeout
    while proc.stopped(pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"still stopped after {timeout} s: {proc.stopped(pids)}")
        time.sleep(0.0001)
    return time.monotonic()


def gone_or_zombie(pid: int) -> bool:
    return set(proc.task_states(pid).values()) <= {"Z", "X"}


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    figures: dict[str, float] = {}
    yield figures
    out = tmp_path_factory.getbasetemp() / "exit-paths.json"
    out.write_text(json.dumps(figures, indent=1, sort_keys=True))
    shown = {k: round(v * 1e3, 2) for k, v in figures.items()}
    print("\ntime from leaving to running (ms):", shown)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """Start supervisors as a child subreaper; kill and reap everything in the teardown."""
    memfile = tmp_path / "counters"
    memfile.write_bytes(bytes(8 * 2 * WORKERS))
    started: list[Supervisor] = []
    was = is_subreaper()
    set_subreaper(True)

    def begin(mode: str, extra: int = 0, **options: Any) -> tuple[Supervisor, Any]:
        sup = Supervisor(mode, memfile, extra, **options)
        started.append(sup)
        return sup, read_counters

    fd = os.open(memfile, os.O_RDWR)
    mem = mmap.mmap(fd, 0)
    os.close(fd)

    def read_counters() -> list[int]:
        return list(struct.unpack_from(f"{2 * WORKERS}q", mem, 0))

    try:
        yield begin
    finally:
        for sup in started:
            # Leaves first (the grandchild, reaped by its parent), each checked by starttime.
            for pid in reversed(sup.pids + sup.foreign):
                kill_if_same(pid, sup.starttimes.get(pid), signal.SIGKILL)
            for pid in sup.pids + sup.foreign:
                proc.wait_until(lambda p=pid: gone_or_zombie(p), 10, f"worker {pid} to die")
            if sup.proc.poll() is None:
                sup.proc.kill()
            sup.proc.wait()
            for stream in (sup.proc.stdin, sup.proc.stdout):
                if stream is not None:
                    stream.close()
            # Orphans (and a dead supervisor's helper) are now our children: reap them by PID.
            for pid in [*sup.pids, *sup.foreign, *([sup.helper] if sup.helper else [])]:
                if pid == sup.helper:
                    proc.wait_until(lambda p=pid: gone_or_zombie(p), 10, "the helper to exit")
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass  # not ours: reaped by its own parent
        mem.close()
        set_subreaper(was)


def kill_if_same(pid: int, start_time: int | None, sig: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if start_time is not None and starttime(pid) == start_time:
            signal.pidfd_send_signal(fd, sig)
    except (ProcessLookupError, FileNotFoundError, ValueError):
        pass
    finally:
        os.close(fd)


def check_frozen(sup: Supervisor, read: Any) -> None:
    assert sup.pids and not proc.not_stopped(sup.pids)  # T (signal) or t (ptrace), every task
    assert proc.counters_still(read, 0.001, ticks=5)
    if sup.helper is not None:  # the helper runs, and it is not a frozen process
        assert sup.helper not in sup.pids
        assert not proc.stopped([sup.helper])


def check_running(sup: Supervisor, read: Any) -> None:
    proc.assert_none_stopped(sup.pids)
    proc.counters_moving(read, SLOTS_USED)
    for pid in sup.pids:
        assert not gone_or_zombie(pid), f"worker {pid} died"
        assert starttime(pid) == sup.starttimes[pid]


def record(summary: dict[str, float], name: str, seconds: float) -> None:
    print(f"{name}: the tree runs {seconds * 1e3:.2f} ms after the supervisor left")
    summary[name] = seconds


# -- the supervisor releases (no watchdog needed) ---------------------------------------


@pytest.mark.parametrize("mode", ["normal", "exception"])
def test_body_ends(start: Any, summary: dict[str, float], mode: str) -> None:
    sup, read = start(mode, watchdog=True)
    sup.frozen()
    check_frozen(sup, read)
    sup.tell()
    left = sup.read()["at"]
    running = wait_running(sup.pids)
    assert sup.proc.wait(timeout=10) == (0 if mode == "normal" else 1)
    check_running(sup, read)
    assert sup.helper is not None
    assert gone_or_zombie(sup.helper)  # it exited quietly...
    with pytest.raises(ChildProcessError):
        os.waitpid(sup.helper, os.WNOHANG)  # ... and its supervisor reaped it
    record(summary, mode, running - left)


def test_keyboard_interrupt(start: Any, summary: dict[str, float]) -> None:
    sup, read = start("keyboard_interrupt", watchdog=True)
    sup.frozen()
    check_frozen(sup, read)
    left = time.monotonic()
    sup.proc.send_signal(signal.SIGINT)
    running = wait_running(sup.pids)
    assert sup.proc.wait(timeout=10) != 0
    check_running(sup, read)
    record(summary, "KeyboardInterrupt", running - left)


def test_sigterm_with_handler(start: Any, summary: dict[str, float]) -> None:
    """A SIGTERM handler that raises SystemExit lets the guard release: no watchdog."""
    sup, read = start("sigterm_handler")
    sup.frozen()
    check_frozen(sup, read)
    sup.proc.send_signal(signal.SIGTERM)
    left = sup.read()["at"]
    running = wait_running(sup.pids)
    assert sup.proc.wait(timeout=10) == 143
    check_running(sup, read)
    record(summary, "SIGTERM (handler)", running - left)


@pytest.mark.parametrize("watchdog", [False, True])
def test_guard_garbage_collected(start: Any, summary: dict[str, float], watchdog: bool) -> None:
    sup, read = start("gc", watchdog=watchdog)
    sup.frozen()
    check_frozen(sup, read)
    sup.tell()
    left = sup.read()["at"]
    running = wait_running(sup.pids)
    assert sup.read()["event"] == "collected"
    assert sup.proc.poll() is None  # the supervisor lives on; the tree runs
    check_running(sup, read)
    if sup.helper is not None:
        assert gone_or_zombie(sup.helper)  # closed with its guard
    sup.tell("exit")
    assert sup.proc.wait(timeout=10) == 0
    record(summary, "guard garbage-collected" + (" (watchdog)" if watchdog else ""), running - left)


@pytest.mark.parametrize("watchdog", [False, True])
def test_interpreter_exit_without_release(
    start: Any, summary: dict[str, float], watchdog: bool
) -> None:
    sup, read = start("atexit", watchdog=watchdog)
    sup.frozen()
    check_frozen(sup, read)
    sup.tell()
    left = sup.read()["at"]
    running = wait_running(sup.pids)
    assert sup.proc.wait(timeout=10) == 0
    check_running(sup, read)
    record(summary, "interpreter exit" + (" (watchdog)" if watchdog else ""), running - left)


# -- the supervisor dies: only the watchdog can thaw ------------------------------------


@pytest.mark.parametrize(
    ("how", "extra"), [("os._exit", 0), ("SIGKILL", 0), ("SIGTERM", 0), ("SIGKILL", 200)]
)
def test_supervisor_dies(start: Any, summary: dict[str, float], how: str, extra: int) -> None:
    sup, read = start("os_exit" if how == "os._exit" else "die", extra, watchdog=True)
    sup.frozen()
    check_frozen(sup, read)
    if how == "os._exit":
        sup.tell()
        left = sup.read()["at"]
    else:
        left = time.monotonic()
        # SIGTERM's default disposition kills without running any Python code.
        sup.proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
    running = wait_running(sup.pids)
    expected = {"os._exit": 3, "SIGKILL": -signal.SIGKILL, "SIGTERM": -signal.SIGTERM}[how]
    assert sup.proc.wait(timeout=10) == expected
    check_running(sup, read)
    assert sup.helper is not None
    proc.wait_until(lambda: gone_or_zombie(sup.helper), 10, "the helper to exit")
    size = f", {len(sup.pids)} processes" if extra else ""
    record(summary, f"{how} (watchdog{size})", running - left)


def test_sigkill_without_watchdog_leaves_it_stopped(start: Any) -> None:
    """The control: without the watchdog nothing thaws a tree whose supervisor was killed
    (so the watchdog, not the kernel's orphaned-process-group rule, does it above)."""
    sup, read = start("die")
    sup.frozen()
    sup.proc.kill()
    sup.proc.wait()
    try:
        assert proc.counters_still(read, 0.002, ticks=25)  # 50 ms and more: nobody thaws
        proc.assert_all_stopped(sup.pids)
    finally:
        for pid in sup.pids:
            kill_if_same(pid, sup.starttimes[pid], signal.SIGCONT)
    check_running(sup, read)


def test_lease_expires_while_supervisor_is_stuck(start: Any, summary: dict[str, float]) -> None:
    sup, read = start("lease", max_frozen=0.3)
    frozen = sup.frozen()
    check_frozen(sup, read)
    running = wait_running(sup.pids)
    assert sup.proc.poll() is None  # alive, and stuck in its body
    check_running(sup, read)
    sup.tell()
    said = sup.read()
    assert said == {"event": "released", "lease_expired": True}
    assert sup.proc.wait(timeout=10) == 0
    # The lease started when the freeze began, a little before "frozen" was said.
    record(summary, "lease expiry (after max_frozen)", max(0.0, running - frozen["at"] - 0.3))


def test_a_lease_longer_than_poll_can_wait(start: Any) -> None:
    """A lease of 30 days (poll(2) waits at most about 24.8 days at a time): the helper
    lives on, and still thaws when the supervisor dies."""
    sup, read = start("die", max_frozen=30 * 86400.0)
    sup.frozen()
    check_frozen(sup, read)
    assert sup.helper is not None and not gone_or_zombie(sup.helper)
    sup.proc.kill()
    wait_running(sup.pids)
    check_running(sup, read)


# -- two guards, other users ---------------------------------------------------------


def test_two_guards_never_stop_each_others_helper(start: Any) -> None:
    """Guard A (watchdog) freezes worker 0; guard B (no watchdog) then freezes every other
    descendant of the supervisor, A's helper among them: B must leave the helper alone, so
    that when the supervisor is killed, A's tree runs again."""
    sup, read = start("two_guards", watchdog=True)
    said = sup.frozen()
    assert said["stopped"] == [sup.pids[0]]
    assert sup.helper is not None and sup.helper not in said["second"]
    assert sorted(said["second"]) == sorted(sup.pids)  # worker 0 held with A
    proc.assert_all_stopped(sup.pids)
    assert not proc.stopped([sup.helper])
    sup.proc.kill()
    rest = sup.pids[1:]
    try:
        wait_running(sup.pids[:1])
        proc.counters_moving(read, (0, 1))  # worker 0 and its thread
        assert proc.stopped(rest)  # B had no watchdog: nothing thaws its part (the control)
    finally:
        for pid in rest:
            kill_if_same(pid, sup.starttimes[pid], signal.SIGCONT)
    check_running(sup, read)


def test_helper_thaws_past_a_process_it_may_not_signal(start: Any) -> None:
    """A supervisor without CAP_KILL freezes, with ``partial_ok=True``, a tree that holds a
    process of another user (journaled, then refused: EPERM). Killed, its helper thaws every
    other process."""
    require_root("a process of another user, and dropping CAP_KILL")
    nokill = ("setpriv", "--bounding-set", "-kill")
    sup, read = start("die", watchdog=True, partial_ok=True, flags=("foreign",), prefix=nokill)
    said = sup.frozen()
    (foreign,) = sup.foreign
    assert foreign not in said["stopped"] and not proc.stopped([foreign])
    check_frozen(sup, read)
    sup.proc.kill()
    wait_running(sup.pids)
    check_running(sup, read)
    assert sup.helper is not None
    proc.wait_until(lambda: gone_or_zombie(sup.helper), 10, "the helper to exit")


def test_another_supervisors_helper_is_never_stopped(start: Any) -> None:
    """A guard of THIS process freezes every descendant of another supervisor, whose helper
    is one: it is recognised by its name alone (it is not one of this process's helpers),
    left running, and thaws its own tree when that supervisor is killed."""
    from treeguard import ProcessesGuard

    sup, read = start("die", watchdog=True)
    sup.frozen()
    assert sup.helper is not None
    guard = ProcessesGuard(root=sup.proc.pid)
    try:
        guard.freeze()
        assert sup.helper not in guard.pids
        assert not proc.stopped([sup.helper])
        sup.proc.kill()
        wait_running(sup.pids)
    finally:
        guard.release()
    check_running(sup, read)


# -- the ptrace backend: the kernel lets the tree go when the tracer dies ------------------


@pytest.mark.parametrize(
    "mode", ["normal", "exception", "SIGINT", "gc", "atexit", "os_exit", "SIGKILL", "SIGTERM"]
)
def test_every_exit_path_with_ptrace(start: Any, summary: dict[str, float], mode: str) -> None:
    """No helper is started: the tree runs again through the guard's own release, or, when
    the supervisor dies, because the kernel detaches every tracee of a dead tracer."""
    require_root("tracing the workers")
    script = {"SIGINT": "keyboard_interrupt", "SIGKILL": "die", "SIGTERM": "die"}.get(mode, mode)
    sup, read = start(script, backend="ptrace", watchdog=True)
    sup.frozen()
    assert sup.helper is None  # the kernel is the watchdog
    check_frozen(sup, read)
    if mode in ("SIGINT", "SIGKILL", "SIGTERM"):
        left = time.monotonic()
        sup.proc.send_signal(getattr(signal, mode))
    else:
        sup.tell()
        left = sup.read()["at"]
        if mode == "gc":
            assert sup.read()["event"] == "collected"
            sup.tell("exit")
    running = wait_running(sup.pids)
    sup.proc.wait(timeout=10)
    check_running(sup, read)
    record(summary, f"ptrace: {mode}", running - left)
