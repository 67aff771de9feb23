"""Fault injection: fork storms, processes killed at random moments, PID reuse.

Every test here checks, through /proc, that nothing is left stopped whatever happened, and
that the only errors are documented ones.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests import proc
from tests.conftest import require_root
from tests.stress._figures import add_figures
from treeguard import ProcessesGuard
from treeguard._storms import STORM, descendants
from treeguard._workers import WorkerTree, wide
from treeguard.errors import FreezeError, TreeUnstableError

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MakeTree = Callable[..., WorkerTree]
ATTEMPTS = 40  # freezes of each storm

# -- fork storm ----------------------------------------------------------------------------


@pytest.fixture
def storm() -> Iterator[Callable[[int, int], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(stormers: int, depth: int) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [sys.executable, "-c", STORM, str(stormers), str(depth)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        started.append(p)
        assert p.stdout is not None
        assert select.select([p.stdout], [], [], 20)[0], "the storm did not start"
        assert len(p.stdout.readline().split()) == stormers
        return p

    try:
        yield start
    finally:
        for p in started:
            # Nothing of it may be stopped here: the storm's root must be able to finish.
            assert p.stdin is not None and p.stdout is not None
            p.stdin.close()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()  # PDEATHSIG takes the stormers with it
                p.wait()
            p.stdout.close()


@pytest.mark.parametrize(("depth", "max_passes"), [(1, 3), (3, 2), (3, 1)])
def test_fork_storm_freezes_or_fails_cleanly(
    storm: Callable[[int, int], subprocess.Popen[bytes]], depth: int, max_passes: int
) -> None:
    root = storm(3, depth).pid
    outcomes = {"frozen": 0, "TreeUnstableError": 0}
    for _ in range(ATTEMPTS):
        # A generous timeout: a storm is large, and the freeze (walk included) must finish.
        guard = ProcessesGuard(root=root, include_root=True, max_passes=max_passes, timeout=10)
        try:
            guard.freeze()
        except TreeUnstableError as err:
            outcomes["TreeUnstableError"] += 1
            assert err.newcomers
        else:
            try:
                outcomes["frozen"] += 1
                # Frozen means frozen: every task of the tree as it is now is stopped.
                tree = [root, *descendants(root)]
                late = {k: s for k, s in proc.states_of(tree).items() if s not in "TtZX"}
                assert not late, f"running while frozen: {late}"
            finally:
                guard.release()
        left = proc.stopped([root, *descendants(root), *guard.pids])
        assert not left, f"left stopped: {left}"
    print(f"fork storm depth={depth} max_passes={max_passes}: {outcomes}")
    add_figures(**{f"storm_d{depth}_p{max_passes}_{k}": v for k, v in outcomes.items()})
    assert sum(outcomes.values()) == ATTEMPTS


# -- random deaths ----------------------------------------------------------------------------


class Killer(threading.Thread):
    """Kills random leaves of ``tree`` while the main thread freezes or thaws."""

    def __init__(self, tree: WorkerTree) -> None:
        super().__init__(daemon=True)
        self.tree = tree
        self.leaves = {pid: tree._starttimes[pid] for pid in tree.pids[1:]}
        self.active = threading.Event()
        self.lock = threading.Lock()
        self.stop = False
        self.killed: list[int] = []
        self.rng = random.Random(6)
        self.phase = 0  # one kill at most per freeze and per thaw
        self.done = -1

    def begin(self) -> None:
        with self.lock:
            self.phase += 1
            self.active.set()

    def run(self) -> None:
        while not self.stop:
            if not self.active.wait(0.05) or self.done == self.phase:
                time.sleep(0.0001)
                continue
            self.done = self.phase
            time.sleep(self.rng.uniform(0, 0.0015))  # a random moment in the operation
            with self.lock:
                if not self.active.is_set() or not self.leaves or self.done != self.phase:
                    continue
                pid = self.rng.choice(sorted(self.leaves))
                starttime = self.leaves.pop(pid)
                fd = os.pidfd_open(pid)
                try:
                    if proc.starttime(pid) == starttime:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        self.killed.append(pid)
                finally:
                    os.close(fd)

    def pause(self) -> None:
        with self.lock:
            self.active.clear()


def test_random_deaths_during_freeze_and_thaw(make_tree: MakeTree) -> None:
    tree = make_tree(wide(81, threads=1), period=0.002)
    killer = Killer(tree)
    killer.start()
    errors: list[FreezeError] = []
    cycles = 0
    guard = ProcessesGuard(root=tree.root, include_root=True, watchdog=True)
    try:
        while killer.leaves and cycles < 400:
            cycles += 1
            killer.begin()
            try:
                guard.freeze()
            except FreezeError as err:  # documented errors only; anything else fails
                errors.append(err)
                killer.pause()
            else:
                killer.pause()
                for pid in killer.killed:  # SIGKILL lands asynchronously: let them die
                    proc.wait_until(lambda p=pid: set(proc.task_states(p).values()) <= {"Z"})
                alive = [p for p in guard.pids if p not in killer.killed]
                assert tree.root in alive
                late = proc.not_stopped(alive)
                assert not late, f"running while frozen: {late}"
                killer.begin()  # and now during the thaw
                guard.release()
                killer.pause()
            survivors = [p for p in tree.pids if p not in killer.killed]
            assert not proc.stopped(survivors), proc.stopped(survivors)
    finally:
        killer.stop = True
        killer.pause()
        killer.join()
        guard.release()
        guard.close()
    survivors = [p for p in tree.pids if p not in killer.killed]
    proc.assert_none_stopped(tree.pids)
    proc.counters_moving(tree.counters, [tree.pids.index(p) * 8 for p in survivors])
    print(f"random deaths: {len(killer.killed)} killed in {cycles} cycles, errors: {errors}")
    assert not errors, errors  # a death is never an error: the process counts as gone
    assert len(killer.killed) >= 60
    add_figures(random_deaths=len(killer.killed), random_death_cycles=cycles)


# -- PID reuse --------------------------------------------------------------------------------

PID_REUSE = r"""
import json, os, resource, select, signal, sys, time
sys.path.insert(0, sys.argv[1])  # the repository: the tests' own /proc reader
from tests.proc import starttime, state
from treeguard import ProcessesGuard
from treeguard._thaw import thaw_identities
assert os.getpid() == 1, "run me as PID 1 of a fresh PID namespace"
HZ = os.sysconf("SC_CLK_TCK")

