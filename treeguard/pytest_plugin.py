"""The treeguard pytest plugin: freeze processes in a test, thawed at teardown whatever happens.

Installed with the package (the ``pytest11`` entry point ``treeguard``). The fixture
:func:`treeguard_freeze` returns a function that freezes a tree and returns the frozen
:class:`~treeguard.ProcessesGuard`::

    def test_pause(treeguard_freeze):
        proc = subprocess.Popen(["sleep", "30"])
        guard = treeguard_freeze(proc)      # proc and all its descendants are stopped
        ...
        guard.release()                     # optional: teardown releases every guard

Every guard the fixture made is released at teardown, even when the test failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from ._guard import ProcessesGuard

__all__ = ["FreezeTree", "treeguard_freeze"]


class _HasPid(Protocol):
    @property
    def pid(self) -> int | None: ...


class FreezeTree(Protocol):
    """The function :func:`treeguard_freeze` returns."""

    def __call__(self, target: int | _HasPid | None = None, **options: Any) -> ProcessesGuard: ...


@pytest.fixture
def treeguard_freeze() -> Iterator[FreezeTree]:
    """Freeze process trees in a test; every one is thawed at teardown.

    The returned function takes a target and the options of :class:`ProcessesGuard`
    (``exclude``, ``timeout``, ``backend``, ...) and returns the frozen guard:

    - a ``subprocess.Popen``, a ``multiprocessing.Process`` or a PID: that process and
      everything below it (``include_root=True``);
    - nothing: every descendant of the test process (for example a pool's workers), minus
      ``exclude``.
    """
    # Imported here, not with the plugin: pytest loads the plugin in every session of a
    # project that has treeguard installed, and only a test that uses the fixture needs it.
    from ._checks import as_pid
    from ._guard import new_guard

    guards: list[ProcessesGuard] = []

    def freeze(target: int | _HasPid | None = None, **options: Any) -> ProcessesGuard:
        if target is None:
            guard = new_guard(options)
        else:
            options.setdefault("include_root", True)
            guard = new_guard({"root": as_pid("target", target), **options})
        guards.append(guard)
        return guard.freeze()

    try:
        yield freeze
    finally:
        # Thaw newest first (a later guard may hold processes below an earlier one).
        failure: BaseException | None = None
        for guard in reversed(guards):
            try:
                guard.release()
            except BaseException as err:  # release the others before reporting it
                failure = failure or err
        if failure is not None:
            raise failure
