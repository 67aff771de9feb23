"""Ways of freezing, behind the one interface of :class:`Backend`."""

from __future__ import annotations

import errno
import os

from .._drive import run_sync
from .._mounts import discover
from .._thaw import thaw_identities
from ..errors import FreezeError, FreezePermissionError, InvalidArgumentError, TokenError
from ..procfs import ProcFS
from ._base import Backend, Journal, Memo, Plan
from ._freezers import thaw_cgroup  # (a thaw imports nothing: its table may be full)
from ._relays import Watchers
from ._signal import SignalBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "Journal",
    "Memo",
    "Plan",
    "create",
    "thaw_described",
    "validate_described",
]

#: ``signal``: SIGSTOP/SIGCONT; ``cgroup``: the kernel freezer of the cgroup holding the
#: tree; ``auto``: cgroup for a tree alone in a treeguard-made cgroup, else signal;
#: ``ptrace``: every thread seized and held in a ptrace-stop (invisible to the tree).
BACKENDS = ("signal", "cgroup", "auto", "ptrace")

#: Linux's PID_MAX_LIMIT (include/linux/threads.h).
_PID_MAX = 4 * 1024 * 1024
#: starttime (proc(5): unsigned long long) and a pidfs inode number are 64-bit.
_U64_MAX = 2**64 - 1
_SIGNAL_KEYS = frozenset({"stopped", "already_stopped"})
#: Members a signal payload may lack: ``relays`` (the job-control relays above the tree,
#: resumed after it); a token written without it thaws the tree alone.
_SIGNAL_OPTIONAL = frozenset({"relays"})
_CGROUP_KEYS = frozenset({"version", "path", "inode", "was_frozen"})


def create(name: str, plan: Plan) -> Backend:
    """The backend called ``name``, ready to freeze ``plan``."""
    # The other backends' modules (the cgroup freezers, ptrace through ctypes, the kernel's
    # process events) are imported by the first freeze that uses one: a few milliseconds
    # that a supervisor using signals never spends.
    if name == "signal":
        return SignalBackend(plan)
    if name == "cgroup":
        from ._cgroup import CgroupBackend

        return CgroupBackend(plan)
    if name == "auto":
        from ._auto import AutoBackend

        return AutoBackend(plan)
    if name == "ptrace":
        from ._ptrace import PtraceBackend

        return PtraceBackend(plan)
    raise InvalidArgumentError("backend", f"must be one of {', '.join(BACKENDS)}, not {name!r}")


def _kind(name: str, payload: dict[str, object]) -> str:
    # An ``auto`` freeze is described by the backend that ran; its payload says which.
    if name == "auto" and isinstance(payload, dict):
        return "cgroup" if "version" in payload else "signal"
    return name


def validate_described(name: str, payload: dict[str, object]) -> None:
    """Check that ``payload`` is exactly what backend ``name``'s ``describe()`` produces.

    :raises TokenError: if it is not (unknown keys, wrong types, PIDs out of range,
        a cgroup path that is not a cgroup directory of the hierarchy it names).
    """
    if not isinstance(payload, dict):
        raise TokenError(f"payload must be an object, not {type(payload).__name__}")
    kind = _kind(name, payload)
    if kind == "ptrace":
        raise TokenError("a ptrace freeze is never described in a token (its hold cannot move)")
    if kind == "signal":
        _validate_signal(payload)
    elif kind == "cgroup":
        _validate_cgroup(payload)
    else:
        raise TokenError(f"unknown backend {name!r} (this treeguard knows {BACKENDS})")


