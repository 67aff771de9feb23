"""For the stress tests and the benchmarks: a fork storm, and an independent reader of the
descendants of a process (the core's own walk is what they check)."""

from __future__ import annotations

import os

__all__ = ["STORM", "descendants"]

#: A fork storm, for the stress tests and the benchmarks: ``python -c STORM STORMERS DEPTH``
#: forks STORMERS processes that fork short-lived chains of DEPTH processes as fast as they
#: can, prints their PIDs, and ends them when its stdin reaches a line or its end.
STORM = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the test
stormers, depth = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children

def chain(level):
    # A short-lived process that forks one child, waits for it and exits: a chain of
    # `depth` processes that keeps appearing and vanishing.
    if level < depth:
        pid = os.fork()
        if pid == 0:
            chain(level + 1)
        try:
            os.waitpid(pid, 0)  # with SIGCHLD ignored: returns (ECHILD) once it exited
        except ChildProcessError:
            pass
    os._exit(0)

def storm():
    libc.prctl(1, signal.SIGKILL)
    while True:  # as fast as it can
        if os.fork() == 0:
            chain(1)

pids = []
for _ in range(stormers):
    pid = os.fork()
    if pid == 0:
        storm()
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
sys.stdin.readline()
for pid in pids:
    os.kill(pid, signal.SIGKILL)
# Their chains finish by themselves (each waits for its own child); wait until all are gone.
while True:
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        if not f.read().split():
            break
    time.sleep(0.001)
"""


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` now, from the ``children`` file of each thread (a child
    forked by a secondary thread is listed only there); for tests and benchmarks, which
    check the core's work with a reader of their own."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:  # gone (ENOENT), or going (ESRCH)
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            stack += kids
    return found
