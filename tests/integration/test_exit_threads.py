"""Freezes in other threads when the interpreter exits: one under way is let end, then
thawed; one begun after the exit's thaw is refused. Otherwise what such a freeze stops
after the exit's thaw stays stopped once Python ends the thread. Checked through /proc,
in a fresh interpreter."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from tests import proc
from treeguard._workers import WorkerTree, wide

ROOT = str(Path(__file__).resolve().parents[2])

# Run by a fresh interpreter: an exit hook older than treeguard's (it runs after it) lets
# the daemon thread's freeze go on (``go``) and waits for the thread, so that whatever
# the freeze does after treeguard's exit hook happens before the process ends.
_PROLOGUE = """
import atexit, signal, sys, threading
sys.path.insert(0, sys.argv[1])
go, done = threading.Event(), threading.Event()

def after_treeguards_hook():
    go.set()
    done.wait(20)

atexit.register(after_treeguards_hook)
from treeguard import ProcessesGuard, _finalizers
from treeguard._workers import poll_until
from treeguard.errors import FreezeError

guard = ProcessesGuard(int(sys.argv[2]), include_root=True, timeout=10)
"""


def _run(body: str, tree: WorkerTree, *, ok: bool = True) -> str:
    code = textwrap.dedent(_PROLOGUE) + textwrap.dedent(body)
    done = proc.run_python(code, [ROOT, str(tree.root)])
    assert done.returncode == 0 or not ok, done.stderr
    return done.stdout


def test_a_freeze_under_way_in_a_daemon_thread_at_exit_is_thawed_once_it_ends(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # The daemon thread has stopped the root and is about to stop its children when the
    # main thread returns. The exit waits for the freeze to end, then thaws all of it: a
    # thaw run beside it would resume only the root, and the children stopped after it
    # would stay stopped.
    tree = make_tree(wide(3), mode="idle")
    out = _run(
        """
        real, root, inside = signal.pidfd_send_signal, int(sys.argv[2]), threading.Event()

        def send(fd, sig, *rest):
            if sig == signal.SIGSTOP and threading.current_thread().daemon:
                if inside.is_set():
                    # The root is proven stopped: held here, mid-freeze, until the exit has
                    # begun (or, if nothing waits for this freeze, until its thaw is over).
                    poll_until(lambda: go.is_set() or getattr(_finalizers, "_exiting", 0), 10)
                inside.set()
            return real(fd, sig, *rest)

        signal.pidfd_send_signal = send

        def freeze():
            try:
                guard.freeze()
                print("frozen", len(guard.pids), flush=True)
            finally:
                done.set()

        threading.Thread(target=freeze, daemon=True).start()
        inside.wait(10)
        print("exiting", flush=True)
        """,
        tree,
    )
    proc.assert_none_stopped(tree.pids)
    assert out.split("\n")[:2] == ["exiting", f"frozen {len(tree.pids)}"], out


def test_a_freeze_begun_in_another_thread_once_the_exit_has_thawed_is_refused(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # A daemon thread that freezes every so often: its next freeze comes after the exit's
    # thaw, when nothing would thaw it any more. It is refused, before any signal.
    tree = make_tree(wide(3), mode="idle")
    out = _run(
        """
        real, sent = signal.pidfd_send_signal, []

        def send(fd, sig, *rest):
            sent.append(sig)
            return real(fd, sig, *rest)

        def freeze_again():
            try:
                go.wait(10)
                signal.pidfd_send_signal = send
                guard.freeze()
                print("frozen", flush=True)
            except FreezeError as err:
                print("refused:", err, "signals:", len(sent), flush=True)
            finally:
                done.set()

        threading.Thread(target=freeze_again, daemon=True).start()
        guard.freeze()
        guard.release()
        print("exiting", flush=True)
        """,
        tree,
    )
    proc.assert_none_stopped(tree.pids)
    lines = out.strip().split("\n")
    assert lines[0] == "exiting" and lines[1].startswith("refused: "), out
    assert lines[1].endswith(" signals: 0"), out  # refused before any signal


def test_the_main_thread_may_still_freeze_in_a_later_exit_hook(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # Exit hooks run in the main thread, after treeguard's: a freeze there is the caller's
    # own to release, and goes on as at any other time.
    tree = make_tree(wide(2), mode="idle")
    out = _run(
        """
        done.set()

        def snapshot_at_exit():
            with ProcessesGuard(int(sys.argv[2]), include_root=True) as held:
                print("frozen", len(held.pids), flush=True)

        atexit.unregister(after_treeguards_hook)
        atexit.register(snapshot_at_exit)  # older than treeguard's hook, moved at freeze
        guard.freeze()
        guard.release()
        """,
        tree,
    )
    assert out == f"frozen {len(tree.pids)}\n", out
    proc.assert_none_stopped(tree.pids)


def test_an_interrupt_while_the_exit_waits_for_a_freeze_thaws_at_once(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # The daemon thread's freeze never ends (held for good after stopping the root): the
    # exit waits for it, and two Ctrl-C land in that wait. The first cuts the wait short:
    # the guard is thawed at once, and the interrupt raised after.
    tree = make_tree(wide(2), mode="idle")
    out = _run(
        """
        import os
        real, inside = signal.pidfd_send_signal, threading.Event()
        guard = ProcessesGuard(int(sys.argv[2]), include_root=True, timeout=5)

        def send(fd, sig, *rest):
            if sig == signal.SIGSTOP and threading.current_thread().daemon:
                if inside.is_set():
                    threading.Event().wait()  # for good
                inside.set()
            return real(fd, sig, *rest)

        def in_the_wait():  # the exit's thaw, waiting for its turn
            frame, names = sys._current_frames().get(threading.main_thread().ident), set()
            while frame is not None:
                names.add(frame.f_code.co_name)
                frame = frame.f_back
            return {"for_thaw", "pause"} <= names

        def root_runs():
            with open(f"/proc/{sys.argv[2]}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "T"

        def interrupt_the_exit():
            poll_until(in_the_wait, 10)
            os.kill(os.getpid(), signal.SIGINT)
            # Thawed long before the freeze's wait (11 s) would have ended; or, were the
            # interrupt to escape the thaw, waiting again: a second Ctrl-C lands there.
            poll_until(lambda: root_runs() or in_the_wait(), 10)
            print("thawed" if root_runs() else "waiting again", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            done.set()

        signal.pidfd_send_signal = send
        threading.Thread(target=guard.freeze, daemon=True).start()
        inside.wait(10)
        threading.Thread(target=interrupt_the_exit, daemon=True).start()
        print("exiting", flush=True)
        """,
        tree,
        ok=False,
    )
    proc.assert_none_stopped(tree.pids)
    assert out == "exiting\nthawed\n", out


def test_the_exit_thaws_after_an_async_thaw_of_another_thread_not_beside_it(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # An event loop in a daemon thread is in `async with guard()` when the exit begins: the
    # exit lets its freeze end, and thaws; the block ends while the exit's thaw resumes its
    # first process (held there, and after it, a moment), and its own thaw comes. The two
    # take turns: two at once resume, close and forget one entry twice and skip the next.
    tree = make_tree(wide(4), mode="idle")
    out = _run(
        """
        import asyncio, time
        import treeguard
        from treeguard._backends import _pidfds

        main, inside, resuming = threading.main_thread(), threading.Event(), threading.Event()
        real = signal.pidfd_send_signal

        def send(fd, sig, *rest):
            if sig == signal.SIGSTOP and threading.current_thread() is not main:
                if inside.is_set():
                    poll_until(lambda: getattr(_finalizers, "_exiting", 0), 10)
                inside.set()
            if sig == signal.SIGCONT and threading.current_thread() is main:
                if not resuming.is_set():
                    resuming.set()
                    time.sleep(0.3)  # the exit's thaw, at its first process
            return real(fd, sig, *rest)

        real_release, released = _pidfds.release, []

        def release(entry):
            real_release(entry)
            if threading.current_thread() is main and not released:
                released.append(entry)
                time.sleep(0.3)  # and between its first two

        signal.pidfd_send_signal, _pidfds.release = send, release

        def loop_thread():
            async def body():
                try:
                    async with treeguard.guard(int(sys.argv[2]), include_root=True, timeout=10):
                        print("frozen", flush=True)
                        for _ in range(10000):  # until the exit's thaw is at work
                            if resuming.is_set():
                                break
                            await asyncio.sleep(0.001)
                finally:
                    done.set()

            asyncio.run(body())

        threading.Thread(target=loop_thread, daemon=True).start()
        inside.wait(10)
        print("exiting", flush=True)
        """,
        tree,
    )
    proc.assert_none_stopped(tree.pids)
    assert out == "exiting\nfrozen\n", out


def test_a_child_forked_during_a_thaw_in_another_thread_may_freeze_the_guard(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # The process forks while another of its threads releases the guard (its thaw's turn
    # taken): in the child, whose copy of that turn no thread holds, the inherited guard
    # freezes and releases as a new one would, instead of waiting for ever.
    tree = make_tree(wide(2), mode="idle")
    out = _run(
        """
        import os, time
        done.set()
        guard.freeze()
        backend, in_thaw = guard._backend, threading.Event()
        real_thaw = backend.thaw

        def slow_thaw():
            in_thaw.set()
            time.sleep(0.5)
            yield from real_thaw()

        backend.thaw = slow_thaw
        releasing = threading.Thread(target=guard.release)
        releasing.start()
        in_thaw.wait(10)
        child = os.fork()
        if child == 0:
            signal.alarm(10)  # (a child that hangs dies)
            guard.freeze()
            guard.release()
            os._exit(0)
        releasing.join(10)
        _, status = os.waitpid(child, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        """,
        tree,
    )
    proc.assert_none_stopped(tree.pids)
    assert out == "child 0\n", out


def test_a_handler_that_releases_inside_the_guards_turn_does_not_wait_for_itself(
    make_tree: Callable[..., WorkerTree],
) -> None:
    # A signal handler runs between two bytecodes of the main thread, which may be where
    # it looks at the guard's turn (under its lock): a release() there goes on.
    tree = make_tree(wide(2), mode="idle")
    out = _run(
        """
        done.set()
        signal.alarm(10)  # (one that waits for itself dies)
        guard.freeze()
        with guard._turn._lock:  # what the handler interrupted
            guard.release()
        print("released", flush=True)
        """,
        tree,
    )
    proc.assert_none_stopped(tree.pids)
    assert out == "released\n", out
