"""A guard collected while frozen, whose finalizer's thaw an interrupt cuts short (before the
thaw starts, or inside it): the tree stays stopped only until this process's next freeze or
release of any guard, which finishes that thaw. Checked through /proc."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

import pytest

from tests import proc
from treeguard import ProcessesGuard, _guard
from treeguard._finalizers import Finalizer, sweep
from treeguard._workers import WorkerTree, wide


def _stat_files_of(pids: list[int]) -> int:
    """How many descriptors this process holds on the stat files of ``pids``."""
    names = {f"/proc/{pid}/stat" for pid in pids}
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            held += os.readlink(f"/proc/self/fd/{fd}") in names
        except OSError:
            continue
    return held


@pytest.mark.parametrize("where", ["before the thaw", "in the thaw"])
def test_a_collected_guard_whose_thaw_was_interrupted_is_thawed_by_the_next_release(
    where: str,
    make_tree: Callable[..., WorkerTree],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unraisable: list[type[BaseException]] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: unraisable.append(u.exc_type))
    tree = make_tree(wide(6), mode="idle")
    guard = ProcessesGuard(tree.root, include_root=True)
    guard.freeze()
    guard.release()
    guard.freeze()  # (frozen again: it keeps each process's descriptors between freezes)
    proc.assert_all_stopped(tree.pids)
    assert _stat_files_of(tree.pids) >= len(tree.pids) - 1  # (all but the root: see _known)
    interrupts = [KeyboardInterrupt()]

    def interrupted(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if interrupts:
                raise interrupts.pop()
            return real(*args)

        return call

    if where == "before the thaw":  # the collector's call of the finalizer itself
        monkeypatch.setattr(Finalizer, "__call__", interrupted(Finalizer.__call__))
    else:
        monkeypatch.setattr(_guard, "run_to_end", interrupted(_guard.run_to_end))
    try:
        del guard
        gc.collect()
        assert unraisable == [KeyboardInterrupt]
        proc.assert_all_stopped(tree.pids)  # the interrupt did cut the thaw short
        ProcessesGuard(tree.root).release()  # another guard, never frozen
        proc.assert_none_stopped(tree.pids)
        assert _stat_files_of(tree.pids) == 0
    finally:
        sweep()
