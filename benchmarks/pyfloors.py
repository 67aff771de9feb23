"""The floors of a freezer written in Python: what the C floor (floor.c) and the kernel
floor do, and nothing else, in the fewest Python statements. They show how much of the
distance between treeguard and a floor is the interpreter's, whatever the library does:
the ratio of treeguard to one of these is what its own checks and bookkeeping cost.

- ``Python floor (signal)``: floor.c's signal mode, line for line (pidfd_open, the stat's
  parent check, SIGSTOP through the pidfd, every task's stat read until it shows ``T``, the
  children files of the proven generation; the thaw sends SIGCONT, last first).
- ``Python floor (ptrace)``: floor.c's ptrace mode, line for line (PTRACE_SEIZE and
  PTRACE_INTERRUPT of every thread, each stop collected by waitpid; the thaw detaches).
- ``Python floor (cgroup v2, checked)``: the kernel floor (a write to ``cgroup.freeze``,
  ``cgroup.events`` read until ``frozen 1``) with the one check no cgroup freezer can skip,
  that the caller is not in the cgroup (its ``cgroup.procs`` searched, through a
  descriptor held open), and the task list read once frozen (what a report counts).
"""

from __future__ import annotations

import os
import select
import signal

from checks import MOUNTS
from contenders import Contender, KernelFloor, _v2_cgroup

from treeguard import _ptrace as ptrace
from treeguard._workers import WorkerTree


def _stat(path: str) -> tuple[bytes, int] | None:
    """The state letter and the parent of a stat file, anchored on the last ')'."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    tail = data[data.rfind(b")") + 2 :]
    return tail[:1], int(tail[2 : tail.index(b" ", 2)])


def _tids(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in _tids(pid):
        try:
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        kids += map(int, b"".join(chunks).split())
    return kids


class PySignalFloor(Contender):
    name = "Python floor (signal)"

    def setup(self, tree: WorkerTree) -> None:
        super().setup(tree)
        self.held: list[tuple[int, int]] = []  # (pid, pidfd), parents first

    def freeze(self) -> None:
        held = self.held
        generation = [(self.tree.root, 0)]
        while generation:
            first = len(held)
            for pid, parent in generation:
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                st = _stat(f"/proc/{pid}/stat")
                if st is None or (parent and st[1] != parent):
                    os.close(fd)  # gone, or its PID reused: not the child listed
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGSTOP)
                except OSError:
                    os.close(fd)
                    continue
                held.append((pid, fd))
            proven = [pid for pid, _ in held[first:]]
            for pid in proven:
                for tid in _tids(pid):
                    while (st := _stat(f"/proc/{pid}/task/{tid}/stat")) and st[0] not in b"TZ":
                        os.sched_yield()
            generation = [(kid, pid) for pid in proven for kid in _children(pid)]

    def thaw(self) -> None:
        while self.held:
            _, fd = self.held[-1]
            try:
                signal.pidfd_send_signal(fd, signal.SIGCONT)
            except OSError:
                pass  # gone
            os.close(fd)
            self.held.pop()

    def teardown(self) -> None:
        if hasattr(self, "held"):
            self.thaw()


class PyPtraceFloor(Contender):
    """floor.c's ptrace mode (the ptrace calls through treeguard's own thin ctypes binding,
    Python having none): every thread seized and interrupted, each stop collected by
    waitpid; the thaw detaches every thread, last first. The tracer is the thread that
    seized, this one."""

    name = "Python floor (ptrace)"

    def setup(self, tree: WorkerTree) -> None:
        super().setup(tree)
        self.held: list[int] = []  # the TIDs seized, parents first

    def freeze(self) -> None:
        held = self.held
        generation = [(self.tree.root, 0)]
        while generation:
            first, proven = len(held), []
            for pid, parent in generation:
                st = _stat(f"/proc/{pid}/stat")
                if st is None or (parent and st[1] != parent):
                    continue
                for tid in map(int, _tids(pid)):
                    try:
                        ptrace.seize(tid)
                    except OSError:
                        continue
                    held.append(tid)
                    ptrace.interrupt(tid)
                proven.append(pid)
            for tid in held[first:]:
                os.waitpid(tid, ptrace.WALL)
            generation = [(kid, pid) for pid in proven for kid in _children(pid)]

    def thaw(self) -> None:
        while self.held:
            try:
                ptrace.detach(self.held[-1])
            except OSError:
                pass  # gone
            self.held.pop()

    def teardown(self) -> None:
        if hasattr(self, "held"):
            self.thaw()


class PyCgroupFloor(KernelFloor):
    """Set up after the kernel floor: freezes the cgroup that one moved the tree into."""

    name = "Python floor (cgroup v2, checked)"

    def setup(self, tree: WorkerTree) -> None:
        self.tree = tree
        path = MOUNTS["v2"] + _v2_cgroup(tree.root)
        self.fds = []
        for name, mode in (("cgroup.freeze", os.O_WRONLY), ("cgroup.events", os.O_RDONLY)):
            self.fds.append(os.open(f"{path}/{name}", mode | os.O_CLOEXEC))
        for name in ("cgroup.procs", "cgroup.threads"):
            self.fds.append(os.open(f"{path}/{name}", os.O_RDONLY | os.O_CLOEXEC))
        self.freezer, self.events, self.procs, self.threads = self.fds
        self.poller = select.poll()
        self.poller.register(self.events, select.POLLPRI)
        self.counted = (0, 0)

    @staticmethod
    def _listing(fd: int) -> bytes:
        chunks, offset = [], 0
        while chunk := os.pread(fd, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def freeze(self) -> None:
        listed = b"\n" + self._listing(self.procs)
        if b"\n%d\n" % os.getpid() in listed:
            raise RuntimeError("the caller is in the cgroup")
        self._set(b"1")
        self.counted = (self._listing(self.threads).count(b"\n"), listed.count(b"\n") - 1)

    def teardown(self) -> None:
        if self.fds:
            try:
                os.pwrite(self.freezer, b"0", 0)
            except OSError:
                pass  # removed by the kernel floor's teardown, which thawed it first
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def py_floors() -> list[Contender]:
    """The Python floors (set up after the kernel floor)."""
    found: list[Contender] = [PySignalFloor(), PyPtraceFloor()]
    return found + [PyCgroupFloor()] if "v2" in MOUNTS else found
