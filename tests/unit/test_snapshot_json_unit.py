"""Snapshot JSON read back (schema 1, old documents included), the tree's memory totals,
and what the drawing shows of each process's description: pure data, no processes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_snapshot_unit import _rec, _tree
from treeguard._snapshot import CMDLINE_SHOWN, TreeSnapshot
from treeguard.errors import InvalidArgumentError

DESCRIPTION = ("cmdline", "user", "rss", "pss", "cpu_user", "cpu_system")


def _described() -> TreeSnapshot:
    snap = _tree()
    records = list(snap.records)
    for i, rec in enumerate(records):
        if rec.reason is None:
            records[i] = dataclasses.replace(
                rec,
                cmdline=(f"/usr/bin/p{rec.pid}", "--serve", "x y"),
                user="root",
                rss=(rec.pid - 9) * 1024 * 1024,
                pss=(rec.pid - 9) * 512 * 1024,
                cpu_user=0.25,
                cpu_system=0.5,
            )
    return dataclasses.replace(snap, records=tuple(records))


def test_round_trip() -> None:
    snap = _described()
    assert TreeSnapshot.from_json(snap.to_json()) == snap
    assert TreeSnapshot.from_json(snap.to_json(indent=2).encode()) == snap
    assert TreeSnapshot.from_dict(snap.to_dict()) == snap


def test_a_document_written_before_the_description_still_loads() -> None:
    """Schema 1 as first written: no description members and no ``memory``."""
    data = _described().to_dict()
    del data["memory"]
    for process in data["processes"]:
        for key in DESCRIPTION:
            del process[key]
    old = TreeSnapshot.from_dict(data)
    assert old == _tree()
    assert all(getattr(r, key) is None for r in old for key in DESCRIPTION)
    assert old.memory["rss"] is None
    # Members a later treeguard adds are ignored, not refused.
    data["added_later"] = {"x": 1}
    data["processes"][0]["added_later"] = [1]
    assert TreeSnapshot.from_dict(data) == _tree()


def _broken(change: Any) -> dict[str, Any]:
    data = _described().to_dict()
    change(data)
    return data


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(schema=2),
        lambda d: d.pop("processes"),
        lambda d: d.update(consistent="yes"),
        lambda d: d["processes"][0].update(pid="10"),
        lambda d: d["processes"][0].update(pid=True),
        lambda d: d["processes"][1].pop("threads"),
        lambda d: d["processes"][1]["signals"].pop("caught"),
        lambda d: d["processes"][0].update(cmdline="p10 --serve"),
        lambda d: d["processes"][0].update(rss=1.5),
        lambda d: d["processes"][0].update(cpu_user="1"),
        lambda d: d["difference"].update(appeared=[[1]]),
    ],
)
def test_a_broken_document_is_refused(change: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="snapshot"):
        TreeSnapshot.from_dict(_broken(change))


@pytest.mark.parametrize("text", ["", "[]", "{", "null", b"\xff"])
def test_text_that_is_no_snapshot_is_refused(text: str | bytes) -> None:
    with pytest.raises(InvalidArgumentError, match="snapshot"):
        TreeSnapshot.from_json(text)


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 2**40)), st.one_of(st.none(), st.integers(0, 2**40))
        ),
        min_size=1,
        max_size=8,
    )
)
def test_memory_sums_what_was_read(values: list[tuple[int | None, int | None]]) -> None:
    records = tuple(
        dataclasses.replace(_rec(100 + i, 0), rss=rss, pss=pss)
        for i, (rss, pss) in enumerate(values)
    )
    zombie = dataclasses.replace(_rec(99, 0, state="Z", reason="zombie"), rss=None)
    snap = TreeSnapshot(None, True, (zombie, *records), True, "frozen")
    memory = snap.memory
    rss = [r for r, _ in values if r is not None]
    pss = [p for _, p in values if p is not None]
    assert memory["rss"] == (sum(rss) if rss else None)
    assert memory["pss"] == (sum(pss) if pss else None)
    # A zombie holds no memory: never unread. The others are, when a value is missing
    # from a sum; with nothing read at all there is no sum, and nothing is unread.
    expected = [100 + i for i, (r, p) in enumerate(values) if r is None or (pss and p is None)]
    if not rss and not pss:
        expected = []
    assert memory["unread"] == expected


def test_render_shows_memory_and_command_lines() -> None:
    lines = _described().render().splitlines()
    assert lines[0] == "p10 [10] S, 2 threads, RSS 1.0 MiB  cmd: /usr/bin/p10 --serve x y"
    assert lines[2] == "│  ├─ p12 [12] Z, 1 thread  not freezable: zombie"
    # 1+2+4+5+6 MiB of RSS, half as much PSS.
    assert lines[-1].startswith("6 processes, 9 tasks, RSS 18.0 MiB, PSS 9.0 MiB; ")


def test_render_escapes_and_shortens_a_command_line() -> None:
    rec = dataclasses.replace(_rec(5, 0), cmdline=("evil\x1b[2J", "a" * 300), rss=1000)
    snap = TreeSnapshot(5, True, (rec,), True, "two passes agree")
    line = snap.render().splitlines()[0]
    assert line.startswith("p5 [5] S, 1 thread, RSS 1000 B  cmd: evil\\x1b[2J aaa")
    assert line.endswith("...")
    assert len(line.split("  cmd: ")[1]) == CMDLINE_SHOWN
    assert "\x1b" not in line
    assert json.loads(snap.to_json())["processes"][0]["cmdline"][1] == "a" * 300


def test_render_shows_the_first_line_of_a_script() -> None:
    rec = dataclasses.replace(_rec(5, 0), cmdline=("python3", "-c", "\nimport os\nos.pause()"))
    snap = TreeSnapshot(5, True, (rec,), True, "two passes agree")
    assert snap.render().splitlines()[0].endswith("  cmd: python3 -c ...")
