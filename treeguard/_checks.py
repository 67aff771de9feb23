"""Every rule about arguments, in one place: what a PID, a process, a number of seconds and
the freezing options must be. Each raises one clear error and touches no process.
"""

from __future__ import annotations

import math
import os

from .errors import FreezeError, InvalidArgumentError, NoSuchProcessError
from .procfs import ProcFS

__all__ = [
    "MAX_SECONDS",
    "PID_MAX_LIMIT",
    "as_pid",
    "check_options",
    "check_pid",
    "check_proc",
    "check_process",
    "check_seconds",
]

#: Linux's PID_MAX_LIMIT: no PID is larger on any configuration.
PID_MAX_LIMIT = 4 * 1024 * 1024


def check_pid(name: str, value: object) -> int:
    """``value`` as a PID, or :class:`InvalidArgumentError` saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"a PID must be an int, not {type(value).__name__}")
    if not 0 < value <= PID_MAX_LIMIT:
        raise InvalidArgumentError(name, f"a PID is between 1 and {PID_MAX_LIMIT}, not {value}")
    return value


#: The longest timeout or lease accepted, in seconds (a year): far beyond any freeze, and
#: small enough for every clock and poll(2) it is handed to.
MAX_SECONDS = 365 * 24 * 3600.0


def check_seconds(name: str, value: object) -> float:
    """``value`` as a positive number of seconds up to :data:`MAX_SECONDS`, or
    :class:`InvalidArgumentError` saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(name, f"must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not (seconds > 0 and math.isfinite(seconds)) or seconds > MAX_SECONDS:
        raise InvalidArgumentError(
            name, f"must be a positive number of seconds up to {MAX_SECONDS:g}, not {value!r}"
        )
    return seconds


def check_process(name: str, pid: int, fs: ProcFS, *, zombie_ok: bool = True) -> None:
    """Raise unless ``pid`` names a process (not a thread) visible here.

    :raises NoSuchProcessError: if there is no such process (or, unless ``zombie_ok``, only
        its zombie: it will never run again).
    :raises InvalidArgumentError: if ``pid`` is a thread of another process.
    """
    status = fs.status(pid)
    if status is None or (not zombie_ok and status.get("State", "")[:1] in ("Z", "X")):
        raise NoSuchProcessError(pid)
    tgid = status.get("Tgid", str(pid))
    if tgid != str(pid):
        raise InvalidArgumentError(
            name, f"{pid} is a thread of process {tgid}, not a process: give {tgid}"
        )


def check_proc(fs: ProcFS) -> None:
    """Raise unless ``fs`` is the /proc of this process's PID namespace.

    A /proc mounted for another PID namespace (``unshare --pid --fork`` without
    ``--mount-proc``) names other processes by the same numbers: trusting it would freeze
    strangers and report success. ``/proc/self`` there names this process by its number in
    that namespace; it is this process's own /proc only if that is ``os.getpid()``.
    """
    try:
        seen = os.readlink(f"{fs.root}/self")
    except OSError:
        seen = "?"
    if seen != str(os.getpid()):
        raise FreezeError(
            f"{fs.root} belongs to another PID namespace (its /proc/self is {seen}, this "
            f"process is {os.getpid()}): mount a /proc for this namespace (unshare "
            "--mount-proc, or mount -t proc proc /proc in a new mount namespace)"
        )


def check_options(*, timeout: object, max_passes: object, partial_ok: object) -> None:
    check_seconds("timeout", timeout)
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise InvalidArgumentError("max_passes", f"must be an int >= 1, not {max_passes!r}")
    if not isinstance(partial_ok, bool):
        raise InvalidArgumentError("partial_ok", f"must be True or False, not {partial_ok!r}")


def as_pid(name: str, value: object) -> int:
    """The PID of a process given as a PID, a ``subprocess.Popen``, a started
    ``multiprocessing.Process`` or a ``psutil.Process``.

    :raises InvalidArgumentError: if ``value`` is none of those (or not started).
    :raises NoSuchProcessError: if the object's process has ended (a Popen or Process that
        was waited for: its PID may name another process by now), or a ``psutil.Process``
        whose PID names another process now (psutil compares its creation time).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return check_pid(name, value)
    pid = getattr(value, "pid", None)
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise InvalidArgumentError(
            name,
            "give a PID, a subprocess.Popen, a started multiprocessing.Process or a "
            f"psutil.Process, not {value!r}",
        )
    check_pid(name, pid)
    is_running = getattr(value, "is_running", None)
    if callable(is_running) and hasattr(value, "create_time"):  # psutil.Process
        if not is_running():
            raise NoSuchProcessError(pid)
    elif getattr(value, "returncode", None) is not None:  # a Popen that was reaped
        raise NoSuchProcessError(pid)
    elif getattr(value, "exitcode", None) is not None:  # a joined multiprocessing.Process
        raise NoSuchProcessError(pid)
    return pid
