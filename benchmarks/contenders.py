"""The contenders: ways of freezing a process tree, each behind the same small interface.

``setup`` (untimed) prepares a tree, ``freeze`` and ``thaw`` are timed, ``teardown`` always
runs and leaves nothing frozen, stopped or created behind. ``kind`` says which independent
check proves a freeze: ``"signal"`` (every task ``T``) or ``"cgroup"`` (the cgroup frozen).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

import psutil
from checks import MOUNTS, task_states

from treeguard import ProcessesGuard
from treeguard._workers import WorkerTree
from treeguard.cgroup import Cgroup


class Contender:
    name = "?"
    kind = "signal"
    #: False when the contender's freeze returns without knowing that anything stopped.
    verifies = True

    def setup(self, tree: WorkerTree) -> None:
        self.tree = tree

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class TreeguardSignal(Contender):
    name = "treeguard signal"

    def setup(self, tree: WorkerTree) -> None:
        super().setup(tree)
        self.guard = ProcessesGuard(root=tree.root, include_root=True)

    def freeze(self) -> None:
        self.guard.freeze()

    def thaw(self) -> None:
        self.guard.release()

    def teardown(self) -> None:
        if hasattr(self, "guard"):
            self.guard.release()


class TreeguardBackend(TreeguardSignal):
    """One of treeguard's other backends (the cgroup ones), by name."""

    kind = "cgroup"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"treeguard {backend}"
        # A ptrace hold shows every task stopped (t) in /proc, as a signal freeze does.
        self.kind = "signal" if backend == "ptrace" else "cgroup"

    def setup(self, tree: WorkerTree) -> None:
        self.tree = tree
        self.guard = ProcessesGuard(root=tree.root, include_root=True, backend=self.backend)


class TreeguardFirst(TreeguardBackend):
    """The cgroup backend with a new guard for every freeze: the census is read in full
    each time (a guard frozen again keeps it while no task of the tree forked or exited)."""

    def __init__(self) -> None:
        super().__init__("cgroup")
        self.name = "treeguard cgroup (new guard)"

    def freeze(self) -> None:
        self.guard = ProcessesGuard(root=self.tree.root, include_root=True, backend="cgroup")
        self.guard.freeze()

    def thaw(self) -> None:
        self.guard.release()
        self.guard.close()


class TreeguardDirect(TreeguardBackend):
    """``Cgroup.freeze()``: treeguard's v2 freezer on a cgroup named directly, the one the
    kernel floor moved the tree into (so it is set up after the floor). There is no tree
    to find and nothing to prove, only that the caller is outside the cgroup."""

    def __init__(self) -> None:
        super().__init__("Cgroup.freeze()")

    def setup(self, tree: WorkerTree) -> None:
        self.tree = tree
        self.cg = Cgroup(MOUNTS["v2"] + _v2_cgroup(tree.root), version=2)

    def freeze(self) -> None:
        self.cg.freeze()

    def thaw(self) -> None:
        self.cg.thaw()

    def teardown(self) -> None:
        if hasattr(self, "cg"):
            self.cg.thaw()


class KernelFloor(Contender):
    """The cgroup v2 freezer by hand: the tree sits in a cgroup of its own (moved in,
    untimed, by ``setup``); a freeze writes ``cgroup.freeze`` and waits for ``frozen 1``
    in ``cgroup.events``, which raises POLLPRI when it changes (cgroup-v2.rst)."""

    name = "kernel floor (cgroup v2)"
    kind = "cgroup"

    def __init__(self) -> None:
        self.path: str | None = None
        self.fds: list[int] = []
        self.moved: list[tuple[int, str]] = []

    def setup(self, tree: WorkerTree) -> None:
        super().setup(tree)
        root = MOUNTS["v2"]
        self.path = f"{root}/treeguard-bench-floor-{os.getpid()}"
        os.mkdir(self.path)
        procs = os.open(f"{self.path}/cgroup.procs", os.O_WRONLY)
        try:
            for pid in tree.pids:
                self.moved.append((pid, _v2_cgroup(pid)))
                os.write(procs, str(pid).encode())  # one PID per write(2)
        finally:
            os.close(procs)
        self.freezer = os.open(f"{self.path}/cgroup.freeze", os.O_WRONLY)
        self.events = os.open(f"{self.path}/cgroup.events", os.O_RDONLY)
        self.fds = [self.freezer, self.events]
        self.poller = select.poll()
        self.poller.register(self.events, select.POLLPRI)

    def _set(self, value: bytes) -> None:
        want = b"frozen " + value
        os.pwrite(self.freezer, value, 0)
        # The fastest wait by hand: re-read at once for 2 ms (the kernel rate-limits
        # cgroup.events notifications to about one per 10 ms), then poll, looking again
        # every millisecond.
        spin_until = time.perf_counter() + 0.002
        while want not in os.pread(self.events, 4096, 0):
            if time.perf_counter() > spin_until:
                self.poller.poll(1)

    def freeze(self) -> None:
        self._set(b"1")

    def thaw(self) -> None:
        self._set(b"0")

    def teardown(self) -> None:
        if self.path is None:
            return
        try:
            with open(f"{self.path}/cgroup.freeze", "w") as f:
                f.write("0")
            for pid, home in self.moved:
                try:
                    with open(f"{MOUNTS['v2']}{home}/cgroup.procs", "w") as f:
                        f.write(str(pid))
                except (ProcessLookupError, FileNotFoundError):
                    pass
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds = []
            if os.path.isdir(self.path):  # remove() waits for the moved tasks to leave
                Cgroup(self.path, version=2).remove()
            self.path = None


