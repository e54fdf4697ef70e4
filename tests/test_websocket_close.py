"""Closing: handshakes started by either side keep code and reason; a vanished client is 1006.

The echo app forwards every close event its listeners see to the sockets connected at /observe,
so the test waits on an event instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.rawws import RawWebSocket
from tests.support import ServerProcess, wait_until


def _id() -> str:
    return uuid.uuid4().hex


class Observer:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def close_event(self, conn_id: str, within: float = 10.0) -> dict[str, Any]:
        """The close event the server's listener saw for socket `conn_id`."""
        async with asyncio.timeout(within):
            while True:
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                record: dict[str, Any] = json.loads(msg.data)
                if record["id"] == conn_id:
                    return record


@contextlib.asynccontextmanager
async def observer(server: ServerProcess) -> AsyncIterator[Observer]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.ws}/observe") as ws,
    ):
        yield Observer(ws)


CLIENT_CLOSES = [(1000, ""), (4001, "bye now"), (3000, "ünïcode reason ☃"), (4999, "r" * 123)]


@pytest.mark.parametrize(("code", "reason"), CLIENT_CLOSES, ids=["1000", "4001", "utf8", "123B"])
async def test_close_started_by_websockets_client(
    echo_server: ServerProcess, code: int, reason: str
) -> None:
    conn_id = _id()
    async with observer(echo_server) as obs:
        async with connect(f"{echo_server.ws}/ws?id={conn_id}") as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 10) == "hi"
            await asyncio.wait_for(ws.close(code, reason), 10)
            assert ws.protocol.close_rcvd is not None, "server did not answer the Close frame"
            assert ws.protocol.close_rcvd.code == code  # the server's answer echoes the code
        seen = await obs.close_event(conn_id)
    assert (seen["code"], seen["reason"], seen["was_clean"]) == (code, reason, True)
    assert seen["ready_state"] == 3  # CLOSED by the time the close event runs


async def test_close_started_by_aiohttp_client(echo_server: ServerProcess) -> None:
    conn_id = _id()
    async with observer(echo_server) as obs:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{echo_server.ws}/ws-async?id={conn_id}") as ws,
        ):
            await ws.send_str("hi")
            assert (await ws.receive(timeout=10)).data == "hi"
            await asyncio.wait_for(ws.close(code=4003, message=b"aiohttp says bye"), 10)
            assert ws.close_code == 4003
        seen = await obs.close_event(conn_id)
    assert (seen["code"], seen["reason"], seen["was_clean"]) == (4003, "aiohttp says bye", True)


@pytest.mark.parametrize("route", ["/ws", "/ws-pull"])
async def test_close_started_by_server_seen_by_websockets(
    echo_server: ServerProcess, route: str
) -> None:
    conn_id = _id()
    async with observer(echo_server) as obs:
        async with connect(f"{echo_server.ws}{route}?id={conn_id}") as ws:
            await ws.send("!close 4002 server says bye")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            rcvd = closed.value.rcvd
            assert rcvd is not None, "no Close frame from the server"
            assert (rcvd.code, rcvd.reason) == (4002, "server says bye")
        seen = await obs.close_event(conn_id)
    # websockets answers with the same code and reason; the server's close event reports them.
    assert (seen["code"], seen["reason"], seen["was_clean"]) == (4002, "server says bye", True)


async def test_close_started_by_server_seen_by_aiohttp(echo_server: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{echo_server.ws}/ws?id={_id()}") as ws,
    ):
        await ws.send_str("!close 4004 from the server")
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        assert (msg.data, msg.extra) == (4004, "from the server")


async def test_close_reason_longer_than_123_bytes_is_refused(echo_server: ServerProcess) -> None:
    # server.close() with a 124-byte reason raises ValueError inside the listener, which the
    # runtime turns into 1011 - the client must never see an over-long Close frame.
    async with connect(f"{echo_server.ws}/ws?id={_id()}") as ws:
        await ws.send("!close 4000 " + "x" * 124)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011


async def test_abrupt_disconnect_reaches_close_listener_as_1006(echo_server: ServerProcess) -> None:
    conn_id = _id()
    async with observer(echo_server) as obs:
        raw = await RawWebSocket.connect(echo_server.port, f"/ws?id={conn_id}")
        await raw.send("hello")
        assert await raw.recv_message() == "hello"
        raw.abort()  # TCP gone, no Close frame
        seen = await obs.close_event(conn_id)
    assert seen["code"] == 1006
    assert seen["was_clean"] is False
    assert seen["ready_state"] == 3


async def test_a_client_gone_before_the_101_leaves_no_socket_open(
    echo_server: ServerProcess,
) -> None:
    """Requests that arrive with the client's FIN behind them: whenever the handler got to
    accept the socket (hyper may also drop the request before it runs), the 101 finds no one,
    and the application's WebSocket must end (1006), not stay open forever with no connection
    behind it (it did when the connection went away between the answer and the 101: a cluster
    link "accepted" that way swallowed every request sent on it)."""
    ids: list[str] = []
    async with aiohttp.ClientSession() as session:

        async def stats() -> dict[str, Any]:
            async with session.get(f"{echo_server.http}/stats") as response:
                return dict(await response.json())

        async def leave_before_the_101(conn_id: str) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", echo_server.port)
            writer.write(
                (
                    f"GET /ws?id={conn_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            writer.write_eof()
            # The server is done with the connection (it dropped the request, or the 101 found
            # the client gone) when it closes its side: then whether the handler ran is known.
            async with asyncio.timeout(10):
                while await reader.read(65536):
                    pass
            writer.close()

        before = (await stats())["counts"]["fetch"]

        async def every_accepted_socket_closed() -> tuple[int, list[dict[str, Any]]] | None:
            now = await stats()
            accepted = now["counts"]["fetch"] - before
            closes = [c for c in now["closes"] if c["id"] in ids]
            return (accepted, closes) if len(closes) == accepted else None

        # Batches until the handler got to run for some of them (hyper may drop such a request
        # before it reaches the handler).
        accepted, closes = 0, []
        for _ in range(5):
            batch = [_id() for _ in range(10)]
            ids += batch
            await asyncio.gather(*(leave_before_the_101(conn_id) for conn_id in batch))
            found = await wait_until(
                every_accepted_socket_closed, within=10, what="a close for every accepted socket"
            )
            accepted, closes = found
            if accepted:
                break
    assert accepted > 0, "no request reached the handler"
    assert {c["code"] for c in closes} == {1006}
    assert {c["ready_state"] for c in closes} == {3}


async def test_abrupt_disconnect_of_pull_socket_ends_iteration_with_1006(
    echo_server: ServerProcess,
) -> None:
    conn_id = _id()
    async with observer(echo_server) as obs:
        async with connect(f"{echo_server.ws}/ws-pull?id={conn_id}") as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 10) == "hello"
            ws.transport.abort()
        seen = await obs.close_event(conn_id)
    assert (seen["code"], seen["was_clean"]) == (1006, False)
