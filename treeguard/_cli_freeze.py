"""``treeguard freeze PID -- CMD``: the tree frozen while CMD runs, CMD's status passed
through."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ._cli_pause import INTERRUPTS, heeded
from .errors import FrozenInterrupt, InvalidArgumentError

__all__ = ["EXIT_CANNOT_EXEC", "EXIT_NOT_FOUND", "CannotRun", "cmd_freeze"]

EXIT_CANNOT_EXEC = 126  # CMD was found but cannot be executed
EXIT_NOT_FOUND = 127  # CMD was not found


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP while cleaning up in bounded time."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_child(child: subprocess.Popen[bytes], signum: int) -> None:
    """Pass ``signum`` on to CMD and wait for it (never leave it orphaned)."""
    with _interrupts_ignored():
        if child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
            try:
                child.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def cmd_freeze(args: argparse.Namespace) -> int:
    from ._freezethaw import freezethaw

    cmd: list[str] = args.cmd
    if not cmd:
        raise InvalidArgumentError("CMD", "give the command to run after '--'")
    if args.cgroup is not None:
        return _freeze_cgroup(args)
    if args.pid is None:
        raise InvalidArgumentError("PID", "give the root of the tree, or --cgroup PATH")
    started: list[subprocess.Popen[bytes]] = []

    def run_cmd() -> int:
        try:
            started.append(subprocess.Popen(cmd))
        except OSError as err:
            raise CannotRun(cmd[0], err) from None
        return started[0].wait()

    # freezethaw holds SIGINT, SIGTERM and SIGHUP back while CMD runs, thaws, and then hands
    # them to these handlers, which end CMD with the same signal (and treeguard with 128+N).
    # The watchdog thaws when nothing of treeguard can run any more (SIGKILL, a crash).
    def interrupted(signum: int, frame: object) -> None:
        raise FrozenInterrupt(signum)

    previous = {sig: signal.signal(sig, interrupted) for sig in heeded()}
    try:
        status = freezethaw(
            run_cmd,
            root=args.pid,
            include_root=True,
            exclude=args.exclude,
            backend=args.backend or "signal",
            timeout=args.timeout,
            partial_ok=args.partial_ok,
            watchdog=True,
        )
    except FrozenInterrupt as interrupt:
        if started:
            _end_child(started[0], interrupt.signum)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


class CannotRun(Exception):
    """CMD could not be started: 127 if it was not found, else 126 (as env(1) and POSIX
    shells say, "Command Search and Execution")."""

    def __init__(self, cmd: str, err: OSError) -> None:
        super().__init__(f"cannot run {cmd!r}: {err.strerror or err}")
        missing = err.errno in (errno.ENOENT, errno.ENOTDIR)
        self.status = EXIT_NOT_FOUND if missing else EXIT_CANNOT_EXEC


def _freeze_cgroup(args: argparse.Namespace) -> int:
    """Freeze the cgroup ``args.cgroup`` whole (with :meth:`Cgroup.freeze`'s checks), run
    CMD, thaw. A watchdog helper, told of the cgroup before its freeze is written, thaws it
    if treeguard dies; a cgroup frozen before stays frozen (and is not told)."""
    from ._checks import check_seconds
    from ._cli_pause import cgroup_only
    from ._watchdog import Watchdog
    from .cgroup import Cgroup

    cgroup_only(args)
    check_seconds("timeout", args.timeout)
    cg = Cgroup(args.cgroup)
    dog = Watchdog.start()
    try:
        dog.arm(None)
        # Interrupts wait until the freeze is done and CMD's handlers are in place. The
        # mask is read before it is changed, so that it is always restored (a handler may
        # raise as the call that blocks returns).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
            if not cg.frozen:
                dog.journal.freezing_cgroup(cg.version, cg.path, os.stat(cg.path).st_ino)
            cg.freeze(timeout=args.timeout)
            try:
                return _run_held(args.cmd, previous)
            finally:
                with _interrupts_ignored():
                    cg.thaw()
                    dog.journal.released()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    finally:
        dog.close()  # thaws what the journal still holds (a failed thaw)


def _run_held(cmd: list[str], mask: Iterable[int]) -> int:
    """Run CMD with SIGINT, SIGTERM and SIGHUP passed on to it (and raised as
    :class:`FrozenInterrupt` once it ended); ``mask`` is the signal mask to run it with
    (CMD inherits the mask: it must not start with these blocked)."""

    def interrupted(signum: int, frame: object) -> None:
        raise FrozenInterrupt(signum)

    child: subprocess.Popen[bytes] | None = None
    handlers = {sig: signal.signal(sig, interrupted) for sig in heeded()}
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that waited is raised here
        try:
            child = subprocess.Popen(cmd)
        except OSError as err:
            raise CannotRun(cmd[0], err) from None
        status = child.wait()
    except FrozenInterrupt as interrupt:
        if child is not None:
            _end_child(child, interrupt.signum)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status
