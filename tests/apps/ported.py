"""A Worker and a Durable Object written as Cloudflare's documentation writes them, ported to
Python with Cloudflare's own (camelCase) names only: the test that such code runs unchanged.

Routes
  WS   /room/NAME?name=USER  a chat room (a hibernatable Durable Object, one per NAME); "ping" is
                             auto-answered "pong"; "!who" answers who is in the room, as JSON
  WS   /echo                 the standard API: echoes; "!state" answers readyState/bufferedAmount
  GET  /closes               the close events /echo sockets saw (JSON)
  GET  /ids                  what the namespace's id methods return (JSON)
  GET  /visits               how many requests ctx.waitUntil() counted
  GET  /boom                 raises after ctx.passThroughOnException()
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sockworker import (
    App,
    DurableObject,
    Response,
    WebSocket,
    WebSocketPair,
    WebSocketRequestResponsePair,
)

CLOSES: list[dict[str, Any]] = []
VISITS = [0]


class ChatRoom(DurableObject):
    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        self.ctx.setWebSocketAutoResponse(WebSocketRequestResponsePair("ping", "pong"))

    async def fetch(self, request: Any) -> Response:
        if request.headers.get("Upgrade") != "websocket":
            return Response("Expected Upgrade: websocket", status=426)
        name = parse_qs(request.queryString).get("name", ["anonymous"])[0]
        client, server = WebSocketPair()
        self.ctx.acceptWebSocket(server, [name])
        server.serializeAttachment({"name": name})
        return Response(None, status=101, webSocket=client)

    async def webSocketMessage(self, ws: WebSocket, message: str | bytes) -> None:
        name = ws.deserializeAttachment()["name"]
        if message == "!who":
            sockets = self.ctx.getWebSockets()
            ws.send(
                json.dumps(
                    {
                        "who": sorted(s.deserializeAttachment()["name"] for s in sockets),
                        "tags": self.ctx.getTags(ws),
                        "tagged": len(self.ctx.getWebSockets(name)),
                        "autoResponse": self.ctx.getWebSocketAutoResponse().response,
                        "readyState": ws.readyState == WebSocket.READY_STATE_OPEN,
                    }
                )
            )
            return
        for other in self.ctx.getWebSockets():
            if other is not ws and other.readyState == WebSocket.READY_STATE_OPEN:
                other.send(f"{name}: {message}")

    async def webSocketClose(self, ws: WebSocket, code: int, reason: str, wasClean: bool) -> None:
        ws.close(code, "Durable Object is closing WebSocket")


def echo() -> Response:
    client, server = WebSocketPair()
    server.accept()

    def on_message(event: Any) -> None:
        if event.data == "!state":
            server.send(
                json.dumps(
                    {"readyState": server.readyState, "bufferedAmount": server.bufferedAmount}
                )
            )
        else:
            server.send(event.data)

    def on_close(event: Any) -> None:
        CLOSES.append({"code": event.code, "reason": event.reason, "wasClean": event.wasClean})

    server.addEventListener("message", on_message)
    server.addEventListener("close", on_close)
    return Response(None, status=101, webSocket=client)


async def count_visit() -> None:
    await asyncio.sleep(0)
    VISITS[0] += 1


async def fetch(request: Any, env: Any, ctx: Any) -> Response:
    ctx.passThroughOnException()
    path = urlsplit(request.url).path
    if path.startswith("/room/"):
        ctx.waitUntil(count_visit())
        room = env.ROOMS.get(env.ROOMS.idFromName(path.removeprefix("/room/")))
        return await room.fetch(request)
    if path == "/echo":
        return echo()
    if path == "/closes":
        return Response.json(CLOSES)
    if path == "/visits":
        return Response.json(VISITS[0])
    if path == "/ids":
        named = env.ROOMS.idFromName("lobby")
        unique = env.ROOMS.newUniqueId()
        response = Response.json(
            {
                "named": named.toString(),
                "roundTrip": env.ROOMS.idFromString(named.toString()).equals(named),
                "uniqueLength": len(unique.toString()),
                "sameName": env.ROOMS.idFromName("lobby").equals(named),
            }
        )
        response.headers.set("x-ported", "yes")
        if response.headers.has("x-ported"):
            response.headers.append("x-checked", "1")
        return response
    if path == "/boom":
        raise RuntimeError("ported-worker-boom")
    return Response("Not found", status=404)


app = App(fetch=fetch, durable_objects={"ROOMS": ChatRoom})
