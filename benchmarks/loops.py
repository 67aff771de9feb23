"""Benchmarks of one guard over time: the event loop's largest gap while an async guard
freezes and thaws, one guard frozen and released many times, and the cold first freeze of
a fresh process. Every backend that works here; every freeze checked independently."""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import checks

from treeguard import ProcessesGuard
from treeguard._workers import WorkerTree, wide
from treeguard.cgroup import Cgroup

Result = dict[str, Any]
BACKENDS = ("signal", "cgroup", "ptrace")


@contextlib.contextmanager
def tree_for(backend: str, spec: dict[str, Any]) -> Iterator[WorkerTree]:
    """An idle tree, alone in a cgroup of its own for the cgroup backend; killed (and its
    cgroup removed) afterwards."""
    cg = Cgroup.create(version=2) if backend == "cgroup" else None
    try:
        spawn = {} if cg is None else {"spawn": cg.spawn}
        with WorkerTree(spec, mode="idle", **spawn) as tree:
            yield tree
    finally:
        if cg is not None:
            cg.kill()
            cg.remove()


def frozen_why(backend: str, pids: list[int]) -> str | None:
    """Why the tree is not frozen the way ``backend`` freezes, or None if it is."""
    late = checks.not_cgroup_frozen(pids) if backend == "cgroup" else checks.not_stopped(pids)
    return f"{backend}: not frozen: {list(late)[:5]}" if late else None


def thawed_why(pids: list[int]) -> str | None:
    if not checks.poll(lambda: not checks.stopped(pids), 5):
        return f"tasks left stopped: {checks.stopped(pids)[:5]}"
    return None


def async_gaps(size: int, failures: list[str], runs: int = 5) -> Result:
    """The largest gap between two turns of a ticking task while ``treeguard.guard()``
    freezes (entering) and thaws (leaving), per backend and event loop: the median over
    ``runs`` of each run's largest gap, in wall-clock time and in the loop thread's CPU time
    (its own work between two turns, without the time a busy machine kept it waiting for a
    CPU)."""
    import anyio
    import anyio.lowlevel

    import treeguard

    out: Result = {"processes": size}
    for backend in BACKENDS:
        with tree_for(backend, wide(size)) as tree:
            pids = list(tree.pids)
            for loop in ("asyncio", "trio"):

                async def main(
                    backend: str = backend, loop: str = loop, pids: list[int] = pids
                ) -> dict[str, float]:
                    marks: list[float] = []
                    phase: dict[str, float] = {}
                    stop = anyio.Event()

                    cpu: list[float] = []

                    async def ticker() -> None:
                        while not stop.is_set():
                            marks.append(time.perf_counter())
                            cpu.append(time.thread_time())
                            await anyio.lowlevel.checkpoint()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(ticker)
                        await anyio.sleep(0.01)  # the ticker runs; the loop is warm
                        phase["t0"] = time.perf_counter()
                        async with treeguard.guard(
                            root=tree.root,
                            include_root=True,
                            backend=backend,  # type: ignore[arg-type]
                        ):
                            phase["t1"] = time.perf_counter()
                            phase["t1cpu"] = time.thread_time()
                            why = frozen_why(backend, pids)
                            if why:
                                failures.append(f"async gap, {loop}: {why}")
                            # The check above holds the loop too: the ticker runs again
                            # before the thaw's window opens.
                            await anyio.sleep(0.005)
                            phase["t2"] = time.perf_counter()
                        phase["t3"] = time.perf_counter()
                        phase["t3cpu"] = time.thread_time()
                        await anyio.sleep(0.005)
                        stop.set()

                    def gap(a: str, b: str, clock: list[float]) -> float:
                        # From the last tick before a (the call began) through the ticks
                        # in between to b (the call returned: the loop is free again).
                        first = max(0, bisect.bisect_left(marks, phase[a]) - 1)
                        last = bisect.bisect_right(marks, phase[b])
                        seq = [*clock[first:last], phase[b + "cpu" if clock is cpu else b]]
                        return max((y - x for x, y in zip(seq, seq[1:], strict=False)), default=0)

                    return {
                        "freeze_gap_ms": gap("t0", "t1", marks) * 1e3,
                        "thaw_gap_ms": gap("t2", "t3", marks) * 1e3,
                        "freeze_cpu_gap_ms": gap("t0", "t1", cpu) * 1e3,
                        "thaw_cpu_gap_ms": gap("t2", "t3", cpu) * 1e3,
                        "freeze_ms": (phase["t1"] - phase["t0"]) * 1e3,
                    }

                got: list[dict[str, float]] = []
                for _ in range(runs):
                    try:
                        got.append(anyio.run(main, backend=loop))
                    except Exception as err:  # noqa: BLE001 - reported: not usable here
                        out[f"{backend}/{loop}"] = {"error": f"{type(err).__name__}: {err}"}
                        got = []
                        break
                    finally:
                        why = thawed_why(pids)
                        if why:
                            failures.append(f"async gap, {backend}/{loop}: {why}")
                if got:
                    out[f"{backend}/{loop}"] = {
                        key: statistics.median(g[key] for g in got) for key in got[0]
                    }
    return out


