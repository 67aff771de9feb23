"""The benchmarks' quick mode runs, and every freeze it timed was verified (never a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_root

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def test_quick_mode_runs_and_every_freeze_verifies(tmp_path: Path) -> None:
    require_root("the kernel floor (a cgroup v2 of its own)")
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=RUN.parents[1],
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every freeze and thaw verified" in done.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["failures"] == []
    assert report["workloads"], "no workload ran"
    for workload in report["workloads"]:
        for name in ("treeguard signal", "kernel floor (cgroup v2)", "crosvm (model)"):
            result = workload["contenders"][name]
            # every repetition's freeze and thaw passed the independent check
            assert result["verified"] == report["repetitions"], (workload["workload"], name)
            assert result["freeze_ms"]["n"] == report["repetitions"]
    enumerated = report["enumeration"]["enumerators"]
    assert {"alone", "crowded"} <= set(enumerated["treeguard walk"])
    # the kernel floor removed its cgroup
    assert not [p for p in Path("/sys/fs/cgroup/unified").glob("treeguard-bench-*")]
