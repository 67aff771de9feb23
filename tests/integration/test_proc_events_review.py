"""Review of the process events subscription (:mod:`treeguard._proc_events`): confirmed though
others listen, and never held by a forked child."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

import pytest

from tests.conftest import require_root
from treeguard._proc_events import ProcEvents


def _listener() -> ProcEvents:
    """A subscription of its own (another listener on the machine), retried: it may race
    with the events of others, the very thing tested below."""
    for _ in range(20):
        found = ProcEvents.open()
        if found is not None:
            return found
    raise AssertionError("the kernel gave no process events subscription")


def test_a_subscription_is_confirmed_though_events_come_before_its_acknowledgement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bound to the group, a socket receives the events of the machine at once when anyone
    # listens already (cn_filter lets everything through before the socket's request):
    # a fork between the bind and the request queues an event before the acknowledgement.
    require_root("process events")
    other = _listener()
    real = socket.socket

    class Busy(real):  # type: ignore[misc, valid-type]
        def bind(self, address: Any) -> None:
            super().bind(address)
            subprocess.run(["true"], check=True)  # a fork and exits, heard by `other`

    try:
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", Busy)
            events = ProcEvents.open()
        assert events is not None, "refused: an event came before the acknowledgement"
        try:
            subprocess.run(["true"], check=True)
            assert not events.quiet({os.getpid()}, 64)
        finally:
            events.close()
    finally:
        other.close()


def test_a_forked_child_holds_no_copy_of_a_subscription() -> None:
    # A copy would keep the subscription alive after its owner closed it (and the kernel
    # queueing the machine's events on it, for nobody) as long as the child lives.
    require_root("process events")
    events = _listener()
    try:
        mine = {
            os.readlink(f"/proc/self/fd/{fd}")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        }
        theirs = f"socket:[{os.fstat(events._sock.fileno()).st_ino}]"
        assert theirs in mine
        pid = os.fork()
        if pid == 0:
            held = set()
            for fd in os.listdir("/proc/self/fd"):
                try:
                    held.add(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            os._exit(1 if theirs in held else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child holds the subscription"
        subprocess.run(["true"], check=True)
        assert not events.quiet({os.getpid()}, 64)  # still the parent's, and open
    finally:
        events.close()
