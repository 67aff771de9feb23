"""The child-subreaper switch (prctl(2) PR_SET_CHILD_SUBREAPER), bound once."""

from __future__ import annotations

import os

from .errors import WatchdogError

__all__ = ["is_subreaper", "set_subreaper"]


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def set_subreaper(enable: bool = True) -> None:
    """Make the calling process a child subreaper (PR_SET_CHILD_SUBREAPER, see prctl(2)).

    A descendant orphaned by its parent's exit (a double-forking daemon) is then re-parented
    to this process instead of PID 1, so it stays in the tree and is frozen with it. The
    consequences: this process must reap such orphans (``os.waitpid``), or they remain
    zombies once they exit; ``os.wait()`` may return PIDs it never started; the flag is not
    inherited by children and survives ``execve``.

    :param enable: ``False`` clears the flag.
    :raises WatchdogError: if the kernel refuses (Linux before 3.4).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enable), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise WatchdogError(f"PR_SET_CHILD_SUBREAPER failed: {os.strerror(err)}")


def is_subreaper() -> bool:
    """Whether the calling process is a child subreaper (PR_GET_CHILD_SUBREAPER)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        raise WatchdogError(f"PR_GET_CHILD_SUBREAPER failed: {os.strerror(ctypes.get_errno())}")
    return bool(flag.value)
