"""Echo worker for the end-to-end tests: HTTP inspection, WebSocket echo, recorded handler calls.

Routes
  GET  /stats            handler-call counters and every close event seen (JSON); not counted
  ANY  /inspect          the request as the worker saw it (JSON)
  GET  /boom             raises (the client must get a bare 500)
  WS   /ws?id=ID         echo via a plain `def` message listener
  WS   /ws-async?id=ID   echo via an `async def` message listener
  WS   /ws-pull?id=ID    echo via `async for message in server`
  WS   /observe          receives one JSON line per close event of any other socket
  anything else          404 "not found"

Text commands on the echo sockets: "!close CODE REASON" makes the server close, "!raise" makes the
listener raise, "!info" answers with the server socket's attributes as JSON.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import sockworker as sw

COUNTS = {"fetch": 0, "message": 0, "close": 0, "error": 0}
CLOSES: list[dict[str, Any]] = []
ERRORS: list[dict[str, Any]] = []
OBSERVERS: list[Any] = []
TASKS: set[asyncio.Task[None]] = set()

MAX_MESSAGE = 2 << 20


def _json(value: Any, status: int = 200) -> sw.Response:
    return sw.Response(
        json.dumps(value),
        status=status,
        headers={"content-type": "application/json", "x-reply": "ok"},
    )


def _info(server: Any) -> str:
    return json.dumps(
        {
            "ready_state": server.ready_state,
            "url": server.url,
            "protocol": server.protocol,
            "extensions": server.extensions,
            "buffered_amount": server.buffered_amount,
        }
    )


def _command(server: Any, conn_id: str, data: str | bytes) -> bool:
    """Handle a "!..." command; returns False when `data` is a plain message to echo."""
    if not isinstance(data, str) or not data.startswith("!"):
        return False
    verb, _, rest = data.partition(" ")
    if verb == "!close":
        code, _, reason = rest.partition(" ")
        server.close(int(code), reason)
    elif verb == "!raise":
        raise RuntimeError(f"listener-failure-{conn_id}")
    elif verb == "!info":
        server.send(_info(server))
    else:
        return False
    return True


def _record_close(server: Any, conn_id: str, event: Any) -> None:
    COUNTS["close"] += 1
    record = {
        "id": conn_id,
        "code": event.code,
        "reason": event.reason,
        "was_clean": event.was_clean,
        "ready_state": server.ready_state,
    }
    CLOSES.append(record)
    line = json.dumps(record)
    for observer in list(OBSERVERS):
        if observer.ready_state == sw.WebSocket.OPEN:
            observer.send(line)


def _record_error(conn_id: str, event: Any) -> None:
    COUNTS["error"] += 1
    ERRORS.append({"id": conn_id, "error": repr(event.error)})


def _pick_protocol(request: sw.Request) -> dict[str, str]:
    offered = request.headers.get("sec-websocket-protocol")
    if not offered:
        return {}
    names = [name.strip() for name in offered.split(",")]
    return {"sec-websocket-protocol": "chat"} if "chat" in names else {}


def _open_echo(request: sw.Request, mode: str) -> sw.Response:
    conn_id = request.query.get("id", "")
    client, server = sw.WebSocketPair()
    server.accept()

    if mode == "sync":

        def on_message(event: Any) -> None:
            COUNTS["message"] += 1
            if not _command(server, conn_id, event.data):
                server.send(event.data)

        server.add_event_listener("message", on_message)
    elif mode == "async":

        async def on_message_async(event: Any) -> None:
            COUNTS["message"] += 1
            await asyncio.sleep(0)
            if not _command(server, conn_id, event.data):
                server.send(event.data)

        server.on("message", on_message_async)
    else:

        async def pull() -> None:
            async for message in server:
                COUNTS["message"] += 1
                if not _command(server, conn_id, message):
                    server.send(message)

        task = asyncio.get_running_loop().create_task(pull())
        TASKS.add(task)
        task.add_done_callback(TASKS.discard)

    server.on("close", lambda event: _record_close(server, conn_id, event))
    server.on("error", lambda event: _record_error(conn_id, event))
    return sw.Response(status=101, websocket=client, headers=_pick_protocol(request))


def _open_observer() -> sw.Response:
    client, server = sw.WebSocketPair()
    server.accept()
    OBSERVERS.append(server)

    def gone(_event: Any) -> None:
        if server in OBSERVERS:
            OBSERVERS.remove(server)

    server.on("close", gone)
    return sw.Response(status=101, websocket=client)


async def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    path = request.path
    if path == "/stats":
        return _json({"counts": COUNTS, "closes": CLOSES, "errors": ERRORS})
    COUNTS["fetch"] += 1
    if path == "/inspect":
        body = request.body
        text = await request.text()
        parsed = None
        if request.headers.get("content-type", "").startswith("application/json"):
            parsed = await request.json()
        return _json(
            {
                "method": request.method,
                "url": request.url,
                "path": request.path,
                "query": dict(request.query),
                "x_test_lower": request.headers.get("x-test"),
                "x_test_upper": request.headers.get("X-TEST"),
                "missing_header": request.headers.get("x-not-sent", "default"),
                "body_hex": bytes(body).hex(),
                "body_len": len(body),
                "text": text,
                "json": parsed,
                "client": request.client,
            }
        )
    if path == "/boom":
        await asyncio.sleep(0)
        raise RuntimeError("secret-detail-http-500")
    if path == "/ws":
        return _open_echo(request, "sync")
    if path == "/ws-async":
        return _open_echo(request, "async")
    if path == "/ws-pull":
        return _open_echo(request, "pull")
    if path == "/observe":
        return _open_observer()
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, limits=sw.Limits(max_message_size=MAX_MESSAGE))
