"""Fixtures of the integration tests that more than one file uses."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Fork a child (which waits for a signal) for each "f" read on standard input, and print the
# child's PID; end on anything else.
FORK_ON_F = """
import os, signal
while os.read(0, 1) == b"f":
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    os.write(1, b"%d\\n" % pid)
"""
# The same, once it said it is ready.
_FORKER = 'import os\nos.write(1, b"ready\\n")' + FORK_ON_F


@pytest.fixture
def spawn_forker() -> Iterator[
    Callable[[Callable[..., subprocess.Popen[Any]]], subprocess.Popen[Any]]
]:
    """Start a forker with a cgroup's ``spawn`` (the cgroup fixture kills it)."""
    pipes: list[Any] = []

    def start(spawn: Callable[..., subprocess.Popen[Any]]) -> subprocess.Popen[Any]:
        forker = spawn(
            [sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        pipes.extend((forker.stdin, forker.stdout))
        assert forker.stdout is not None
        assert forker.stdout.readline() == b"ready\n"
        return forker

    try:
        yield start
    finally:
        for pipe in pipes:
            pipe.close()


SpawnForker = Callable[[Callable[..., subprocess.Popen[Any]]], subprocess.Popen[Any]]


def fork_one(forker: subprocess.Popen[Any]) -> int:
    """Have ``forker`` fork one child: its PID."""
    assert forker.stdin is not None and forker.stdout is not None
    forker.stdin.write(b"f")
    forker.stdin.flush()
    return int(forker.stdout.readline())


# The async tests' event loops: asyncio in debug mode (it reports a callback that holds the
# loop too long, and a coroutine never awaited) and trio; a test file may choose its own.
@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param
