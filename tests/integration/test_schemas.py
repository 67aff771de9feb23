"""The JSON Schema files shipped in the package (treeguard/schemas/) against real outputs: a
snapshot of a real frozen tree, real tokens, `treeguard status --json` of real pauses; and
documents they must refuse, so that a schema that accepts anything fails here."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests import proc
from tests.conftest import MakeCgroup
from tests.integration import test_cli, test_reliability
from tests.integration.test_cli import SPEC, MakeTree, run
from treeguard import ProcessesGuard, Token
from treeguard._snapshot import TreeSnapshot
from treeguard._snapshot_read import snapshot
from treeguard._token import freeze, thaw
from treeguard.errors import InvalidArgumentError

paused_cleanup = test_cli.paused_cleanup  # a fixture: resumes what a test left paused
relay = test_reliability.relay  # a fixture: su above a sleeper

NAMES = ("snapshot-1", "token-1", "status-1")


def validator(name: str) -> Draft202012Validator:
    """The schema as a user finds it: a resource of the installed package."""
    text = resources.files("treeguard").joinpath(f"schemas/{name}.schema.json").read_text()
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def assert_valid(name: str, document: Any) -> None:
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in validator(name).iter_errors(document)
    ]
    assert not errors, errors


def assert_invalid(name: str, document: Any) -> None:
    assert not validator(name).is_valid(document), document


@pytest.mark.parametrize("name", NAMES)
def test_each_schema_is_a_2020_12_schema(name: str) -> None:
    schema = validator(name).schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


# -- snapshots ------------------------------------------------------------------------


def _old(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` as schema 1 was first written: without the members added since."""
    old = copy.deepcopy(document)
    del old["memory"]
    for process in old["processes"]:
        for key in ("cmdline", "user", "rss", "pss", "cpu_user", "cpu_system"):
            del process[key]
    return old


def test_snapshots_of_real_trees(make_tree: MakeTree) -> None:
    tree = make_tree({"threads": 1, "zombies": 1, "children": [{"children": [{}]}, {}]})
    with ProcessesGuard(tree.root, include_root=True) as guard:
        frozen = json.loads(guard.snapshot(pss=True).to_json())
        proc.assert_all_stopped(tree.pids)
    proc.assert_none_stopped(tree.pids)
    assert frozen["consistency"] == "frozen" and frozen["memory"]["pss"] > 0
    assert_valid("snapshot-1", frozen)
    assert_valid("snapshot-1", _old(frozen))  # documents older treeguards wrote stay valid
    running = json.loads(snapshot(tree.root).to_json())
    assert any(p["reason"] == "zombie" for p in running["processes"])
    assert_valid("snapshot-1", running)
    result = run("tree", str(tree.root), "--json")
    assert result.returncode == 0, result.stderr
    assert_valid("snapshot-1", json.loads(result.stdout))
    # The caller's own branch: "caller" records, signal handlers, several threads.
    assert_valid("snapshot-1", json.loads(snapshot().to_json()))


Change = Callable[[dict[str, Any]], object]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("processes"),
        lambda d: d.update(schema=2),
        lambda d: d.update(consistency="fine"),
        lambda d: d.update(extra=1),
        lambda d: d["processes"][0].update(pid=0),
        lambda d: d["processes"][0].update(pid="1"),
        lambda d: d["processes"][0].pop("threads"),
        lambda d: d["processes"][0].update(reason="tired"),
        lambda d: d["processes"][0].update(state="running"),
        lambda d: d["processes"][0]["signals"].update(caught=["USR1"]),
        lambda d: d["processes"][0].update(rss=-1),
        lambda d: d["processes"][0].update(cmdline="sleep 1"),
        lambda d: d["memory"].pop("unread"),
        lambda d: d["difference"].update(appeared=[[1, 2, 3]]),
    ],
)
def test_a_wrong_snapshot_fails(make_tree: MakeTree, change: Change) -> None:
    tree = make_tree({}, mode="idle")
    document = json.loads(snapshot(tree.root).to_json())
    assert_valid("snapshot-1", document)
    change(document)
    assert_invalid("snapshot-1", document)
    if "extra" not in document:  # the reader ignores members a later treeguard may add
        with pytest.raises(InvalidArgumentError, match="snapshot"):
            TreeSnapshot.from_dict(document)


# -- tokens ---------------------------------------------------------------------------


