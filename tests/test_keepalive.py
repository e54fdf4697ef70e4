"""Keepalive in the core (Limits.ping_interval / ping_timeout): a silent peer is pinged, one
that does not answer is closed 1011 (the handler sees 1006); pings never wake Python or a
hibernated object, and are counted as free protocol pings."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.rawws import OP_CLOSE, OP_PING, RawWebSocket, parse_close
from tests.support import ServerProcess, get_json, wait_until

PING_INTERVAL = 0.3


@pytest.fixture(scope="module")
def keepalive() -> Iterator[ServerProcess]:
    server = ServerProcess("tests.apps.keepalive:app")
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


async def test_a_peer_that_does_not_answer_pings_is_closed_1011_and_the_app_sees_1006(
    keepalive: ServerProcess,
) -> None:
    conn_id = uuid.uuid4().hex
    async with await RawWebSocket.connect(keepalive.port, f"/ws?id={conn_id}") as ws:
        first = await ws.recv_frame(within=10)
        assert first.opcode == OP_PING
        # Not answered: the next frame is the server's Close.
        closing = await ws.recv_frame(within=10)
        assert closing.opcode == OP_CLOSE
        assert parse_close(closing.payload) == (1011, "keepalive ping timeout")

    async def closed() -> list[dict[str, Any]]:
        stats = await get_json(f"{keepalive.http}/stats")
        return [c for c in stats["closes"] if c["id"] == conn_id]

    (event,) = await wait_until(closed, within=10, what="the close event")
    assert (event["code"], event["clean"]) == (1006, False), event


async def test_a_peer_that_answers_stays_open_and_any_byte_counts(keepalive: ServerProcess) -> None:
    # websockets answers pings on its own: open across many intervals.
    async with connect(f"{keepalive.ws}/ws", ping_interval=None) as ws:
        for i in range(10):
            await asyncio.sleep(PING_INTERVAL)  # pacing: let several keepalive intervals pass
            await ws.send(str(i))
            assert await ws.recv() == str(i)
    # A raw client that never answers a Ping but keeps sending messages is not closed either.
    async with await RawWebSocket.connect(keepalive.port, "/ws") as raw:
        for i in range(8):
            await raw.send(str(i))
            assert await raw.recv_message() == str(i)
            await asyncio.sleep(PING_INTERVAL / 2)  # pacing: stay inside the interval


async def test_pings_do_not_wake_a_hibernated_object_and_are_counted(
    keepalive: ServerProcess,
) -> None:
    name = uuid.uuid4().hex
    async with connect(f"{keepalive.ws}/room/{name}", ping_interval=None) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        # Many keepalive rounds while the object hibernates (after 0.2 s): answered by the client
        # library, never seen by Python.
        await asyncio.sleep(PING_INTERVAL * 8)  # pacing: let keepalive rounds pass
        stats = await get_json(f"{keepalive.http}/stats")
        assert stats["built"][name] == 1
        await ws.send("again")
        assert await ws.recv() == "again"
    metrics = await get_json_text(f"{keepalive.http}/metrics")
    pings = [line for line in metrics.splitlines() if line.startswith("sockworker_protocol_pings")]
    assert pings and int(pings[0].split()[1]) >= 4, metrics


async def get_json_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()
