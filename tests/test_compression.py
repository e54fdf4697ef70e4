"""permessage-deflate (RFC 7692), opt-in with App(compression=True): negotiated with the
client's parameters, no context kept between messages, a bound on what a message inflates to."""

from __future__ import annotations

import asyncio
import os
import uuid
import zlib
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from tests.rawws import OP_TEXT, RSV1, RawWebSocket
from tests.support import ServerProcess

EXPECTED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.fixture(scope="module")
def compressed() -> Iterator[ServerProcess]:
    server = ServerProcess("tests.apps.compressed:app")
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


async def test_negotiated_with_websockets_and_messages_round_trip(
    compressed: ServerProcess,
) -> None:
    async with connect(f"{compressed.ws}/ws") as ws:  # websockets offers permessage-deflate
        assert ws.response is not None
        assert ws.response.headers["Sec-WebSocket-Extensions"] == EXPECTED
        await ws.send("!info")
        assert await ws.recv() == EXPECTED
        for message in ("short", "long and repetitive " * 1000, os.urandom(100_000)):
            await ws.send(message)
            assert await ws.recv() == message
    # Not offered: not used.
    async with connect(f"{compressed.ws}/ws", compression=None) as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send("!info")
        assert await ws.recv() == ""


async def test_a_small_frame_that_inflates_past_the_limit_is_1009(
    compressed: ServerProcess,
) -> None:
    bomb = _deflate(bytes(16 << 20))  # 16 MiB of zeros in ~16 KiB; the limit is 1 MiB
    assert len(bomb) < 64 << 10
    async with await RawWebSocket.connect(
        compressed.port, "/ws", headers={"Sec-WebSocket-Extensions": "permessage-deflate"}
    ) as ws:
        assert ws.reply.headers["sec-websocket-extensions"] == EXPECTED
        await ws.send_frame(OP_TEXT, _deflate(b"fine"), rsv=RSV1)
        assert await ws.recv_message() == "fine"
        await ws.send_frame(OP_TEXT, bomb, rsv=RSV1)
        code, _ = await ws.recv_close()
    assert code == 1009


async def test_broadcast_reaches_compressed_and_plain_sockets(compressed: ServerProcess) -> None:
    room = f"{compressed.ws}/room/{uuid.uuid4().hex}"
    async with connect(room) as deflating, connect(room, compression=None) as plain:
        message = "to everyone, " * 200
        await deflating.send(message)
        assert await asyncio.wait_for(deflating.recv(), 10) == message
        assert await asyncio.wait_for(plain.recv(), 10) == message


async def test_an_offer_with_a_bad_parameter_is_declined(compressed: ServerProcess) -> None:
    async with await RawWebSocket.connect(
        compressed.port,
        "/ws",
        headers={"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=42"},
    ) as ws:
        assert "sec-websocket-extensions" not in ws.reply.headers
        # And a compressed frame is then a protocol error.
        await ws.send_frame(OP_TEXT, _deflate(b"x"), rsv=RSV1)
        code, _ = await ws.recv_close()
    assert code == 1002
