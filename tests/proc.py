"""Independent checks of process state for the tests.

Deliberately NOT built on treeguard's own parser: task states are read with psutil and a
minimal reader of ``/proc/PID/task/TID/stat``, so a bug in treeguard.procfs cannot hide
a process that is not stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator

import psutil

from treeguard._workers import counters_moving as _moving
from treeguard._workers import counters_still as counters_still
from treeguard._workers import poll_until


def stat_fields(pid: int, tid: int | None = None) -> list[bytes] | None:
    """The fields of a stat line after the command name (0: state, 1: ppid, 19: starttime),
    anchored on the last ``)``; None if the process (or thread) is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].split()


def state(pid: int, tid: int | None = None) -> str | None:
    fields = stat_fields(pid, tid)
    return None if fields is None else fields[0].decode()


def starttime(pid: int) -> int:
    """The starttime of ``pid``; -1 if it is gone."""
    fields = stat_fields(pid)
    return -1 if fields is None else int(fields[19])


def task_states(pid: int) -> dict[int, str]:
    """``{tid: state}`` for every thread of ``pid`` (empty if the process is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return {}
    states = {int(tid): state(pid, int(tid)) for tid in tids}
    return {tid: s for tid, s in states.items() if s is not None}


def states_of(pids: Iterable[int]) -> dict[tuple[int, int], str]:
    return {(pid, tid): s for pid in pids for tid, s in task_states(pid).items()}


def not_stopped(pids: Iterable[int]) -> dict[tuple[int, int], str]:
    """Tasks of ``pids`` that are not stopped (ignoring zombie threads)."""
    return {k: s for k, s in states_of(pids).items() if s not in "TtZX"}


def stopped(pids: Iterable[int]) -> dict[tuple[int, int], str]:
    """Tasks of ``pids`` that are stopped."""
    return {k: s for k, s in states_of(pids).items() if s in "Tt"}


def assert_all_stopped(pids: Iterable[int]) -> None:
    pids = list(pids)
    assert pids, "no processes to check"
    late = not_stopped(pids)
    assert not late, f"tasks not stopped: {late}"
    for pid in pids:  # psutil agrees, process by process
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED, pid


def assert_none_stopped(pids: Iterable[int], timeout: float = 5.0) -> None:
    """No task of ``pids`` is stopped. Polled for up to ``timeout`` seconds: a SIGCONT's
    wake-up may be queued on another CPU for a moment after it was sent, while a task left
    stopped stays so."""
    pids = list(pids)
    poll_until(lambda: not stopped(pids), timeout)
    left = stopped(pids)
    assert not left, f"tasks still stopped: {left}"


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    assert poll_until(condition, timeout), (
        f"timed out after {timeout} s waiting for {what or condition}"
    )


def counters_moving(
    read: Callable[[], list[int]], indexes: Iterable[int], timeout: float = 10.0
) -> None:
    """Wait until every counter in ``indexes`` has moved (a running tree); fail otherwise."""
    assert _moving(read, indexes, timeout), f"some counter did not move within {timeout} s"


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def ppid(pid: int) -> int:
    fields = stat_fields(pid)
    assert fields is not None, f"no process {pid}"
    return int(fields[1])


def children(pid: int) -> list[int]:
    """Children of ``pid`` forked by its main thread ([] if it is gone)."""
    try:
        return [int(c) for c in read_text(f"/proc/{pid}/task/{pid}/children").split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def in_child(work: Callable[[], str]) -> str:
    """``work()`` in a forked child, which never returns into the caller: what it returned,
    through a pipe made after the fork was asked for. A child that raised fails the test
    with the error."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status, out = 1, "nothing"
        try:
            os.close(rfd)
            out, status = work(), 0
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            out = repr(err)
        finally:
            os.write(wfd, out.encode())
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd) as reader:
        out = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def as_nobody(work: Callable[[], object]) -> object:
    """``work()`` in a forked child that became uid/gid 65534 with no supplementary groups;
    its result, which must be JSON, comes back through a pipe. (Whatever ``work`` needs to
    import must be imported before: nobody may not read this interpreter's files.)"""
    import json

    def become_nobody() -> str:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        return json.dumps(work())

    return json.loads(in_child(become_nobody))


@contextlib.contextmanager
def stopped_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep 60`` the test stopped itself (SIGSTOP, seen ``T``), killed and reaped
    afterwards whatever happened: a victim whose PID a forged record names."""
    victim = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: task_states(victim.pid), 10)
        victim.send_signal(signal.SIGSTOP)
        wait_until(lambda: stopped([victim.pid]), 10, "the victim to stop")
        yield victim
    finally:
        victim.kill()
        victim.wait()


def run_python(code: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter with ``argv``: its exit status and output (it
    reads nothing; a minute at most)."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