def _validate_signal(payload: dict[str, object]) -> None:
    if set(payload) - _SIGNAL_OPTIONAL != _SIGNAL_KEYS:
        raise TokenError(
            f"a signal payload has the keys {sorted(_SIGNAL_KEYS)}, "
            f"and may have {sorted(_SIGNAL_OPTIONAL)}"
        )
    seen: set[int] = set()
    for key in sorted(set(payload)):
        records = payload[key]
        if not isinstance(records, list):
            raise TokenError(f"payload[{key!r}] must be a list")
        for i, record in enumerate(records):
            where = f"payload[{key!r}][{i}]"
            if not isinstance(record, list | tuple) or len(record) not in (2, 3):
                raise TokenError(f"{where} must be [pid, starttime] or [pid, starttime, inode]")
            for value in record:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TokenError(f"{where} must hold integers, not {value!r}")
            pid = record[0]
            if not 1 <= pid <= _PID_MAX:
                raise TokenError(f"{where}: PID {pid} is not between 1 and {_PID_MAX}")
            for name, value in zip(("starttime", "inode"), record[1:], strict=False):
                if not 0 <= value <= _U64_MAX:
                    raise TokenError(f"{where}: {name} {value} is not an unsigned 64-bit number")
            if pid in seen:
                raise TokenError(f"PID {pid} appears twice in the payload")
            seen.add(pid)


def _validate_cgroup(payload: dict[str, object]) -> None:
    if set(payload) != _CGROUP_KEYS:
        raise TokenError(f"a cgroup payload has exactly the keys {sorted(_CGROUP_KEYS)}")
    version, path, was_frozen = payload["version"], payload["path"], payload["was_frozen"]
    if isinstance(version, bool) or version not in (1, 2):
        raise TokenError(f"payload['version'] must be 1 or 2, not {version!r}")
    if not isinstance(was_frozen, bool):
        raise TokenError("payload['was_frozen'] must be true or false")
    inode = payload["inode"]
    if isinstance(inode, bool) or not isinstance(inode, int) or inode < 0:
        raise TokenError(f"payload['inode'] must be a non-negative integer, not {inode!r}")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise TokenError(f"payload['path'] must be an absolute path, not {path!r}")
    if os.path.normpath(path) != path:
        raise TokenError(f"payload['path'] must be a normalized path, not {path!r}")

    found = discover()
    hierarchy = found.v2 if version == 2 else found.freezer
    mount = None if hierarchy is None else hierarchy.mountpoint.rstrip("/")
    # Only a directory strictly below the mounted hierarchy is a cgroup that can be frozen;
    # anything else would make the thaw write to a file that is no cgroup's.
    if mount is None or not path.startswith(mount + "/"):
        raise TokenError(f"payload['path'] {path!r} is not below a cgroup v{version} mount")


def thaw_described(name: str, payload: dict[str, object]) -> int:
    """Thaw, from any process, a freeze that ``Backend.describe()`` described.

    The payload must have been validated by the caller (see :func:`validate_described`).
    A signal payload's job-control relays (parents above the tree, told of its stop) are
    resumed after the tree, each only if it is stopped and still the process recorded.

    :returns: how many processes (or cgroups) were thawed (the relays are not counted).
    """
    kind = _kind(name, payload)
    if kind == "signal":
        stopped = payload["stopped"]
        assert isinstance(stopped, list)
        errors: dict[int, int] = {}
        resumed, failed = thaw_identities((tuple(int(v) for v in r) for r in stopped), None, errors)
        relays = payload.get("relays")
        if relays:  # after the tree, as the freezing guard's own thaw does
            assert isinstance(relays, list)
            run_sync(Watchers.described(relays, ProcFS()).resume())
        short = [pid for pid in failed if errors[pid] in (errno.EMFILE, errno.ENFILE)]
        if short:  # not the user's rights: this process's descriptor table is full
            raise FreezeError(
                f"could not thaw PID(s) {short}: no file descriptor to be had "
                f"({os.strerror(errno.EMFILE)}); the others were resumed: close some "
                "descriptors and thaw again (a thaw is idempotent)"
            )
        if failed:
            raise FreezePermissionError(failed, reason="they may not be signalled by this user")
        return resumed
    if kind == "cgroup":
        version, path, inode = payload["version"], payload["path"], payload["inode"]
        assert isinstance(version, int)
        assert isinstance(path, str)
        assert isinstance(inode, int)
        if payload["was_frozen"]:
            return 0  # frozen before the freeze: it stays frozen, as the guard would leave it
        # A directory whose inode changed is another cgroup, made again under that name.
        return thaw_cgroup(version, path, inode)
    raise InvalidArgumentError("backend", f"cannot thaw a {name!r} freeze")
