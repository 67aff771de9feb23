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

Which hierarchy ``Cgroup.create()`` uses by default is decided here too (:func:`choose`),
so that ``treeguard doctor`` reports the very choice a create would make: v2 when it is
mounted, this process may make a cgroup there and the kernel has the v2 freezer, else the
v1 freezer under the same rule.
"""

from __future__ import annotations

import os
import re

from ._mounts import Discovery, Hierarchy
from .errors import CgroupUnavailableError

__all__ = [
    "SYSTEMD_SCOPE",
    "choose",
    "creatable",
    "no_v2_freezer",
    "parent_for",
    "refusal",
    "usable",
]

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
    elif not os.path.isdir(parent):
        raise CgroupUnavailableError(
            parent, "no such directory: pass parent= an existing cgroup directory"
        )
    problem = refusal(hierarchy, parent, own)
    if problem is not None:
        hint = "remount it read-write or run where cgroups are delegated"
        raise CgroupUnavailableError(
            parent, f"{problem}: {hint if hierarchy.read_only else _WHAT_TO_DO}"
        )
    return parent


#: The release that brought ``cgroup.freeze`` (cgroup-v2.rst; Linux 5.2).
V2_FREEZER = (5, 2)


def _release(text: str) -> tuple[int, int]:
    numbers = [int(n) for n in re.findall(r"\d+", text)[:2]]
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def no_v2_freezer(directory: str) -> str | None:
    """Why a v2 cgroup made in ``directory`` would have no ``cgroup.freeze``; ``None`` if
    it would have one. Nothing is created to find out.

    Every non-root v2 cgroup has ``cgroup.freeze`` on Linux 5.2+ and ``cgroup.events``
    from 4.5, the root cgroup neither. So a non-root ``directory`` answers for itself; for
    the root, a child cgroup already there answers, and without one the kernel's release.
    """
    if os.path.isfile(os.path.join(directory, "cgroup.freeze")):
        return None
    missing = "this kernel has no cgroup v2 freezer (cgroup.freeze needs Linux 5.2+)"
    if os.path.isfile(os.path.join(directory, "cgroup.events")):
        return missing  # a non-root cgroup without it
    try:
        with os.scandir(directory) as entries:
            child = next((e.path for e in entries if e.is_dir(follow_symlinks=False)), None)
    except OSError:
        child = None
    if child is not None:
        return None if os.path.isfile(os.path.join(child, "cgroup.freeze")) else missing
    release = os.uname().release
    return None if _release(release) >= V2_FREEZER else f"{missing}, and this is {release}"


def usable(found: Discovery, hierarchy: Hierarchy, parent: str | None = None) -> str:
    """The directory ``Cgroup.create(version=hierarchy.version, parent=parent)`` makes its
    cgroup in: :func:`parent_for`, and for v2 a kernel with the v2 freezer.

    :raises CgroupUnavailableError: if it cannot (the message says why).
    """
    directory = parent_for(found, hierarchy, parent)
    if hierarchy.version == 2:
        missing = no_v2_freezer(directory)
        if missing is not None:
            instead = "pass version=1" if found.freezer is not None else "mount the v1 freezer"
            raise CgroupUnavailableError(directory, f"{missing}: {instead} on such a kernel")
    return directory


def creatable(found: Discovery, hierarchy: Hierarchy) -> tuple[str | None, str | None]:
    """``(parent, None)`` where ``Cgroup.create(version=hierarchy.version)`` would make its
    cgroup, or ``(None, why)`` if it cannot (for ``treeguard doctor``)."""
    try:
        return usable(found, hierarchy), None
    except CgroupUnavailableError as err:
        return None, str(err)


def _within(path: str, hierarchy: Hierarchy) -> bool:
    mount = hierarchy.mountpoint.rstrip("/")
    return path == mount or path.startswith(mount + "/")


def choose(
    found: Discovery, version: int | None = None, parent: str | None = None
) -> tuple[Hierarchy, str]:
    """The hierarchy and directory ``Cgroup.create(version=, parent=)`` uses.

    With ``version=None``: v2 when it is usable here (mounted, this process may make a
    cgroup in it, the kernel has its freezer), else the v1 freezer when usable; with
    ``parent=``, only the hierarchy holding ``parent``.

    :raises CgroupUnavailableError: if none is usable, naming why each was refused.
    """
    mounted = {2: found.v2, 1: found.freezer}
    names = {2: "cgroup v2", 1: "the cgroup v1 freezer controller"}
    wanted = [version] if version is not None else [2, 1]
    candidates = [h for v in wanted if (h := mounted[v]) is not None]
    if not candidates:
        if version is None:
            what = "cgroup v2 and the cgroup v1 freezer controller are not mounted: mount one"
        else:
            other = 1 if version == 2 else 2
            what = f"{names[version]} is not mounted: mount it" + (
                f" or pass version={other}" if mounted[other] is not None else ""
            )
        how = {
            None: "mount -t cgroup2 none DIR, or mount -t cgroup -o freezer none DIR",
            2: "mount -t cgroup2 none DIR",
            1: "mount -t cgroup -o freezer none DIR",
        }[version]
        raise CgroupUnavailableError(
            "/proc/self/mountinfo", f"{what} ({how}), or run where cgroups are delegated"
        )
    if parent is not None:
        parent = os.path.abspath(parent)
        holding = [h for h in candidates if _within(parent, h)]
        if not holding:
            where = " or ".join(f"v{h.version} at {h.mountpoint}" for h in candidates)
            raise CgroupUnavailableError(
                parent, f"not in the cgroup hierarchy mounted here ({where})"
            )
        candidates = holding
    refused: list[CgroupUnavailableError] = []
    for hierarchy in candidates:
        try:
            return hierarchy, usable(found, hierarchy, parent)
        except CgroupUnavailableError as err:
            refused.append(err)
    if len(refused) == 1:
        raise refused[0]
    reasons = "; ".join(f"v{h.version}: {err}" for h, err in zip(candidates, refused, strict=True))
    raise CgroupUnavailableError(refused[0].path, f"no hierarchy is usable here ({reasons})")
