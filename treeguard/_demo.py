"""``treeguard demo``: the main job on an embedded tree, with every claim checked.

It starts a small worker tree (:func:`treeguard._workers.demo_spec`: processes with threads
and grandchildren, each thread advancing a counter in shared memory), freezes it with
:class:`ProcessesGuard`, shows the frozen tree, proves that no counter moves while frozen,
thaws it, proves the counters move again, and tears it down. It exits 0 only when every
check held.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ._guard import ProcessesGuard
from ._workers import SLOTS, WorkerTree, _nodes, counters_moving, counters_still, demo_spec
from .errors import FreezeError
from .procfs import ProcFS

__all__ = ["run"]

#: How often each worker thread advances its counter.
PERIOD = 0.005
#: Tick periods to watch the frozen tree for.
WATCH_TICKS = 20


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def run(out: TextIO | None = None) -> int:
    """Run the demo, printing to ``out`` (default: stdout).

    :returns: 0 when every check held, 1 otherwise.
    """
    out = out or sys.stdout
    failed: list[str] = []

    def check(ok: bool, what: str) -> None:
        out.write(f"  [{'ok' if ok else 'FAILED'}] {what}\n")
        if not ok:
            failed.append(what)

    tree = WorkerTree(demo_spec(), mode="tick", period=PERIOD)
    out.write(
        f"treeguard demo: {tree.size} worker processes; every thread bumps its own counter "
        f"every {PERIOD * 1000:g} ms\n"
    )
    try:
        tree.start()
        read = tree.counters
        # The counter slots in use: each process's main thread and its extra threads.
        used = [
            node["i"] * SLOTS + t for node in _nodes(tree.spec) for t in range(1 + node["threads"])
        ]
        check(counters_moving(read, used), f"all {len(used)} counters are moving before the freeze")
        guard = ProcessesGuard(tree.root, include_root=True)
        with guard:
            snap = guard.snapshot()
            report = guard.report
            out.write(
                f"\nfroze {report.stopped} processes ({report.tasks} tasks) in "
                f"{_ms(report.freeze_seconds)}, {report.passes} pass(es):\n\n"
            )
            out.write(snap.render() + "\n\n")
            tasks = [(r.pid, t.tid, t.state) for r in snap for t in r.threads]
            check(
                sorted(snap.pids) == sorted(tree.pids) and snap.consistent,
                "the snapshot holds exactly the tree's processes, consistent",
            )
            check(
                all(state == "T" for _, _, state in tasks),
                f"every task shows T in /proc ({len(tasks)} tasks)",
            )
            check(
                counters_still(read, PERIOD, WATCH_TICKS),
                f"no counter moved in {WATCH_TICKS} tick periods while frozen",
            )
        out.write(f"\nthawed in {_ms(guard.report.thaw_seconds)}\n")
        fs = ProcFS()
        stopped = [pid for pid in tree.pids if (st := fs.stat(pid)) is not None and st.state == "T"]
        check(not stopped, "no process is left stopped")
        check(counters_moving(read, used), "every counter is moving again")
    except (FreezeError, OSError, TimeoutError, RuntimeError) as err:
        failed.append(f"{type(err).__name__}: {err}")
        out.write(f"  [FAILED] {type(err).__name__}: {err}\n")
    finally:
        tree.close()
    check(not tree.alive(), "the tree is torn down")
    if failed:
        out.write(f"\n{len(failed)} check(s) FAILED: {'; '.join(failed)}\n")
        return 1
    out.write("\nall checks passed\n")
    return 0
