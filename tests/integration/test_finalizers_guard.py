"""A guard collected while frozen, whose finalizer's thaw an interrupt cuts short (before the
thaw starts, or inside it): the tree stays stopped only until this process's next freeze or
release of any guard, which finishes that thaw. Checked through /proc."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import proc
from treeguard import ProcessesGuard, _finalizers, _guard
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


def test_an_interrupt_in_the_sweep_of_a_release_is_raised_once_its_own_thaw_is_done(
    make_tree: Callable[..., WorkerTree], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A collected guard's thaw, cut short, is finished by the sweep at the start of another
    # guard's release(); a Ctrl-C landing in that thaw is held until it is done, then
    # raised: it must not keep the release from thawing its own tree first.
    monkeypatch.setattr("sys.unraisablehook", lambda u: None)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    collected = make_tree(wide(3), mode="idle")
    mine = make_tree(wide(3), mode="idle")
    guard = ProcessesGuard(collected.root, include_root=True)
    other = ProcessesGuard(mine.root, include_root=True)
    guard.freeze()
    other.freeze()
    real = _guard.run_to_end
    runs = 0

    def run_to_end(make: Callable[..., Any]) -> BaseException | None:
        nonlocal runs
        runs += 1
        if runs == 1:  # the collector's run: cut short before the thaw
            raise KeyboardInterrupt
        if runs == 2:  # the sweep's run: a real Ctrl-C lands in its thaw
            signals = [signal.SIGINT]

            def interrupted() -> Any:
                if signals:
                    os.kill(os.getpid(), signals.pop())
                return make()

            return real(interrupted)
        return real(make)

    monkeypatch.setattr(_guard, "run_to_end", run_to_end)
    try:
        del guard
        gc.collect()
        proc.assert_all_stopped(collected.pids)
        with pytest.raises(KeyboardInterrupt):
            other.release()
        assert runs == 3  # (the sweep's thaw, then this release's own)
        proc.assert_none_stopped(collected.pids)
        proc.assert_none_stopped(mine.pids)
        assert not other.frozen
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
        other.release()
        sweep()


def test_a_ctrl_c_in_one_thaw_at_exit_leaves_no_other_guard_frozen(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # Two guards frozen at exit: the exit thaws the newer one first, and a Ctrl-C lands in
    # that thaw (which finishes it, then raises it): the older one is thawed all the same.
    trees = [make_tree(wide(3), mode="idle") for _ in range(2)]
    code = textwrap.dedent(
        """
        import os, signal, sys
        sys.path.insert(0, sys.argv[1])
        from treeguard import ProcessesGuard

        guards = [ProcessesGuard(int(pid), include_root=True) for pid in sys.argv[2:]]
        for guard in guards:
            guard.freeze()
        backend = type(guards[1]._backend)
        real = backend.thaw
        interrupts = [signal.SIGINT]

        def thaw(self):
            if interrupts:  # the first thaw at exit: a real Ctrl-C lands in it
                os.kill(os.getpid(), interrupts.pop())
            return real(self)

        backend.thaw = thaw
        print("frozen", flush=True)
        """
    )
    try:
        done = proc.run_python(
            code, [str(Path(__file__).resolve().parents[2]), *(str(t.root) for t in trees)]
        )
        assert done.stdout == "frozen\n", done.stderr
        assert "KeyboardInterrupt" in done.stderr  # (reported, as at any exit)
        for tree in trees:
            proc.assert_none_stopped(tree.pids)
    finally:
        for tree in trees:
            for pid in tree.pids:
                os.kill(pid, signal.SIGCONT)


def test_a_guard_closed_and_frozen_again_keeps_no_finalizer_per_helper_it_closed(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # Each freeze after a close() starts a watchdog helper; the finalizer that would close
    # the one closed before is not kept pending (and swept) for the guard's whole life.
    tree = make_tree(wide(2), mode="idle")
    guard = ProcessesGuard(tree.root, include_root=True, watchdog=True)
    pending = []
    try:
        for _ in range(3):
            guard.freeze()
            assert guard.helper_pid is not None
            guard.close()  # (released; the helper stopped and reaped)
            pending.append(len(_finalizers._PENDING))
    finally:
        guard.close()
    proc.assert_none_stopped(tree.pids)
    assert pending[0] == pending[-1], pending


def test_the_exit_thaws_before_a_hook_registered_earlier_waits_on_the_tree() -> None:
    # treeguard imported first, multiprocessing after: multiprocessing's exit hook joins its
    # children, and one of them is still frozen at exit. The thaw must run first, or the
    # join waits for ever. (The watchdog thaws the child if the test kills the program.)
    code = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from treeguard import ProcessesGuard
        import multiprocessing

        if __name__ == "__main__":
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.5,))
            child.start()
            guard = ProcessesGuard(watchdog=True)
            guard.freeze()
            print(*guard.pids, flush=True)
        """
    )
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).resolve().parents[2])],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the exit waited on its frozen child (multiprocessing's join)")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 1, done.stdout
    assert time.monotonic() - started < 25


def test_real_interrupts_in_the_collection_of_frozen_guards_lose_no_thaw(
    make_tree: Callable[..., WorkerTree], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A timer's signal handler raises at whatever bytecode runs then, while the collector
    # runs a frozen guard's finalizers; the next release() of any guard must leave nothing
    # stopped (a finalizer left claimed by an interrupt was skipped for good).
    monkeypatch.setattr("sys.unraisablehook", lambda u: None)

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, handler)
    tree = make_tree(wide(4), mode="idle")
    lost: list[int] = []
    rng = random.Random(7)
    try:
        probe = ProcessesGuard(tree.root, include_root=True)
        probe.freeze()
        probe.release()
        took = max(probe.report.thaw_seconds, 1e-4)
        for trial in range(200):
            held = [ProcessesGuard(tree.root, include_root=True)]
            held[0].freeze()
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 1.5 * took))
                held.clear()  # collected here, its finalizers run
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                pass
            signal.setitimer(signal.ITIMER_REAL, 0)
            held.clear()
            try:
                ProcessesGuard(tree.root).release()
            except KeyboardInterrupt:  # (one that landed late: its thaw was finished)
                ProcessesGuard(tree.root).release()
            if not proc.poll_until(lambda: not proc.stopped(tree.pids), 2.0):
                lost.append(trial)
                for pid in tree.pids:  # (ours: go on with the next trial)
                    os.kill(pid, signal.SIGCONT)
                sweep()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not lost, f"trials whose thaw was lost: {lost}"


