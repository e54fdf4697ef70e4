"""A chat room for the cluster tests: hibernatable sockets with tags and an attachment, a
history in KV, broadcast, an auto-response; `/count?room=R` says how many sockets it has."""

from __future__ import annotations

import json

import sockworker as sw

#: Instances made on this node (a hibernated room is made again by its next event).
INSTANCES = 0


class Room(sw.DurableObject):
    # Idle rooms leave memory soon (the hibernation test waits for it).
    limits = sw.Limits(hibernate_after=0.5)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        global INSTANCES
        super().__init__(ctx, env)
        INSTANCES += 1
        ctx.set_websocket_auto_response(sw.AutoResponse("ping", "pong"))

    def fetch(self, request: sw.Request) -> sw.Response:
        if request.path == "/count":
            return sw.Response(
                json.dumps({"sockets": self.ctx.websocket_count(), "node": sw.node_id()})
            )
        user = request.query.get("user", "anonymous")
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server, tags=[user])
        server.serialize_attachment({"user": user})
        history = self.ctx.storage.get("history") or []
        server.send(json.dumps({"kind": "history", "messages": history, "owner": sw.node_id()}))
        self.ctx.broadcast(json.dumps({"kind": "join", "user": user}))
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        user = ws.deserialize_attachment()["user"]
        if message == "whoami":
            tags = self.ctx.get_tags(ws)
            ws.send(json.dumps({"kind": "you", "user": user, "tags": tags, "instance": INSTANCES}))
            return
        if message == "shout":
            # To everyone but the sender (also when the sender is held by another node).
            self.ctx.broadcast(json.dumps({"kind": "shout", "user": user}), exclude=ws)
            return
        if message == "list":
            users = sorted(s.deserialize_attachment()["user"] for s in self.ctx.get_websockets())
            ws.send(json.dumps({"kind": "list", "users": users}))
            return
        history = self.ctx.storage.get("history") or []
        history.append([user, message])
        self.ctx.storage.put("history", history)
        for socket in self.ctx.get_websockets():
            socket.send(
                json.dumps(
                    {"kind": "message", "user": user, "text": message, "owner": sw.node_id()}
                )
            )

    def websocket_close(self, ws: sw.WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.ctx.broadcast(
            json.dumps({"kind": "leave", "user": ws.deserialize_attachment()["user"]})
        )


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    room = env.ROOMS.get_by_name(request.query.get("room", "lobby"))
    return await room.fetch(request)


app = sw.App(fetch=fetch, durable_objects={"ROOMS": Room})
