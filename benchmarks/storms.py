"""Two measures beyond the idle trees: a fork storm, where a freezer must outrun the forks,
and the time from a supervisor's SIGKILL to its tree running again."""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import checks

from treeguard import ProcessesGuard, TreeUnstableError
from treeguard._storms import STORM, descendants
from treeguard._subreaper import is_subreaper, set_subreaper


def run_storm(quick: bool) -> dict[str, Any]:
    """Freeze a fork storm (3 stormers, chains 3 deep) with ``max_passes=1``, per backend:
    how many freezes held (every task stopped) and how long they took."""
    attempts = 5 if quick else 20
    storm = subprocess.Popen(
        [sys.executable, "-c", STORM, "3", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    out: dict[str, Any] = {}
    try:
        assert storm.stdout is not None
        assert select.select([storm.stdout], [], [], 20)[0], "the storm did not start"
        storm.stdout.readline()
        for backend in ("signal", "ptrace"):
            held, unstable, times = 0, 0, []
            for _ in range(attempts):
                guard = ProcessesGuard(
                    storm.pid, include_root=True, backend=backend, max_passes=1, timeout=10
                )
                t0 = time.perf_counter()
                try:
                    guard.freeze()
                except TreeUnstableError:
                    unstable += 1
                    continue
                try:
                    times.append(time.perf_counter() - t0)
                    tree = [storm.pid, *descendants(storm.pid)]
                    if not checks.not_stopped(tree):
                        held += 1
                finally:
                    guard.release()
            out[backend] = {
                "attempts": attempts,
                "held": held,
                "unstable": unstable,
                "freeze_ms": statistics.median(times) * 1e3 if times else None,
            }
    finally:
        assert storm.stdin is not None
        storm.stdin.close()  # the storm ends its stormers and waits for their chains
        try:
            storm.wait(20)
        except subprocess.TimeoutExpired:
            storm.kill()
            storm.wait()
    return out


_SUPERVISOR = r"""
import subprocess, sys, time
from treeguard import ProcessesGuard
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        for _ in range(10)]
guard = ProcessesGuard(backend=sys.argv[1], watchdog=True)
guard.freeze()
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(600)
"""


def run_supervisor_death(quick: bool) -> dict[str, Any]:
    """SIGKILL a supervisor holding 10 processes frozen: how long until they run, per
    backend (signal: its watchdog helper thaws; ptrace: the kernel lets them go)."""
    reps = 3 if quick else 10
    was = is_subreaper()
    set_subreaper(True)  # the orphans come to us, to be ended and reaped
    out: dict[str, Any] = {}
    try:
        for backend in ("signal", "ptrace"):
            times = []
            for _ in range(reps):
                sup = subprocess.Popen(
                    [sys.executable, "-c", _SUPERVISOR, backend], stdout=subprocess.PIPE
                )
                assert sup.stdout is not None
                kids = [int(p) for p in sup.stdout.readline().split()]
                try:
                    assert kids, "the supervisor started nothing"
                    assert not checks.not_stopped(kids), "not frozen"
                    t0 = time.perf_counter()
                    sup.kill()
                    sup.wait()
                    if checks.poll(lambda k=kids: not checks.stopped(k), 10):
                        times.append(time.perf_counter() - t0)
                finally:
                    sup.stdout.close()
                    _end_orphans(kids)
            out[backend] = {
                "runs": reps,
                "resumed": len(times),
                "ms": statistics.median(times) * 1e3 if times else None,
            }
    finally:
        set_subreaper(was)
    return out


def _end_orphans(kids: list[int]) -> None:
    """End the dead supervisor's children, re-parented to this subreaper (their PIDs cannot
    be reused until reaped here), and reap them and its watchdog helper once it exits."""
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in kids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    # The helper (signal backend) exits after its thaw: reap it too.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            left = [int(p) for p in f.read().split()]
        zombies = [p for p in left if checks.task_states(p).get(p) == "Z"]
        for pid in zombies:
            os.waitpid(pid, 0)
        if not [p for p in left if p not in zombies and _is_helper(p)]:
            return
        time.sleep(0.001)


def _is_helper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip() == b"treeguard-wd"
    except OSError:
        return False
