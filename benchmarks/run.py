"""treeguard's benchmarks: freezers against the kernel floor, on the same idle trees.

    python benchmarks/run.py [--quick] [--out DIR] [--workloads 'wide 10,|chain']
                             [--contenders 'cgroup|ptrace'] [--extras 'async_gaps|cold']

Every repetition runs every contender once, in shuffled order, on the same tree, so that
machine noise hits all alike. After each freeze every task is checked independently
(``benchmarks/checks.py``); after each thaw, that no task is left stopped. Prints a table of
medians (min..max, ratio to the kernel floor measured in the same run, and to the floor of
the contender's own mechanism; the CPU time of each freeze too, which a busy machine's
waits for a CPU do not inflate), writes
``results.json`` and, when matplotlib is importable, ``latency.png`` into ``--out``.
Exits 1 if any freeze or thaw failed its check. Needs root for the cgroup contenders.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checks  # noqa: E402
import contenders  # noqa: E402
import loops  # noqa: E402
import storms  # noqa: E402
import tables  # noqa: E402

from treeguard import ProcessesGuard  # noqa: E402
from treeguard._workers import WorkerTree, chain, wide  # noqa: E402

Result = dict[str, Any]


def workloads(quick: bool, only: str = "") -> list[tuple[str, int, dict[str, Any]]]:
    """``(label, tasks, spec)`` of every freezing workload (those whose label holds one of
    the ``|``-separated words of ``only``, if given)."""
    sizes = (10, 100) if quick else (10, 100, 1000)
    found = [
        (f"wide {n}, {t} threads", n * (1 + t), wide(n, threads=t)) for t in (0, 4) for n in sizes
    ]
    found.append(("chain 50 deep x2 (100)", 100, chain(50, width=2)))
    return [w for w in found if _chosen(w[0], only or None)]


#: Trees of at most this many tasks freeze in a millisecond or two, where the machine's
#: noise weighs most: they get three times the repetitions (unless --reps says how many).
SMALL = 500


def _chosen(name: str, only: str | None) -> bool:
    """Whether ``name`` holds one of the ``|``-separated words of ``only`` (None: all)."""
    return only is None or any(word and word in name for word in only.split("|"))


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def check_frozen(c: contenders.Contender, pids: list[int]) -> str | None:
    """Why the tree is not frozen the way ``c`` freezes, or None if it is."""
    if c.kind == "signal":
        # A contender that does not wait itself (psutil) gets a moment, untimed.
        if not checks.poll(lambda: not checks.not_stopped(pids), 0 if c.verifies else 2):
            return f"tasks not stopped: {checks.not_stopped(pids)[:5]}"
        return None
    late = checks.not_cgroup_frozen(pids)
    return f"cgroup not frozen for {late[:5]}" if late else None


def check_thawed(c: contenders.Contender, pids: list[int]) -> str | None:
    if not checks.poll(lambda: not checks.stopped(pids), 5):
        return f"tasks still stopped: {checks.stopped(pids)[:5]}"
    if c.kind == "cgroup":
        frozen = [p for p in pids if checks.cgroup_frozen(p)]
        if frozen:
            return f"cgroup still frozen for {frozen[:5]}"
    return None


def own_time(c: contenders.Contender, start: float, end: float) -> float:
    """When ``c``'s call ended: ``end``, or by the time the contender measured itself (a C
    floor driven through a pipe)."""
    took = getattr(c, "took", None)
    return end if took is None else start + took


def own_cpu(c: contenders.Contender, start: float, end: float) -> float:
    """The CPU time ``c``'s call took: this process's (every thread of it) from ``start``
    to ``end`` (``time.process_time``), or what a C floor measured of its own. On a busy
    machine this leaves out the time spent waiting for a CPU, which the wall clock counts."""
    took = getattr(c, "took_cpu", None)
    return end - start if took is None else took


#: The floor of each contender's own mechanism (the kernel's cgroup freezer by default).
OWN_FLOOR = {
    "treeguard signal": "C floor (signal)",
    "crosvm (model)": "C floor (signal)",
    "psutil naive (unverified)": "C floor (signal)",
    "treeguard ptrace": "C floor (ptrace)",
    "Python floor (signal)": "C floor (signal)",
    "Python floor (ptrace)": "C floor (ptrace)",
}


def run_workload(
    label: str,
    spec: dict[str, Any],
    reps: int,
    failures: list[str],
    extra: Result,
    only: str = "",
) -> Result:
    # The floors always run: every ratio is to a floor measured in the same run.
    rivals = [
        c
        for c in contenders.freezers()
        if _chosen(c.name, only or None) or "floor" in c.name or c.name in OWN_FLOOR.values()
    ]
    times: dict[str, dict[str, list[float]]] = {
        c.name: {"freeze": [], "thaw": [], "freeze_cpu": []} for c in rivals
    }
    verified: dict[str, int] = {c.name: 0 for c in rivals}
    with WorkerTree(spec, mode="idle") as tree:
        pids = list(tree.pids)
        ready: list[contenders.Contender] = []
        try:
            for c in rivals:
                try:
                    c.setup(tree)
                    if not isinstance(c, contenders.TreeguardBackend):
                        ready.append(c)
                        continue
                    c.freeze()  # a trial run: a backend that does not work here is skipped
                    c.thaw()
                    ready.append(c)
                except Exception as err:  # noqa: BLE001 - reported, then skipped
                    print(f"note: {c.name} skipped on {label}: {type(err).__name__}: {err}")
                    c.teardown()
                    del times[c.name], verified[c.name]
            for _ in range(reps):
                order = ready[:]
                random.shuffle(order)
                for c in order:
                    gc.collect()
                    gc.disable()
                    try:
                        c0, t0 = time.process_time(), time.perf_counter()
                        c.freeze()
                        t1 = own_time(c, t0, time.perf_counter())
                        cpu = own_cpu(c, c0, time.process_time())
                        why = check_frozen(c, pids)
                        t2 = time.perf_counter()
                        c.thaw()
                        t3 = own_time(c, t2, time.perf_counter())
                    except Exception as err:  # noqa: BLE001 - a failed freeze is a result
                        why = f"{type(err).__name__}: {err}"
                        t0 = t1 = t2 = t3 = cpu = 0.0
                        try:
                            c.thaw()
                        except Exception:  # noqa: BLE001, S110
                            pass
                    finally:
                        gc.enable()
                    why = why or check_thawed(c, pids)
                    if why:
                        failures.append(f"{label}: {c.name}: {why}")
                        continue
                    verified[c.name] += 1
                    times[c.name]["freeze"].append(t1 - t0)
                    times[c.name]["thaw"].append(t3 - t2)
                    times[c.name]["freeze_cpu"].append(cpu)
            if label == "wide 1000, 0 threads" or (
                extra.get("quick") and label.startswith("wide 100,")
            ):
                extra["supervisor"] = supervisor_cost(tree)
        finally:
            for c in rivals:
                c.teardown()
    return {
        "workload": label,
        "processes": len(pids),
        "threads_per_process": spec.get("threads", 0),
        "repetitions": reps,
        "contenders": {
            name: {
                "freeze_ms": summary(t["freeze"]) if t["freeze"] else None,
                "thaw_ms": summary(t["thaw"]) if t["thaw"] else None,
                "freeze_cpu_ms": summary(t["freeze_cpu"]) if t["freeze_cpu"] else None,
                "verified": verified[name],
            }
            for name, t in times.items()
        },
    }


def supervisor_cost(tree: WorkerTree) -> Result:
    """The supervisor's descriptors and memory while it holds the tree frozen."""

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    fds0, rss0 = len(os.listdir("/proc/self/fd")), rss_kib()
    guard = ProcessesGuard(root=tree.root, include_root=True).freeze()
    try:
        fds1, rss1 = len(os.listdir("/proc/self/fd")), rss_kib()
    finally:
        guard.release()
    per = 1000 / len(tree.pids)
    return {
        "processes": len(tree.pids),
        "fds_per_1000": round((fds1 - fds0) * per),
        "rss_kib_per_1000": round((rss1 - rss0) * per),
    }


