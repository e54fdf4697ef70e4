"""Worker with permessage-deflate on (App(compression=True)), for tests/test_compression.py.

Routes
  WS   /ws              echo; "!info" answers the socket's extensions
  WS   /room/NAME       hibernatable socket of a ROOMS object; every message is broadcast
"""

from __future__ import annotations

from typing import Any

import sockworker as sw


class Room(sw.DurableObject):
    async def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self.ctx.broadcast(message)


async def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path.startswith("/room/"):
        room = env.ROOMS.get(env.ROOMS.id_from_name(request.path.removeprefix("/room/")))
        response: sw.Response = await room.fetch(request)
        return response
    client, server = sw.WebSocketPair()
    server.accept()

    def on_message(event: Any) -> None:
        server.send(server.extensions if event.data == "!info" else event.data)

    server.on("message", on_message)
    return sw.Response(status=101, websocket=client)


app = sw.App(
    fetch=fetch,
    durable_objects={"ROOMS": Room},
    limits=sw.Limits(max_message_size=1 << 20),
    compression=True,
)
