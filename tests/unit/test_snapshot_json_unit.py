"""Snapshot JSON read back (schema 1, old documents included), the tree's memory totals,
and what the drawing shows of each process's description: pure data, no processes."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from importlib import resources
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.unit.test_snapshot_unit import _rec, _tree
from treeguard._jsonshape import _understood, schema
from treeguard._records import ProcessRecord
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


# -- the reader refuses what the shipped schema refuses ---------------------------------


def _validator() -> Draft202012Validator:
    """The shipped schema, read as a user finds it (not through treeguard's checker)."""
    text = resources.files("treeguard").joinpath("schemas/snapshot-1.schema.json").read_text()
    return Draft202012Validator(json.loads(text))


SCHEMA_VALIDATOR = _validator()


@pytest.mark.parametrize(
    ("change", "member"),
    [
        (lambda d: d.update(taken_at=10**400), "taken_at"),
        (lambda d: d.update(taken_at=math.inf), "taken_at"),
        (lambda d: d.update(taken_at=math.nan), "taken_at"),
        (lambda d: d["processes"][0].update(cpu_user=10**400), "processes[0].cpu_user"),
        (lambda d: d["processes"][0].update(cpu_system=-math.inf), "processes[0].cpu_system"),
        (lambda d: d["processes"][0].update(cpu_user=-0.5), "processes[0].cpu_user"),
        (lambda d: d["processes"][1].update(depth=-1), "processes[1].depth"),
        (lambda d: d["processes"][0].update(pid=0), "processes[0].pid"),
        (lambda d: d["processes"][0].update(pid=4194305), "processes[0].pid"),
        (lambda d: d["processes"][0].update(tgid=10**400), "processes[0].tgid"),
        (lambda d: d["processes"][0].update(pid=1.0), "processes[0].pid"),
        (lambda d: d["processes"][0].update(uid=-2), "processes[0].uid"),
        (lambda d: d["processes"][0].update(state="running"), "processes[0].state"),
        (lambda d: d["processes"][0].update(reason="tired"), "processes[0].reason"),
        (lambda d: d["processes"][0].update(freezable="yes"), "processes[0].freezable"),
        (lambda d: d["processes"][0].update(threads=[]), "processes[0].threads"),
        (lambda d: d["processes"][0]["signals"].update(caught=["USR1"]), "caught"),
        (lambda d: d["processes"][0]["threads"][0].update(tid=0), "threads[0].tid"),
        (lambda d: d.update(consistency="fine"), "consistency"),
        (lambda d: d.update(root=0), "root"),
        (lambda d: d["difference"].update(vanished=[[1, -1]]), "difference.vanished[0][1]"),
        (lambda d: d.update(warnings=[{"pid": 1, "kind": "odd", "detail": ""}]), "warnings[0]"),
        (lambda d: d["memory"].update(unread=[0]), "memory.unread[0]"),
        (lambda d: d["memory"].update(rss=-1), "memory.rss"),
        (lambda d: d.update(schema=True), "schema"),
    ],
)
def test_what_the_schema_refuses_is_refused_by_name(change: Any, member: str) -> None:
    document = _broken(change)
    # Where JSON Schema allows what no float or PID can be, the reader is the stricter.
    stricter = {"taken_at", "processes[0].cpu_user", "processes[0].pid"}
    assert not SCHEMA_VALIDATOR.is_valid(document) or member in stricter
    with pytest.raises(InvalidArgumentError, match="snapshot") as caught:
        TreeSnapshot.from_dict(document)
    assert member in caught.value.problem
    # Through JSON too: ``1e999`` and ``Infinity`` parse as floats, and are refused as such.
    with pytest.raises(InvalidArgumentError, match=re.escape(member)):
        TreeSnapshot.from_json(json.dumps(document))


def test_a_process_record_alone_is_checked_too() -> None:
    data = _described().to_dict()["processes"][0]
    assert ProcessRecord.from_dict(data).pid == data["pid"]
    with pytest.raises(InvalidArgumentError, match="depth"):
        ProcessRecord.from_dict({**data, "depth": -1})


@pytest.mark.parametrize("text", ['{"taken_at": 1e999}', "[" * 100_000, '{"schema": NaN}'])
def test_text_the_parser_takes_badly_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="snapshot"):
        TreeSnapshot.from_json(text)


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from([-1, 0, 1, 4194304, 4194305, 2**64 - 1, 2**64, 10**400, -(10**400)]),
        st.integers(),
        st.floats(),  # NaN and the infinities included
        st.sampled_from(["S", "Z", "SS", "SIGUSR1", "USR1", "zombie", "frozen", ""]),
        st.text(max_size=5),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every member and item of a document, as a path of keys and indexes."""
    found = [path] if path else []
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, inner in items:
            found += _places(inner, (*path, key))
    return found


@st.composite
def _mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A snapshot document with one to three of its members replaced or removed (never one
    added: the reader ignores members it does not know, which the schema refuses)."""
    document = copy.deepcopy(draw(st.sampled_from([_described().to_dict(), _tree().to_dict()])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_places(document)))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return document


@given(_mutated())
def test_what_the_reader_accepts_the_schema_accepts(document: dict[str, Any]) -> None:
    """Accepted implies valid; so invalid implies refused, with InvalidArgumentError only
    (any other exception fails the test)."""
    valid = SCHEMA_VALIDATOR.is_valid(document)
    event("valid" if valid else "schema refuses")
    for read in (
        lambda: TreeSnapshot.from_dict(document),
        lambda: TreeSnapshot.from_json(json.dumps(document)),
    ):
        try:
            snap = read()
        except InvalidArgumentError:
            continue
        assert valid, f"accepted a document the schema refuses: {document!r}"
        assert SCHEMA_VALIDATOR.is_valid(snap.to_dict())


def test_the_checker_reads_the_whole_shipped_schema() -> None:
    """A keyword the checker does not know would go unchecked: loading fails on one."""
    assert schema("snapshot-1")["title"] == "treeguard snapshot, schema 1"
    with pytest.raises(RuntimeError, match="oneOf"):
        _understood({"$defs": {"x": {"properties": {"a": {"items": {"oneOf": []}}}}}})