def run_enumeration(quick: bool, reps: int) -> Result:
    """Enumerating a 10-process tree, alone and with many unrelated idle processes."""
    crowd = 300 if quick else 3000
    out: Result = {"crowd": crowd, "enumerators": {}}
    with WorkerTree(wide(10), mode="idle") as tree:
        for phase in ("alone", "crowded"):
            others = WorkerTree(wide(crowd), mode="idle") if phase == "crowded" else None
            try:
                if others is not None:
                    others.start()
                samples: dict[str, list[float]] = {name: [] for name in contenders.ENUMERATORS}
                for _ in range(reps * 5):
                    order = list(contenders.ENUMERATORS.items())
                    random.shuffle(order)
                    for name, fn in order:
                        t0 = time.perf_counter()
                        found = fn(tree.root)
                        samples[name].append(time.perf_counter() - t0)
                        assert sorted(found) == sorted(tree.pids), (name, found)
                for name, values in samples.items():
                    out["enumerators"].setdefault(name, {})[phase] = summary(values)
            finally:
                if others is not None:
                    others.close()
    for v in out["enumerators"].values():
        v["ratio"] = v["crowded"]["median"] / v["alone"]["median"]
    return out


def run_watchdog(quick: bool, reps: int) -> Result | None:
    """Start-up and per-freeze cost of ``ProcessesGuard(watchdog=True)`` over a plain guard."""
    size = 10 if quick else 100
    with WorkerTree(wide(size), mode="idle") as tree:
        plain = ProcessesGuard(root=tree.root, include_root=True)
        timed: dict[str, list[float]] = {"plain": [], "watchdog": []}
        try:
            watched = ProcessesGuard(root=tree.root, include_root=True, watchdog=True)
            t0 = time.perf_counter()
            watched.freeze()
            first = time.perf_counter() - t0
            watched.release()
        except NotImplementedError:
            print("note: the watchdog is not implemented yet: its cost is not measured")
            return None
        try:
            for _ in range(reps * 2):
                for name, g in random.sample([("plain", plain), ("watchdog", watched)], 2):
                    t0 = time.perf_counter()
                    g.freeze()
                    timed[name].append(time.perf_counter() - t0)
                    if checks.not_stopped(tree.pids):
                        raise RuntimeError(f"{name} guard: tree not stopped")
                    g.release()
        finally:
            plain.release()
            watched.release()
            # Stop the helper process now, not at garbage collection.
            if getattr(watched, "_watchdog", None) is not None:
                watched._watchdog.close()
    p, w = statistics.median(timed["plain"]), statistics.median(timed["watchdog"])
    return {
        "processes": size,
        "startup_ms": (first - w) * 1000,
        "first_freeze_ms": first * 1000,
        "per_freeze_extra_ms": (w - p) * 1000,
        "plain_freeze_ms": p * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small trees, few repetitions")
    parser.add_argument("--out", default="benchmarks/out", help="where results go")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per workload")
    # Words separated by |: only the workloads, contenders (the floors always run) and
    # extra measurements ('' for none) whose names hold one.
    parser.add_argument("--workloads", default="", help="only these workloads: a|b")
    parser.add_argument("--contenders", default="", help="only these contenders: a|b")
    parser.add_argument("--extras", default=None, help="only these extras: a|b")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 15)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    failures: list[str] = []
    extra: Result = {"quick": args.quick}
    results = []
    for label, tasks, spec in workloads(args.quick, args.workloads):
        print(f"… {label}", flush=True)
        n = reps * 3 if tasks <= SMALL and not (args.reps or args.quick) else reps
        results.append(run_workload(label, spec, n, failures, extra, args.contenders))
    wanted = args.extras
    enumeration = None
    if _chosen("enumeration", wanted):
        print("… enumeration", flush=True)
        enumeration = run_enumeration(args.quick, reps)
    extras: dict[str, Callable[[], Result | None]] = {
        "async_gaps": lambda: loops.async_gaps(
            100 if args.quick else 1000, failures, 2 if args.quick else 5
        ),
        "repeated": lambda: loops.repeated(
            10 if args.quick else 100, 20 if args.quick else 100, failures
        ),
        "cold": lambda: loops.cold(10 if args.quick else 100, 3 if args.quick else 7, failures),
        "watchdog": lambda: run_watchdog(args.quick, reps),
        "fork_storm": lambda: storms.run_storm(args.quick),
        "supervisor_death": lambda: storms.run_supervisor_death(args.quick),
    }
    for key, fn in extras.items():
        if not _chosen(key, wanted):
            continue
        print(f"… {key}", flush=True)
        try:
            extra[key] = fn()
        except Exception as err:  # noqa: BLE001 - reported: a face that is not ready yet
            print(f"note: {key} failed: {type(err).__name__}: {err}")
            extra[key] = {"error": f"{type(err).__name__}: {err}"}
    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "cpu": _cpu_model(),
        },
        "repetitions": reps,
        "quick": args.quick,
        "workloads": results,
        "enumeration": enumeration,
        "extra": extra,
        "failures": failures,
        "seconds": time.time() - started,
        "targets": tables.targets(results),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print()
    print(tables.table(results, OWN_FLOOR))
    print()
    if report["targets"]:
        print(tables.targets_text(report["targets"]))
        print()
    if enumeration is not None:
        crowd = enumeration["crowd"]
        print(f"enumeration of a 10-process tree, alone vs with {crowd} idle others:")
        for name, v in enumeration["enumerators"].items():
            print(
                f"  {name:32} {v['alone']['median']:.3f} ms -> {v['crowded']['median']:.3f} ms"
                f"  ({v['ratio']:.2f}x)"
            )
    for line in loops.summary(extra):
        print(line)
    for key in ("supervisor", "watchdog", "fork_storm", "supervisor_death"):
        if extra.get(key):
            print(f"{key}: {extra[key]}")
    if tables.plot(results, os.path.join(args.out, "latency.png")):
        print(f"plot: {os.path.join(args.out, 'latency.png')}")
    print(f"results: {os.path.join(args.out, 'results.json')} ({report['seconds']:.0f} s)")
    if failures:
        print(f"FAILED: {len(failures)} freezes or thaws did not verify:")
        for line in failures:
            print("  " + line)
        return 1
    print("every freeze and thaw verified")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
