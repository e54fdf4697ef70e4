"""A Durable Object whose constructor can be made to fail once (GET /arm), for the test that a
failing wake-up costs only its own event, not the rest of the batch it came in."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import sockworker as sw

ARMED = [False]
INSTANCES: list[weakref.ref[Fragile]] = []


class Fragile(sw.DurableObject):
    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        if ARMED[0]:
            ARMED[0] = False
            raise RuntimeError("constructor failure (armed)")
        super().__init__(ctx, env)
        INSTANCES.append(weakref.ref(self))

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(f"ok:{message!s}")


async def fetch(request: sw.Request, env: Any, ctx: sw.ExecutionContext) -> sw.Response:
    if request.path == "/arm":
        ARMED[0] = True
        return sw.Response("armed")
    if request.path == "/alive":
        gc.collect()
        return sw.Response.json(sum(1 for ref in INSTANCES if ref() is not None))
    response: sw.Response = await env.FRAGILE.get(env.FRAGILE.id_from_name("one")).fetch(request)
    return response


app = sw.App(
    fetch=fetch, durable_objects={"FRAGILE": Fragile}, limits=sw.Limits(hibernate_after=0.3)
)
