"""The CPU-metered coroutine (``Server.metered``) in-process, on a real native server (no
socket is opened to it): each resumption is one measured step charged to the slot, the limit
holds across steps, and a coroutine that swallows ``CpuLimitExceeded`` gets it again at every
later resumption."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import sockworker as sw
from sockworker import CpuLimitExceeded, _native
from sockworker.cpu import Metered


@pytest.fixture
def server() -> Iterator[_native.Server]:
    server = _native.Server("127.0.0.1", 0, limits=sw.Limits()._socket_limits(), io_threads=1)
    yield server
    server.stop()


def burn(cpu_ns: int) -> None:
    """Uses ``cpu_ns`` of this thread's CPU."""
    until = time.thread_time_ns() + cpu_ns
    while time.thread_time_ns() < until:
        pass


def charged(meter: _native.Meter) -> int:
    return meter.totals()[_native.UNIT_CPU_NS]


async def test_each_resumption_is_charged_to_the_slot(server: _native.Server) -> None:
    meter = _native.Meter()
    slot = meter.slot("acct", None, None, cpu_limit_ms=1000)
    burnt = 0

    async def three_steps() -> str:
        nonlocal burnt
        for _ in range(3):
            burn(2_000_000)
            burnt += 2_000_000
            await asyncio.sleep(0)
        return "done"

    coro = server.metered(three_steps(), slot)
    assert isinstance(coro, Metered)
    assert await asyncio.ensure_future(coro) == "done"
    # Every step's CPU is charged (what the coroutine burnt, and a little more around it),
    # and nothing between the steps (the loop's own work is not the coroutine's).
    assert burnt <= charged(meter) < burnt + 50_000_000


async def test_past_the_limit_the_coroutine_gets_cpu_limit_exceeded(
    server: _native.Server,
) -> None:
    slot = _native.Meter().slot("acct", None, None, cpu_limit_ms=5)
    seen: list[str] = []

    async def handler() -> None:
        for step in range(10):
            seen.append(f"step {step}")
            burn(2_000_000)  # 2 ms a step: the limit of 5 ms is crossed in the third
            await asyncio.sleep(0)
        seen.append("never")

    with pytest.raises(CpuLimitExceeded):
        await asyncio.ensure_future(server.metered(handler(), slot))
    assert "never" not in seen
    assert 3 <= len(seen) <= 4  # crossed in the third step, raised there or at the fourth


async def test_a_swallowed_limit_is_raised_again_at_each_resumption(
    server: _native.Server,
) -> None:
    slot = _native.Meter().slot("acct", None, None, cpu_limit_ms=1)
    caught = 0

    async def stubborn() -> None:
        nonlocal caught
        burn(3_000_000)
        for _ in range(3):
            try:
                await asyncio.sleep(0)
            except CpuLimitExceeded:
                caught += 1
        await asyncio.sleep(0)

    with pytest.raises(CpuLimitExceeded):
        await asyncio.ensure_future(server.metered(stubborn(), slot))
    assert caught == 3


async def test_no_limit_means_no_interruption(server: _native.Server) -> None:
    slot = _native.Meter().slot("acct", None, None, cpu_limit_ms=0)

    async def long() -> int:
        burn(20_000_000)
        await asyncio.sleep(0)
        return 7

    assert await asyncio.ensure_future(server.metered(long(), slot)) == 7


async def test_close_and_throw_reach_the_coroutine(server: _native.Server) -> None:
    slot = _native.Meter().slot("acct", None, None, cpu_limit_ms=1000)
    finished: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(3600)
        except ValueError:
            finished.append("thrown")
            raise
        finally:
            finished.append("finally")

    coro = server.metered(waits(), slot)
    coro.send(None)
    with pytest.raises(ValueError):
        coro.throw(ValueError("in"))
    assert finished == ["thrown", "finally"]
    closed = server.metered(waits(), slot)
    closed.send(None)
    closed.close()
    assert finished[-1] == "finally"