def repeated(size: int, times: int, failures: list[str]) -> Result:
    """One guard frozen and released ``times`` times (a supervisor snapshotting every few
    seconds), against a new guard for every freeze, interleaved."""
    out: Result = {"processes": size, "times": times}
    for backend in BACKENDS:
        with tree_for(backend, wide(size)) as tree:
            pids = list(tree.pids)
            kept = ProcessesGuard(root=tree.root, include_root=True, backend=backend)  # type: ignore[arg-type]
            samples: dict[str, list[float]] = {"same guard": [], "new guard": []}
            try:
                for _ in range(times):
                    for name in samples:
                        g = kept if name == "same guard" else None
                        if g is None:
                            g = ProcessesGuard(root=tree.root, include_root=True, backend=backend)  # type: ignore[arg-type]
                        t0 = time.perf_counter()
                        g.freeze()
                        samples[name].append(time.perf_counter() - t0)
                        why = frozen_why(backend, pids)
                        g.release()
                        why = why or thawed_why(pids)
                        if why:
                            failures.append(f"repeated, {backend}: {why}")
            except Exception as err:  # noqa: BLE001 - reported: a backend not usable here
                kept.release()
                out[backend] = {"error": f"{type(err).__name__}: {err}"}
                continue
            out[backend] = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
            out[backend]["first_ms"] = samples["same guard"][0] * 1e3
    return out


_COLD = """
import json, sys, time
t0 = time.perf_counter()
import treeguard
t1 = time.perf_counter()
g = treeguard.ProcessesGuard(root=int(sys.argv[1]), include_root=True, backend=sys.argv[2])
g.freeze()
t2 = time.perf_counter()
sys.stdout.write("frozen\\n"); sys.stdout.flush(); sys.stdin.readline()
t3 = time.perf_counter()
g.release()
t4 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "first_freeze_ms": (t2 - t1) * 1e3,
                  "thaw_ms": (t4 - t3) * 1e3}))
"""


def cold(size: int, runs: int, failures: list[str]) -> Result:
    """The first freeze of a fresh process (imports, caches, the first reads), per backend:
    the median of ``runs`` fresh processes. Each finds the bytecode compiled, as in an
    installed package: a first, untimed process writes it to a cache of this run's own."""
    out: Result = {"processes": size, "runs": runs}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPYCACHEPREFIX": cache}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for backend in BACKENDS:
            found = _cold_runs(backend, size, runs, env, failures)
            if isinstance(found, dict):
                out[backend] = found
            elif found:
                out[backend] = {key: statistics.median(f[key] for f in found) for key in found[0]}
    return out


def _cold_runs(
    backend: str, size: int, runs: int, env: dict[str, str], failures: list[str]
) -> list[dict[str, float]] | Result:
    """The figures of ``runs`` fresh processes (after one untimed), or the error of one."""
    with tree_for(backend, wide(size)) as tree:
        pids = list(tree.pids)
        found: list[dict[str, float]] = []
        for run in range(runs + 1):
            child = subprocess.Popen(
                [sys.executable, "-c", _COLD, str(tree.root), backend],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert child.stdin is not None
            assert child.stdout is not None
            try:
                if child.stdout.readline().strip() == "frozen":
                    why = frozen_why(backend, pids)
                    if why:
                        failures.append(f"cold, {why}")
                child.stdin.write("\n")
                child.stdin.flush()
                line = child.stdout.readline()
            finally:
                child.stdin.close()
                err = child.stderr.read() if child.stderr else ""
                child.wait(30)
                child.stdout.close()
                if child.stderr:
                    child.stderr.close()
            why = thawed_why(pids)
            if why:
                failures.append(f"cold, {backend}: {why}")
            if child.returncode != 0 or not line:
                return {"error": err.strip().splitlines()[-1:] or ["no output"]}
            if run:
                found.append(json.loads(line))
    return found


def summary(extra: Result) -> list[str]:
    """Lines for the printed report."""
    lines = []
    gaps = extra.get("async_gaps") or {}
    if gaps:
        lines.append(
            f"largest event-loop gap ({gaps['processes']} processes, median of runs), "
            "freeze / thaw:"
        )
        for key, v in gaps.items():
            if isinstance(v, dict):
                text = v.get("error") or (
                    f"{v['freeze_gap_ms']:.2f} / {v['thaw_gap_ms']:.2f} ms "
                    f"(loop thread's CPU {v['freeze_cpu_gap_ms']:.2f} / "
                    f"{v['thaw_cpu_gap_ms']:.2f} ms; freeze {v['freeze_ms']:.1f} ms)"
                )
                lines.append(f"  {key:18} {text}")
    rep = extra.get("repeated") or {}
    if rep:
        lines.append(
            f"one guard frozen {rep['times']} times ({rep['processes']} processes), "
            "median freeze: same guard / a new guard each time:"
        )
        for key in BACKENDS:
            v = rep.get(key)
            if v:
                text = v.get("error") or (
                    f"{v['same guard']:.2f} / {v['new guard']:.2f} ms (first {v['first_ms']:.2f})"
                )
                lines.append(f"  {key:8} {text}")
    first = extra.get("cold") or {}
    if first:
        lines.append(f"cold first freeze of a fresh process ({first['processes']} processes):")
        for key in BACKENDS:
            v = first.get(key)
            if v:
                text = v.get("error") or (
                    f"import {v['import_ms']:.1f} ms, first freeze {v['first_freeze_ms']:.2f}"
                    f" ms, thaw {v['thaw_ms']:.2f} ms"
                )
                lines.append(f"  {key:8} {text}")
    return lines
