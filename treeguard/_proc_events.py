"""The kernel's process events connector (``cn_proc``): every fork and exit on the machine,
as they happen.

A guard frozen again and again (a supervisor snapshotting every few seconds) may keep what
a cgroup census proved if it learns that no process of the tree forked or exited since:
the connector says so. A process subscribes through a netlink socket
(``NETLINK_CONNECTOR``, group ``CN_IDX_PROC``); the kernel then queues an event on it from
inside ``fork()`` and ``exit()`` themselves (``proc_fork_connector``,
``proc_exit_connector``), for threads too, so that once a cgroup is frozen every fork of
its tasks that completed is in the queue. A full queue is never silent: the next read
fails with ``ENOBUFS``.

It takes ``CAP_NET_ADMIN`` in the initial user and PID namespaces (the kernel reports
events by the initial namespace's PIDs, and ignores anyone else's subscription). Elsewhere
:meth:`ProcEvents.open` returns ``None`` and the census is read in full at every freeze.
While a subscription is open, every fork and exit on the machine builds one small message
(the kernel skips that work when nobody listens); since Linux 6.6 the kernel keeps all but
forks and exits from this socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import weakref
from collections.abc import Collection, Iterator

__all__ = ["ProcEvents"]

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1  # the connector's id and value of process events (linux/connector.h)
_CN_VAL_PROC = 1
_MCAST_LISTEN = 1  # enum proc_cn_mcast_op
_EVENT_FORK = 0x00000001  # enum proc_cn_event (linux/cn_proc.h)
_EVENT_EXIT = 0x80000000
_NLMSG_DONE = 3

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_HEAD = _NLMSG.size + _CN_MSG.size
# struct proc_event: what, cpu, timestamp_ns, then the event's PIDs: a fork's parent
# (pid, tgid) and child (pid, tgid); an exit's task (pid, tgid).
_WHAT = struct.Struct("=I")
_PIDS = struct.Struct("=4i")
_DATA = 16  # the union's offset in struct proc_event

#: Bytes the kernel may queue on the socket (it charges only what is queued).
_BUFFER = 4 << 20


def _request(op: bytes, ack: int) -> bytes:
    body = _CN_MSG.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, ack, len(op), 0) + op
    return _NLMSG.pack(_NLMSG.size + len(body), _NLMSG_DONE, 0, 0, 0) + body


class ProcEvents:
    """A subscription to the machine's fork and exit events, read by :meth:`quiet`.

    Owned by the process that opened it: a forked child must not read it (it would take
    events from the owner's queue); :meth:`quiet` refuses there.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._owner = os.getpid()
        _OPEN.add(self)

    @classmethod
    def open(cls) -> ProcEvents | None:
        """Subscribe; ``None`` where the kernel does not confirm it (not the initial
        namespaces, no ``CAP_NET_ADMIN`` before Linux 6.6, a kernel without
        ``CONFIG_PROC_EVENTS``, no descriptor to spare)."""
        sock = _subscribe()
        return None if sock is None else cls(sock)

    def quiet(self, pids: Collection[int], budget: int) -> bool:
        """Read every event queued since the last call: True if no fork or exit named one
        of ``pids`` (as parent, child, or the task that exited). False if one did, or if
        that cannot be known: events lost to a full queue, more than ``budget`` of them
        queued (a busy machine: the subscription is then made anew, which drops them at
        once), a closed subscription, another process than the owner."""
        if self._sock.fileno() < 0 or os.getpid() != self._owner:
            return False
        quiet = True
        recv = self._sock.recv
        for _ in range(budget):
            try:
                data = recv(65536)
            except BlockingIOError:
                return quiet
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                quiet = False  # events were dropped: read on, so the next call starts clean
                continue
            if quiet and _names(data, pids):
                quiet = False
        self._sock.close()
        self._sock = _subscribe() or self._sock  # (left closed if that failed)
        return False

    def close(self) -> None:
        """Unsubscribe (closing the socket is enough). Idempotent; in a forked child, it
        closes only the child's copy of the descriptor."""
        self._sock.close()


#: The subscriptions of this process: a forked child closes its copies at once, or a
#: long-lived child (a worker forked by a supervisor) would keep alive each subscription
#: its parent closed, the kernel queueing every fork and exit of the machine on it until
#: its buffer is full (megabytes each), for nobody.
_OPEN: weakref.WeakSet[ProcEvents] = weakref.WeakSet()


def _close_inherited() -> None:
    for events in list(_OPEN):
        events.close()


os.register_at_fork(after_in_child=_close_inherited)


def _subscribe() -> socket.socket | None:
    try:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            _NETLINK_CONNECTOR,
        )
    except OSError:
        return None
    try:
        sock.bind((0, _CN_IDX_PROC))
        # The kernel caps this at net.core.rmem_max (208 KiB by default, about 250
        # events); a queue that overflows only costs a census read in full.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
        # The plain request (all events) is acknowledged at once, which proves the
        # subscription; the filter that follows (Linux 6.6+; its own acknowledgement is
        # filtered out) is ignored by older kernels, where every event comes.
        token = int.from_bytes(os.urandom(3), "little") + 1
        sock.send(_request(struct.pack("=I", _MCAST_LISTEN), token))
        if _confirmed(sock, token + 1):
            sock.send(_request(struct.pack("=II", _MCAST_LISTEN, _EVENT_FORK | _EVENT_EXIT), 0))
            return sock
    except OSError:
        pass
    sock.close()
    return None


#: Messages read, at most, before the acknowledgement of a subscription.
_BEFORE_ACK = 1024


def _confirmed(sock: socket.socket, ack: int) -> bool:
    """Whether the kernel acknowledged a request with no error. The acknowledgement is
    queued before ``send()`` returns (the connector runs its callback in the sender's
    context), but once anyone else listens, the events of the machine reach a socket from
    its ``bind()`` on: those queued before the acknowledgement are skipped."""
    for _ in range(_BEFORE_ACK):
        try:
            found = _acknowledged(sock.recv(65536), ack)
        except BlockingIOError:
            return False
        if found is not None:
            return found
    return False


def _messages(data: bytes) -> Iterator[tuple[int, int, tuple[int, int, int, int]]]:
    """``(what, ack, pids)`` of each process event in a datagram: its kind, the ``ack`` of
    its connector header, and the first four 32-bit fields of its data (a fork's parent
    and child, an exit's task; an acknowledgement's error first)."""
    off = 0
    while off + _HEAD + _DATA + _PIDS.size <= len(data):
        length = _NLMSG.unpack_from(data, off)[0]
        ack = _CN_MSG.unpack_from(data, off + _NLMSG.size)[3]
        (what,) = _WHAT.unpack_from(data, off + _HEAD)
        yield what, ack, _PIDS.unpack_from(data, off + _HEAD + _DATA)
        off += max((length + 3) & ~3, _NLMSG.size)


def _acknowledged(data: bytes, ack: int) -> bool | None:
    """Whether ``data`` holds the kernel's acknowledgement ``ack`` of a request with no
    error (the acknowledgement is a ``PROC_EVENT_NONE`` whose ``ack`` is the request's
    plus one); ``None`` if it holds no acknowledgement ``ack``."""
    for what, got, fields in _messages(data):
        if what == 0 and got == ack:
            return fields[0] == 0
    return None


def _names(data: bytes, pids: Collection[int]) -> bool:
    """Whether a fork or exit event in ``data`` names one of ``pids``."""
    for what, _, named in _messages(data):
        if what == _EVENT_FORK and any(pid in pids for pid in named):
            return True
        if what == _EVENT_EXIT and (named[0] in pids or named[1] in pids):
            return True
    return False
