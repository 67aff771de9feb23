"""The benchmarks' quick mode runs, and every freeze it timed was verified (never a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_root
from treeguard.cgroup import discover

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def test_quick_mode_runs_and_every_freeze_verifies(tmp_path: Path) -> None:
    require_root("the kernel floor (a cgroup v2 of its own)")
    mine = discover().own_directory(2)
    before = set(os.listdir(mine)) if mine is not None else set()
    with subprocess.Popen(
        [sys.executable, str(RUN), "--quick", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=RUN.parents[1],
        env={**os.environ, "MPLBACKEND": "Agg"},
    ) as bench:
        try:
            out, err = bench.communicate(timeout=110)
        except subprocess.TimeoutExpired:
            bench.kill()
            raise
    assert bench.returncode == 0, out[-3000:] + err[-3000:]
    assert "every freeze and thaw verified" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["failures"] == []
    assert report["workloads"], "no workload ran"
    expected = {
        "treeguard signal",
        "treeguard cgroup",
        "treeguard cgroup (new guard)",
        "treeguard auto",
        "treeguard ptrace",
        "treeguard Cgroup.freeze()",
        "kernel floor (cgroup v2)",
        "C floor (signal)",
        "C floor (ptrace)",
        "psutil naive (unverified)",
        "crosvm (model)",
        "Python floor (signal)",
        "Python floor (ptrace)",
        "Python floor (cgroup v2, checked)",
    }
    for workload in report["workloads"]:
        assert set(workload["contenders"]) == expected, workload["workload"]
        for name, result in workload["contenders"].items():
            # every repetition's freeze and thaw passed the independent check
            assert result["verified"] == workload["repetitions"], (workload["workload"], name)
            assert result["freeze_ms"]["n"] == workload["repetitions"] == report["repetitions"]
    storm = report["extra"]["fork_storm"]
    for backend in ("signal", "ptrace"):  # every freeze of the storm held, or gave up cleanly
        assert storm[backend]["held"] + storm[backend]["unstable"] == storm[backend]["attempts"]
    assert storm["ptrace"]["held"] == storm["ptrace"]["attempts"]  # the kernel catches forks
    for backend, death in report["extra"]["supervisor_death"].items():
        assert death["resumed"] == death["runs"], backend  # the tree ran again every time
    extra = report["extra"]
    for backend in ("signal", "cgroup", "ptrace"):  # measured on every backend
        for loop in ("asyncio", "trio"):
            assert "freeze_gap_ms" in extra["async_gaps"][f"{backend}/{loop}"], (backend, loop)
        assert "same guard" in extra["repeated"][backend], backend
        assert "first_freeze_ms" in extra["cold"][backend], backend
    enumerated = report["enumeration"]["enumerators"]
    assert {"alone", "crowded"} <= set(enumerated["treeguard walk"])
    # the kernel floor removed its cgroup (named after the run's PID: other runs may be at
    # work), wherever the v2 hierarchy is mounted (found in mountinfo: /sys/fs/cgroup on a
    # pure v2 host), and so did every Cgroup.create() of the run, below this process's own
    found = discover()
    assert found.v2 is not None, "CI has a cgroup v2 mount"
    own = found.own_directory(2)
    assert own is not None
    assert not (Path(found.v2.mountpoint) / f"treeguard-bench-floor-{bench.pid}").exists()
    # Cgroup.create() names its cgroups treeguard-<pid>-<random>: the run's own, by its PID
    # (another run on the machine may be at work meanwhile).
    theirs = f"treeguard-{bench.pid}-"
    assert not [p for p in os.listdir(own) if p.startswith(theirs) and p not in before]
