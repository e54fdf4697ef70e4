"""The app of tests/test_outgoing.py: a Durable Object that opens one upstream WebSocket, keeps
it on the instance, and relays what comes down it to every client that connects later."""

from __future__ import annotations

from typing import Any

import sockworker as sw


class Relay(sw.DurableObject):
    # Quick to hibernate, were it not for the upstream socket it holds.
    limits = sw.Limits(hibernate_after=0.2)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.upstream: sw.WebSocket | None = None
        self.seen: list[list[Any]] = []

    async def fetch(self, request: sw.Request) -> sw.Response:
        if request.path.endswith("/status"):
            return sw.Response.json({"seen": self.seen, "clients": self.ctx.websocket_count()})
        if self.upstream is None:
            upstream = await sw.connect(
                request.query["upstream"], protocols=["relay"], ca_file=request.query.get("ca")
            )
            upstream.add_event_listener("message", self.on_upstream)
            upstream.add_event_listener("close", self.on_upstream_close)
            upstream.add_event_listener("error", self.on_upstream_error)
            self.upstream = upstream
            self.seen.append(["open", upstream.protocol])
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def on_upstream(self, event: sw.MessageEvent) -> None:
        self.ctx.broadcast(event.data)

    def on_upstream_close(self, event: sw.CloseEvent) -> None:
        self.seen.append(["close", event.code, event.reason, event.was_clean])
        self.ctx.broadcast(f"upstream closed {event.code}")
        self.upstream = None

    def on_upstream_error(self, event: sw.ErrorEvent) -> None:
        self.seen.append(["error", str(event.error)])

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        if self.upstream is not None:
            self.upstream.send(message)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    path, query = request.path, request.query
    if path.startswith("/relay/"):
        name = path.removeprefix("/relay/").split("/")[0]
        return await env.RELAYS.get(env.RELAYS.id_from_name(name)).fetch(request)
    if path == "/try-connect":
        try:
            await sw.connect(query["url"], ca_file=query.get("ca"))
        except sw.ConnectError as error:
            return sw.Response.json({"error": type(error).__name__, "message": str(error)})
        return sw.Response.json({"error": None})
    if path == "/fetch-form":
        response = await sw.fetch(query["url"], headers={"upgrade": "websocket"})
        ws = response.websocket
        assert ws is not None and response.status == 101
        ws.accept()
        ws.send("hello from the fetch form")
        reply = await ws.receive()
        ws.close(1000, "done")
        return sw.Response.json({"reply": reply})
    return sw.Response("no such route", status=404)


app = sw.App(fetch=fetch, durable_objects={"RELAYS": Relay})
