"""Protocol handling in the core: pings answered without Python, bad frames closed with 1002/1007,
listener exceptions closed with 1011 — while a healthy client keeps being served."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RSV1,
    RSV2,
    RSV3,
    RawWebSocket,
    encode_frame,
)
from tests.support import ServerProcess, get_json, healthy_client


def _id() -> str:
    return uuid.uuid4().hex


async def _counts(server: ServerProcess) -> dict[str, int]:
    stats: dict[str, Any] = await get_json(f"{server.http}/stats")
    return stats["counts"]


async def test_client_ping_gets_pong_without_any_handler_call(echo_server: ServerProcess) -> None:
    async with connect(f"{echo_server.ws}/ws?id={_id()}", ping_interval=None) as ws:
        await ws.send("warm-up")
        assert await asyncio.wait_for(ws.recv(), 10) == "warm-up"
        before = await _counts(echo_server)

        for i in range(20):
            pong_waiter = await ws.ping(f"ping-{i}".encode())
            await asyncio.wait_for(pong_waiter, 5)

        # A message after the pings: once its echo is back, anything the pings triggered in
        # Python has been counted too (events for one socket are delivered in order).
        await ws.send("after-pings")
        assert await asyncio.wait_for(ws.recv(), 10) == "after-pings"
        after = await _counts(echo_server)

    assert after["message"] == before["message"] + 1
    assert after["fetch"] == before["fetch"]
    assert after["error"] == before["error"]


async def test_ping_payload_is_echoed_in_pong_and_unsolicited_pong_is_ignored(
    echo_server: ServerProcess,
) -> None:
    async with await RawWebSocket.connect(echo_server.port, f"/ws?id={_id()}") as ws:
        before = await _counts(echo_server)
        await ws.send_frame(OP_PING, b"are you there?")
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload, frame.fin) == (OP_PONG, b"are you there?", True)

        await ws.send_frame(OP_PING, b"")
        frame = await ws.recv_frame()
        assert (frame.opcode, frame.payload) == (OP_PONG, b"")

        await ws.send_frame(OP_PONG, b"unsolicited")  # allowed by RFC 6455 5.5.3: no answer
        await ws.send("still open")
        assert await ws.recv_message() == "still open"
        after = await _counts(echo_server)
    assert after["message"] == before["message"] + 1


async def _expect_close(ws: RawWebSocket, code: int) -> None:
    got, reason = await ws.recv_close()
    assert got == code, f"expected close {code}, got {got} {reason!r}"


# name -> (frames, how many of them are well-formed messages the handler may see)
VIOLATIONS: dict[str, tuple[list[bytes], int]] = {
    "unmasked-text": ([encode_frame(OP_TEXT, b"hello", mask=False)], 0),
    "unmasked-binary-after-good": (
        [encode_frame(OP_TEXT, b"fine"), encode_frame(OP_BINARY, b"\x01\x02", mask=False)],
        1,
    ),
    "rsv1": ([encode_frame(OP_TEXT, b"hello", rsv=RSV1)], 0),
    "rsv2": ([encode_frame(OP_BINARY, b"hello", rsv=RSV2)], 0),
    "rsv3": ([encode_frame(OP_TEXT, b"hello", rsv=RSV3)], 0),
    "rsv-on-ping": ([encode_frame(OP_PING, b"x", rsv=RSV1)], 0),
    "opcode-3": ([encode_frame(0x3, b"hello")], 0),
    "opcode-7": ([encode_frame(0x7, b"")], 0),
    "opcode-0xB": ([encode_frame(0xB, b"hello")], 0),
    "opcode-0xF": ([encode_frame(0xF, b"")], 0),
    "fragmented-ping": (
        [encode_frame(OP_PING, b"part", fin=False), encode_frame(OP_CONT, b"rest", fin=True)],
        0,
    ),
    "fragmented-close": ([encode_frame(OP_CLOSE, b"\x03\xe8", fin=False)], 0),
    "continuation-without-start": ([encode_frame(OP_CONT, b"orphan", fin=True)], 0),
    "new-message-inside-fragmented": (
        [encode_frame(OP_TEXT, b"one", fin=False), encode_frame(OP_TEXT, b"two", fin=True)],
        0,
    ),
    "control-payload-over-125": ([encode_frame(OP_PING, b"p" * 126)], 0),
}


@pytest.mark.parametrize(("frames", "well_formed"), VIOLATIONS.values(), ids=VIOLATIONS.keys())
async def test_protocol_violation_closes_with_1002(
    echo_server: ServerProcess, frames: list[bytes], well_formed: int
) -> None:
    async with healthy_client(echo_server):
        before = await _counts(echo_server)
        async with await RawWebSocket.connect(echo_server.port, f"/ws?id={_id()}") as bad:
            for i, frame in enumerate(frames):
                bad.write_raw(frame)
                if i < well_formed:  # a good message first: it must still be echoed
                    assert await bad.recv_message() == "fine"
            await _expect_close(bad, 1002)
            # Answer like a polite client; the server must then drop the connection.
            await bad.send_frame(OP_CLOSE, b"\x03\xea")
            await bad.wait_eof()
        after = await _counts(echo_server)
    assert after["message"] == before["message"] + well_formed


INVALID_UTF8: dict[str, list[bytes]] = {
    "lone-continuation-byte": [encode_frame(OP_TEXT, b"abc\x80def")],
    "0xff": [encode_frame(OP_TEXT, b"\xff\xfe")],
    "overlong-slash": [encode_frame(OP_TEXT, b"\xc0\xaf")],
    "surrogate": [encode_frame(OP_TEXT, b"x" + b"\xed\xa0\x80")],
    "truncated-at-end-of-fragmented-message": [
        encode_frame(OP_TEXT, b"ok\xc3", fin=False),
        encode_frame(OP_CONT, b"", fin=True),
    ],
}


@pytest.mark.parametrize("frames", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
async def test_invalid_utf8_closes_with_1007(
    echo_server: ServerProcess, frames: list[bytes]
) -> None:
    async with healthy_client(echo_server):
        before = await _counts(echo_server)
        async with await RawWebSocket.connect(echo_server.port, f"/ws?id={_id()}") as bad:
            for frame in frames:
                bad.write_raw(frame)
            await _expect_close(bad, 1007)
        after = await _counts(echo_server)
    assert after["message"] == before["message"]  # the invalid message never reached Python


@pytest.mark.parametrize("route", ["/ws", "/ws-async"])
async def test_listener_exception_closes_socket_with_1011_and_is_logged(
    echo_server: ServerProcess,
    route: str,
) -> None:
    conn_id = _id()
    mark = echo_server.log_mark()
    async with healthy_client(echo_server):
        async with connect(f"{echo_server.ws}{route}?id={conn_id}") as ws:
            await ws.send("!raise")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None, "no close frame from the server"
        assert closed.value.rcvd.code == 1011
    await echo_server.wait_for_log_async(f"listener-failure-{conn_id}", start=mark)
    assert "Traceback (most recent call last)" in "\n".join(echo_server.lines[mark:])


async def test_listener_exception_seen_by_aiohttp_as_1011(echo_server: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{echo_server.ws}/ws?id={_id()}") as ws,
    ):
        await ws.send_str("!raise")
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == 1011
