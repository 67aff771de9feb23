"""Worker trees for the demo, the tests and the benchmarks: real processes to freeze.

A :class:`WorkerTree` is started from a *spec*, a nested mapping::

    {"threads": 2, "children": [{...}, {...}], "fork_from_thread": False, "zombies": 0}

One Python interpreter is started for the root; every other process is forked from it, so
a thousand-process tree starts in about a second. Each process (and each of its threads)
advances its own counter in a shared memory block every ``period`` seconds while
``mode="tick"``, or blocks forever
while ``mode="idle"``; it reports ``index pid`` on a pipe once it is fully set up, so
:meth:`WorkerTree.start` returns only when every process and thread runs.

Teardown never orphans a process (PID 1 of a container may not reap): workers ignore
SIGCHLD so the kernel reaps their children, and :meth:`WorkerTree.close` kills leaves first,
waiting for each to exit before its parent. Every worker dies with its parent
(PR_SET_PDEATHSIG), so a crashed supervisor does not leave a tree behind either.
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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._thaw import signal_identity
from .procfs import ProcFS

__all__ = [
    "WorkerTree",
    "chain",
    "counters_moving",
    "counters_still",
    "demo_spec",
    "wide",
]

Spec = dict[str, Any]

_WORKER = r"""
import ctypes, mmap, os, signal, struct, sys, threading, time
spec_text, ready_fd, mem_fd, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
period = float(sys.argv[5])
import json
libc = ctypes.CDLL(None, use_errno=True)
mem = mmap.mmap(mem_fd, 0)
SLOTS = 8  # counters per process: its main thread and up to 7 more threads

def tick(slot):
    n = 0
    while True:
        n += 1
        struct.pack_into("q", mem, slot * 8, n)
        time.sleep(period)

def block():
    while True:
        time.sleep(3600)

def reap_and_exit(signum, frame):
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    os._exit(0)

def fork_child(node):
    pid = os.fork()
    if pid == 0:
        try:
            run(node)
        finally:
            os._exit(0)
    return pid

def run(node):
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the forking thread
    if os.getppid() == 1:
        os._exit(1)
    libc.prctl(15, f"tg-worker-{node['i']}".encode())  # PR_SET_NAME
    zombies = node.get("zombies", 0)
    signal.signal(signal.SIGTERM, reap_and_exit)
    # Ignoring SIGCHLD makes the kernel reap our children; a holder of zombies must not
    # (and must not inherit its parent's choice either).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL if zombies else signal.SIG_IGN)
    lines = []
    for _ in range(zombies):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        lines.append(f"z {node['i']} {pid}\n")
    work = tick if mode == "tick" else (lambda slot: block())
    if node.get("fork_from_thread"):
        forked = threading.Event()
        def forker():
            for child in node.get("children", ()):
                fork_child(child)
            forked.set()
            work(node["i"] * SLOTS + 7)  # stays alive: its children's PDEATHSIG is tied to it
        threading.Thread(target=forker, daemon=True).start()
        forked.wait()
    else:
        for child in node.get("children", ()):
            fork_child(child)
    for t in range(node.get("threads", 0)):
        threading.Thread(target=work, args=(node["i"] * SLOTS + 1 + t,), daemon=True).start()
    for line in lines:
        os.write(ready_fd, line.encode())
    os.write(ready_fd, f"r {node['i']} {os.getpid()}\n".encode())
    work(node["i"] * SLOTS)

run(json.loads(spec_text))
"""

#: Counter slots per process (main thread, six extra threads, a forking thread).
SLOTS = 8


def wide(n: int, *, threads: int = 0) -> Spec:
    """A root with ``n - 1`` children: ``n`` processes in all."""
    return {"threads": threads, "children": [{"threads": threads} for _ in range(n - 1)]}


def chain(depth: int, *, threads: int = 0, width: int = 1) -> Spec:
    """``depth`` levels, each process with ``width`` children, the first of which continues."""
    node: Spec = {"threads": threads}
    for _ in range(depth - 1):
        node = {"threads": threads, "children": [node] + [{} for _ in range(width - 1)]}
    return node


def demo_spec() -> Spec:
    """The demo's tree: eight processes, some with threads, some with grandchildren."""
    return {
        "threads": 1,
        "children": [
            {"threads": 2, "children": [{"threads": 0}, {"threads": 1}]},
            {"threads": 0, "children": [{"threads": 3, "children": [{"threads": 0}]}]},
            {"threads": 1},
        ],
    }


def _number(node: Spec, start: int = 0) -> int:
    node["i"] = start
    nxt = start + 1
    for child in node.get("children", ()):
        nxt = _number(child, nxt)
    return nxt


def _nodes(node: Spec) -> Iterator[Spec]:
    yield node
    for child in node.get("children", ()):
        yield from _nodes(child)


