"""Worker for the attacks of issue #14: small limits, an origin allow-list, a Durable Object
namespace with limits of its own, and handlers that misbehave on purpose.

Limits (app): max_message_size 64 KiB, max_buffered_bytes 256 KiB, handshake_timeout 1 s,
max_connections 60, keepalive off (tests/apps/keepalive.py has it). Namespace ROOMS:
max_message_size 100, max_buffered_bytes 64 KiB, idle_timeout 1 s; namespace SLOW: wall_ms 200.

Routes
  WS   /ws?id=ID           echo (plain `def` listener); counts messages per id
  WS   /room/NAME          hibernatable socket of a ROOMS object: echo, "!flood N" sends N KiB
  WS   /chosen?proto=P     accepts with subprotocol P, offered or not
  GET  /block?seconds=S    time.sleep(S) in the Worker's `def` fetch (blocks the loop)
  GET  /slow               a SLOW object's fetch that sleeps in steps of 50 ms for 2 s
  GET  /badheader          answers with a header value holding CR LF
  POST /body               echoes the body length
  GET  /stats              counts (JSON); not counted itself
"""

from __future__ import annotations

import json
import time
from typing import Any

import sockworker as sw

COUNTS: dict[str, Any] = {"fetch": 0, "messages": {}, "closes": []}


class Room(sw.DurableObject):
    limits = sw.Limits(max_message_size=100, max_buffered_bytes=64 << 10, idle_timeout=1.0)

    async def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        if isinstance(message, str) and message.startswith("!flood "):
            for _ in range(int(message.split()[1])):
                ws.send(b"x" * 1024)
            return
        ws.send(message)

    def websocket_close(self, ws: sw.WebSocket, code: int, reason: str, was_clean: bool) -> None:
        COUNTS["closes"].append({"where": "room", "code": code, "reason": reason})


class Slow(sw.DurableObject):
    limits = sw.Limits(wall_ms=200)

    def fetch(self, request: sw.Request) -> sw.Response:
        for _ in range(40):
            time.sleep(0.05)  # blocking steps: the wall limit stops it at the next bytecode
        return sw.Response("finished")


def _echo(request: sw.Request, headers: dict[str, str] | None = None) -> sw.Response:
    conn_id = request.query.get("id", "")
    client, server = sw.WebSocketPair()
    server.accept()
    counts = COUNTS["messages"]

    def on_message(event: Any) -> None:
        counts[conn_id] = counts.get(conn_id, 0) + 1
        server.send(event.data)

    def on_close(event: Any) -> None:
        COUNTS["closes"].append({"where": conn_id, "code": event.code, "reason": event.reason})

    server.on("message", on_message)
    server.on("close", on_close)
    return sw.Response(status=101, websocket=client, headers=headers)


async def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    path = request.path
    if path == "/stats":
        return sw.Response(json.dumps(COUNTS), headers={"content-type": "application/json"})
    COUNTS["fetch"] += 1
    if path == "/ws":
        return _echo(request)
    if path == "/chosen":
        return _echo(request, {"sec-websocket-protocol": request.query["proto"]})
    if path.startswith("/room/"):
        stub = env.ROOMS.get(env.ROOMS.id_from_name(path.removeprefix("/room/")))
        response: sw.Response = await stub.fetch(request)
        return response
    if path == "/slow":
        response = await env.SLOW.get(env.SLOW.id_from_name("slow")).fetch(request)
        return response
    if path == "/badheader":
        return sw.Response("x", headers={"x-bad": "one\r\nInjected: two"})
    if path == "/body":
        return sw.Response(str(len(request.body)))
    return sw.Response("not found", status=404)


def blocking_fetch(request: sw.Request, env: Any, ctx: Any) -> Any:
    """A plain `def` fetch: `/block` sleeps in it (the loop is blocked); the rest is async."""
    if request.path == "/block":
        time.sleep(float(request.query.get("seconds", "1.5")))
        return sw.Response("slept")
    return fetch(request, env, ctx)


app = sw.App(
    fetch=blocking_fetch,
    durable_objects={"ROOMS": Room, "SLOW": Slow},
    limits=sw.Limits(
        max_message_size=64 << 10,
        max_buffered_bytes=256 << 10,
        handshake_timeout=1.0,
        max_connections=60,
        ping_interval=None,
    ),
    allowed_origins=["http://good.example"],
    metrics_path="/metrics",
)
