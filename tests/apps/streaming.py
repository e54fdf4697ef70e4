"""Streamed HTTP bodies (tests/test_streaming.py): responses from iterators, Server-Sent Events,
request.stream(). Request bodies are limited to 2 MiB. ``app`` reads request bodies whole
before fetch runs; ``streamed_app`` is the same Worker with stream_request_bodies=True (and a
1 s handshake_timeout).

Worker routes
  GET  /chunks?n=N        an async generator: "chunk 0\\n" ... "chunk N-1\\n"
  GET  /sync              a sync generator: b"one ", "two ", b"three"
  GET  /sized             chunks with the handler's own content-length
  GET  /sse/NAME          text/event-stream: "data: 1", then (once POST /next/NAME) "data: 2", end
  POST /next/NAME         lets /sse/NAME (or /hang/NAME) go on
  GET  /hang/NAME         one chunk, then waits for /next/NAME forever
  GET  /forever/NAME      64 KiB chunks without end; counts them
  GET  /state/NAME        {"finished": the generator of NAME ran its finally, "pulled": chunks}
  GET  /fail-late         two chunks, then RuntimeError("boom late")
  GET  /fail-early        RuntimeError("boom early") before the first chunk
  GET  /empty             a generator that yields nothing
  GET  /status/CODE       a streamed body with that status (204, 304: no body goes out)
  POST /upload            reads the body with request.stream(): {"pieces", "bytes", "sha256"}
  POST /read              await request.read(): {"bytes", "sha256", "same": request.body after}
  POST /body-early        request.body before reading: {"error": the RuntimeError's message}
  POST /incremental/NAME  reads request.stream(), counting what arrived in RECEIVED[NAME]
  GET  /received/NAME     RECEIVED[NAME]
  POST /echo              a streamed response of the request's pieces, as they arrive
  GET  /do/NAME           the Ticker object NAME's fetch: a streamed SSE body from the object
  POST /do-next/NAME      the Ticker's next() (lets its stream write and send the next event)
  GET  /do-count/NAME     the Ticker's stored counter
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import sockworker as sw

GATES: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
FINISHED: dict[str, bool] = {}
PULLED: dict[str, int] = defaultdict(int)
RECEIVED: dict[str, int] = defaultdict(int)
CHUNK = 64 * 1024


def _json(value: Any) -> sw.Response:
    return sw.Response.json(value)


async def _chunks(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"chunk {i}\n"


def _sync() -> Iterator[bytes | str]:
    yield b"one "
    yield "two "
    yield b"three"


async def _sse(name: str) -> AsyncIterator[str]:
    try:
        yield "data: 1\n\n"
        await GATES[name].wait()
        yield "data: 2\n\n"
    finally:
        FINISHED[name] = True


async def _hang(name: str) -> AsyncIterator[bytes]:
    try:
        yield b"first\n"
        await asyncio.Event().wait()  # never set
        yield b"never\n"
    finally:
        FINISHED[name] = True


async def _forever(name: str) -> AsyncIterator[bytes]:
    block = b"x" * CHUNK
    try:
        while True:
            PULLED[name] += 1
            yield block
    finally:
        FINISHED[name] = True


async def _fail_late() -> AsyncIterator[str]:
    yield "a"
    yield "b"
    raise RuntimeError("boom late")


async def _fail_early() -> AsyncIterator[str]:
    raise RuntimeError("boom early")
    yield "never"  # (makes it a generator)


async def _empty() -> AsyncIterator[str]:
    return
    yield "never"


class Ticker(sw.DurableObject):
    """Streams SSE events from its fetch; each event stores the counter before it is sent."""

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.ready = asyncio.Event()

    def fetch(self, request: sw.Request) -> sw.Response:
        return sw.Response(self._events(), headers={"content-type": "text/event-stream"})

    async def _events(self) -> AsyncIterator[str]:
        storage = self.ctx.storage
        for _ in range(2):
            n = (storage.get("n") or 0) + 1
            storage.put("n", n)
            yield f"data: {n}\n\n"
            await self.ready.wait()
            self.ready.clear()

    def next(self) -> None:
        self.ready.set()

    def count(self) -> int:
        return int(self.ctx.storage.get("n") or 0)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    parts = request.path.strip("/").split("/")
    route, name = parts[0], (parts[1] if len(parts) > 1 else "")
    if route == "chunks":
        return sw.Response(_chunks(int(request.query.get("n", "3"))))
    if route == "sync":
        return sw.Response(_sync())
    if route == "sized":
        return sw.Response(_chunks(2), headers={"content-length": "16"})
    if route == "sse":
        return sw.Response(_sse(name), headers={"content-type": "text/event-stream"})
    if route == "next":
        GATES[name].set()
        return sw.Response("ok")
    if route == "hang":
        return sw.Response(_hang(name))
    if route == "forever":
        return sw.Response(_forever(name))
    if route == "state":
        return _json({"finished": FINISHED.get(name, False), "pulled": PULLED.get(name, 0)})
    if route == "fail-late":
        return sw.Response(_fail_late())
    if route == "fail-early":
        return sw.Response(_fail_early())
    if route == "empty":
        return sw.Response(_empty())
    if route == "status":
        return sw.Response(_chunks(2), status=int(name))
    if route == "upload":
        pieces, size, digest = 0, 0, hashlib.sha256()
        async for piece in request.stream():
            pieces += 1
            size += len(piece)
            digest.update(piece)
        return _json({"pieces": pieces, "bytes": size, "sha256": digest.hexdigest()})
    if route == "read":
        data = await request.read()
        digest = hashlib.sha256(data).hexdigest()
        return _json({"bytes": len(data), "sha256": digest, "same": request.body == data})
    if route == "body-early":
        try:
            return _json({"bytes": len(request.body)})
        except RuntimeError as error:
            return _json({"error": str(error)})
    if route == "incremental":
        async for piece in request.stream():
            RECEIVED[name] += len(piece)
        return _json(RECEIVED[name])
    if route == "received":
        return _json(RECEIVED.get(name, 0))
    if route == "echo":
        return sw.Response(request.stream())
    ticker = env.TICKER.get(env.TICKER.id_from_name(name)) if name else None
    if route == "do" and ticker is not None:
        return await ticker.fetch(request)
    if route == "do-next" and ticker is not None:
        await ticker.next()
        return sw.Response("ok")
    if route == "do-count" and ticker is not None:
        return sw.Response(json.dumps(await ticker.count()))
    return sw.Response("not found", status=404)


app = sw.App(
    fetch=fetch,
    durable_objects={"TICKER": Ticker},
    limits=sw.Limits(max_body_size=2 * 1024 * 1024),
)
streamed_app = sw.App(
    fetch=fetch,
    durable_objects={"TICKER": Ticker},
    limits=sw.Limits(max_body_size=2 * 1024 * 1024, handshake_timeout=1.0),
    stream_request_bodies=True,
)
