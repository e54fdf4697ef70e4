"""Hibernatable sockets spread over 100 rooms, for the memory test of hibernated sockets.

WS   /room          joins room r(N mod 100): accepted with ctx.accept_websocket; echoes
GET  /resident      how many rooms have an instance in memory now, after gc.collect() as in
                    the other test apps (JSON; "before_gc": the count before it)
"""

from __future__ import annotations

import gc
import json
import weakref

import sockworker as sw

ROOMS = 100
_joined = 0
_resident: weakref.WeakSet[Room] = weakref.WeakSet()


class Room(sw.DurableObject):
    # The memory test's clients are raw sockets that never read: they cannot answer the core's
    # keepalive Pings, and a socket silent for ping_interval + ping_timeout (40 s by default)
    # is closed with 1011, which a slow run of the test outlasted (all its sockets were gone
    # when it counted descriptors). The Pings still go out, and the keepalive timer is still
    # part of what a socket costs; only the close is pushed past the test.
    limits = sw.Limits(hibernate_after=0.3, ping_timeout=3600)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        _resident.add(self)

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(message)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    global _joined
    if request.path == "/resident":
        # An instance that a reference cycle holds waits for Python's collector, which an idle
        # server may not run for a long time; what the runtime itself keeps is what is asked.
        before_gc = len(_resident)
        gc.collect()
        return sw.Response(json.dumps({"resident": len(_resident), "before_gc": before_gc}))
    if request.path == "/room":
        _joined += 1
        return await env.ROOM.get_by_name(f"r{_joined % ROOMS}").fetch(request)
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, durable_objects={"ROOM": Room})
