"""Independent checks of what a contender did, deliberately NOT built on treeguard.

Task states come from a minimal reader of ``/proc/PID/task/TID/stat`` (anchored on the last
``)``), cgroup freezer states from ``/proc/PID/cgroup`` and the cgroup's own files, so that
a bug in treeguard's parser or walk cannot make a freeze look verified.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

# The same minimal reader the tests check with (tests/proc.py): one independent source.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.proc import task_states  # noqa: E402
from treeguard._workers import poll_until as poll  # noqa: E402, F401 - the one poll loop


def not_stopped(pids: Iterable[int]) -> list[tuple[int, int, str]]:
    """Tasks of ``pids`` that are not stopped by a signal (``T``/``t``)."""
    return [(pid, tid, s) for pid in pids for tid, s in task_states(pid).items() if s not in "TtZX"]


def stopped(pids: Iterable[int]) -> list[tuple[int, int, str]]:
    """Tasks of ``pids`` that are stopped by a signal."""
    return [(pid, tid, s) for pid in pids for tid, s in task_states(pid).items() if s in "Tt"]


def _mounts() -> dict[str, str]:
    """``{"v2": path, "v1": path}`` of the cgroup v2 and v1 freezer mounts."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split(" ", 2)
            point = left.split(" ")[4]
            if fstype == "cgroup2":
                found.setdefault("v2", point)
            elif fstype == "cgroup" and "freezer" in options.split()[-1].split(","):
                found.setdefault("v1", point)
    return found


MOUNTS = _mounts()


def cgroup_frozen(pid: int) -> bool | None:
    """Whether ``pid``'s cgroup is frozen (v2 ``frozen 1`` or v1 ``FROZEN``; the v1 freezer
    wins when the process is in a non-root v1 freezer cgroup); ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    v1 = v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and "v2" in MOUNTS:
            v2 = path
        elif "freezer" in controllers.split(",") and "v1" in MOUNTS:
            v1 = path
    if v1 not in (None, "/"):
        with open(f"{MOUNTS['v1']}{v1}/freezer.state") as f:
            if f.read().strip() == "FROZEN":
                return True
    if v2 not in (None, "/"):
        with open(f"{MOUNTS['v2']}{v2}/cgroup.events") as f:
            return "frozen 1" in f.read().splitlines()
    return False


def not_cgroup_frozen(pids: Iterable[int]) -> list[int]:
    return [pid for pid in pids if cgroup_frozen(pid) is False]
