"""Where the cgroup hierarchies are mounted, and which cgroups a process is in.

Found in ``/proc/self/mountinfo`` (never assumed at ``/sys/fs/cgroup``) and
``/proc/PID/cgroup``: pure v2, pure v1 and hybrid machines alike. The mount table is kept
between freezes, and read again only when the kernel says it changed (POLLPRI on the open
mountinfo) or in another mount namespace. Below the backends and the public
:mod:`treeguard.cgroup`, which both use it.
"""

from __future__ import annotations

import functools
import os
import select
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .procfs import ProcFS

__all__ = [
    "Discovery",
    "Hierarchy",
    "cgroup_paths",
    "discover",
    "hierarchies",
    "layout",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "version_of",
]


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """A mounted cgroup hierarchy: v2, or the v1 one with the freezer controller.

    ``root`` is the cgroup the mount shows at ``mountpoint`` (``/`` unless it is a bind
    mount or was mounted inside a cgroup namespace).
    """

    version: int
    mountpoint: str
    root: str = "/"
    read_only: bool = False

    def directory(self, cgroup: str) -> str | None:
        """The directory of ``cgroup`` (a path as in ``/proc/PID/cgroup``), or ``None`` if
        this mount does not show it."""
        root = self.root.rstrip("/")
        if cgroup != root and not cgroup.startswith(root + "/"):
            return None
        rel = cgroup[len(root) :].strip("/")
        return os.path.join(self.mountpoint, rel) if rel else self.mountpoint


@dataclass(frozen=True, slots=True)
class Discovery:
    """What this machine offers: the v2 hierarchy, the v1 freezer, the caller's cgroups."""

    v2: Hierarchy | None
    freezer: Hierarchy | None
    own: dict[str, str] = field(default_factory=dict)

    def own_directory(self, version: int) -> str | None:
        """The directory of the caller's own cgroup in the v2 or v1 freezer hierarchy."""
        hierarchy = self.v2 if version == 2 else self.freezer
        cgroup = self.own.get("" if version == 2 else "freezer")
        if hierarchy is None or cgroup is None:
            return None
        return hierarchy.directory(cgroup)


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo (fs/proc_namespace.c).
    if "\\" not in field_:
        return field_
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Hierarchy]:
    """The cgroup v2 and v1-freezer mounts listed in ``/proc/PID/mountinfo`` text (proc(5)):
    ``id parent major:minor root mountpoint options [optional...] - fstype source super``.
    """
    found: list[Hierarchy] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(after) < 1:
            continue
        fstype = after[0]
        supers = after[2].split(",") if len(after) > 2 else []
        if fstype == "cgroup2":
            version = 2
        elif fstype == "cgroup" and "freezer" in supers:
            version = 1
        else:
            continue
        found.append(
            Hierarchy(
                version=version,
                mountpoint=_unescape(fields[4]),
                root=_unescape(fields[3]),
                read_only="ro" in fields[5].split(","),
            )
        )
    return found


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` as ``{controller: path}``; the v2 entry's key is ``""``.

    Lines are ``hierarchy-ID:controller-list:path`` (cgroups(7)); a v1 hierarchy with
    several controllers gives each of them the same path.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            out[""] = path
        else:
            for name in controllers.split(","):
                if name:
                    out[name] = path
    return out


def _pick(mounts: list[Hierarchy], version: int) -> Hierarchy | None:
    candidates = [m for m in mounts if m.version == version]
    # Prefer a mount of the whole hierarchy, then a writable one.
    candidates.sort(key=lambda m: (m.root != "/", m.read_only))
    return candidates[0] if candidates else None


def discover(fs: ProcFS | None = None) -> Discovery:
    """Find the cgroup hierarchies and the caller's cgroups.

    :param fs: where /proc is (tests point it at a synthetic tree).
    """
    fs = fs or ProcFS()
    v2, freezer = hierarchies(fs)
    own = fs.read("self/cgroup")
    return Discovery(v2=v2, freezer=freezer, own=dict(cgroup_paths(own or b"")))


def hierarchies(fs: ProcFS) -> tuple[Hierarchy | None, Hierarchy | None]:
    """The cgroup v2 and v1-freezer hierarchies of :func:`discover`, without the caller's
    own cgroups (one read less)."""
    if fs.root == "/proc":
        return _hierarchies(_MOUNTS.read())
    return _hierarchies(fs.read("self/mountinfo", 65536) or b"")


def layout(fs: ProcFS | None = None) -> str:
    """Which cgroup filesystems this mount namespace shows: ``"v2"``, ``"v1"``, ``"hybrid"``
    (v1 controllers and v2 side by side) or ``"none"``; any v1 controller counts, not only
    the freezer."""
    fs = fs or ProcFS()
    data = _MOUNTS.read() if fs.root == "/proc" else fs.read("self/mountinfo", 65536) or b""
    types = set()
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        after = line.partition(" - ")[2].split()
        if after and after[0] in ("cgroup", "cgroup2"):
            types.add(after[0])
    if types == {"cgroup", "cgroup2"}:
        return "hybrid"
    return "v2" if "cgroup2" in types else "v1" if "cgroup" in types else "none"


class _MountTable:
    """``/proc/self/mountinfo``, held open and read again only when it changed.

    The kernel raises POLLPRI on an open mountinfo when a mount is added, removed or
    changed in the mount namespace it was opened in (proc(5); remounts too), so one poll(2)
    says whether the bytes read last still stand. A process that moved to another mount
    namespace (its ``/proc/self/ns/mnt`` differs) opens the file anew, and so does a
    forked child.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._ns: tuple[int, int] = (0, 0)
        self._data = b""
        os.register_at_fork(after_in_child=self._after_fork)

    def read(self) -> bytes:
        with self._lock:
            st = os.stat("/proc/self/ns/mnt")
            ns = (st.st_dev, st.st_ino)
            if self._fd >= 0 and ns == self._ns:
                changed = select.poll()
                changed.register(self._fd, select.POLLPRI)
                if not changed.poll(0):
                    return self._data
            else:
                self._close()
                self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
                self._ns = ns
            chunks: list[bytes] = []
            offset = 0
            while chunk := os.pread(self._fd, 65536, offset):
                chunks.append(chunk)
                offset += len(chunk)
            self._data = b"".join(chunks)
            return self._data

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._close()  # the child's own copy: the open file is shared with the parent


_MOUNTS = _MountTable()


# Both parses are cached by the file's bytes, so they are never stale: a guard reads the
# caller's /proc/PID/cgroup files on every freeze (mountinfo only when it changed, see
# _MountTable) and parses them only when their bytes changed.


@functools.lru_cache(maxsize=8)
def _hierarchies(mountinfo: bytes) -> tuple[Hierarchy | None, Hierarchy | None]:
    mounts = parse_mountinfo(mountinfo.decode("utf-8", "surrogateescape"))
    return _pick(mounts, 2), _pick(mounts, 1)


@functools.lru_cache(maxsize=64)
def cgroup_paths(data: bytes) -> Mapping[str, str]:
    """:func:`parse_proc_cgroup` of a ``/proc/PID/cgroup`` file's bytes (read-only; the
    processes of a tree mostly share one content, parsed once)."""
    return MappingProxyType(parse_proc_cgroup(data.decode("utf-8", "surrogateescape")))


# -- a cgroup of one's own ---------------------------------------------------------------


def version_of(path: str) -> int | None:
    if os.path.isfile(os.path.join(path, "cgroup.freeze")):
        return 2
    if os.path.isfile(os.path.join(path, "freezer.state")):
        return 1
    return None
