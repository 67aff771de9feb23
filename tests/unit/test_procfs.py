"""The /proc/PID/stat parser: exact round trips, and nothing but ProcfsParseError on junk."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests import proc
from tests.unit.strategies import StatLine, stat_lines
from treeguard import FreezeError, ProcfsParseError
from treeguard.procfs import (
    ProcFS,
    Stat,
    parse_children,
    parse_stat,
    parse_stat_brief,
    parse_state,
)


@given(stat_lines())
def test_parse_returns_exactly_what_was_generated(line: StatLine) -> None:
    stat = parse_stat(line.raw)
    assert (stat.pid, stat.comm, stat.state) == (line.pid, line.comm, line.state)
    assert (stat.ppid, stat.pgrp, stat.session) == (line.ppid, line.pgrp, line.session)
    assert (stat.flags, stat.num_threads, stat.starttime) == (
        line.flags,
        line.num_threads,
        line.starttime,
    )
    assert stat.name == line.comm.decode("utf-8", "backslashreplace")


@given(stat_lines())
def test_text_decoded_with_surrogateescape_parses_the_same(line: StatLine) -> None:
    assert parse_stat(line.raw.decode("utf-8", "surrogateescape")) == parse_stat(line.raw)


@given(st.binary(max_size=400))
@example(b"")
@example(b"12 (x) R")
@example(b"12 x) R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 5")
@example(b"(x) R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 5")
def test_random_bytes_parse_or_raise_the_documented_error(data: bytes) -> None:
    try:
        parse_stat(data)
    except ProcfsParseError as err:
        assert isinstance(err, FreezeError)
        assert isinstance(err, ValueError)


def _either(data: bytes | bytearray) -> object:
    try:
        return parse_stat(data)
    except ProcfsParseError:
        return ProcfsParseError


def _brief(data: object) -> object:
    try:
        return parse_stat_brief(data)  # type: ignore[arg-type]
    except ProcfsParseError:
        return ProcfsParseError


@given(stat_lines())
def test_the_fast_path_takes_only_what_the_full_checks_accept_and_reads_the_same(
    line: StatLine,
) -> None:
    # bytes take the fast path (and what it leaves, the full checks), a bytearray the
    # full checks only: the two must agree on the line, and on it with any one of the
    # fields up to starttime marred (each way the checks tell apart).
    head, _, tail = line.raw.rpartition(b")")
    fields = tail.split(b" ")  # fields[0] is the empty one before the state
    lines = [line.raw]
    for at in range(min(len(fields), 22)):
        for junk in (b"", b" ", b"-", b"+", b")", b"\n", b"x", b"_1", b"\xff"):
            for drop in (0, 1):
                marred = [*fields[:at], junk + fields[at][drop:], *fields[at + 1 :]]
                lines.append(head + b")" + b" ".join(marred))
    for raw in lines:
        full = _either(bytearray(raw))
        assert _either(raw) == full, raw
        # parse_stat_brief's fast path too takes only what the full checks accept (a line
        # with a marred ppid, pgrp, session or flags is refused though it reads none).
        want = (full.state, full.num_threads, full.starttime) if isinstance(full, Stat) else full
        assert _brief(raw) == want, raw


def _state(data: object) -> object:
    try:
        return parse_state(data)  # type: ignore[arg-type]
    except ProcfsParseError:
        return ProcfsParseError


@given(stat_lines(), st.data())
def test_parse_state_reads_the_state_field_as_the_full_checks_do(
    line: StatLine, data: st.DataObject
) -> None:
    # Where the full checks accept a line, parse_state reads their state. Where they refuse
    # it, it reads the state field of a whole line or refuses too; a line cut short anywhere
    # (a short read) gets the full checks' answer, never a letter from inside the command.
    head, _, tail = line.raw.rpartition(b")")
    fields = tail.split(b" ")
    lines = [line.raw]
    for at in range(min(len(fields), 22)):
        for junk in (b"", b" ", b")", b"\n", b"x", b"\xff"):
            lines.append(
                head + b")" + b" ".join([*fields[:at], junk + fields[at], *fields[at + 1 :]])
            )
    for raw in lines:
        full = _either(raw)
        got = _state(raw)
        if isinstance(full, Stat):
            assert got == full.state, raw
        elif got is not ProcfsParseError:
            assert raw.endswith(b"\n") and got == chr(raw[raw.rfind(b")") + 2]), raw
    whole = line.raw if line.raw.endswith(b"\n") else line.raw + b"\n"
    cut = whole[: data.draw(st.integers(min_value=0, max_value=len(whole) - 1))]
    want = _either(cut)
    assert _state(cut) == (want.state if isinstance(want, Stat) else want), cut
    text = line.raw.decode("utf-8", "surrogateescape")
    for other in (text, bytearray(line.raw), memoryview(line.raw)):
        assert _state(other) == parse_stat(line.raw).state
    for junk in (None, 12, [line.raw]):
        assert _state(junk) is ProcfsParseError


def test_parse_state_never_reads_a_letter_inside_the_command_of_a_cut_line() -> None:
    # A task may name itself "a) T \n(b" (prctl PR_SET_NAME): a line cut right after that
    # newline ends in one, with a ')' followed by " T ", yet is no whole line. It gets the
    # full checks' answer (a refusal), never the "T" of the command name: the proof would
    # take the running task for a stopped one. (The whole line is as long as the kernel's.)
    line = b"12 (a) T \n(b) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5" + b" 0" * 32 + b"\n"
    assert parse_state(line) == "S"
    for end in range(len(line)):
        want = _either(line[:end])
        assert _state(line[:end]) == (want.state if isinstance(want, Stat) else want)


@given(stat_lines())
def test_parse_stat_brief_of_anything_but_bytes_reads_as_parse_stat(line: StatLine) -> None:
    # Text, a bytearray or a memoryview read as parse_stat reads them; anything else is a
    # ProcfsParseError, never a TypeError or an AttributeError from the fast path.
    st = parse_stat(line.raw)
    want = (st.state, st.num_threads, st.starttime)
    text = line.raw.decode("utf-8", "surrogateescape")
    for data in (text, bytearray(line.raw), memoryview(line.raw)):
        assert _brief(data) == want
    for junk in (None, 12, [line.raw]):
        assert _brief(junk) is ProcfsParseError


@given(stat_lines(), st.data())
def test_truncated_and_corrupted_lines_parse_or_raise(line: StatLine, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(line.raw)))
    try:
        short = parse_stat(line.raw[:cut])
    except ProcfsParseError:
        pass
    else:  # a cut line that parses at all must say what the whole line says
        assert short == parse_stat(line.raw)
    at = data.draw(st.integers(min_value=0, max_value=max(0, len(line.raw) - 1)))
    junk = data.draw(st.binary(min_size=1, max_size=3))
    try:
        parse_stat(line.raw[:at] + junk + line.raw[at + 1 :])
    except ProcfsParseError:
        pass


# Lines captured on this kind of machine (kernel 6.18).
REAL = [
    (
        b"9116 (a) (b c)\n\xff) S 9075 9073 1068 0 -1 4194368 263 0 0 0 0 0 0 0 20 0 1 0 76931 "
        b"17289216 2687 18446744073709551615 94609032339456 94609032339797 140735073947904 0 0 "
        b"0 0 16781312 2 1 0 0 17 1 0 0 0 0 0 94609032351152 94609032351768 94609370759168 "
        b"140735073949954 140735073949997 140735073949997 140735073951695 0\n",
        (9116, b"a) (b c)\n\xff", "S", 9075, 9073, 1068, 4194368, 1, 76931),
    ),
    (
        b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 22 0 0 "
        b"18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
        (2, b"kthreadd", "S", 0, 0, 0, 2129984, 1, 22),
    ),
    (
        # A task being reaped: process group and session read -1.
        b"2482 (tg-worker-38) X 0 -1 -1 0 -1 4195404 367 0 0 0 3 6 0 0 20 0 0 0 53396 0 0 ",
        (2482, b"tg-worker-38", "X", 0, -1, -1, 4195404, 0, 53396),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), REAL)
def test_real_lines(raw: bytes, expected: tuple[object, ...]) -> None:
    s = parse_stat(raw)
    got = (s.pid, s.comm, s.state, s.ppid, s.pgrp, s.session, s.flags, s.num_threads)
    assert (*got, s.starttime) == expected


def test_kernel_thread_flag() -> None:
    assert parse_stat(REAL[1][0]).is_kernel_thread
    assert not parse_stat(REAL[0][0]).is_kernel_thread


@pytest.mark.parametrize(
    "bad",
    [
        b"+1 (x) R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 5",
        b"1 (x) R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1_0 0 5",
        b"1 (x) R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0",
        b"1 (x) 7 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 5",
        b"1 (x)R 1 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 1 0 5",
    ],
)
def test_malformed_lines_are_rejected(bad: bytes) -> None:
    with pytest.raises(ProcfsParseError):
        parse_stat(bad)


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ProcfsParseError):
        parse_stat(12)  # type: ignore[arg-type]


def test_children_file() -> None:
    assert parse_children(b"12 13 400 ") == [12, 13, 400]
    assert parse_children(b"") == []
    with pytest.raises(ProcfsParseError):
        parse_children(b"12 x ")


def test_reads_this_process() -> None:
    import os

    fs = ProcFS()
    me = fs.stat(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.state == "R"
    assert os.getpid() in (fs.tids(os.getpid()) or [])
    assert fs.stat(4194304) is None  # no such PID: None, not an error
    status = fs.status(os.getpid())
    assert status is not None and status["Pid"] == str(os.getpid())


def test_has_thread_names_the_threads_of_a_process_only() -> None:
    fs = ProcFS()
    started = threading.Event()
    done = threading.Event()

    def run() -> None:
        started.set()
        done.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(30)
        tid = thread.native_id
        assert tid is not None and tid != os.getpid()
        assert fs.has_thread(os.getpid(), tid)
        assert fs.has_thread(os.getpid(), os.getpid())
        assert not fs.has_thread(os.getppid(), tid)  # a thread of another process
        assert not fs.has_thread(os.getpid(), 0)
    finally:
        done.set()
        thread.join()
    # (join() returns as the thread's Python part ends; the kernel task goes a moment later)
    proc.wait_until(lambda: not fs.has_thread(os.getpid(), tid), 10, "the thread to end")
