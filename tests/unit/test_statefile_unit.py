"""The pause journal as pure data: what StateJournal writes, parse_state reads back; a line
cut short is dropped; anything else malformed is refused (and nothing is signalled)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treeguard import Token, TokenError
from treeguard._checks import PID_MAX_LIMIT
from treeguard._statefile import StateJournal, parse_state

identities = st.tuples(
    st.integers(1, PID_MAX_LIMIT), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)
)
TOKEN = Token("signal", {"stopped": [[10, 5]], "already_stopped": []})


def journal_bytes(tmp_path: Path, records: list[tuple[int, int, int]], done: bool) -> bytes:
    path = tmp_path / "state"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        journal = StateJournal(fd)
        for record in records:
            journal.stopping(*record)
        if done:
            journal.completed(TOKEN)
            journal.helper((77, 8, 9), 1_800_000_000.25)
    finally:
        os.close(fd)
    return path.read_bytes()


@given(st.lists(identities, max_size=30), st.booleans())
def test_round_trip(
    tmp_path_factory: pytest.TempPathFactory, records: list[tuple[int, int, int]], done: bool
) -> None:
    data = journal_bytes(tmp_path_factory.mktemp("j"), records, done)
    state = parse_state(data)
    assert state.version == 2
    assert state.stopped == records
    assert state.token == (TOKEN if done else None)
    assert state.helper == ((77, 8, 9) if done else None)
    assert state.lease_ends == (1_800_000_000.25 if done else None)
    # Cut short anywhere in its last line: that line is dropped, the others are kept.
    if records and not done:
        cut = data[: data.rindex(b"[") + 5]
        assert parse_state(cut).stopped == records[:-1]


def test_a_relay_watched_is_read_back(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "state", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        journal = StateJournal(fd)
        journal.watching(40, 7)
        journal.stopping(41, 8, 9)
    finally:
        os.close(fd)
    state = parse_state((tmp_path / "state").read_bytes())
    assert state.watchers == [(40, 7)]
    assert state.stopped == [(41, 8, 9)]


def test_a_helper_without_its_end_is_read_and_a_bad_end_refused() -> None:
    head = b'{"format": "treeguard-pause", "version": 2}\n'
    state = parse_state(head + b'["helper", 77, 8, 9]\n')  # written before ends was recorded
    assert state.helper == (77, 8, 9) and state.lease_ends is None
    for bad in (b'"soon"', b"-1", b"true", b"[]"):
        with pytest.raises(TokenError, match="line 2"):
            parse_state(head + b'["helper", 77, 8, 9, ' + bad + b"]\n")
    with pytest.raises(TokenError, match="line 2"):
        parse_state(head + b'["helper", 77, 8, 9, 1, 2]\n')


def test_version_1_is_a_bare_token() -> None:
    state = parse_state(TOKEN.to_json().encode() + b"\n")
    assert state.version == 1 and state.token == TOKEN and not state.stopped


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\n",
        b'{"format":"treeguard-pause","version":3}\n',
        b'{"format":"treeguard-pause","version":2,"x":1}\n',
        b'{"format":"treeguard-pause","version":2}\n["stop",0,1,0]\n',
        b'{"format":"treeguard-pause","version":2}\n["stop",1,-1,0]\n',
        b'{"format":"treeguard-pause","version":2}\n["stop",1,1]\n',
        b'{"format":"treeguard-pause","version":2}\n["stop",true,1,0]\n',
        b'{"format":"treeguard-pause","version":2}\n["stop",1,NaN,0]\n',
        b'{"format":"treeguard-pause","version":2}\n["kill",1,1,0]\n',
        b'{"format":"treeguard-pause","version":2}\n["watch",1]\n',
        b'{"format":"treeguard-pause","version":2}\n["watch",1,2,3]\n',
        b'{"format":"treeguard-pause","version":2}\n["watch",0,2]\n',
        b'{"format":"treeguard-pause","version":2}\nnot json\n["stop",1,1,0]\n',
        b'{"format":"treeguard-pause","version":2}\n["cgroup",2,"/etc",1]\n',
        b'{"format":"treeguard-pause","version":2}\n["token",{"format":"x"}]\n',
    ],
)
def test_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(TokenError):
        parse_state(data)
