"""Snapshot data without processes: signal mask decoding, rendering, the JSON schema."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treeguard._describe import files_user
from treeguard._snapshot import (
    REASONS,
    SCHEMA,
    WARNING_KINDS,
    ProcessRecord,
    SignalState,
    ThreadRecord,
    TreeSnapshot,
    decode_sigmask,
    printable,
    signal_name,
)
from treeguard.errors import InvalidArgumentError

RTMIN = int(signal.SIGRTMIN)


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        ("0000000000000000", ()),
        ("0000000000000200", ("SIGUSR1",)),  # bit 9: signal 10
        ("0000000000010000", ("SIGCHLD",)),  # bit 16: signal 17
        ("0000000000020000", ("SIGCONT",)),  # bit 17: signal 18
        ("0000000000004002", ("SIGINT", "SIGTERM")),
        ("0000000080000000", ("SIG32",)),  # glibc keeps 32 and 33 unnamed
        ("0000000200000000", ("SIGRTMIN",)),  # bit 33: signal 34
        ("0000001000000000", ("SIGRTMIN+3",)),
        ("8000000000000000", (f"SIGRTMIN+{64 - RTMIN}",)),  # signal 64
        ("fffffffe7ffbfeff", None),  # a typical SigCgt of a shell: only checks it decodes
    ],
)
def test_decode_sigmask_table(mask: str, names: tuple[str, ...] | None) -> None:
    decoded = decode_sigmask(mask)
    if names is not None:
        assert decoded == names
    else:
        assert "SIGKILL" not in decoded and len(decoded) == 60


@given(st.sets(st.integers(min_value=1, max_value=64)))
def test_decode_sigmask_round_trip(numbers: set[int]) -> None:
    mask = sum(1 << (n - 1) for n in numbers)
    names = decode_sigmask(f"{mask:016x}")
    assert names == tuple(signal_name(n) for n in sorted(numbers))
    assert decode_sigmask(mask) == names
    assert len(set(names)) == len(numbers)  # every number has its own name


@pytest.mark.parametrize("bad", ["", "zz", "0x-1", -1])
def test_decode_sigmask_rejects_garbage(bad: str | int) -> None:
    with pytest.raises(InvalidArgumentError):
        decode_sigmask(bad)


def _rec(
    pid: int,
    depth: int,
    *,
    ppid: int = 1,
    state: str = "S",
    threads: int = 1,
    reason: str | None = None,
    caught: tuple[str, ...] = (),
    tracer: int = 0,
    thread_state: str | None = None,
) -> ProcessRecord:
    tasks = tuple(
        ThreadRecord(tid=pid + i, state=thread_state or state, pending=("SIGUSR1",) * (i == 0))
        for i in range(threads)
    )
    return ProcessRecord(
        pid=pid,
        tgid=pid,
        ppid=ppid,
        depth=depth,
        name=f"p{pid}",
        state=state,
        starttime=1000 + pid,
        uid=0,
        tracer_pid=tracer,
        reason=reason,
        signals=SignalState(caught=caught, blocked=("SIGUSR1",)),
        threads=tasks,
    )


def _tree() -> TreeSnapshot:
    records = (
        _rec(10, 0, threads=2),
        _rec(11, 1, ppid=10, caught=("SIGCHLD", "SIGCONT")),
        _rec(12, 2, ppid=11, state="Z", reason="zombie", caught=("SIGCONT",)),
        _rec(13, 2, ppid=11, tracer=99),
        _rec(14, 1, ppid=10, threads=3, thread_state="D"),
        _rec(15, 2, ppid=14),
    )
    return TreeSnapshot(
        root=10,
        include_root=True,
        records=records,
        consistent=False,
        consistency="changed",
        appeared=((16, 2000),),
        taken_at=1.5,
    )


def test_render_draws_the_tree() -> None:
    lines = _tree().render().splitlines()
    assert lines[:6] == [
        "p10 [10] S, 2 threads",
        "├─ p11 [11] S, 1 thread",
        "│  ├─ p12 [12] Z, 1 thread  not freezable: zombie",
        "│  └─ p13 [13] S, 1 thread",
        "└─ p14 [14] S, 3 threads (also D)",
        "   └─ p15 [15] S, 1 thread",
    ]
    warnings = lines[6:-1]
    # The zombie's handler is no warning: it will never run.
    assert warnings == [
        "warning: PID 11 has a SIGCONT handler (catches SIGCONT)",
        "warning: PID 11 has a SIGCHLD handler (catches SIGCHLD)",
        "warning: PID 13 is traced by PID 99 (traced)",
        "warning: PID 14 task(s) 14,15,16 in D (uninterruptible)",
    ]
    assert lines[-1] == "6 processes, 9 tasks; INCONSISTENT (changed); appeared: 16"


def test_render_several_top_records() -> None:
    snap = TreeSnapshot(
        root=1,
        include_root=False,
        records=(_rec(2, 0), _rec(3, 1, ppid=2), _rec(4, 0)),
        consistent=True,
        consistency="two passes agree",
    )
    assert snap.render().splitlines() == [
        "p2 [2] S, 1 thread",
        "└─ p3 [3] S, 1 thread",
        "p4 [4] S, 1 thread",
        "3 processes, 3 tasks; consistent (two passes agree)",
    ]


def test_json_schema() -> None:
    snap = _tree()
    data = json.loads(snap.to_json())
    assert data["schema"] == SCHEMA == 1
    assert set(data) == {
        "schema",
        "root",
        "include_root",
        "taken_at",
        "consistent",
        "consistency",
        "difference",
        "processes",
        "warnings",
        "memory",
    }
    assert (data["root"], data["include_root"], data["taken_at"]) == (10, True, 1.5)
    assert (data["consistent"], data["consistency"]) == (False, "changed")
    assert data["difference"] == {"appeared": [[16, 2000]], "vanished": []}
    assert [p["pid"] for p in data["processes"]] == [10, 11, 12, 13, 14, 15]
    first = data["processes"][0]
    assert set(first) == {
        "pid",
        "tgid",
        "ppid",
        "depth",
        "name",
        "state",
        "starttime",
        "uid",
        "tracer_pid",
        "freezable",
        "reason",
        "signals",
        "threads",
        "cmdline",
        "user",
        "rss",
        "pss",
        "cpu_user",
        "cpu_system",
    }
    assert first["signals"] == {
        "pending": [],
        "shared_pending": [],
        "blocked": ["SIGUSR1"],
        "ignored": [],
        "caught": [],
    }
    assert first["threads"] == [
        {"tid": 10, "state": "S", "pending": ["SIGUSR1"], "blocked": []},
        {"tid": 11, "state": "S", "pending": [], "blocked": []},
    ]
    # Nothing was read of what these processes are: null, and no total.
    assert {first[k] for k in ("cmdline", "user", "rss", "pss", "cpu_user", "cpu_system")} == {None}
    # Nothing was read, so nothing was left out of a sum: no process is "unread".
    assert data["memory"] == {"rss": None, "pss": None, "unread": []}
    zombie = data["processes"][2]
    assert (zombie["freezable"], zombie["reason"]) == (False, "zombie")
    assert zombie["reason"] in REASONS
    assert {w["kind"] for w in data["warnings"]} == set(WARNING_KINDS) - {"job-control relay"}
    assert all(set(w) == {"pid", "kind", "detail"} for w in data["warnings"])


@pytest.mark.parametrize(("name", "relays"), [("su", True), ("runuser", True), ("sul", False)])
def test_a_job_control_relay_is_named(name: str, relays: bool) -> None:
    record = dataclasses.replace(_rec(20, 0), name=name)
    kinds = [kind for kind, _ in record.warnings()]
    assert kinds == (["job-control relay"] if relays else [])


def test_lookup_by_pid() -> None:
    snap = _tree()
    assert snap[13].tracer_pid == 99
    assert snap.pids == (10, 11, 12, 13, 14, 15)
    assert len(snap) == 6
    with pytest.raises(KeyError):
        snap[99]


# -- names safe to print ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("bash", "bash"),
        ("ev\x1b[2Jil", r"ev\x1b[2Jil"),
        ("a\nb\tc\x7f", r"a\nb\tc\x7f"),
        ("zero\u200bwidth", r"zero\u200bwidth"),
        ("café", "café"),
        (r"raw\xff", r"raw\xff"),  # an undecodable byte, as procfs already shows it
    ],
)
def test_printable(name: str, shown: str) -> None:
    assert printable(name) == shown


@given(st.text())
def test_printable_leaves_nothing_unprintable(name: str) -> None:
    assert printable(name).isprintable()


def test_which_backends_the_tree_would_not_notice() -> None:
    def snap(record: ProcessRecord) -> TreeSnapshot:
        return TreeSnapshot(
            root=record.pid,
            include_root=True,
            records=(record,),
            consistent=True,
            consistency="two passes agree",
        )

    assert set(snap(_rec(20, 0)).unnoticed_by()) == {"cgroup", "ptrace", "signal"}
    relay = dataclasses.replace(_rec(21, 0), name="su")
    assert set(snap(relay).unnoticed_by()) == {"cgroup", "ptrace"}
    assert set(snap(_rec(22, 0, caught=("SIGCONT",))).unnoticed_by()) == {"cgroup", "ptrace"}
    assert set(snap(_rec(23, 0, tracer=7)).unnoticed_by()) == {"cgroup"}


def test_user_names_from_the_passwd_file(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "# a comment line\n"
        "broken line\n"
        "svc:x:1000:1000::/home/svc:/bin/sh\n"
        "alias:x:1000:1000::/home/svc:/bin/sh\n"
        ":x:2000:2000::/:/bin/sh\n"
    )
    assert files_user(0, str(passwd)) == "root"
    assert files_user(1000, str(passwd)) == "svc"  # the first line wins, as in NSS files
    assert files_user(100, str(passwd)) is None  # 100 is a prefix of 1000, not a match
    assert files_user(2000, str(passwd)) is None  # an empty name is no name
    assert files_user(0, str(tmp_path / "absent")) is None
