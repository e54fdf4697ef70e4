"""Limits of the connection layer: max_message_size (1009), idle_timeout (1001),
handshake_timeout (dropped) and max_connections (503 before the upgrade)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.rawws import OP_BINARY, OP_CONT, OP_TEXT, RawWebSocket, encode_frame, open_tcp
from tests.support import ServerProcess, healthy_client, wait_until

# The limits the apps configure (tests/apps/tight.py and tests/apps/few.py); the test process
# does not import the apps, which need the built extension.
MAX_MESSAGE = 1024
HANDSHAKE_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.5
MAX_CONNECTIONS = 3

# ---------------------------------------------------------------- max_message_size


def _message(kind: str, size: int) -> str | bytes:
    return "m" * size if kind == "text" else os.urandom(size)


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_message_at_the_limit_is_echoed_one_byte_more_is_1009(
    tight_server: ServerProcess, kind: str
) -> None:
    async with healthy_client(tight_server):
        async with connect(f"{tight_server.ws}/ws", ping_interval=None) as ws:
            exact = _message(kind, MAX_MESSAGE)
            await ws.send(exact)
            assert await asyncio.wait_for(ws.recv(), 10) == exact
            await ws.send(_message(kind, MAX_MESSAGE + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None, "no Close frame from the server"
        assert closed.value.rcvd.code == 1009


async def test_fragments_each_small_but_together_too_big_is_1009(
    tight_server: ServerProcess,
) -> None:
    async with connect(f"{tight_server.ws}/ws", ping_interval=None) as ws:
        await ws.send([b"a" * 400, b"b" * 400, b"c" * 400])
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_announced_oversize_length_is_1009_without_waiting_for_the_payload(
    tight_server: ServerProcess,
) -> None:
    async with await RawWebSocket.connect(tight_server.port, "/ws") as ws:
        # 10 MiB announced (header and mask key), not one payload byte sent
        ws.write_raw(encode_frame(OP_BINARY, b"", length=10 << 20))
        code, _ = await ws.recv_close(within=10)
    assert code == 1009


async def test_oversize_message_from_aiohttp_is_1009(tight_server: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{tight_server.ws}/ws") as ws,
    ):
        await ws.send_bytes(os.urandom(MAX_MESSAGE * 4))
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == 1009


async def test_fragmented_message_within_the_limit_is_fine(tight_server: ServerProcess) -> None:
    async with await RawWebSocket.connect(tight_server.port, "/ws") as ws:
        ws.write_raw(encode_frame(OP_TEXT, b"x" * 500, fin=False))
        ws.write_raw(encode_frame(OP_CONT, b"y" * 524, fin=True))
        assert await ws.recv_message() == "x" * 500 + "y" * 524


# ---------------------------------------------------------------- idle_timeout


async def test_idle_websockets_client_is_closed_with_1001(tight_server: ServerProcess) -> None:
    async with connect(f"{tight_server.ws}/ws", ping_interval=None) as ws:
        await ws.send("one message, then silence")
        await asyncio.wait_for(ws.recv(), 10)
        started = time.monotonic()
        try:
            await asyncio.wait_for(ws.wait_closed(), IDLE_TIMEOUT + 10)
        except TimeoutError:
            raise AssertionError(f"still open {IDLE_TIMEOUT + 10} s after going idle") from None
        elapsed = time.monotonic() - started
    assert ws.protocol.close_rcvd is not None, "connection dropped without a Close frame"
    assert ws.protocol.close_rcvd.code == 1001
    assert elapsed >= IDLE_TIMEOUT * 0.8, f"closed after {elapsed:.2f}s, before the idle timeout"


async def test_idle_aiohttp_client_is_closed_with_1001(tight_server: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{tight_server.ws}/ws", autoping=True, heartbeat=None) as ws,
    ):
        msg = await ws.receive(timeout=IDLE_TIMEOUT + 10)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == 1001


async def _keep_busy(
    ws: ClientConnection,
    duration: float,
    action: Callable[[ClientConnection, int], Awaitable[None]],
) -> None:
    deadline = time.monotonic() + duration
    i = 0
    while time.monotonic() < deadline:
        await action(ws, i)
        i += 1
        await asyncio.sleep(IDLE_TIMEOUT / 5)  # pacing: stay well inside the idle window


async def _ping(ws: ClientConnection, i: int) -> None:
    await asyncio.wait_for(await ws.ping(str(i).encode()), 5)


async def _echo(ws: ClientConnection, i: int) -> None:
    await ws.send(f"msg {i}")
    assert await asyncio.wait_for(ws.recv(), 5) == f"msg {i}"


@pytest.mark.parametrize("action", [_ping, _echo], ids=["pings", "messages"])
async def test_client_sending_frames_outlives_the_idle_timeout(
    tight_server: ServerProcess,
    action: Callable[[ClientConnection, int], Awaitable[None]],
) -> None:
    async with connect(f"{tight_server.ws}/ws", ping_interval=None) as ws:
        await _keep_busy(ws, IDLE_TIMEOUT * 2.5, action)
        await ws.send("still open")
        assert await asyncio.wait_for(ws.recv(), 5) == "still open"


# ---------------------------------------------------------------- handshake_timeout


async def _time_until_dropped(reader: asyncio.StreamReader, within: float) -> float:
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    if not await reader.read(65536):
                        break
                except ConnectionResetError:
                    break
    except TimeoutError:
        raise AssertionError(f"connection still open after {within} s") from None
    return time.monotonic() - started


@pytest.mark.parametrize(
    "first_bytes", [b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "partial-request"]
)
async def test_client_that_never_finishes_the_handshake_is_dropped(
    tight_server: ServerProcess, first_bytes: bytes
) -> None:
    reader, writer = await open_tcp(tight_server.port)
    try:
        writer.write(first_bytes)
        elapsed = await _time_until_dropped(reader, HANDSHAKE_TIMEOUT + 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert elapsed >= HANDSHAKE_TIMEOUT * 0.6, f"dropped after {elapsed:.2f}s, too early"


async def test_trickling_handshake_is_dropped_at_the_timeout(tight_server: ServerProcess) -> None:
    """A client that keeps sending one header byte at a time must not extend the handshake."""
    reader, writer = await open_tcp(tight_server.port)
    request = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 10_000

    async def trickle() -> None:
        for i in range(len(request)):
            writer.write(request[i : i + 1])
            try:
                await writer.drain()
            except OSError:
                return
            await asyncio.sleep(HANDSHAKE_TIMEOUT / 10)  # pacing of the slow client

    trickler = asyncio.create_task(trickle())
    try:
        elapsed = await _time_until_dropped(reader, HANDSHAKE_TIMEOUT + 10)
    finally:
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickler
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert HANDSHAKE_TIMEOUT * 0.6 <= elapsed < HANDSHAKE_TIMEOUT + 5, (
        f"dropped after {elapsed:.2f}s"
    )


# ---------------------------------------------------------------- max_connections


async def _status_of_websockets_attempt(server: ServerProcess) -> int:
    try:
        async with connect(f"{server.ws}/ws", open_timeout=10):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_connections_past_max_connections_get_503_before_upgrade(
    few_server: ServerProcess,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        held = [
            await stack.enter_async_context(connect(f"{few_server.ws}/ws", ping_interval=None))
            for _ in range(MAX_CONNECTIONS)
        ]

        assert await _status_of_websockets_attempt(few_server) == 503
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{few_server.ws}/ws")
            assert refused.value.status == 503

        # Those admitted are unaffected.
        for i, ws in enumerate(held):
            await ws.send(f"held {i}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"held {i}"

        # Freeing one slot admits one more (the server notices the close asynchronously).
        await held.pop().close()

        async def admitted() -> bool:
            return await _status_of_websockets_attempt(few_server) == 101

        await wait_until(admitted, within=10, interval=0.05, what="a freed connection slot")


# ---------------------------------------------------------------- Limits itself


def test_over_sets_exactly_the_fields_given_also_back_to_the_default() -> None:
    import sockworker as sw

    app = sw.Limits(max_message_size=100, idle_timeout=5.0, ping_interval=None)
    namespace = sw.Limits(max_message_size=1 << 20, ping_interval=20.0)
    merged = namespace.over(app)
    assert merged.max_message_size == 1 << 20, "a default value given is laid over the base"
    assert merged.ping_interval == 20.0
    assert merged.idle_timeout == 5.0, "a field not given is the base's"
    assert sw.Limits().over(app) == app


def test_a_namespace_may_not_set_server_wide_limits() -> None:
    import sockworker as sw

    class Room(sw.DurableObject):
        limits = sw.Limits(max_connections=10)

    with pytest.raises(ValueError, match="max_connections"):
        sw.App(durable_objects={"ROOMS": Room})


def test_url_protocol_and_extensions_are_read_only() -> None:
    import sockworker as sw

    _, server = sw.WebSocketPair()
    for name in ("url", "protocol", "extensions", "ready_state"):
        with pytest.raises(AttributeError):
            setattr(server, name, "x")
