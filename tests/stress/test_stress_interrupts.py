"""Interrupts at any point of freeze() and release(): nothing is ever left stopped or frozen.

A SIGALRM handler raises KeyboardInterrupt, as Python's own SIGINT handler does on Ctrl-C,
after a delay set with ``setitimer(ITIMER_REAL)`` drawn across the whole length of a freeze
or a release: the interrupt lands at any bytecode of them (and of the thaw they run on the
way out). After each trial the interrupt is caught and release() is called once more, which
must finish whatever was cut short; then the tree is checked through /proc and the cgroup's
own files, independently of treeguard: no task stopped, the cgroup thawed (``cgroup.events``
says ``frozen 0``, ``freezer.state`` says THAWED), every counter moving.

pytest-timeout watches from a thread here (``method="thread"``): its default watch is a
SIGALRM of its own, which these trials take over. Should a trial hang, that watch ends the
whole run at once (no teardown); a timer thaws the cgroup before, since a task frozen by
the v1 freezer does not even die of SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from tests import proc
from tests.conftest import MakeCgroup, require_root, slot
from tests.stress._figures import add_figures
from treeguard import ProcessesGuard
from treeguard._backends import _freezer_base
from treeguard._workers import WorkerTree
from treeguard.cgroup import Cgroup

TIMEOUT = 180

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(TIMEOUT, method="thread"),
    # An interrupt between an open and the `with` that would close it (in os.walk, say)
    # leaks that one descriptor: unavoidable in Python, and not what is checked here.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

#: Trials per backend, every other one interrupting freeze(), the others release().
TRIALS = 300
#: Interrupts are drawn up to this many times the operation's usual length, so that some
#: land after it returned, in its last bytecodes.
SPREAD = 1.6
#: 19 processes, 7 of them with a second thread (26 tasks).
SPEC = {"threads": 1, "children": [{"threads": 1, "children": [{}, {}]} for _ in range(6)]}


class Alarm:
    """Raises KeyboardInterrupt once, ``delay`` seconds into ``op``, and never outside it."""

    def __init__(self) -> None:
        self.armed = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def run(self, op: Callable[[], object], delay: float) -> bool:
        """Run ``op`` with the interrupt due after ``delay`` seconds; True if it came."""
        try:
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, delay)
            op()
            self.armed = False
        except KeyboardInterrupt:
            return True
        finally:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        return False


@pytest.fixture
def alarm() -> Iterator[Alarm]:
    require_root("the interrupt trials (cgroups)")
    alarm = Alarm()
    previous = signal.signal(signal.SIGALRM, alarm.handler)
    try:
        yield alarm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _main_slots(tree: WorkerTree) -> list[int]:
    return [slot(i) for i in range(tree.size)]


def _thawed(cg: Cgroup | None) -> str | None:
    """What is wrong with the cgroup's freezer files (``None`` if it is thawed)."""
    if cg is None:
        return None
    if cg.version == 2:
        control = proc.read_text(os.path.join(cg.path, "cgroup.freeze")).strip()
        events = proc.read_text(os.path.join(cg.path, "cgroup.events")).split()
        if control != "0" or "frozen" not in events or events[events.index("frozen") + 1] != "0":
            return f"cgroup.freeze {control}, cgroup.events {events}"
        return None
    state = proc.read_text(os.path.join(cg.path, "freezer.state")).strip()
    return None if state == "THAWED" else f"freezer.state {state}"


def _check_running(tree: WorkerTree, cg: Cgroup | None, when: str) -> None:
    problem = _thawed(cg)
    assert problem is None, f"{when}: the cgroup is left frozen ({problem})"
    # SIGCONT may reach a task on another CPU a moment after it was sent (the wake-up is
    # queued there): a task left stopped stays so, one on its way shows running at once.
    proc.wait_until(lambda: not proc.stopped(tree.pids), 5, f"{when}: tasks to run again")
    proc.counters_moving(tree.counters, _main_slots(tree))