def _v2_cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


class PsutilNaive(Contender):
    """What people write with psutil: ``children(recursive=True)`` and ``suspend()``. It
    neither waits for the stop nor looks at threads: its time is the calls alone."""

    name = "psutil naive (unverified)"
    verifies = False

    def freeze(self) -> None:
        root = psutil.Process(self.tree.root)
        self.procs = [root, *root.children(recursive=True)]
        for proc in self.procs:
            proc.suspend()

    def thaw(self) -> None:
        for proc in reversed(self.procs):
            proc.resume()


def crosvm_load(root: int) -> list[int]:
    """crosvm's enumeration: the main thread's ``children`` file only, recursively."""
    found: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                stack += (int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _all_tasks_stopped(pid: int) -> bool:
    """crosvm's check: every task under /proc/PID/task shows T (a gone process counts)."""
    return all(state in "Tt" for state in task_states(pid).values())


class CrosvmModel(Contender):
    """A MODEL of crosvm's freezer algorithm (not crosvm itself): load the descendants
    through the main thread's children files, SIGSTOP each, wait for each task to show
    ``T`` with at most 10 polls 50 ms apart, re-load and compare, up to 3 rounds."""

    name = "crosvm (model)"

    def freeze(self) -> None:
        pids = crosvm_load(self.tree.root)
        for _ in range(3):
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            for pid in pids:
                for _ in range(10):
                    if _all_tasks_stopped(pid):
                        break
                    time.sleep(0.05)
                else:
                    raise TimeoutError(f"crosvm model: {pid} did not stop")
            again = crosvm_load(self.tree.root)
            if again == pids:
                self.pids = pids
                return
            pids = again
        self.pids = pids
        raise RuntimeError("crosvm model: new processes forked while freezing")

    def thaw(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def treeguard_backends() -> list[Contender]:
    """treeguard's other backends (cgroup, auto, ptrace) that this installation has."""
    try:
        from treeguard._backends import BACKENDS
    except ImportError:  # pragma: no cover
        return []
    return [TreeguardBackend(name) for name in BACKENDS if name != "signal"]


class CFloor(Contender):
    """benchmarks/floor.c: the floor of a careful signal (or ptrace) freezer, in C. It
    times its own work (``took``), so the pipe it is driven through is not counted."""

    verifies = True

    def __init__(self, mode: str, exe: str) -> None:
        self.mode = mode
        self.exe = exe
        self.name = f"C floor ({mode})"
        self.proc: subprocess.Popen[str] | None = None
        self.took: float | None = None
        self.took_cpu: float | None = None

    def setup(self, tree: WorkerTree) -> None:
        super().setup(tree)
        self.proc = subprocess.Popen(
            [self.exe, self.mode, str(tree.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _say(self, command: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if answer[:1] != ["ok"]:
            raise RuntimeError(f"{self.name}: {answer or 'no answer'}")
        self.took = int(answer[1]) / 1e9
        self.took_cpu = int(answer[2]) / 1e9 if len(answer) > 2 else None

    def freeze(self) -> None:
        self._say("f")

    def thaw(self) -> None:
        self._say("t")

    def teardown(self) -> None:
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # end of input: it thaws what it holds, then exits
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()  # a ptrace hold ends with it; a signal freeze is thawed below
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


_FLOOR_EXE: list[str | None] = []


def c_floors() -> list[Contender]:
    """The C floors, compiled once per run (none, with a note, without a C compiler)."""
    if not _FLOOR_EXE:
        cc = shutil.which("cc") or shutil.which("gcc")
        exe = None
        if cc is None:
            print("note: no C compiler: the C floors are not measured")
        else:
            out = os.path.join(tempfile.mkdtemp(prefix="treeguard-bench-"), "floor")
            source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.c")
            done = subprocess.run([cc, "-O2", "-o", out, source], capture_output=True, text=True)
            if done.returncode == 0:
                exe = out
            else:
                print(f"note: the C floors did not build: {done.stderr.strip()[:200]}")
        _FLOOR_EXE.append(exe)
    exe = _FLOOR_EXE[0]
    return [] if exe is None else [CFloor("signal", exe), CFloor("ptrace", exe)]


def freezers() -> list[Contender]:
    from pyfloors import py_floors  # (it builds on this module's floors)

    found: list[Contender] = [TreeguardSignal(), KernelFloor(), PsutilNaive(), CrosvmModel()]
    found += c_floors()
    if "v2" not in MOUNTS:
        found.remove(found[1])
        print("note: no cgroup v2 mount: the kernel floor is not measured")
        return found + treeguard_backends() + py_floors()
    return found + treeguard_backends() + [TreeguardFirst(), TreeguardDirect()] + py_floors()


# -- enumeration of the tree below a root (no freezing) -----------------------------------


def enumerate_treeguard(root: int) -> list[int]:
    """treeguard's own walk (the one its freezer uses), reading each process's stat."""
    from treeguard._tree import children_source, walk
    from treeguard.procfs import ProcFS

    fs = ProcFS()
    return list(walk([root], fs.stat, children_source(fs)))


def enumerate_psutil(root: int) -> list[int]:
    proc = psutil.Process(root)
    return [root, *(p.pid for p in proc.children(recursive=True))]


ENUMERATORS: dict[str, Callable[[int], list[int]]] = {
    "treeguard walk": enumerate_treeguard,
    "psutil children(recursive=True)": enumerate_psutil,
    "crosvm load (model)": crosvm_load,
}
