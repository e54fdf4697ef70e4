"""A ticker: one Durable Object per channel, its alarm ticking every TICK_MS milliseconds, each
tick broadcast to every subscriber (tested with 10,000 of them, tests/test_example_ticker.py).

    TICK_MS=500 sockworker serve examples.ticker:app --port 8787
    python -m websockets ws://127.0.0.1:8787/ticks/demo     # {"tick": 1, "at": ..., ...}

`/ticks/NAME` is a channel. A subscriber's socket is accepted as hibernatable and never costs a
Python object: a tick is one alarm of the channel's object, which calls ``ctx.broadcast`` once;
the core encodes the frame once and queues it on every socket. A subscriber's "ping" is answered
"pong" by the core without waking the object; anything else it sends is ignored. With no subscriber
left, the next alarm sets no further one, so an idle channel stops ticking (and hibernates); the
next subscriber starts it again, counting on from the tick number kept in the channel's storage.

TICK_MS (default 1000) must be an integer from 10 to 3,600,000; anything else stops the server
at start with a message that says so.
"""

from __future__ import annotations

import json
import os

import sockworker as sw


def _tick_seconds(raw: str) -> float:
    try:
        ms = int(raw)
    except ValueError:
        raise ValueError(f"TICK_MS must be an integer (milliseconds), not {raw!r}") from None
    if not 10 <= ms <= 3_600_000:
        raise ValueError(f"TICK_MS must be from 10 to 3600000 milliseconds, not {ms}")
    return ms / 1000


TICK = _tick_seconds(os.environ.get("TICK_MS", "1000"))


class Channel(sw.DurableObject):
    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        ctx.set_websocket_auto_response(sw.AutoResponse("ping", "pong"))

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)  # hibernatable: no Python object stays per socket
        storage = self.ctx.storage
        if storage.get_alarm() is None:  # the first subscriber starts the clock
            storage.set_alarm(sw.now() + TICK)
        return sw.Response(status=101, websocket=client)

    def alarm(self, info: sw.AlarmInfo) -> None:
        subscribers = self.ctx.websocket_count()  # counted in the core, wakes nothing
        if not subscribers:
            return  # nobody listens: no next alarm, the channel stops ticking
        storage = self.ctx.storage
        tick = (storage.get("tick") or 0) + 1
        storage.put("tick", tick)
        frame = json.dumps({"tick": tick, "at": sw.now(), "subscribers": subscribers})
        self.ctx.broadcast(frame)  # encoded once, queued on every socket by the core
        storage.set_alarm(sw.now() + TICK)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        # A subscriber has nothing to say (its "ping" is answered by the core, never here).
        return


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    name = request.path.removeprefix("/ticks/")
    if not request.path.startswith("/ticks/") or not name or "/" in name:
        return sw.Response("connect a WebSocket to /ticks/NAME\n", status=404)
    if request.headers.get("upgrade", "").lower() != "websocket":
        return sw.Response(f"connect a WebSocket to {request.path} for a tick every {TICK} s\n")
    return await env.CHANNELS.get_by_name(name).fetch(request)


app = sw.App(fetch=fetch, durable_objects={"CHANNELS": Channel})
