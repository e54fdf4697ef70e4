"""An app for the observability tests (tests/test_metrics_port.py, test_dashboard_browser.py):
requests and sockets billed to ``?account=``, a handler that blocks the application thread,
and a Durable Object reached through its stub.

Routes
  GET /metrics                  the app port's own metrics (App(metrics_path=))
  GET /hello?account=A          "hello" (billed to A)
  GET /block?started=F&release=G  a `def` handler: creates file F, then blocks the Python
                                thread (time.sleep) until file G exists, then answers "released"
  WS  /ws?account=A             echoes every message (a Worker socket)
  ANY /room/NAME?account=A      `await stub.fetch(request)` of the Room NAME, which echoes its
                                hibernatable sockets' messages and answers GET with its name;
                                it hibernates 0.3 s after its last event
"""

from __future__ import annotations

import os
import time
from typing import Any

import sockworker as sw


class Room(sw.DurableObject):
    # (Hibernates soon after its last event: the tests see hibernated sockets and objects.)
    limits = sw.Limits(hibernate_after=0.3)

    async def fetch(self, request: sw.Request) -> sw.Response:
        if request.headers.get("upgrade", "").lower() == "websocket":
            client, server = sw.WebSocketPair()
            self.ctx.accept_websocket(server)
            return sw.Response(status=101, websocket=client)
        return sw.Response(f"room {request.path}")

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(message)


def _echo(server: Any) -> None:
    server.add_event_listener("message", lambda event: server.send(event.data))


async def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path.startswith("/room/"):
        stub = env.ROOMS.get(env.ROOMS.id_from_name(request.path.split("/")[2]))
        response: sw.Response = await stub.fetch(request)
        return response
    if request.path == "/ws":
        client, server = sw.WebSocketPair()
        server.accept()
        _echo(server)
        return sw.Response(status=101, websocket=client)
    return sw.Response("not found", status=404)


def worker(request: sw.Request, env: Any, ctx: Any) -> Any:
    """A `def` Worker for the plain routes (so /block holds the thread), `async` for the rest."""
    if request.path == "/hello":
        return sw.Response("hello")
    if request.path == "/block":
        started = request.query["started"]
        release = request.query["release"]
        with open(started, "w"):
            pass
        while not os.path.exists(release):
            time.sleep(0.01)  # the point of the route: the application thread is held
        return sw.Response("released")
    return fetch(request, env, ctx)


def _account(request: sw.Request) -> str:
    return request.query.get("account", "default")


app = sw.App(worker, account=_account, durable_objects={"ROOMS": Room}, metrics_path="/metrics")
