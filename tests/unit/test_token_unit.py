"""Tokens as pure data: JSON round trips, and every kind of damage rejected as TokenError."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treeguard import InvalidArgumentError, Token, TokenError, thaw
from treeguard._checks import PID_MAX_LIMIT

pids = st.integers(1, PID_MAX_LIMIT)
starttimes = st.integers(0, 2**64 - 1)


@st.composite
def payloads(draw: Any) -> dict[str, Any]:
    chosen = draw(st.lists(pids, unique=True, max_size=40))
    split = draw(st.integers(0, len(chosen)))
    # [pid, starttime], or with the pidfs inode where the kernel has one
    pairs = [[p, draw(starttimes), *draw(st.lists(starttimes, max_size=1))] for p in chosen]
    relays = draw(st.integers(split, len(chosen)))
    payload = {"stopped": pairs[:split], "already_stopped": pairs[split:relays]}
    if draw(st.booleans()):  # the relays above the tree: optional (tokens without them)
        payload["relays"] = pairs[relays:]
    return payload


@given(payloads())
def test_json_round_trip(payload: dict[str, Any]) -> None:
    token = Token("signal", payload)
    again = Token.from_json(token.to_json())
    assert again == token
    assert hash(again) == hash(token)
    assert again.payload == payload
    assert again.identities == tuple((r[0], r[1]) for r in payload["stopped"])
    assert again.pids == tuple(r[0] for r in payload["stopped"])
    assert again.already_stopped == tuple((r[0], r[1]) for r in payload["already_stopped"])
    assert Token.from_json(token.to_json().encode()) == token


def test_stop_order_is_kept() -> None:
    order = [[30, 5], [10, 6], [20, 7]]
    token = Token.from_json(Token("signal", {"stopped": order, "already_stopped": []}).to_json())
    assert token.pids == (30, 10, 20)


def test_token_does_not_share_the_callers_payload() -> None:
    payload: dict[str, Any] = {"stopped": [[10, 1]], "already_stopped": []}
    token = Token("signal", payload)
    payload["stopped"].append([11, 2])
    token.payload["stopped"].append([12, 3])
    assert token.pids == (10,)


def _good() -> dict[str, Any]:
    payload = {"stopped": [[100, 5], [101, 6]], "already_stopped": [[102, 7]], "relays": [[99, 4]]}
    return json.loads(Token("signal", payload).to_json())


def _sealed(body: dict[str, Any]) -> str:
    """``body`` with a digest recomputed, as a careful forger would."""
    inner = {k: body[k] for k in ("format", "version", "backend", "payload")}
    canonical = json.dumps(inner, sort_keys=True, separators=(",", ":"))
    return json.dumps({**body, "digest": hashlib.sha256(canonical.encode()).hexdigest()})


def _edit(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = _good()
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


DAMAGE = {
    "pid is a string": (("payload", "stopped", 0, 0), "100"),
    "pid is a float": (("payload", "stopped", 0, 0), 100.0),
    "pid is a bool": (("payload", "stopped", 0, 0), True),
    "pid zero": (("payload", "stopped", 0, 0), 0),
    "pid negative": (("payload", "stopped", 0, 0), -5),
    "pid too large": (("payload", "stopped", 0, 0), PID_MAX_LIMIT + 1),
    "starttime negative": (("payload", "stopped", 0, 1), -1),
    "starttime too large": (("payload", "stopped", 0, 1), 2**64),
    "starttime null": (("payload", "stopped", 0, 1), None),
    "record of four": (("payload", "stopped", 0), [100, 5, 1, 2]),
    "record of one": (("payload", "stopped", 0), [100]),
    "inode negative": (("payload", "stopped", 0), [100, 5, -1]),
    "inode too large": (("payload", "stopped", 0), [100, 5, 2**64]),
    "record is an object": (("payload", "stopped", 0), {"pid": 100, "starttime": 5}),
    "stopped not a list": (("payload", "stopped"), {"100": 5}),
    "duplicate pid": (("payload", "stopped", 1), [100, 5]),
    "pid in both lists": (("payload", "already_stopped", 0), [101, 9]),
    "payload not an object": (("payload",), [[100, 5]]),
    "extra payload key": (("payload", "cgroup"), "/sys/fs/cgroup/x"),
    "relays not a list": (("payload", "relays"), {"99": 4}),
    "relay pid zero": (("payload", "relays", 0, 0), 0),
    "relay of one": (("payload", "relays", 0), [99]),
    "relay of four": (("payload", "relays", 0), [99, 4, 1, 2]),
    "relay starttime negative": (("payload", "relays", 0, 1), -1),
    "relay pid stopped too": (("payload", "relays", 0), [100, 5]),
    "unknown backend": (("backend",), "magic"),
    "backend not a string": (("backend",), 1),
    "wrong version": (("version",), 2),
    "version as string": (("version",), "1"),
    "wrong format": (("format",), "crosvm"),
    "extra top-level key": (("comment",), "hi"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_malformed_tokens_are_rejected_even_when_resealed(case: str) -> None:
    path, value = DAMAGE[case]
    with pytest.raises(TokenError):
        Token.from_json(_sealed(_edit(path, value)))


@pytest.mark.parametrize(
    "path",
    [
        ("payload", "stopped", 0, 0),
        ("payload", "stopped", 0, 1),
        ("payload", "already_stopped"),
        ("payload", "relays", 0, 1),
    ],
)
def test_edits_without_a_new_digest_are_caught(path: tuple[Any, ...]) -> None:
    body = _good()
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = [] if path[-1] == "already_stopped" else node[path[-1]] + 10
    with pytest.raises(TokenError, match="digest"):
        Token.from_json(json.dumps(body))


@pytest.mark.parametrize("key", ["format", "version", "backend", "payload", "digest"])
def test_missing_keys(key: str) -> None:
    body = _good()
    del body[key]
    with pytest.raises(TokenError, match="missing"):
        Token.from_json(json.dumps(body))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        "null",
        "42",
        '{"a": NaN}',
        '{"version": 1, "version": 1}',
        b"\xff\xfe",
        "[" * 100_000,
        None,
        12,
    ],
)
def test_not_a_token_at_all(text: Any) -> None:
    with pytest.raises(TokenError):
        Token.from_json(text)


def test_digest_must_be_a_string() -> None:
    body = _good()
    body["digest"] = 0
    with pytest.raises(TokenError, match="digest"):
        Token.from_json(json.dumps(body))


def test_made_tokens_are_checked_too() -> None:
    with pytest.raises(TokenError):
        Token("signal", {"stopped": [[1, 2, 3, 4]], "already_stopped": []})
    with pytest.raises(TokenError):
        Token("signal", {"stopped": [[1, float("nan")]], "already_stopped": []})
    with pytest.raises(TokenError):
        Token("signal", {"stopped": [[1, object()]], "already_stopped": []})


def test_thaw_wants_a_token() -> None:
    with pytest.raises(InvalidArgumentError):
        thaw(Token("signal", {"stopped": [], "already_stopped": []}).to_json())  # type: ignore[arg-type]


def test_an_empty_token_thaws_nothing() -> None:
    assert thaw(Token("signal", {"stopped": [], "already_stopped": []})) == 0


def test_repr() -> None:
    token = Token("signal", {"stopped": [[10, 1]], "already_stopped": []})
    assert "1 stopped" in repr(token)
