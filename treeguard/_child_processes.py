"""``freeze_child_processes(monitor_pid)``: the crosvm-shaped face of the freezing core."""

from __future__ import annotations

from ._checks import as_pid
from ._guard import ProcessesGuard
from ._types import Target

__all__ = ["freeze_child_processes"]


def freeze_child_processes(
    monitor_pid: Target | None = None, *, timeout: float = 1.0, max_passes: int = 3
) -> ProcessesGuard:
    """Freeze every descendant of the calling process except ``monitor_pid`` and its subtree.

    The crosvm-shaped entry point: returns a frozen :class:`ProcessesGuard`; release it (or
    let it go out of scope) to thaw.

    :param monitor_pid: the monitor: a PID or a process object.
    :raises InvalidArgumentError: if ``monitor_pid`` is not a valid PID.
    :raises NoSuchProcessError: if it names no process.
    :raises FreezeError: as :meth:`ProcessesGuard.freeze`.
    """
    exclude = () if monitor_pid is None else (as_pid("monitor_pid", monitor_pid),)
    return ProcessesGuard(exclude=exclude, timeout=timeout, max_passes=max_passes).freeze()
