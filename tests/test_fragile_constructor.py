"""A constructor that raises while an object wakes for a socket event: that event is lost (and
logged), the object is reset, and the other events of the same batch are still handled."""

from __future__ import annotations

import aiohttp

from tests.rawws import OP_TEXT, RawWebSocket, encode_frame
from tests.support import ServerProcess, get_json, wait_until


async def test_a_failing_constructor_costs_only_its_own_event() -> None:
    server = ServerProcess("tests.apps.fragile:app")
    try:
        async with await RawWebSocket.connect(server.port, "/ws") as ws:
            await ws.send("warm")
            assert await ws.recv_message() == "ok:warm"

            async def hibernated() -> bool:
                return await get_json(f"{server.http}/alive") == 0

            await wait_until(hibernated, within=10, what="the object to hibernate")
            async with aiohttp.ClientSession() as session, session.get(f"{server.http}/arm"):
                pass
            # Two messages in one write: one read, one batch. The first wakes the object and its
            # constructor raises; the second must still be handled by a fresh instance.
            ws.write_raw(encode_frame(OP_TEXT, b"one") + encode_frame(OP_TEXT, b"two"))
            assert await ws.recv_message() == "ok:two"
            server.wait_for_log(r"exception in the constructor \(for websocket_message\) of object")
            await ws.send("three")
            assert await ws.recv_message() == "ok:three"
    finally:
        assert server.stop() == 0
