"""The benchmarks' printed table and plot, from the results of :mod:`run`."""

from __future__ import annotations

from typing import Any

import contenders

FLOOR = contenders.KernelFloor.name
SIGSTOP_FLOOR = "C floor (signal)"
Result = dict[str, Any]

#: The targets of the speed issue: each backend's freeze (and thaw) against the floor it
#: names, the C SIGSTOP floor for the signal and ptrace backends, the kernel's cgroup v2
#: freezer for the cgroup ones.
TARGETS: dict[str, tuple[str, float]] = {
    "treeguard signal": (SIGSTOP_FLOOR, 1.25),
    "treeguard ptrace": (SIGSTOP_FLOOR, 2.0),
    "treeguard cgroup": (FLOOR, 1.5),
    "treeguard Cgroup.freeze()": (FLOOR, 1.3),
}
#: No target, printed beside the targets: what the same floors give a freezer written in
#: Python that does nothing more than they do (:mod:`pyfloors`).
REFERENCES: dict[str, str] = {
    "Python floor (signal)": SIGSTOP_FLOOR,
    "Python floor (ptrace)": SIGSTOP_FLOOR,
    "Python floor (cgroup v2, checked)": FLOOR,
}


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


def targets(results: list[Result]) -> list[Result]:
    """Each backend's freeze and thaw against the floor its target names (:data:`TARGETS`),
    per workload: medians of the same run, and whether the freeze meets the target; and the
    Python floors' against theirs (:data:`REFERENCES`: ``target`` and ``met`` are None)."""
    found: list[Result] = []
    for r in results:
        cs = r["contenders"]
        aims = [(name, floor, target) for name, (floor, target) in TARGETS.items()]
        aims += [(name, floor, None) for name, floor in REFERENCES.items()]
        for name, floor_name, target in aims:
            c, floor = cs.get(name), cs.get(floor_name)
            if not c or not floor:
                continue
            ratios = {}
            for key in ("freeze_ms", "thaw_ms"):
                mine, base = c.get(key), floor.get(key)
                ratios[key] = mine["median"] / base["median"] if mine and base else None
            freeze = ratios["freeze_ms"]
            found.append(
                {
                    "workload": r["workload"],
                    "contender": name,
                    "floor": floor_name,
                    "target": target,
                    "freeze_ratio": freeze,
                    "thaw_ratio": ratios["thaw_ms"],
                    "met": None if target is None else freeze is not None and freeze <= target,
                }
            )
    return found


def targets_text(found: list[Result]) -> str:
    """The printed lines of :func:`targets`: one per workload, each backend's ratios."""
    if not found:
        return ""
    lines = ["targets: freeze / thaw median against the floor each target names"]
    by_workload: dict[str, list[Result]] = {}
    for t in found:
        by_workload.setdefault(t["workload"], []).append(t)
    for workload, items in by_workload.items():
        cells = []
        for t in items:
            short = t["contender"].removeprefix("treeguard ")
            floor = "SIGSTOP" if t["floor"] == SIGSTOP_FLOOR else "kernel"
            freeze, thaw = t["freeze_ratio"], t["thaw_ratio"]
            text = f"{freeze:.2f}x" if freeze is not None else "failed"
            text += f" / {thaw:.2f}x" if thaw is not None else ""
            if t["target"] is None:
                cells.append(f"{short} {text} ({floor} floor, no target)")
                continue
            mark = "met" if t["met"] else "MISSED"
            cells.append(f"{short} {text} ({floor} floor, target {t['target']:g}x: {mark})")
        lines.append(f"  {workload:26} " + "; ".join(cells))
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> bool:
    """``latency.png``: freeze latency by tree size (False, with a note, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install '.[plot]'): no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    # One colour per contender, the same in both panels (more than the default ten).
    every = sorted({n for r in results for n in r["contenders"]})
    colour = dict(zip(every, plt.get_cmap("tab20").colors, strict=False))
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
            if pts:  # the floors dashed, so that each stands out from the contenders
                style = "--" if "floor" in name else "-"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=name, color=colour[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("processes in the tree (wide, idle)")
        ax.set_title(f"freeze latency, {threads} extra threads per process")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median freeze latency (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(0.8, 0.5))
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    return True