def test_tokens_of_real_freezes(make_tree: MakeTree, cgroup: MakeCgroup) -> None:
    tree = make_tree(SPEC, mode="idle")
    token = freeze(tree.root, include_root=True)
    try:
        document = json.loads(token.to_json())
    finally:
        assert thaw(token) == len(tree.pids)
    proc.assert_none_stopped(tree.pids)
    assert document["backend"] == "signal" and len(document["payload"]["stopped"]) == 4
    assert_valid("token-1", document)
    for change in (
        lambda d: d.update(digest="0" * 63),
        lambda d: d.update(version=2),
        lambda d: d.update(backend="ptrace"),
        lambda d: d["payload"].update(stopped=[[0, 5]]),
        lambda d: d["payload"].update(stopped=[[5]]),
        lambda d: d["payload"].update(version=2),  # a signal payload has no version
        lambda d: d.pop("digest"),
    ):
        wrong = copy.deepcopy(document)
        change(wrong)
        assert_invalid("token-1", wrong)
    old = copy.deepcopy(document)  # as a token is written without relays: still valid
    assert old["payload"].pop("relays") == []
    assert_valid("token-1", old)
    # A cgroup freeze's token names the cgroup.
    cg = cgroup(2)
    boxed = make_tree({"children": [{}]}, spawn=cg.spawn, mode="idle")
    token = freeze(boxed.root, include_root=True, backend="cgroup")
    try:
        document = json.loads(token.to_json())
    finally:
        thaw(token)
    assert not cg.frozen
    assert document["payload"]["path"] == cg.path
    assert_valid("token-1", document)
    assert Token.from_json(json.dumps(document)) == token
    for change in (
        lambda d: d["payload"].update(version=3),
        lambda d: d["payload"].update(path="relative/path"),
        lambda d: d["payload"].update(stopped=[]),
    ):
        wrong = copy.deepcopy(document)
        change(wrong)
        assert_invalid("token-1", wrong)


def test_the_token_of_a_tree_under_a_relay(relay: Callable[[str], tuple[int, int]]) -> None:
    su, child = relay("su")
    token = freeze(child, include_root=True)
    try:
        document = json.loads(token.to_json())
    finally:
        thaw(token)
    assert [r[0] for r in document["payload"]["relays"]] == [su]
    assert_valid("token-1", document)
    for change in (
        lambda d: d["payload"].update(relays=[[0, 5]]),
        lambda d: d["payload"].update(relays=[[su]]),
        lambda d: d["payload"].update(relays=[[su, 5, 6, 7]]),
        lambda d: d["payload"].update(relays={str(su): 5}),
    ):
        wrong = copy.deepcopy(document)
        change(wrong)
        assert_invalid("token-1", wrong)
    proc.wait_until(lambda: test_reliability._relay_settled(su, child), 5, "su to run on")


# -- status --json ----------------------------------------------------------------------


def _status(*args: str) -> dict[str, Any]:
    result = run("status", *args, "--json")
    assert result.stderr == "", result
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_status_of_real_pauses(
    make_tree: MakeTree, cgroup: MakeCgroup, tmp_path: Path, paused_cleanup: list[Path]
) -> None:
    tree = make_tree(SPEC, mode="idle")
    assert_valid("status-1", _status(str(tree.root)))  # running: nothing held
    state = tmp_path / "paused.json"
    paused_cleanup.append(state)
    assert run("pause", str(tree.root), "--state", str(state)).returncode == 0
    paused = _status("--state", str(state))
    assert paused["frozen"] and paused["since"] is not None
    assert_valid("status-1", paused)
    assert_valid("status-1", _status(str(tree.root)))
    assert run("resume", "--state", str(state)).returncode == 0
    proc.assert_none_stopped(tree.pids)
    # A lease: its helper is named.
    leased = tmp_path / "lease.json"
    paused_cleanup.append(leased)
    helper = test_cli.pause_with_lease(tree.root, leased, "600")
    document = _status("--state", str(leased))
    assert document["lease"]["helper"] == helper and document["lease"]["running"]
    assert document["lease"]["ends"] is not None
    assert_valid("status-1", document)
    assert run("resume", "--state", str(leased)).returncode == 0
    proc.wait_until(lambda: proc.state(helper) in ("Z", None), 10, "resume to end it")
    # A cgroup pause: its cgroup is described.
    cg = cgroup(2)
    boxed = make_tree({"children": [{}]}, spawn=cg.spawn, mode="idle")
    boxed_state = tmp_path / "cgroup.json"
    paused_cleanup.append(boxed_state)
    result = run("pause", "--backend", "cgroup", str(boxed.root), "--state", str(boxed_state))
    assert result.returncode == 0, result.stderr
    document = _status("--state", str(boxed_state))
    assert document["cgroup"] is not None
    assert_valid("status-1", document)
    assert run("resume", "--state", str(boxed_state)).returncode == 0
    for change in (
        lambda d: d.update(state="asleep"),
        lambda d: d.update(since="yesterday"),
        lambda d: d.update(backend="freezer"),
        lambda d: d.pop("frozen"),
        lambda d: d["cgroup"].update(exists="yes"),
        lambda d: d["processes"].append({"pid": 1, "held": "maybe"}),
    ):
        wrong = copy.deepcopy(document)
        change(wrong)
        assert_invalid("status-1", wrong)


# -- the documentation's samples ----------------------------------------------------------


def test_the_samples_on_the_formats_page_are_valid() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "formats.md"
    blocks = re.findall(r"^```json\n(.*?)^```$", page.read_text(), re.S | re.M)
    kinds = []
    for block in blocks:
        document = json.loads(block)
        kind = "token-1" if "format" in document else "status-1" if "state" in document else None
        kind = kind or "snapshot-1"
        assert_valid(kind, document)
        kinds.append(kind)
    assert sorted(kinds) == sorted(NAMES)
