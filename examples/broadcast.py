"""A room per path: every message goes to every other socket in the room.

Each room is a Durable Object holding hibernatable sockets; ``ctx.broadcast`` has the core encode
the frame once and queue it on every socket, with no Python loop and no Python object per socket.
Serve it with ``sockworker serve examples.broadcast:app``; the broadcast benchmark uses it.
"""

import sockworker as sw


class Room(sw.DurableObject):
    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self.ctx.broadcast(message, exclude=ws)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    if request.headers.get("upgrade", "").lower() != "websocket":
        return sw.Response("connect a WebSocket: every message goes to the others on the path\n")
    room = env.ROOMS.get(env.ROOMS.id_from_name(request.path))
    return await room.fetch(request)


app = sw.App(fetch=fetch, durable_objects={"ROOMS": Room})
