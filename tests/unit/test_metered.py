"""The CPU-metered coroutine (``cpu.Metered``) in-process, against a stand-in for the core's
step clock: each resumption is one measured step, the limit is enforced across steps, and a
coroutine that swallows ``CpuLimitExceeded`` gets it again at every later resumption."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from sockworker import CpuLimitExceeded
from sockworker.cpu import Metered


class Slot:
    def __init__(self, cpu_limit_ns: int | None) -> None:
        self.cpu_limit_ns = cpu_limit_ns


class StepClock:
    """Charges ``cost`` ns per step; ``interrupt`` marks the next step as cut by the watchdog."""

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self.budgets: list[int | None] = []
        self.open = False
        self.interrupt = False

    def step_begin(self, slot: Slot, budget: int | None) -> bool:
        assert not self.open, "steps do not nest"
        self.open = True
        self.budgets.append(budget)
        return True

    def step_end(self) -> tuple[int, bool]:
        assert self.open
        self.open = False
        interrupted, self.interrupt = self.interrupt, False
        return self.cost, interrupted


def metered(coro: Coroutine[Any, Any, Any], limit: int | None, clock: StepClock) -> Metered:
    return Metered(coro, Slot(limit), clock)  # type: ignore[arg-type]


async def test_each_resumption_is_one_step_with_the_budget_left() -> None:
    clock = StepClock(cost=10)

    async def three_steps() -> str:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return "done"

    assert await asyncio.ensure_future(metered(three_steps(), 100, clock)) == "done"
    assert clock.budgets == [100, 90, 80]
    assert not clock.open


async def test_past_the_limit_the_next_step_raises_inside_the_coroutine() -> None:
    clock = StepClock(cost=60)
    seen: list[str] = []

    async def handler() -> None:
        seen.append("first")
        await asyncio.sleep(0)  # 60 ns so far
        seen.append("second")
        await asyncio.sleep(0)  # 120 ns: over the limit of 100
        seen.append("never")

    with pytest.raises(CpuLimitExceeded):
        await asyncio.ensure_future(metered(handler(), 100, clock))
    assert seen == ["first", "second"]
    assert clock.budgets[-1] == 0  # the step that raised had nothing left


async def test_a_swallowed_limit_is_raised_again_at_each_resumption() -> None:
    clock = StepClock(cost=1)
    caught = 0

    async def stubborn() -> None:
        nonlocal caught
        for _ in range(3):
            try:
                await asyncio.sleep(0)
            except CpuLimitExceeded:
                caught += 1
        await asyncio.sleep(0)

    clock.interrupt = True  # the watchdog cut the first step
    with pytest.raises(CpuLimitExceeded):
        await asyncio.ensure_future(metered(stubborn(), 1_000, clock))
    assert caught == 3


async def test_no_limit_means_no_budget() -> None:
    clock = StepClock(cost=10**12)

    async def long() -> int:
        await asyncio.sleep(0)
        return 7

    assert await asyncio.ensure_future(metered(long(), None, clock)) == 7
    assert clock.budgets == [None, None]


async def test_an_unmeasured_step_charges_nothing() -> None:
    class Busy(StepClock):
        def step_begin(self, slot: Slot, budget: int | None) -> bool:
            self.budgets.append(budget)
            return False  # a batch is being measured already

    clock = Busy(cost=10**9)

    async def two() -> None:
        await asyncio.sleep(0)

    await asyncio.ensure_future(metered(two(), 5, clock))
    assert clock.budgets == [5, 5]
