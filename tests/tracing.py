"""Act at one exact bytecode boundary of a function: right after one of its calls returns,
which is where CPython runs a signal handler that became due (so where a Ctrl-C lands) and
where another thread may take over."""

from __future__ import annotations

from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any


def call_offsets(code: CodeType) -> list[int]:
    """The offsets of the calls of ``code``, in order."""
    import dis

    return [i.offset for i in dis.get_instructions(code) if i.opname.startswith("CALL")]


def after_call(code: CodeType, offset: int, act: Callable[[], None]) -> Callable[..., Any]:
    """A trace function (for :func:`sys.settrace`) that calls ``act()`` once, in a frame of
    ``code``, at the first instruction after the call at ``offset`` returned. What ``act``
    raises is raised there."""
    acted = False
    after = False

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal acted, after
        if event == "opcode" and not acted:
            if after:
                acted = True
                act()
            after = frame.f_lasti == offset
        return local

    def outer(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = True
        return local

    return outer
