"""``async with treeguard.guard()``: the anyio face of the freezing core.

The freeze is the same step generator the sync face runs (:meth:`ProcessesGuard._freeze_steps`),
driven by :func:`treeguard._drive.run_async`: every wait of the algorithm is an ``await``, and
the walk pauses every few milliseconds, so the event loop keeps running while a large tree is
being stopped and verified. Works on asyncio and trio alike (through anyio).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, final

import anyio

from ._checks import as_pid
from ._drive import run_async
from ._guard import ProcessesGuard, new_guard
from ._types import GuardOptions, Target
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncGuard", "guard"]


@final
class AsyncGuard:
    """The async context manager :func:`guard` returns; it wraps one :class:`ProcessesGuard`.

    Entering freezes (a cancellation point: a cancellation while freezing thaws whatever was
    stopped, then propagates). Leaving thaws, shielded from cancellation, whatever ended the
    body: normal exit, an exception, a cancellation or ``KeyboardInterrupt``. The thaw is a
    burst of non-blocking system calls, so the shield holds only for as long as those take.
    """

    __slots__ = ("guard",)

    def __init__(self, guard: ProcessesGuard) -> None:
        #: The guard this context manager drives (also what ``async with`` yields).
        self.guard = guard

    async def __aenter__(self) -> ProcessesGuard:
        return await run_async(self.guard._freeze_steps())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await run_async(self.guard._thaw_steps())
        finally:
            # If anything interrupted the async thaw (a KeyboardInterrupt delivered at a
            # checkpoint), finish it synchronously: the backend's thaw is resumable and
            # release() is idempotent.
            self.guard.release()

    def __repr__(self) -> str:
        return f"<AsyncGuard {self.guard!r}>"


def guard(
    root: Target | None = None,
    *,
    monitor_pid: Target | None = None,
    **options: Unpack[GuardOptions],
) -> AsyncGuard:
    """Freeze a process tree for the duration of an ``async with`` block.

    ::

        async with treeguard.guard(server) as g:   # every descendant of server
            await copy_memory(g.pids)

        async with treeguard.guard(monitor_pid=monitor.pid):   # the caller's, but one
            ...

    On asyncio and trio alike. The event loop keeps running while the tree is being frozen.

    :param root: whose descendants to freeze, as in :class:`ProcessesGuard` (default: the
        calling process).
    :param monitor_pid: a process to leave running, with its subtree (added to ``exclude``).
    :param options: the options of :class:`ProcessesGuard` (``include_root``, ``exclude``,
        ``timeout``, ``max_passes``, ``partial_ok``, ``scope``, ``backend``, ``watchdog``,
        ``max_frozen``, ``subreaper``), checked here, before anything runs.
    :returns: an async context manager that yields the frozen :class:`ProcessesGuard`; a
        synchronous ``release()`` inside the block thaws early.
    :raises InvalidArgumentError: if an argument is of the wrong type or out of range.
    :raises NoSuchProcessError: if ``root`` or ``monitor_pid`` names no process.
    :raises FreezeError: on entering, as :meth:`ProcessesGuard.freeze` (nothing is left
        stopped).
    """
    given: dict[str, Any] = dict(options)
    if monitor_pid is not None:
        monitor = as_pid("monitor_pid", monitor_pid)
        exclude = given.pop("exclude", ())
        if isinstance(exclude, str | bytes) or not hasattr(exclude, "__iter__"):
            raise InvalidArgumentError("exclude", "must be an iterable of PIDs")
        given["exclude"] = (*exclude, monitor)
    return AsyncGuard(new_guard({"root": root, **given}))