class WorkerTree:
    """A running tree of worker processes; a context manager that always tears it down.

    :attr:`pids` lists the processes in pre-order (the root first); :attr:`zombies` the
    zombie children made on request; :meth:`counters` reads every process's counters.
    """

    def __init__(
        self,
        spec: Spec,
        *,
        mode: str = "tick",
        period: float = 0.005,
        start_timeout: float = 60.0,
        spawn: Callable[..., subprocess.Popen[bytes]] | None = None,
    ) -> None:
        if mode not in ("tick", "idle"):
            raise ValueError(f"mode must be 'tick' or 'idle', not {mode!r}")
        self.spec = json.loads(json.dumps(spec))
        self.size = _number(self.spec)
        self.mode = mode
        self.period = period
        self.start_timeout = start_timeout
        # How the root is started (e.g. treeguard.cgroup.Cgroup.spawn: the tree is born in it).
        self._spawn = spawn or subprocess.Popen
        self.pids: list[int] = []
        self.zombies: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._starttimes: dict[int, int] = {}
        self._mem = mmap.mmap(-1, self.size * SLOTS * 8)
        self._memfd = -1

    @property
    def root(self) -> int:
        return self.pids[0]

    def start(self) -> WorkerTree:
        fd = os.memfd_create("treeguard-workers")
        os.ftruncate(fd, self.size * SLOTS * 8)
        self._mem = mmap.mmap(fd, 0)
        self._memfd = fd
        rfd, wfd = os.pipe()
        try:
            self.proc = self._spawn(
                [
                    sys.executable,
                    "-c",
                    _WORKER,
                    json.dumps(self.spec),
                    str(wfd),
                    str(fd),
                    self.mode,
                    str(self.period),
                ],
                pass_fds=(wfd, fd),
                stdin=subprocess.DEVNULL,
            )
            os.close(wfd)
            wfd = -1
            self._await_ready(rfd)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        return self

    def _await_ready(self, rfd: int) -> None:
        by_index: dict[int, int] = {}
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        ready = select.poll()  # (not select: the caller's descriptors may go past 1,023)
        ready.register(rfd, select.POLLIN)
        while len(by_index) < self.size:
            left = deadline - time.monotonic()
            if left <= 0 or not ready.poll(left * 1000):
                raise TimeoutError(f"worker tree: {len(by_index)} of {self.size} ready in time")
            chunk = os.read(rfd, 65536)
            if not chunk:
                raise RuntimeError(f"worker tree died: {len(by_index)} of {self.size} ready")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                kind, index, pid = line.split()
                if kind == b"z":
                    self.zombies.append(int(pid))
                else:
                    by_index[int(index)] = int(pid)
                    self._starttimes[int(pid)] = _starttime(int(pid))
        self.pids = [by_index[i] for i in range(self.size)]

    def alive(self) -> list[int]:
        """The processes of the tree that still exist (the same processes: same starttime)."""
        return [pid for pid in self.pids if _starttime(pid) == self._starttimes.get(pid)]

    def counters(self) -> list[int]:
        """Every counter, process by process, slot by slot (0 for slots no thread uses)."""
        return list(struct.unpack_from(f"{self.size * SLOTS}q", self._mem, 0))

    def close(self) -> None:
        """Kill every process of the tree, leaves first, and wait until all are gone."""
        holders = {n["i"] for n in _nodes(self.spec) if n.get("zombies")}
        parent = {c["i"]: n["i"] for n in _nodes(self.spec) for c in n.get("children", ())}
        for index in range(len(self.pids) - 1, 0, -1):
            pid = self.pids[index]
            if index in holders:
                # It reaps its zombies on SIGTERM; SIGCONT lets it act on that if stopped.
                signal_identity(pid, self._starttimes[pid], signal.SIGTERM, signal.SIGCONT)
            else:
                signal_identity(pid, self._starttimes[pid], signal.SIGKILL)
            # Wait until it is reaped before its parent dies, or it would become a zombie of
            # PID 1. Only a holder of zombies leaves it a zombie (and reaps it on SIGTERM).
            _wait_dead(pid, self._starttimes[pid], zombie_ok=parent[index] in holders)
        if self.proc is not None:
            if self.proc.poll() is None:
                if 0 in holders:
                    self.proc.send_signal(signal.SIGCONT)
                    self.proc.terminate()
                else:
                    self.proc.kill()
            self.proc.wait()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def __enter__(self) -> WorkerTree:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def counters_still(read: Callable[[], list[int]], period: float, ticks: int = 8) -> bool:
    """Whether the counters ``read`` returns stay put for ``ticks`` tick periods (a frozen
    tree), looking at every period so that a single tick would show."""
    first = read()
    for _ in range(ticks):
        time.sleep(period)
        if read() != first:
            return False
    return True


def poll_until(condition: Callable[[], object], timeout: float) -> bool:
    """Whether ``condition`` turns true within ``timeout`` seconds, looking at once, then
    with a backoff from 0.2 ms to 20 ms."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def counters_moving(
    read: Callable[[], list[int]], indexes: Iterable[int], timeout: float = 10.0
) -> bool:
    """Whether every counter in ``indexes`` moves within ``timeout`` seconds (a running tree)."""
    first = read()
    todo = set(indexes)

    def moved() -> bool:
        now = read()
        todo.difference_update([i for i in list(todo) if now[i] != first[i]])
        return not todo

    return poll_until(moved, timeout)


def _starttime(pid: int) -> int:
    stat = ProcFS().stat(pid)
    return -1 if stat is None else stat.starttime


def _wait_dead(pid: int, starttime: int, *, zombie_ok: bool, timeout: float = 10.0) -> None:
    """Wait until ``pid`` is gone (or, with ``zombie_ok``, a zombie)."""
    fs = ProcFS()

    def dead() -> bool:
        stat = fs.stat(pid)
        return stat is None or stat.starttime != starttime or (zombie_ok and stat.state == "Z")

    if not poll_until(dead, timeout):
        raise TimeoutError(f"worker {pid} did not exit within {timeout} s")
