"""Many connections at once: 1,000 sockets each echo 100 messages, none lost or reordered."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.support import ServerProcess, get_json

CONNECTIONS = 1000
MESSAGES = 100
ROUTES = ["/ws", "/ws-async", "/ws-pull"]  # every way the worker can read, under load


def _message(conn: int, i: int) -> str | bytes:
    text = f"{conn}:{i}:" + "x" * (i % 37)
    return text if i % 2 == 0 else text.encode()


async def test_1000_concurrent_connections_each_echo_100_messages_in_order(
    echo_server: ServerProcess,
) -> None:
    before: dict[str, Any] = (await get_json(f"{echo_server.http}/stats"))["counts"]
    opened = 0
    all_open = asyncio.Event()
    opening = asyncio.Semaphore(100)  # don't overrun the listen backlog with SYNs
    results: dict[int, list[str | bytes]] = {}

    async def one(session: aiohttp.ClientSession, conn: int) -> None:
        nonlocal opened
        async with opening:
            ws = await session.ws_connect(
                f"{echo_server.ws}{ROUTES[conn % len(ROUTES)]}?id=c{conn}", heartbeat=None
            )
        async with ws:
            opened += 1
            if opened == CONNECTIONS:
                all_open.set()
            await all_open.wait()  # every connection is open before anyone sends
            for i in range(MESSAGES):  # pipelined
                message = _message(conn, i)
                if isinstance(message, str):
                    await ws.send_str(message)
                else:
                    await ws.send_bytes(message)
            got: list[str | bytes] = []
            for _ in range(MESSAGES):
                msg = await ws.receive(timeout=40)
                assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
                got.append(msg.data)
            results[conn] = got

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with asyncio.timeout(55):
            async with asyncio.TaskGroup() as group:
                for conn in range(CONNECTIONS):
                    group.create_task(one(session, conn))

    assert len(results) == CONNECTIONS
    for conn in range(CONNECTIONS):
        expected = [_message(conn, i) for i in range(MESSAGES)]
        assert results[conn] == expected, f"connection {conn} got a different stream"

    after: dict[str, Any] = (await get_json(f"{echo_server.http}/stats"))["counts"]
    assert after["message"] - before["message"] == CONNECTIONS * MESSAGES
    assert after["error"] == before["error"]
