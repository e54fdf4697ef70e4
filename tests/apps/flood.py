"""Worker for flow control: a sender faster than its client, and a reader that stops reading.

max_buffered_bytes is 1 MiB here.

Routes
  WS  /flood?id=ID&mode=send|async&chunk=BYTES&total=BYTES
        after the client's first message, send `total` bytes in binary chunks (8-byte big-endian
        index, then filler) with `send` (mode=send, never waiting) or `await send_async`
        (mode=async), then close 1000 "done"; progress is in /stats.
  WS  /pull?id=ID&stop_after=N
        read with `async for`; after N messages stop reading until GET /resume?id=ID.
        Binary messages carry an 8-byte big-endian sequence number; the text "end" marks the end.
  GET /resume?id=ID
  GET /stats?id=ID   that connection's record (JSON)
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import sockworker as sw

MAX_BUFFERED = 1 << 20
FILLER = bytes(range(256)) * 1024  # 256 KiB

STATE: dict[str, dict[str, Any]] = {}
RESUME: dict[str, asyncio.Event] = {}
TASKS: set[asyncio.Task[None]] = set()


def _state(conn_id: str) -> dict[str, Any]:
    return STATE.setdefault(
        conn_id,
        {
            # sender side
            "sent": 0,
            "chunks": 0,
            "max_buffered": 0,
            "done": False,
            "stop": None,
            # reader side
            "received": 0,
            "received_bytes": 0,
            "in_order": True,
            "paused": False,
            "ended": False,
            # both
            "close": None,
        },
    )


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)


def _chunk(index: int, size: int) -> bytes:
    return struct.pack("!Q", index) + FILLER[: size - 8]


async def _send_fast(server: Any, st: dict[str, Any], size: int, total: int) -> None:
    """Queue as fast as possible without ever waiting for the peer."""
    try:
        while st["sent"] < total:
            if server.ready_state != sw.WebSocket.OPEN:
                st["stop"] = f"ready_state {server.ready_state}"
                break
            server.send(_chunk(st["chunks"], size))
            st["chunks"] += 1
            st["sent"] += size
            st["max_buffered"] = max(st["max_buffered"], server.buffered_amount)
            if st["chunks"] % 16 == 0:
                await asyncio.sleep(0)  # let other events (e.g. /stats) run
        else:
            st["stop"] = "total reached"
    except Exception as exc:
        st["stop"] = f"send raised {type(exc).__name__}: {exc}"
    finally:
        st["done"] = True


async def _send_paced(server: Any, st: dict[str, Any], size: int, total: int) -> None:
    """Same stream, but every send waits for the queue to drain below the high-water mark."""
    try:
        while st["sent"] < total:
            if server.ready_state != sw.WebSocket.OPEN:
                st["stop"] = f"ready_state {server.ready_state}"
                break
            await server.send_async(_chunk(st["chunks"], size))
            st["chunks"] += 1
            st["sent"] += size
            st["max_buffered"] = max(st["max_buffered"], server.buffered_amount)
        else:
            st["stop"] = "total reached"
            server.close(1000, "done")
    except Exception as exc:
        st["stop"] = f"send_async raised {type(exc).__name__}: {exc}"
    finally:
        st["done"] = True


def _open_flood(request: sw.Request) -> sw.Response:
    conn_id = request.query["id"]
    mode = request.query.get("mode", "send")
    size = int(request.query.get("chunk", "65536"))
    total = int(request.query.get("total", str(256 << 20)))
    st = _state(conn_id)
    client, server = sw.WebSocketPair()
    server.accept()
    started = False

    def on_message(_event: Any) -> None:
        nonlocal started
        if started:
            return
        started = True
        sender = _send_fast if mode == "send" else _send_paced
        _spawn(sender(server, st, size, total))

    def on_close(event: Any) -> None:
        st["close"] = [event.code, event.reason]

    server.on("message", on_message)
    server.on("close", on_close)
    return sw.Response(status=101, websocket=client)


def _open_pull(request: sw.Request) -> sw.Response:
    conn_id = request.query["id"]
    stop_after = int(request.query.get("stop_after", "8"))
    st = _state(conn_id)
    resume = RESUME.setdefault(conn_id, asyncio.Event())
    client, server = sw.WebSocketPair()
    server.accept()

    async def reader() -> None:
        async for message in server:
            if message == "end":
                st["ended"] = True
                continue
            (seq,) = struct.unpack("!Q", message[:8])
            if seq != st["received"]:
                st["in_order"] = False
            st["received"] += 1
            st["received_bytes"] += len(message)
            if st["received"] == stop_after:
                st["paused"] = True
                await resume.wait()
                st["paused"] = False
        st["close"] = "iteration ended"

    _spawn(reader())
    return sw.Response(status=101, websocket=client)


def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    path = request.path
    if path == "/stats":
        return sw.Response(
            json.dumps(_state(request.query["id"])), headers={"content-type": "application/json"}
        )
    if path == "/resume":
        RESUME.setdefault(request.query["id"], asyncio.Event()).set()
        return sw.Response(
            json.dumps({"resumed": True}), headers={"content-type": "application/json"}
        )
    if path == "/flood":
        return _open_flood(request)
    if path == "/pull":
        return _open_pull(request)
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, limits=sw.Limits(max_buffered_bytes=MAX_BUFFERED))
