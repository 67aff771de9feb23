"""The ptrace backend's tracer thread: a long request lets the event loop that awaits it run."""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from treeguard._backends._tracer import Tracer
from treeguard._drive import run_async, run_sync

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


async def test_a_long_request_lets_the_awaiting_loop_run_every_slice() -> None:
    # CPython hands the GIL to a waiting thread after a switch interval without a release:
    # made one second long here, so that only the tracer's own pauses let the loop run
    # while its work (60 ms of pure Python) holds the GIL.
    tracer = Tracer(lambda: False)
    tracer.start()
    ticks: list[float] = []

    def work() -> None:
        end = time.perf_counter() + 0.06
        while time.perf_counter() < end:
            tracer.pause_if_due()

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await anyio.lowlevel.checkpoint()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ticker)
            await anyio.sleep(0.005)
            start = time.perf_counter()
            await run_async(tracer.steps(work))
            end = time.perf_counter()
            tasks.cancel_scope.cancel()
    finally:
        sys.setswitchinterval(interval)
        run_sync(tracer.steps(lambda: setattr(tracer, "finished", True)))
    during = [start, *(t for t in ticks if start < t < end), end]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert len(during) >= 10, f"the loop ran {len(during) - 2} times in {end - start:.3f} s"
    assert max(gaps) < 0.03, f"the loop waited {max(gaps) * 1e3:.1f} ms"


def test_a_request_of_a_thread_without_a_loop_is_not_sliced() -> None:
    # The sync driver's thread waits in poll(2), not for the GIL: no pause to pay for.
    tracer = Tracer(lambda: False)
    tracer.start()
    paused: list[bool] = []

    def work() -> None:
        request = tracer._running
        paused.append(request is not None and request.sliced)

    run_sync(tracer.steps(work))
    run_sync(tracer.steps(lambda: setattr(tracer, "finished", True)))
    assert paused == [False]
