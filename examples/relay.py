"""A relay: one upstream WebSocket feed fanned out to every client of a room.

`/feed/NAME` is a room, one Durable Object per name. The first client of a room makes the object
open the upstream socket (`sw.connect`), which the object keeps on its instance; every message
that comes down it is broadcast, by the core, to every client of the room, including clients
that connect long after, in unrelated requests. What a client sends goes up the same socket.

    UPSTREAM=ws://127.0.0.1:9000/ sockworker serve examples.relay:app --port 8787

(`python -m websockets ws://127.0.0.1:8787/feed/demo` is a quick client.)
"""

from __future__ import annotations

import logging
import os

import sockworker as sw

UPSTREAM = os.environ.get("UPSTREAM", "ws://127.0.0.1:9000/")
logger = logging.getLogger("relay")


class Feed(sw.DurableObject):
    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.upstream: sw.WebSocket | None = None

    async def fetch(self, request: sw.Request) -> sw.Response:
        if self.upstream is None:
            try:
                self.upstream = await sw.connect(UPSTREAM)
            except sw.ConnectError as error:
                return sw.Response(f"upstream unavailable: {error}\n", status=502)
            self.upstream.add_event_listener("message", self.down)
            self.upstream.add_event_listener("close", self.lost)
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def down(self, event: sw.MessageEvent) -> None:
        self.ctx.broadcast(event.data)  # encoded once, queued on every client by the core

    def lost(self, event: sw.CloseEvent) -> None:
        logger.warning("upstream closed: %d %s", event.code, event.reason)
        self.upstream = None  # the next client to arrive reconnects
        self.ctx.broadcast(f"upstream closed ({event.code})")

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        if self.upstream is not None:
            self.upstream.send(message)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    if not request.path.startswith("/feed/"):
        return sw.Response("connect a WebSocket to /feed/NAME\n", status=404)
    name = request.path.removeprefix("/feed/")
    return await env.FEEDS.get(env.FEEDS.id_from_name(name)).fetch(request)


app = sw.App(fetch=fetch, durable_objects={"FEEDS": Feed})
