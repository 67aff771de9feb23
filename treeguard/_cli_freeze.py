"""``treeguard freeze PID -- CMD``: the tree frozen while CMD runs, CMD's status passed
through."""

from __future__ import annotations

import argparse
import errno
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from ._cli_pause import INTERRUPTS
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

    previous = {sig: signal.signal(sig, interrupted) for sig in INTERRUPTS}
    try:
        status = freezethaw(
            run_cmd,
            root=args.pid,
            include_root=True,
            exclude=args.exclude,
            backend=args.backend,
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
