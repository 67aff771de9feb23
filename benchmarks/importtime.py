"""What ``import treeguard`` costs a program: cold imports, each in a fresh interpreter.

    python benchmarks/importtime.py [--runs N] [--json]

Each repetition starts one interpreter per statement below, in shuffled order, so that
machine noise hits all alike; the byte-code caches are warm, as they are after installation.
Two figures per statement, both medians over the runs:

- wall: the interpreter's whole run, minus that of ``python -c pass`` (the start-up every
  program pays anyway);
- importtime: what ``python -X importtime`` reports for the statement's imports of
  treeguard (the import itself, without the interpreter's start-up or exit).

The treeguard imported is the one this interpreter finds (``PYTHONPATH`` picks another).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

BASELINE = "pass"
STATEMENTS = [
    "import treeguard",
    "from treeguard import ProcessesGuard",
    "from treeguard import guard",
    "from treeguard._cli import main",
]


def run_once(statement: str) -> tuple[float, float]:
    """``(wall, importtime)`` in seconds of one fresh interpreter running ``statement``."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    return wall, imported_seconds(done.stderr)


def imported_seconds(report: str) -> float:
    """The cumulative time of treeguard's top-level imports in a ``-X importtime`` report
    (the lines not indented below another import; the interpreter's own start-up imports
    are not counted), in seconds."""
    total = 0
    for line in report.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, cumulative, name = line.split("|")
        if name.startswith(" treeguard"):  # one space after the bar: a top-level import
            total += int(cumulative)
    return total / 1e6


def measure(runs: int) -> dict[str, dict[str, float]]:
    """Median wall time and import time of every statement (and of the baseline)."""
    statements = [BASELINE, *STATEMENTS]
    for statement in statements:  # compile the byte-code caches before timing
        run_once(statement)
    samples: dict[str, list[tuple[float, float]]] = {s: [] for s in statements}
    for _ in range(runs):
        for statement in random.sample(statements, len(statements)):
            samples[statement].append(run_once(statement))
    base = statistics.median(wall for wall, _ in samples[BASELINE])
    return {
        statement: {
            "wall_ms": statistics.median(wall for wall, _ in values) * 1e3,
            "over_baseline_ms": (statistics.median(wall for wall, _ in values) - base) * 1e3,
            "importtime_ms": statistics.median(imp for _, imp in values) * 1e3,
            "importtime_min_ms": min(imp for _, imp in values) * 1e3,
        }
        for statement, values in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="interpreters per statement")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = measure(args.runs)
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "runs": args.runs, **figures}))
        return 0
    print(f"Python {sys.version.split()[0]}, median of {args.runs} fresh interpreters each")
    print(f"{'statement':40} {'wall':>9} {'- pass':>9} {'importtime':>11}")
    for statement, figure in figures.items():
        print(
            f"{'python -c ' + repr(statement) if statement == BASELINE else statement:40}"
            f" {figure['wall_ms']:7.1f}ms {figure['over_baseline_ms']:7.1f}ms"
            f" {figure['importtime_ms']:9.1f}ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