class Lengths:
    """How long a freeze and a release take now: the medians of the last few that ran to
    their end. The machine's load changes during 300 trials (other tests, other jobs), so
    the delays follow it instead of a single measure taken at the start."""

    def __init__(self, new_guard: Callable[[], ProcessesGuard], runs: int = 9) -> None:
        self.seen: dict[str, deque[float]] = {p: deque(maxlen=15) for p in ("freeze", "release")}
        for _ in range(runs):
            guard = new_guard()
            t0 = time.perf_counter()
            try:
                guard.freeze()
                t1 = time.perf_counter()
            finally:
                guard.release()
            self.seen["freeze"].append(t1 - t0)
            self.seen["release"].append(time.perf_counter() - t1)

    def median(self, phase: str) -> float:
        return statistics.median(self.seen[phase])

    def run(self, alarm: Alarm, phase: str, op: Callable[[], object], delay: float) -> bool:
        """``alarm.run(op, delay)``, remembering how long ``op`` took if it was not cut."""
        t0 = time.perf_counter()
        hit = alarm.run(op, delay)
        if not hit:
            self.seen[phase].append(time.perf_counter() - t0)
        return hit


def _thaw_directly(cg: Cgroup) -> None:
    """Write the thaw, not through treeguard: a failed trial's cleanup (a v1-frozen task
    does not even act on SIGKILL)."""
    name, value = ("cgroup.freeze", "0") if cg.version == 2 else ("freezer.state", "THAWED")
    with open(os.path.join(cg.path, name), "w") as f:
        f.write(value)


@pytest.mark.parametrize("backend", ["signal", "cgroup-v2", "cgroup-v1"])
def test_interrupted_freeze_and_release_leave_nothing_stopped(
    backend: str,
    alarm: Alarm,
    cgroup: MakeCgroup,
    make_tree: Callable[..., WorkerTree],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cg = None if backend == "signal" else cgroup(int(backend[-1]))
    tree = make_tree(SPEC, spawn=None if cg is None else cg.spawn)
    name = backend.split("-")[0]

    def new_guard() -> ProcessesGuard:
        return ProcessesGuard(tree.root, include_root=True, backend=name, timeout=5.0)

    if cg is not None:
        rescue = threading.Timer(TIMEOUT - 30, _thaw_directly, (cg,))
        rescue.daemon = True
        rescue.start()
    lengths = Lengths(new_guard)
    rng = random.Random(17)
    landed = {"freeze": 0, "release": 0}
    thawed_by_freeze = 0
    few_tasks = _freezer_base._FEW_TASKS
    try:
        for trial in range(TRIALS):
            # Both ways of writing the freeze: in the caller (a cgroup of few tasks) and
            # by a thread of its own while the census runs.
            monkeypatch.setattr(_freezer_base, "_FEW_TASKS", few_tasks if trial % 4 < 2 else 0)
            guard = new_guard()
            try:
                if trial % 2 == 0:
                    phase = "freeze"
                    delay = rng.uniform(1e-6, SPREAD * lengths.median(phase))
                    hit = lengths.run(alarm, phase, guard.freeze, delay)
                    if hit and not guard.frozen:
                        # The freeze raised: everything it stopped so far runs again.
                        thawed_by_freeze += 1
                        where = f"trial {trial}, freeze cut at {delay * 1e3:.3f} ms"
                        _check_running(tree, cg, where)
                else:
                    phase = "release"
                    guard.freeze()
                    delay = rng.uniform(1e-6, SPREAD * lengths.median(phase))
                    hit = lengths.run(alarm, phase, guard.release, delay)
                landed[phase] += hit
            finally:
                guard.release()  # finishes whatever the interrupt cut short
            assert not guard.frozen
            _check_running(tree, cg, f"trial {trial}, {phase} cut at {delay * 1e3:.3f} ms")
    finally:
        if cg is not None:
            rescue.cancel()
            _thaw_directly(cg)
    # The delays must have reached into the operations, not only past them.
    assert landed["freeze"] > TRIALS // 8, landed
    assert landed["release"] > TRIALS // 8, landed
    add_figures(
        **{
            f"interrupts_{backend}_trials": TRIALS,
            f"interrupts_{backend}_in_freeze": landed["freeze"],
            f"interrupts_{backend}_in_release": landed["release"],
            f"interrupts_{backend}_freeze_raised_thawed": thawed_by_freeze,
            f"interrupts_{backend}_left_stopped": 0,
            f"interrupts_{backend}_freeze_ms": round(lengths.median("freeze") * 1e3, 3),
            f"interrupts_{backend}_release_ms": round(lengths.median("release") * 1e3, 3),
        }
    )
