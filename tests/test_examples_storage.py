"""examples/counter.py, as docs/howto/counter.md uses it: the counter counts across hibernation
and a restart; the rate limiter lets a burst through, then answers 429, then refills."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

APP = "examples.counter:app"


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(url) as response:
        return response.status, await response.text()


async def test_the_counter_counts_across_a_restart(make_server: Any) -> None:
    server = make_server(APP)
    async with aiohttp.ClientSession() as session:
        assert await post(session, f"{server.http}/counter/visits") == (200, '{"visits": 1}')
        assert await post(session, f"{server.http}/counter/visits") == (200, '{"visits": 2}')
    assert server.stop() == 0
    again = make_server(APP, "--data-dir", str(server.data_dir))
    async with aiohttp.ClientSession() as session:
        assert await post(session, f"{again.http}/counter/visits") == (200, '{"visits": 3}')
        async with session.get(f"{again.http}/counter/visits") as response:
            assert await response.text() == '{"visits": 3}'


async def test_the_rate_limiter_lets_a_burst_through_then_429(make_server: Any) -> None:
    server = make_server(APP)
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(12):
            async with session.get(f"{server.http}/limited") as response:
                statuses.append(response.status)
        assert statuses[:10] == [200] * 10, statuses
        assert 429 in statuses[10:], statuses
        await asyncio.sleep(1.2)  # the bucket refills at one token a second
        async with session.get(f"{server.http}/limited") as response:
            assert response.status == 200