def test_the_exit_thaws_only_once_a_daemon_threads_thaw_is_done(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # A daemon thread is in the middle of release() when the main thread exits: the exit's
    # thaw of the same guard must wait for it, never run beside it (two thaws at once resume
    # and close the same entries twice).
    tree = make_tree(wide(3), mode="idle")
    code = textwrap.dedent(
        """
        import atexit, sys, threading
        sys.path.insert(0, sys.argv[1])
        from treeguard import ProcessesGuard
        from treeguard._backends._signal import SignalBackend
        from treeguard._workers import poll_until

        guard = ProcessesGuard(int(sys.argv[2]), include_root=True)
        guard.freeze()
        real, inside = SignalBackend.thaw, [0]
        entered, exiting = threading.Event(), threading.Event()
        atexit.register(exiting.set)  # (newer than treeguard's: it runs first)

        def thaw(self):
            inside[0] += 1
            if inside[0] > 1:
                print("two thaws at once", file=sys.stderr, flush=True)
            try:
                if threading.current_thread() is not threading.main_thread():
                    entered.set()
                    exiting.wait(10)
                    # Held here for a second after the exit began, unless a second thaw
                    # comes in meanwhile (it is then reported above).
                    poll_until(lambda: inside[0] > 1, 1.0)
                yield from real(self)
            finally:
                inside[0] -= 1

        SignalBackend.thaw = thaw
        threading.Thread(target=guard.release, daemon=True).start()
        entered.wait(10)
        print("exiting", flush=True)
        """
    )
    done = proc.run_python(code, [str(Path(__file__).resolve().parents[2]), str(tree.root)])
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr
    assert "two thaws at once" not in done.stderr
    proc.assert_none_stopped(tree.pids)
