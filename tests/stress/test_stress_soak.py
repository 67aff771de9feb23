"""Endurance: a thousand freeze/thaw cycles, and two thousand processes on 256 descriptors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import proc
from tests.stress._figures import add_figures
from treeguard import ProcessesGuard
from treeguard._workers import SLOTS, WorkerTree, demo_spec

pytestmark = pytest.mark.slow

MakeTree = Callable[..., WorkerTree]
CYCLES = 1000
ROOT = Path(__file__).resolve().parents[2]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_soak_a_thousand_cycles(make_tree: MakeTree) -> None:
    tree = make_tree(demo_spec(), period=0.002)  # 8 processes, 16 tasks, all ticking
    ticking = [
        i * SLOTS + t
        for i, node in enumerate([tree.spec, *_flatten(tree.spec)])
        for t in range(1 + node.get("threads", 0))
    ]
    identities = {pid: proc_starttime(pid) for pid in tree.pids}
    # With a lease that never runs out: the watchdog is armed and released every cycle.
    guard = ProcessesGuard(root=tree.root, include_root=True, max_frozen=60)
    helper = -1
    fds = rss = 0
    try:
        for cycle in range(CYCLES):
            guard.freeze()
            try:
                assert sorted(guard.pids) == sorted(tree.pids), cycle  # no process lost
                late = proc.not_stopped(tree.pids)  # every task of every process
                assert not late, f"cycle {cycle}: running while frozen: {late}"
                if cycle % 100 == 0:  # the slower, independent checks now and then
                    proc.assert_all_stopped(tree.pids)
                    assert proc.counters_still(tree.counters, tree.period, ticks=3), cycle
            finally:
                guard.release()
            left = proc.stopped(tree.pids)
            assert not left, f"cycle {cycle}: left stopped: {left}"
            if cycle % 100 == 99:
                proc.counters_moving(tree.counters, ticking)
            if cycle == 0:
                helper = guard.helper_pid
                assert helper is not None
            if cycle == 49:  # warmed up: the baseline for growth
                gc.collect()  # other tests' garbage must not close descriptors meanwhile
                fds, rss = open_fds(), rss_kib()
        assert guard.helper_pid == helper  # one helper
        gc.collect()
        assert open_fds() == fds, "descriptors leaked"
        grown = rss_kib() - rss
        assert grown < 2048, f"RSS grew by {grown} KiB over {CYCLES - 50} cycles"
        assert {pid: proc_starttime(pid) for pid in tree.pids} == identities
    finally:
        guard.release()
        guard.close()
    proc.counters_moving(tree.counters, ticking)
    print(f"soak: {CYCLES} cycles, RSS grew {grown} KiB, {fds} descriptors throughout")
    add_figures(soak_cycles=CYCLES, soak_tasks=len(proc.states_of(tree.pids)), soak_rss_kib=grown)


def _flatten(node: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for child in node.get("children", ()):
        out += [child, *_flatten(child)]
    return out


proc_starttime = proc.starttime


PRESSURE = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from tests import proc
from treeguard import ProcessesGuard
from treeguard._workers import WorkerTree
spec = {"children": [{"children": [{} for _ in range(49)]} for _ in range(40)]}  # 2,001
out = {"limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "rounds": []}
with WorkerTree(spec, mode="idle") as tree:
    guard = ProcessesGuard(watchdog=True)  # every descendant of this process
    for _ in range(3):
        guard.freeze()
        try:
            fds = len(os.listdir("/proc/self/fd"))
            late = proc.not_stopped(tree.pids)
            proc.assert_all_stopped(tree.pids)
            stopped = len(guard.pids)
        finally:
            guard.release()
        out["rounds"].append({
            "stopped": stopped, "late": len(late), "fds_while_frozen": fds,
            "left_stopped": len(proc.stopped(tree.pids)),
            "freeze_ms": guard.report.freeze_seconds * 1e3,
            "thaw_ms": guard.report.thaw_seconds * 1e3,
        })
    out["processes"] = len(tree.pids)
    guard.close()
print(json.dumps(out))
"""


def test_two_thousand_processes_on_256_descriptors() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PRESSURE, str(ROOT)], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout)
    assert out["limit"] == 256
    assert out["processes"] == 2001
    for r in out["rounds"]:
        assert r["stopped"] == 2001 and r["late"] == 0 and r["left_stopped"] == 0, r
        assert r["fds_while_frozen"] <= 256
    print("descriptor pressure:", out)
    best = min(r["freeze_ms"] for r in out["rounds"])
    add_figures(pressure_processes=out["processes"], pressure_fd_limit=256, pressure_freeze_ms=best)
