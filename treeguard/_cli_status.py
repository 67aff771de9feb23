"""``treeguard status``: is a paused tree (or the tree below a PID) frozen now, and how? Also
``treeguard tree``, which marks the processes a frozen cgroup holds.

Nothing is signalled or written: each process is read through /proc while a pidfd names it,
and only after its identity (pidfs inode, else start time) matched (see
:func:`treeguard._thaw.open_identity`); a PID that names another process now counts as
gone. How a process is held shows in /proc (proc(5), the kernel's cgroup-v2.rst and
cgroup-v1/freezer-subsystem.rst):

- ``signal``: every task in ``T`` (stopped by SIGSTOP);
- ``ptrace``: every task in ``t`` (tracing stop) and a tracer (``TracerPid``);
- ``cgroup``: the process's cgroup is frozen (``frozen 1`` in a v2 ``cgroup.events``,
  ``FROZEN`` in a v1 ``freezer.state``; both report the effective state, a frozen ancestor
  included). Its tasks show ``S`` or ``D``, so the cgroup is what tells.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._statefile import PauseState
    from .procfs import ProcFS

__all__ = [
    "StatusReport",
    "cmd_status",
    "cmd_tree",
    "in_frozen_cgroups",
    "pid_status",
    "state_status",
]

Identity = tuple[int, int, int]


@dataclass
class ProcessStatus:
    pid: int
    held: str | None  # "signal", "ptrace", "cgroup"; None: running; "gone"


@dataclass
class StatusReport:
    """What ``treeguard status`` prints (``to_json`` is its ``--json``, schema 1)."""

    frozen: bool = False
    backend: str | None = None
    since: float | None = None
    completed: bool = True
    cgroup: dict[str, Any] | None = None
    lease: dict[str, Any] | None = None
    processes: list[ProcessStatus] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.frozen:
            return "frozen"
        held = [p for p in self.processes if p.held not in (None, "gone")]
        if held or (self.cgroup is not None and self.cgroup["frozen"]):
            return "partly frozen"
        if self.processes and all(p.held == "gone" for p in self.processes):
            return "gone"
        return "running"

    def to_json(self) -> str:
        data: dict[str, Any] = {"schema": 1, "state": self.state, **asdict(self)}
        data["since"] = None if self.since is None else _iso(self.since)
        return json.dumps(data, indent=2)

    def render(self) -> str:
        alive = [p for p in self.processes if p.held != "gone"]
        held = sum(p.held not in (None, "gone") for p in alive)
        how = f" by {self.backend}" if self.backend else ""
        line = f"{self.state}{how}: {held} of {len(alive)} process(es) held"
        gone = len(self.processes) - len(alive)
        if gone:
            line += f", {gone} gone"
        lines = [line]
        if self.cgroup is not None:
            state = "frozen" if self.cgroup["frozen"] else "not frozen"
            if not self.cgroup["exists"]:
                state = "gone"
            lines.append(f"cgroup: {self.cgroup['path']} (v{self.cgroup['version']}, {state})")
        if self.since is not None:
            ago = max(0.0, time.time() - self.since)
            lines.append(f"since: {_iso(self.since)} ({ago:.0f} s ago)")
        if not self.completed:
            lines.append("the pause was cut short: `treeguard resume` undoes what it did")
        if self.lease is not None:
            running = "running" if self.lease["running"] else "gone (the lease ran out, or resumed)"
            line = f"lease: helper PID {self.lease['helper']} {running}"
            if self.lease["running"] and self.lease.get("ends") is not None:
                line += f"; it thaws the tree by {self.lease['ends']}"
            lines.append(line)
        return "\n".join(lines)


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _held(fs: ProcFS, pid: int, frozen_cgroup: bool) -> str | None:
    """How ``pid`` (named by a pidfd the caller holds) is held now; None if it runs."""
    if frozen_cgroup:
        return "cgroup"
    tids = fs.tids(pid)
    states = set()
    for tid in tids or ():
        stat = fs.stat(pid, tid)
        if stat is not None:
            states.add(stat.state)
    if states == {"T"}:
        return "signal"
    if states == {"t"}:
        status = fs.status(pid) or {}
        if status.get("TracerPid", "0").strip() not in ("", "0"):
            return "ptrace"
    return None


class _Cgroups:
    """Whether the cgroup of a process is frozen, each cgroup read once."""

    def __init__(self, fs: ProcFS) -> None:
        from ._mounts import hierarchies

        self.fs = fs
        self.v2, self.v1 = hierarchies(fs)
        self._seen: dict[tuple[int, str], bool] = {}

    def frozen(self, pid: int) -> bool:
        from ._mounts import cgroup_paths

        data = self.fs.read(f"{pid}/cgroup")
        if data is None:
            return False
        paths = cgroup_paths(data)
        for version, key, hierarchy in ((2, "", self.v2), (1, "freezer", self.v1)):
            rel = paths.get(key)
            if hierarchy is None or rel is None:
                continue
            directory = hierarchy.directory(rel)
            if directory is None or rel == "/":
                continue  # the root cgroup cannot be frozen
            if (version, directory) not in self._seen:
                self._seen[version, directory] = cgroup_frozen(version, directory)
            if self._seen[version, directory]:
                return True
        return False


def cgroup_frozen(version: int, path: str, inode: int | None = None) -> bool:
    """Whether the cgroup at ``path`` is frozen (False if gone, or another cgroup now)."""
    from ._backends._freezers import freezer_for
    from .errors import CgroupError

    freezer = freezer_for(version, path)
    try:
        if inode is not None and freezer.inode != inode:
            return False
        return freezer.is_frozen()
    except (CgroupError, OSError):
        return False


def _check(fs: ProcFS, identity: Identity, cgroups: _Cgroups | None) -> ProcessStatus:
    """The status of the process ``identity``; ``gone`` if its PID names another now."""
    from ._thaw import close_fd, open_identity

    pid, starttime, inode = identity
    fd = open_identity(pid, starttime, inode, fs)
    if fd < 0:
        return ProcessStatus(pid, "gone")
    try:
        held = _held(fs, pid, cgroups is not None and cgroups.frozen(pid))
        # Read while the pidfd names it: if it still exists now, the PID was its own
        # throughout (pidfd_send_signal(2) with signal 0 delivers nothing; EPERM, another
        # user's process, still says it exists).
        try:
            signal.pidfd_send_signal(fd, 0)
        except PermissionError:
            pass
    except ProcessLookupError:
        return ProcessStatus(pid, "gone")
    finally:
        close_fd(fd)
    return ProcessStatus(pid, held)


def in_frozen_cgroups(identities: Iterable[tuple[int, int]]) -> set[int]:
    """The PIDs of the processes ``(pid, starttime)`` held by their frozen cgroup now."""
    from .procfs import ProcFS

    cgroups = _Cgroups(ProcFS())
    return {
        pid
        for pid, starttime in identities
        if _check(cgroups.fs, (pid, starttime, 0), cgroups).held == "cgroup"
    }


def pid_status(pid: int) -> StatusReport:
    """The status of the tree rooted at ``pid`` (zombies and kernel threads left out:
    nothing of theirs can be frozen)."""
    from ._snapshot_read import snapshot
    from .procfs import ProcFS

    fs = ProcFS()
    snap = snapshot(pid, include_root=True, describe=False)  # held or not: states suffice
    cgroups = _Cgroups(fs)
    report = StatusReport()
    for record in snap:
        if record.state in ("Z", "X") or record.reason in ("zombie", "kernel thread"):
            continue
        report.processes.append(_check(fs, (record.pid, record.starttime, 0), cgroups))
    ways = sorted({p.held for p in report.processes if p.held not in (None, "gone")})
    report.backend = "+".join(ways) or None
    alive = [p for p in report.processes if p.held != "gone"]
    report.frozen = bool(alive) and all(p.held is not None for p in alive)
    return report


def state_status(state: PauseState, mtime: float) -> StatusReport:
    """The status of what a state file (read by ``read_checked``) records."""
    from ._token import Token
    from .procfs import ProcFS

    fs = ProcFS()
    token: Token | None = state.token
    report = StatusReport(since=mtime, completed=token is not None)
    identities: list[Identity] = list(state.stopped)
    cgroup: tuple[int, str, int] | None = state.cgroups[-1] if state.cgroups else None
    kind = "cgroup" if cgroup else "signal"
    if token is not None:
        from ._backends import _kind

        kind = _kind(token.backend, token.payload)  # what an ``auto`` pause chose
    report.backend = kind
    if token is not None and kind == "cgroup":
        payload = token.payload
        cgroup = (int(payload["version"]), str(payload["path"]), int(payload["inode"]))
    elif token is not None:
        records = token.payload.get("stopped", [])
        assert isinstance(records, list)
        identities = [(r[0], r[1], r[2] if len(r) > 2 else 0) for r in records]
    if cgroup is not None:
        version, path, inode = cgroup
        exists = os.path.isdir(path)
        frozen = exists and cgroup_frozen(version, path, inode)
        report.cgroup = {"version": version, "path": path, "exists": exists, "frozen": frozen}
        report.frozen = frozen
        from ._cgroupfs import procs_below

        pids = procs_below(path) if frozen else []
        report.processes = [ProcessStatus(p, "cgroup") for p in pids]
    else:
        report.processes = [_check(fs, identity, None) for identity in identities]
        alive = [p for p in report.processes if p.held != "gone"]
        report.frozen = bool(alive) and all(p.held == "signal" for p in alive)
    if state.helper is not None:
        running = _helper_running(fs, state.helper)
        ends = None if state.lease_ends is None else _iso(state.lease_ends)
        report.lease = {"helper": state.helper[0], "running": running, "ends": ends}
    return report


def _helper_running(fs: ProcFS, identity: Identity) -> bool:
    from ._thaw import close_fd, open_identity
    from .procfs import HELPER_COMM

    fd = open_identity(*identity, fs)
    if fd < 0:
        return False
    try:
        stat = fs.stat(identity[0])
        return stat is not None and stat.comm == HELPER_COMM and stat.state != "Z"
    finally:
        close_fd(fd)


# -- the subcommands ---------------------------------------------------------------------


def cmd_tree(args: argparse.Namespace) -> int:
    from ._snapshot_read import snapshot

    snap = snapshot(args.pid, include_root=True, pss=args.pss)
    # JSON escapes every control character itself; render() escapes names (see printable).
    if args.json:
        print(snap.to_json(indent=2))
        return 0
    # A frozen cgroup's tasks show S or D, which reads as running: say what holds them.
    # render() draws one line per record first, in order (names have no newline left).
    lines = snap.render().split("\n")
    live = [r.identity for r in snap.records if r.reason not in ("zombie", "kernel thread")]
    frozen = in_frozen_cgroups(live)
    for i, record in enumerate(snap.records):
        if record.pid in frozen:
            lines[i] += "  frozen by its cgroup"
    unnoticed = snap.unnoticed_by()
    lines.append(
        "a freeze it would not notice: " + "; ".join(f"{b} ({why})" for b, why in unnoticed.items())
    )
    print("\n".join(lines))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.state is not None:
        from ._statefile import parse_state, read_checked

        data, info = read_checked(args.state)
        report = state_status(parse_state(data), info.st_mtime)
    else:
        report = pid_status(args.pid)
    print(report.to_json() if args.json else report.render())
    return 0 if report.frozen else 8  # see the EPILOG of treeguard._cli