def masks(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigPnd", "ShdPnd"):
                out[key] = int(value, 16)
    return out

def sleeper():
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(3600)
    return pid

results = {}
for mode in ("pidfd", "transient", "identities", "lease"):
    victim, bystander = sleeper(), sleeper()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if mode == "transient":  # no pidfd budget: every process is re-checked by starttime
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    guard = ProcessesGuard(max_frozen=1.0) if mode == "lease" else ProcessesGuard()
    guard.freeze()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    identities = guard.identities
    assert {victim, bystander} <= set(guard.pids), guard.pids
    old = starttime(victim)
    os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    while time.clock_gettime(time.CLOCK_BOOTTIME) * HZ < old + 2:
        time.sleep(0.002)  # a newcomer born in the same clock tick would share the starttime
    ready_r, ready_w = os.pipe()
    cont_r, cont_w = os.pipe()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(victim - 1))
    newcomer = os.fork()
    if newcomer == 0:
        signal.signal(signal.SIGCONT, lambda *_: os.write(cont_w, b"C"))
        os.write(ready_w, b"r")
        while True:
            time.sleep(3600)
    os.read(ready_r, 1)
    same_pid = newcomer == victim
    if mode in ("pidfd", "transient"):
        guard.release()
    elif mode == "identities":
        thaw_identities(identities)  # what tokens and the watchdog do
    else:  # the watchdog's lease runs out and it thaws
        while state(bystander) == "T":
            time.sleep(0.001)
    handler_ran = bool(select.select([cont_r], [], [], 0.05)[0])
    results[mode] = {
        "same_pid": same_pid,
        "starttimes_differ": starttime(newcomer) != old,
        "handler_ran": handler_ran,
        "sigcont_pending": any(m >> (signal.SIGCONT - 1) & 1 for m in masks(newcomer).values()),
        "newcomer_state": state(newcomer),
        "bystander_state": state(bystander),
    }
    guard.close()
    for pid in (newcomer, bystander):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    for fd in (ready_r, ready_w, cont_r, cont_w):
        os.close(fd)
print(json.dumps(results))
"""


def test_pid_reuse_in_a_pid_namespace() -> None:
    require_root("a PID namespace and ns_last_pid")
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID_REUSE, ROOT],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    results = json.loads(done.stdout)
    assert set(results) == {"pidfd", "transient", "identities", "lease"}
    for mode, result in results.items():
        assert result == {
            "same_pid": True,
            "starttimes_differ": True,
            "handler_ran": False,
            "sigcont_pending": False,
            "newcomer_state": "S",
            "bystander_state": "S",
        }, mode
    add_figures(pid_reuse_cases=len(results))
