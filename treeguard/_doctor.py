"""What this machine and this user can do (``treeguard doctor``): which backends work here,
and why the others do not.

Everything is read, nothing is frozen or signalled: the kernel's release, whether pidfds
exist and live on pidfs (the identity a freeze checks before every signal), the
``children`` files, the cgroup layout and where :meth:`treeguard.cgroup.Cgroup.create`
would make a cgroup (the rule of :mod:`._delegation`), Yama's ptrace scope and
CAP_SYS_PTRACE (the rule of :func:`treeguard._ptrace.refusal`). Each answer comes from the
function the backends use, so the report cannot disagree with what a freeze would do.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _ptrace
from ._delegation import choose, creatable
from ._mounts import Discovery, discover, layout
from ._thaw import has_pidfs
from .errors import CgroupUnavailableError
from .procfs import ProcFS

__all__ = ["Diagnosis", "HierarchyFacts", "diagnose"]

#: The identity guarantee each kind of kernel gives a process met by a freeze.
IDENTITY = {
    "pidfs": "pidfs inode (Linux 6.9+): unique to one process for the life of the system",
    "starttime": "PID and start time: two processes started in the same clock tick under "
    "a reused PID could be taken for each other",
}


@dataclass
class HierarchyFacts:
    """One mounted hierarchy (v2, or the v1 freezer) and what this user may do in it."""

    mountpoint: str
    read_only: bool
    own: str | None  # the caller's cgroup directory
    create_in: str | None  # where Cgroup.create() would make its cgroup
    why_not: str | None  # why it cannot, if create_in is None


@dataclass
class Backend:
    available: bool
    note: str


@dataclass
class Diagnosis:
    """What ``treeguard doctor`` prints (``to_dict`` is its ``--json``, schema 1)."""

    kernel: str
    identity: str  # "pidfs" or "starttime"
    pidfd: bool
    children_files: bool
    uid: int
    user_namespace: bool
    cap_sys_ptrace: bool
    yama_scope: int | None
    layout: str  # "v2", "v1", "hybrid", "none"
    v2: HierarchyFacts | None
    v1_freezer: HierarchyFacts | None
    create_version: int | None  # the hierarchy Cgroup.create() uses by default; None: refused
    backends: dict[str, Backend] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": 1, **asdict(self)}

    def render(self) -> str:
        """The human report: facts first, then one line per backend."""
        yama = (
            "not in this kernel" if self.yama_scope is None else f"ptrace_scope {self.yama_scope}"
        )
        lines = [
            f"kernel      {self.kernel}",
            f"identity    {IDENTITY[self.identity]}",
            f"pidfd       {'yes' if self.pidfd else 'no (Linux 5.3+ has pidfd_open)'}",
            "children    "
            + (
                "yes (/proc/PID/task/TID/children)"
                if self.children_files
                else "no (CONFIG_PROC_CHILDREN unset): trees are found by scanning every "
                "/proc/PID/stat"
            ),
            f"user        uid {self.uid}"
            + (" (root)" if self.uid == 0 else "")
            + (", in a user namespace" if self.user_namespace else "")
            + f", CAP_SYS_PTRACE {'yes' if self.cap_sys_ptrace else 'no'}",
            f"yama        {yama}",
            f"cgroups     {self.layout}" + ("" if self.layout != "none" else ": nothing mounted"),
        ]
        for name, facts in (("v2", self.v2), ("v1 freezer", self.v1_freezer)):
            if facts is None:
                continue
            ro = ", read-only" if facts.read_only else ""
            lines.append(f"  {name:<10} at {facts.mountpoint}{ro}; own cgroup {facts.own or '?'}")
            if facts.create_in is not None:
                where = " (the root cgroup)" if facts.create_in == facts.mountpoint else ""
                lines.append(
                    f"  {'':<10} Cgroup.create() makes cgroups in {facts.create_in}{where}"
                )
            else:
                lines.append(f"  {'':<10} Cgroup.create() cannot: {facts.why_not}")
        lines.append("backends")
        for name, backend in self.backends.items():
            mark = "yes" if backend.available else "no "
            lines.append(f"  {name:<7} {mark}  {backend.note}")
        return "\n".join(lines)


def _user_namespace() -> bool:
    """Whether this process is in a user namespace other than the initial one (whose
    uid_map maps all 2**32-1 IDs onto themselves, user_namespaces(7))."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _pidfd() -> bool:
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


def diagnose(fs: ProcFS | None = None) -> Diagnosis:
    """Look at this machine and this process's privileges; nothing is changed."""
    fs = fs or ProcFS()
    found = discover(fs)
    facts: dict[int, HierarchyFacts | None] = {}
    for version, hierarchy in ((2, found.v2), (1, found.freezer)):
        if hierarchy is None:
            facts[version] = None
            continue
        create_in, why_not = creatable(found, hierarchy)
        facts[version] = HierarchyFacts(
            hierarchy.mountpoint,
            hierarchy.read_only,
            found.own_directory(version),
            create_in,
            why_not,
        )
    pidfd = _pidfd()
    diagnosis = Diagnosis(
        kernel=os.uname().release,
        identity="pidfs" if pidfd and has_pidfs() else "starttime",
        pidfd=pidfd,
        children_files=fs.has_children_files(),
        uid=os.geteuid(),
        user_namespace=_user_namespace(),
        cap_sys_ptrace=_ptrace.has_cap_sys_ptrace(),
        yama_scope=_ptrace.yama_scope(),
        layout=layout(fs),
        v2=facts[2],
        v1_freezer=facts[1],
        create_version=None,
    )
    cgroup = _cgroup(found, diagnosis)
    diagnosis.backends = _backends(diagnosis, cgroup)
    return diagnosis


def _cgroup(found: Discovery, d: Diagnosis) -> Backend:
    """The cgroup backend as Cgroup.create() (version=None) would find it: the same
    choice (:func:`._delegation.choose`), recorded in ``d.create_version``."""
    try:
        hierarchy, where = choose(found)
    except CgroupUnavailableError as err:
        return Backend(False, str(err))
    d.create_version = hierarchy.version
    return Backend(
        True,
        f"the kernel's v{hierarchy.version} freezer, for a tree spawned into "
        f"Cgroup.create()'s cgroup (made in {where})",
    )


def _backends(d: Diagnosis, cgroup: Backend) -> dict[str, Backend]:
    # Root's capabilities reach only as far as its user namespace (user_namespaces(7)).
    if d.uid != 0:
        whose = f"processes of uid {d.uid}"
    else:
        whose = "any process of this user namespace" if d.user_namespace else "any process"
    signal = Backend(True, f"SIGSTOP/SIGCONT, for {whose}")
    why_ptrace = _ptrace.refusal(descendants=True)
    if why_ptrace is not None:
        ptrace = Backend(False, why_ptrace)
    elif d.cap_sys_ptrace:
        ptrace = Backend(True, f"seizes every thread; for {whose} (CAP_SYS_PTRACE)")
    elif d.yama_scope == 1:
        ptrace = Backend(True, "seizes every thread; for this process's own descendants")
    else:
        ptrace = Backend(True, f"seizes every thread; for {whose}")
    order = [
        *(["cgroup for a tree alone in a cgroup made by Cgroup.create()"] * cgroup.available),
        *(["ptrace for this process's own tree (not tokens, not leases)"] * ptrace.available),
        "signal otherwise",
    ]
    return {
        "signal": signal,
        "ptrace": ptrace,
        "cgroup": cgroup,
        "auto": Backend(True, "; ".join(order)),
    }
