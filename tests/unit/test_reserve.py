"""treeguard._thaw's reserve descriptors, held by every thread of the process: a look at it
outside its lock sees it as it is, or as another thread left it, never half of each."""

from __future__ import annotations

import dis
import os
import sys

from tests.tracing import after_call
from treeguard import _thaw


def test_a_reserve_spent_by_another_thread_during_the_look_is_no_error() -> None:
    # Another thread spends the reserve (a thaw with a full table, under the reserve's
    # lock) between the freeze's look at how many it holds and at their numbers (a thread
    # switch lands after a call, as here): that freeze goes on (it used to fail with a
    # ValueError), and the spender takes the reserve back when it closes what it opened.
    _thaw.keep_reserve()
    assert len(_thaw._reserve) == 2
    code = _thaw.keep_reserve.__code__
    ops = list(dis.get_instructions(code))
    first_len = next(i for i, op in enumerate(ops) if op.argval == "len")
    target = next(op.offset for op in ops[first_len:] if op.opname.startswith("CALL"))
    spent: list[int] = []

    def spend() -> None:
        with _thaw._reserve_lock:  # (what _opening does)
            while _thaw._reserve:
                fd = _thaw._reserve.pop()
                os.close(fd)
                spent.append(fd)

    sys.settrace(after_call(code, target, spend))
    try:
        _thaw.keep_reserve()
    finally:
        sys.settrace(None)
        _thaw.keep_reserve()  # (the spender's close_fd)
    assert len(spent) == 2
    assert len(_thaw._reserve) == 2
    for fd in _thaw._reserve:
        assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"
