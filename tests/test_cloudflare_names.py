"""Cloudflare's names: a Worker and a Durable Object ported with camelCase names only
(``tests.apps.ported``) run against the real server, and every public snake_case name of the
classes that mirror Cloudflare's has its camelCase twin."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import aiohttp
import pytest
import sockworker as sw
from sockworker.client import Client
from websockets.asyncio.client import connect as ws_connect

from tests.support import ServerProcess, get_json, wait_until

WITHIN = 10.0

# The classes whose names code ported from Workers uses (SPEC §2).
MIRRORED = [
    sw.WebSocket,
    sw.MessageEvent,
    sw.CloseEvent,
    sw.ErrorEvent,
    sw.Request,
    sw.Response,
    sw.Headers,
    sw.ExecutionContext,
    sw.DurableObjectState,
    sw.DurableObjectNamespace,
    sw.DurableObjectStub,
    sw.DurableObjectId,
    sw.AutoResponse,
    sw.DurableObjectStorage,
    sw.SqlStorage,
    sw.SqlCursor,
    sw.AlarmInfo,
    Client,
]


def camel(name: str) -> str:
    """``get_websockets`` -> ``getWebSockets``: Cloudflare writes WebSocket with a capital S."""
    words = [
        ("WebSockets" if w == "websockets" else "WebSocket" if w == "websocket" else w)
        for w in name.split("_")
    ]
    first = words[0][0].lower() + words[0][1:]
    return first + "".join(w[0].upper() + w[1:] for w in words[1:])


def test_camel() -> None:
    assert camel("get_websockets") == "getWebSockets"
    assert camel("websocket_count") == "webSocketCount"
    assert camel("get_websocket_auto_response_timestamp") == "getWebSocketAutoResponseTimestamp"
    assert camel("ready_state") == "readyState"


@pytest.mark.parametrize("cls", MIRRORED, ids=lambda cls: cls.__name__)
def test_every_snake_case_name_has_its_camel_case_twin(cls: type) -> None:
    missing = []
    for name in dir(cls):
        if name.startswith("_") or "_" not in name or name.isupper():
            continue
        twin = camel(name)
        original = inspect.getattr_static(cls, name)
        try:
            alias = inspect.getattr_static(cls, twin)
        except AttributeError:
            missing.append(f"{name} -> {twin}")
            continue
        if inspect.ismemberdescriptor(original):
            # A slot: its twin is a property reading it (see the test below).
            assert isinstance(alias, property), (name, twin, alias)
        else:
            assert alias is original, f"{cls.__name__}.{twin} is not {name}"
    assert not missing, f"{cls.__name__} lacks {missing}"


def test_the_twins_of_slots_and_cloudflare_only_names() -> None:
    assert sw.CloseEvent(4000, "r", True).wasClean is True
    assert sw.ErrorEvent(sw.ProtocolError("bad frame")).message == "bad frame"
    assert sw.Request("GET", "http://h/p?a=1&b=2").queryString == "a=1&b=2"
    client, _server = sw.WebSocketPair()
    assert sw.Response(status=101, webSocket=client).webSocket is client
    with pytest.raises(TypeError):
        sw.Response(status=101, websocket=client, webSocket=client)
    assert sw.WebSocketRequestResponsePair is sw.AutoResponse
    assert [sw.WebSocket.READY_STATE_CONNECTING, sw.WebSocket.READY_STATE_CLOSED] == [0, 3]
    headers = sw.Headers({"X-A": "1"})
    assert headers.has("x-a") and not headers.has("x-b")
    headers.set("x-a", "2")
    headers.append("X-A", "3")
    assert headers.getAll("x-a") == ["2", "3"]
    headers.delete("X-A")
    assert not headers.has("x-a")


# -- the port, against the real server -----------------------------------------------------------


async def _recv(ws: Any) -> Any:
    return await asyncio.wait_for(ws.recv(), WITHIN)


async def test_a_ported_chat_room_runs(ported_server: ServerProcess) -> None:
    url = f"{ported_server.ws}/room/lobby"
    async with ws_connect(f"{url}?name=alice") as alice, ws_connect(f"{url}?name=bob") as bob:
        alice_who = json.loads(await _send_and_recv(alice, "!who"))
        assert alice_who == {
            "who": ["alice", "bob"],
            "tags": ["alice"],
            "tagged": 1,
            "autoResponse": "pong",
            "readyState": True,
        }
        await alice.send("hello")
        assert await _recv(bob) == "alice: hello"
        await bob.send("ping")  # answered by the core: the pair the constructor set
        assert await _recv(bob) == "pong"
        await bob.send(b"bytes too")
        assert await _recv(alice) == "bob: b'bytes too'"
        await bob.close(4000, "leaving")
        assert bob.close_code == 4000
        # webSocketClose ran for bob (its close() on a closed socket is accepted); the room
        # goes on without him.
        who = json.loads(await _send_and_recv(alice, "!who"))
        assert who["who"] == ["alice"]

    async def visits() -> bool:
        return await get_json(f"{ported_server.http}/visits") == 2

    await wait_until(visits, within=WITHIN, what="ctx.waitUntil to run once per room request")


async def _send_and_recv(ws: Any, message: str) -> Any:
    await ws.send(message)
    return await _recv(ws)


async def test_a_ported_standard_api_socket_runs(ported_server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{ported_server.ws}/echo") as ws:
            await ws.send_str("echo me")
            assert (await ws.receive(timeout=WITHIN)).data == "echo me"
            await ws.send_str("!state")
            state = json.loads((await ws.receive(timeout=WITHIN)).data)
            assert state == {"readyState": sw.WebSocket.OPEN, "bufferedAmount": 0}
            await ws.close(code=4001, message=b"done")
        assert ws.close_code == 4001

        async def closes() -> Any:
            return await get_json(f"{ported_server.http}/closes")

        assert await wait_until(closes, within=WITHIN, what="the close listener") == [
            {"code": 4001, "reason": "done", "wasClean": True}
        ]

        async with session.get(f"{ported_server.http}/ids") as response:
            assert response.status == 200
            assert response.headers["x-ported"] == "yes" and response.headers["x-checked"] == "1"
            ids = await response.json()
        assert ids["roundTrip"] is True and ids["sameName"] is True
        assert ids["uniqueLength"] == 64 and len(ids["named"]) == 64

        async with session.get(f"{ported_server.http}/boom") as response:
            assert response.status == 500
            assert "ported-worker-boom" not in await response.text()
    ported_server.wait_for_log("ported-worker-boom")
