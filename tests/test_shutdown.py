"""Graceful shutdown: on SIGTERM (or SIGINT) every client sees 1001 and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.rawws import OP_CLOSE, RawWebSocket, close_payload
from tests.support import ServerProcess

EXIT_DEADLINE = 20.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_every_socket_with_1001_and_exits_0(
    make_server: Callable[..., ServerProcess],
    signum: int,
) -> None:
    server = make_server("tests.apps.echo:app")
    async with contextlib.AsyncExitStack() as stack:
        websockets_clients = [
            await stack.enter_async_context(
                connect(f"{server.ws}{route}?id=w{i}", ping_interval=None)
            )
            for i, route in enumerate(["/ws", "/ws-async", "/ws-pull"] * 2)
        ]
        session = await stack.enter_async_context(aiohttp.ClientSession())
        aiohttp_clients = [
            await stack.enter_async_context(session.ws_connect(f"{server.ws}{route}?id=a{i}"))
            for i, route in enumerate(["/ws", "/ws-async", "/ws-pull"])
        ]
        raw = await stack.enter_async_context(await RawWebSocket.connect(server.port, "/ws?id=r"))
        # An idle keep-alive HTTP connection must not hold the shutdown up either.
        async with session.get(f"{server.http}/inspect") as resp:
            assert resp.status == 200
            await resp.read()

        for ws in websockets_clients:  # every socket is fully established
            await ws.send("up")
            assert await asyncio.wait_for(ws.recv(), 10) == "up"
        for aws in aiohttp_clients:
            await aws.send_str("up")
            assert (await aws.receive(timeout=10)).data == "up"
        await raw.send("up")
        assert await raw.recv_message() == "up"

        server.send_signal(signum)

        for ws in websockets_clients:
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.protocol.close_rcvd is not None, "connection dropped without a Close frame"
            assert ws.protocol.close_rcvd.code == 1001
        for aws in aiohttp_clients:
            msg = await aws.receive(timeout=10)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001), msg
        code, _ = await raw.recv_close()
        assert code == 1001
        await raw.send_frame(OP_CLOSE, close_payload(1001))

        rc = await asyncio.to_thread(server.wait_exit, EXIT_DEADLINE)
    assert rc == 0, f"exit status {rc}; log tail:\n{server.log_tail()}"
    assert "Traceback" not in server.log_text(), server.log_text()


async def test_sigterm_exits_0_even_if_a_client_never_answers_the_close(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("tests.apps.echo:app")
    async with await RawWebSocket.connect(
        server.port, "/ws?id=mute", rcvbuf=16 << 10, limit=16 << 10
    ) as mute:
        await mute.send("up")
        assert await mute.recv_message() == "up"
        server.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(server.wait_exit, EXIT_DEADLINE)
        assert rc == 0, f"exit status {rc}; log tail:\n{server.log_tail()}"
        # The Close frame was sent before the process went away.
        code, _ = await mute.recv_close()
    assert code == 1001


async def test_shutdown_timeout_bounds_the_wait_for_a_peer_that_never_answers(
    make_server: Callable[..., ServerProcess],
) -> None:
    """A client that never reads nor answers the Close: the server still exits 0, once
    --shutdown-timeout has passed (before the 5 s closing handshake would have given up)."""
    server = make_server("tests.apps.echo:app", "--shutdown-timeout", "0.5")
    raw = await RawWebSocket.connect(server.port, "/ws?id=deaf", rcvbuf=4096)
    try:
        await raw.send("up")
        server.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(server.wait_exit, 4.0)
        assert rc == 0, server.log_tail()
    finally:
        raw.abort()
