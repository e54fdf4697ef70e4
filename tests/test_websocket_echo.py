"""WebSocket data path: echo at the framing boundaries, fragmentation, the three ways to read,
subprotocol selection and the server socket's attributes."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.rawws import OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWebSocket
from tests.support import ServerProcess

# 125/126 and 65535/65536 are where the frame's length encoding changes; the echo app allows 2 MiB.
SIZES = [0, 125, 126, 65535, 65536, 1 << 20]


def _payload(kind: str, size: int) -> str | bytes:
    if kind == "text":
        return os.urandom(size // 2 + 1).hex()[:size]
    return os.urandom(size)


def _id() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_echo_sizes_websockets(echo_server: ServerProcess, kind: str, size: int) -> None:
    message = _payload(kind, size)
    async with connect(f"{echo_server.ws}/ws?id={_id()}", max_size=4 << 20) as ws:
        await ws.send(message)
        echoed = await asyncio.wait_for(ws.recv(), 20)
    assert type(echoed) is type(message)
    assert len(echoed) == size
    assert echoed == message


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_echo_sizes_aiohttp(echo_server: ServerProcess, kind: str, size: int) -> None:
    message = _payload(kind, size)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{echo_server.ws}/ws?id={_id()}", max_msg_size=4 << 20) as ws,
    ):
        if isinstance(message, str):
            await ws.send_str(message)
        else:
            await ws.send_bytes(message)
        msg = await ws.receive(timeout=20)
    expected = aiohttp.WSMsgType.TEXT if kind == "text" else aiohttp.WSMsgType.BINARY
    assert msg.type == expected, msg
    assert len(msg.data) == size
    assert msg.data == message


async def test_unicode_text_round_trips(echo_server: ServerProcess) -> None:
    message = "héllo wörld — ☃ 😀 𝄞 " * 100
    async with connect(f"{echo_server.ws}/ws?id={_id()}") as ws:
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 10) == message


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_fragmented_message_arrives_whole(echo_server: ServerProcess, kind: str) -> None:
    fragments = [_payload(kind, n) for n in (1, 0, 125, 126, 70_000, 300_000, 3)]
    whole = "".join(fragments) if kind == "text" else b"".join(fragments)  # type: ignore[arg-type]
    async with connect(f"{echo_server.ws}/ws?id={_id()}", max_size=4 << 20) as ws:
        await ws.send(fragments)  # websockets sends one frame per fragment
        echoed = await asyncio.wait_for(ws.recv(), 20)
        # and the socket is in a sane state for the next, unfragmented message
        await ws.send("next")
        assert await asyncio.wait_for(ws.recv(), 10) == "next"
    assert echoed == whole


async def test_fragments_split_inside_a_utf8_character_and_ping_between_fragments(
    echo_server: ServerProcess,
) -> None:
    text = "héllo ☃"
    raw = text.encode()
    cut1, cut2 = raw.index("é".encode()) + 1, raw.index("☃".encode()) + 2  # inside é and ☃
    async with await RawWebSocket.connect(echo_server.port, f"/ws?id={_id()}") as ws:
        await ws.send_frame(OP_TEXT, raw[:cut1], fin=False)
        await ws.send_frame(OP_PING, b"mid-message")  # control frames may be interleaved
        await ws.send_frame(OP_CONT, raw[cut1:cut2], fin=False)
        await ws.send_frame(OP_CONT, raw[cut2:], fin=True)
        pong = await ws.recv_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mid-message")
        assert await ws.recv_message() == text


@pytest.mark.parametrize("route", ["/ws", "/ws-async", "/ws-pull"])
async def test_every_reading_style_echoes_in_order(echo_server: ServerProcess, route: str) -> None:
    messages: list[str | bytes] = [f"m{i}" if i % 2 else os.urandom(i) for i in range(200)]
    async with connect(f"{echo_server.ws}{route}?id={_id()}") as ws:
        for message in messages:  # pipelined: all sent before any is read
            await ws.send(message)
        echoed = [await asyncio.wait_for(ws.recv(), 10) for _ in messages]
    assert echoed == messages


async def test_subprotocol_selected_by_the_worker(echo_server: ServerProcess) -> None:
    async with connect(
        f"{echo_server.ws}/ws?id={_id()}", subprotocols=["superchat", "chat"], compression=None
    ) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        await ws.send("!info")
        info = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert info["protocol"] == "chat"
    assert info["ready_state"] == 1  # sw.WebSocket.OPEN
    assert info["extensions"] == ""
    assert "/ws" in info["url"]
    assert info["buffered_amount"] == 0

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{echo_server.ws}/ws?id={_id()}", protocols=("chat",)) as ws2,
    ):
        assert ws2.protocol == "chat"


async def test_no_subprotocol_when_none_offered(echo_server: ServerProcess) -> None:
    async with connect(f"{echo_server.ws}/ws?id={_id()}") as ws:
        assert ws.subprotocol is None
        assert "sec-websocket-protocol" not in ws.response.headers  # type: ignore[union-attr]
        await ws.send("!info")
        info = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert not info["protocol"]  # "" (or None): nothing was negotiated


async def test_compression_offer_is_declined_cleanly(echo_server: ServerProcess) -> None:
    # websockets offers permessage-deflate by default; whatever the server answers must be coherent.
    async with connect(f"{echo_server.ws}/ws?id={_id()}") as ws:
        negotiated = ws.response.headers.get("sec-websocket-extensions", "")  # type: ignore[union-attr]
        await ws.send("!info")
        info = json.loads(await asyncio.wait_for(ws.recv(), 10))
        message = "z" * 10_000
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 10) == message
    assert info["extensions"] == negotiated
