"""What describing a snapshot costs (command line, user, RSS, CPU times through psutil; PSS
from smaps_rollup): ``treeguard.snapshot`` of an idle tree walked only, described, and with
PSS, and ``treeguard tree PID`` the way a user runs it (a fresh interpreter).

    python benchmarks/describe.py [--quick]

Each repetition runs every variant once, in shuffled order, on the same tree.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from treeguard._snapshot_read import snapshot
from treeguard._workers import WorkerTree, wide

VARIANTS: dict[str, dict[str, bool]] = {
    "walk only": {"describe": False},
    "described": {},
    "described, PSS": {"pss": True},
}


def run_describe(quick: bool) -> dict[str, Any]:
    """Median milliseconds of each variant on a tree of 100 (quick) or 300 processes."""
    size, reps = (100, 5) if quick else (300, 15)
    samples: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "treeguard tree"]}
    with WorkerTree(wide(size), mode="idle") as tree:
        for _ in range(reps):
            order = list(samples)
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                if name == "treeguard tree":
                    done = subprocess.run(
                        [sys.executable, "-m", "treeguard", "tree", str(tree.root)],
                        capture_output=True,
                        check=True,
                    )
                    assert done.stdout.count(b"\n") >= size
                else:
                    assert len(snapshot(tree.root, **VARIANTS[name])) == size
                samples[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"processes": size, "repetitions": reps}
    for name, values in samples.items():
        out[f"{name} ms"] = round(statistics.median(values) * 1000, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 processes, 5 repetitions")
    result = run_describe(parser.parse_args().quick)
    for key, value in result.items():
        print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
