"""Names for signals and the signal masks of ``/proc/PID/status``, and text safe to print.

proc(5): ``SigPnd``, ``ShdPnd``, ``SigBlk``, ``SigIgn`` and ``SigCgt`` are hexadecimal masks
in which bit N-1 stands for signal N. Names are those of :mod:`signal` (``SIGUSR1``),
real-time signals ``SIGRTMIN+k``, and numbers without a name (32 and 33, which glibc
reserves) ``SIG32``.
"""

from __future__ import annotations

import signal

from .errors import InvalidArgumentError

__all__ = ["decode_sigmask", "printable", "signal_name"]

_RT_MIN = int(signal.SIGRTMIN)
_RT_MAX = int(signal.SIGRTMAX)


def printable(name: str) -> str:
    """``name`` safe to print to a terminal: every character that is not printable (control
    characters such as ESC, which would start a terminal escape sequence; line breaks;
    other non-printables of Unicode) becomes its Python escape (``\\x1b``, ``\\n``,
    ``\\u200b``, ``\\U000e0001``), as :func:`ascii` writes it.

    A command name is chosen by the process itself (``/proc/PID/comm`` is writable by it,
    proc(5)): printed raw, it could move the cursor, rewrite the screen or set the title.
    """
    if name.isprintable():
        return name  # the common case, one pass in C
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)


def signal_name(number: int) -> str:
    """The name of signal ``number``: ``SIGUSR1``, ``SIGRTMIN+3``, or ``SIG32``."""
    if _RT_MIN <= number <= _RT_MAX:
        return "SIGRTMIN" if number == _RT_MIN else f"SIGRTMIN+{number - _RT_MIN}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def decode_sigmask(mask: str | int) -> tuple[str, ...]:
    """The signals set in a ``/proc/PID/status`` mask (hexadecimal text or an int).

    Bit N-1 stands for signal N (proc(5)).

    :raises InvalidArgumentError: if ``mask`` is not a hexadecimal number.
    """
    if isinstance(mask, str):
        try:
            value = int(mask, 16)
        except ValueError:
            raise InvalidArgumentError("mask", f"not a hexadecimal mask: {mask!r}") from None
    else:
        value = mask
    if value < 0:
        raise InvalidArgumentError("mask", f"a mask is not negative: {value}")
    names: list[str] = []
    number = 1
    while value:
        if value & 1:
            names.append(signal_name(number))
        value >>= 1
        number += 1
    return tuple(names)
