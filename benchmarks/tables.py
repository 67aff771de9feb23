"""The benchmarks' printed table and plot, from the results of :mod:`run`."""

from __future__ import annotations

from typing import Any

import contenders

FLOOR = contenders.KernelFloor.name
Result = dict[str, Any]


def table(results: list[Result], own_floor: dict[str, str]) -> str:
    """The printed table: each contender's medians and its ratios to the kernel floor and
    to the floor of its own mechanism (``own_floor``: contender -> floor), freeze and thaw."""
    rows = []
    head = f"{'workload':26} {'contender':28} {'freeze ms (min..max)':>26} {'x floor':>7}"
    head += f" {'x own':>6} {'thaw ms (min..max)':>24} {'x floor':>7} {'x own':>6}"
    head += f" {'cpu ms':>7} {'x own':>6} {'ok':>4}"
    rows.append(head)
    rows.append("-" * len(head))
    for r in results:
        cs = r["contenders"]
        floor = cs.get(FLOOR) or {}
        for name, c in cs.items():
            own = cs.get(own_floor.get(name, FLOOR)) or {}
            cells = [f"{r['workload']:26} {name:28}"]
            for key, width in (("freeze_ms", 26), ("thaw_ms", 24)):
                s = c[key]
                if s is None:
                    cells.append(f"{'failed':>{width}} {'':>7} {'':>6}")
                    continue
                cell = f"{s['median']:.2f} ({s['min']:.2f}..{s['max']:.2f})"
                ratios = []
                for base in (floor.get(key), own.get(key)):
                    ratios.append(f"{s['median'] / base['median']:.2f}x" if base else "-")
                cells.append(f"{cell:>{width}} {ratios[0]:>7} {ratios[1]:>6}")
            cpu, base = c.get("freeze_cpu_ms"), own.get("freeze_cpu_ms")
            ratio = f"{cpu['median'] / base['median']:.2f}x" if cpu and base else "-"
            cells.append(f"{cpu['median'] if cpu else 0:>7.2f} {ratio:>6}")
            cells.append(f"{c['verified']:>4}")
            rows.append(" ".join(cells))
    return "\n".join(rows)


def plot(results: list[Result], path: str) -> bool:
    """``latency.png``: freeze latency by tree size (False, with a note, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install '.[plot]'): no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, threads in zip(axes, (0, 4), strict=True):
        rows = [
            r
            for r in results
            if r["workload"].startswith("wide") and r["threads_per_process"] == threads
        ]
        names = sorted({n for r in rows for n in r["contenders"]})
        for name in names:
            pts = [
                (r["processes"], r["contenders"][name]["freeze_ms"]["median"])
                for r in rows
                if name in r["contenders"] and r["contenders"][name]["freeze_ms"]
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("processes in the tree (wide, idle)")
        ax.set_title(f"freeze latency, {threads} extra threads per process")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median freeze latency (ms)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
