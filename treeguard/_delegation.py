"""Where this process may make a cgroup of its own: below its own cgroup, when it may write
there (a delegated subtree, or any cgroup for root), never anywhere else by default.

A systemd host keeps the root of the hierarchy for PID 1 and hands a user a subtree with
``Delegate=yes`` (systemd.resource-control(5)): the unit's directory and its
``cgroup.procs``, ``cgroup.threads`` and ``cgroup.subtree_control`` belong to the user.
Moving a process between two cgroups needs write access to the ``cgroup.procs`` of their
closest common ancestor (cgroup-v2.rst, "Delegation Containment"); a cgroup made below the
caller's own has the caller's cgroup as that ancestor, so the caller's ``cgroup.procs``
must be writable too, not only its directory.

The caller stays where it is. The new cgroup needs no controller (``cgroup.freeze`` is a
core file of every non-root v2 cgroup), so nothing is ever written to the parent's
``cgroup.subtree_control``, and the "no internal processes" rule (a non-root cgroup that
distributes a domain controller to its children may hold no process itself) is never met:
a cgroup that holds processes may have child cgroups as long as it enables no controller
for them. (runc and systemd move their own processes into a leaf only because they enable
controllers; freezing alone does not.) The root cgroup is the parent only for a caller
that is in it (root on a host without a service manager, or a hybrid host's v2 tree).
"""

from __future__ import annotations

import os

from ._mounts import Discovery, Hierarchy
from .errors import CgroupUnavailableError

__all__ = ["SYSTEMD_SCOPE", "creatable", "parent_for", "refusal"]

#: What gives an unprivileged user a cgroup of their own on a systemd host.
SYSTEMD_SCOPE = "systemd-run --user --scope -p Delegate=yes -- CMD"

_WHAT_TO_DO = (
    "run as root, or in a delegated cgroup (for an unprivileged user on a systemd host: "
    f"`{SYSTEMD_SCOPE}`), or pass parent= a cgroup directory this user may write"
)


def refusal(hierarchy: Hierarchy, path: str, own: str | None) -> str | None:
    """Why this process may not make a cgroup in the directory ``path`` and move its own
    children into it; ``None`` if it may.

    :param own: the directory of the caller's own cgroup in ``hierarchy`` (if visible).
    """
    if hierarchy.read_only:
        return (
            f"the cgroup hierarchy at {hierarchy.mountpoint} is mounted read-only here (a "
            "container without cgroup delegation?)"
        )
    if not os.path.isdir(path):
        return "no such cgroup directory"
    uid = os.geteuid()
    if not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
        return f"uid {uid} may not create a cgroup in it"
    if hierarchy.version == 2 and own is not None:
        ancestor = os.path.commonpath([own, path])
        procs = os.path.join(ancestor, "cgroup.procs")
        if not os.access(procs, os.W_OK, effective_ids=True):
            return (
                f"uid {uid} may not write {procs}, which moving a process from its cgroup "
                "into the new one needs (cgroup-v2.rst, Delegation Containment)"
            )
    return None


def parent_for(found: Discovery, hierarchy: Hierarchy, parent: str | None = None) -> str:
    """The directory :meth:`treeguard.cgroup.Cgroup.create` makes its cgroup in: ``parent``
    if given, else the caller's own cgroup.

    :raises CgroupUnavailableError: if this process may not create a cgroup there (the
        message says what to do).
    """
    own = found.own_directory(hierarchy.version)
    if parent is None:
        if own is None:
            raise CgroupUnavailableError(
                hierarchy.mountpoint,
                "this process's own cgroup is not visible in this mount (another cgroup "
                f"namespace?), and treeguard makes cgroups only below it: {_WHAT_TO_DO}",
            )
        parent = own
    problem = refusal(hierarchy, parent, own)
    if problem is not None:
        hint = "remount it read-write or run where cgroups are delegated"
        raise CgroupUnavailableError(
            parent, f"{problem}: {hint if hierarchy.read_only else _WHAT_TO_DO}"
        )
    return parent


def creatable(found: Discovery, hierarchy: Hierarchy) -> tuple[str | None, str | None]:
    """``(parent, None)`` where :meth:`Cgroup.create` would make its cgroup, or ``(None,
    why)`` if it cannot (for ``treeguard doctor``)."""
    try:
        return parent_for(found, hierarchy), None
    except CgroupUnavailableError as err:
        return None, str(err)
