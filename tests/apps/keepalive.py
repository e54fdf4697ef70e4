"""Worker with a fast keepalive (ping_interval 0.3 s, ping_timeout 0.3 s) and a hibernating
Durable Object, for tests/test_keepalive.py.

Routes
  WS   /ws?id=ID      echo; its close event is recorded
  WS   /room/NAME     hibernatable socket of a ROOMS object (hibernate_after 0.2 s), echo
  GET  /stats         close events and how often each room was built (JSON)
"""

from __future__ import annotations

import json
from typing import Any

import sockworker as sw

STATE: dict[str, Any] = {"closes": [], "built": {}}


class Room(sw.DurableObject):
    limits = sw.Limits(hibernate_after=0.2)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        name = ctx.id.name or ""
        STATE["built"][name] = STATE["built"].get(name, 0) + 1

    async def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(message)


async def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path == "/stats":
        return sw.Response(json.dumps(STATE), headers={"content-type": "application/json"})
    if request.path.startswith("/room/"):
        room = env.ROOMS.get(env.ROOMS.id_from_name(request.path.removeprefix("/room/")))
        response: sw.Response = await room.fetch(request)
        return response
    conn_id = request.query.get("id", "")
    client, server = sw.WebSocketPair()
    server.accept()
    server.on("message", lambda event: server.send(event.data))
    server.on(
        "close",
        lambda event: STATE["closes"].append(
            {"id": conn_id, "code": event.code, "reason": event.reason, "clean": event.was_clean}
        ),
    )
    return sw.Response(status=101, websocket=client)


app = sw.App(
    fetch=fetch,
    durable_objects={"ROOMS": Room},
    limits=sw.Limits(ping_interval=0.3, ping_timeout=0.3),
    metrics_path="/metrics",
)
