"""The app of the cluster benchmark (bench/cluster.py): one Durable Object room per `room`, its
behaviour per message chosen by the query string's `mode`. No storage is written per message,
so what is measured is routing and relaying, not PostgreSQL.

  /?room=peer&mode=echo     a room per connection (`--workers` scaling: nothing forwarded)
  /?room=R&mode=echo        WebSocket: each message goes back to its sender (`ws.send`)
  /?room=R&mode=broadcast   WebSocket: each message goes to every socket of the room, the
                            sender's too (`ctx.broadcast`; `exclude=ws` raises OverflowError
                            when the sender's socket is held by another node)
  /?room=R&mode=node        WebSocket: each message goes back prefixed with the name of the node
                            whose object answered it ("n1 <message>"): failover timing
  /?room=R&mode=...         plain HTTP: the object answers the node's name (the first node to
                            reach a room owns it, so this chooses the owner); it then stays
                            resident, holding its lease (`hibernate_after` below)

Each mode is a namespace of its own, so that a new owner after a failover (which rebuilds the
object without its `fetch`) still knows what to do with a message.
"""

from __future__ import annotations

import os

import sockworker as sw

NODE = os.environ.get("SW_BENCH_NODE", "?")
#: Resident for the whole run: an object that hibernated would give its lease up, and the
#: PostgreSQL-load measurement counts the renewals of resident objects.
RESIDENT = sw.Limits(hibernate_after=24 * 3600)


class Echo(sw.DurableObject):
    limits = RESIDENT

    def fetch(self, request: sw.Request) -> sw.Response:
        if request.headers.get("upgrade", "").lower() != "websocket":
            return sw.Response(NODE)
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(message)


class Broadcast(Echo):
    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self.ctx.broadcast(message)


class Node(Echo):
    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(f"{NODE} {message if isinstance(message, str) else message.decode()}")


NAMESPACES = {"ECHO": Echo, "BROADCAST": Broadcast, "NODE": Node}


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    namespace = request.query.get("mode", "echo").upper()
    if namespace not in NAMESPACES:
        return sw.Response("mode is echo, broadcast or node\n", status=404)
    # room=peer: a room per connection (owned by the node that accepted it: no forwarding).
    room = request.query.get("room", "lobby")
    if room == "peer":
        room = request.client or "lobby"
    response: sw.Response = await getattr(env, namespace).get_by_name(room).fetch(request)
    return response


app = sw.App(fetch=fetch, durable_objects=NAMESPACES)
