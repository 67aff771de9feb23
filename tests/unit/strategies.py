"""Hypothesis strategies for /proc data."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

STATES = "RSDTtZXxIPKWn"

# comm: any bytes but NUL (spaces, parentheses, newlines, invalid UTF-8 included).
comm_bytes = st.binary(max_size=64).filter(lambda b: b"\x00" not in b)
small = st.integers(min_value=0, max_value=2**31 - 1)
signed = st.integers(min_value=-(2**31), max_value=2**31 - 1)
unsigned64 = st.integers(min_value=0, max_value=2**64 - 1)


@dataclass(frozen=True)
class StatLine:
    """A generated stat line and the values it was made from."""

    pid: int
    comm: bytes
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    num_threads: int
    starttime: int
    raw: bytes


@st.composite
def stat_lines(draw: st.DrawFn) -> StatLine:
    pid = draw(st.integers(min_value=1, max_value=4194304))
    comm = draw(comm_bytes)
    state = draw(st.sampled_from(STATES))
    ppid = draw(st.integers(min_value=-1, max_value=4194304))
    pgrp, session = draw(st.integers(min_value=-1, max_value=4194304)), draw(small)
    tty_nr, tpgid = draw(signed), draw(signed)
    flags = draw(small)
    faults_and_times = draw(st.lists(unsigned64, min_size=8, max_size=8))
    priority, nice = draw(signed), draw(st.integers(min_value=-20, max_value=19))
    num_threads = draw(st.integers(min_value=1, max_value=100000))
    itrealvalue = 0
    starttime = draw(unsigned64)
    tail = draw(st.lists(signed, max_size=35))
    fields = [state, ppid, pgrp, session, tty_nr, tpgid, flags, *faults_and_times, priority, nice]
    fields += [num_threads, itrealvalue, starttime, *tail]
    after = " ".join(str(f) for f in fields).encode()
    # The kernel ends the line with a newline; a line without one must go on after starttime
    # (one that stops there may have been cut short inside it).
    newline = draw(st.booleans()) or not tail
    raw = b"%d (" % pid + comm + b") " + after + (b"\n" if newline else b"")
    return StatLine(pid, comm, state, ppid, pgrp, session, flags, num_threads, starttime, raw)
