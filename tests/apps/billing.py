"""The app of the metering tests (tests/test_metering.py).

Every request is billed to the account in its ``?account=`` (default ``observer``). The billing
hook keeps every record it is given; ``/usage?of=ACCOUNT`` waits for the hook's next delivery
(which holds everything counted before the request) and answers the sums per label. With
``$BILLING_LOG`` set, each delivery is also appended there as JSON lines, followed by the running
totals, so a test can read what was delivered at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import sockworker as sw

HIBERNATE_AFTER = 0.3
ROOM_CPU_MS = 50
APP_CPU_MS = 100

alive: dict[str, weakref.ref[Room]] = {}
constructed: dict[str, int] = {}


def burn(ms: float) -> None:
    """Uses `ms` milliseconds of this thread's CPU."""
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


def spin() -> None:
    while True:
        pass


class Hook(sw.BillingHook):
    flush_interval = 0.05

    def __init__(self) -> None:
        self.records: list[sw.UsageRecord] = []
        self.waiters: list[asyncio.Future[None]] = []

    def on_usage(self, records: list[sw.UsageRecord]) -> None:
        self.records.extend(records)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()
        path = os.environ.get("BILLING_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as log:
                for record in records:
                    log.write(json.dumps({"record": record.as_dict()}) + "\n")
                log.write(json.dumps({"totals": app.meter.totals().as_dict()}) + "\n")

    def admit(self, request: sw.Request, account: str) -> sw.Response | None:
        if account == "blocked":
            return sw.Response("quota exceeded", status=429)
        return None

    async def next_delivery(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        await waiter

    def usage(self, account: str) -> dict[str, dict[str, float]]:
        """Sums of every delivered record of `account`, by "namespace/object name"."""
        sums: dict[str, dict[str, float]] = {}
        for record in self.records:
            if record.account != account:
                continue
            key = "worker" if record.namespace is None else f"{record.namespace}/{record.object_id}"
            into = sums.setdefault(key, {})
            for field, value in record.as_dict().items():
                if isinstance(value, int | float) and field not in ("start", "end"):
                    into[field] = into.get(field, 0) + value
        return sums


hook = Hook()


class Room(sw.DurableObject):
    limits = sw.Limits(cpu_ms=ROOM_CPU_MS, hibernate_after=HIBERNATE_AFTER)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.upstream: sw.WebSocket | None = None
        ctx.set_websocket_auto_response(sw.AutoResponse("ping", "pong"))
        name = ctx.id.name or str(ctx.id)
        alive[name] = weakref.ref(self)
        constructed[name] = constructed.get(name, 0) + 1

    async def fetch(self, request: sw.Request) -> sw.Response:
        if request.path.endswith("/stream-burn"):
            query = request.query
            return sw.Response(burnt_chunks(float(query["ms"]), int(query["n"])))
        if request.path.endswith("/spin"):
            spin()
        if request.path.endswith("/dial"):
            # An outgoing socket, kept on the instance: each message down it is answered.
            self.upstream = await sw.connect(request.query["url"])
            self.upstream.add_event_listener("message", self.on_upstream)
            return sw.Response("dialled")
        client, server = sw.WebSocketPair()
        if request.query.get("standard"):
            server.accept()
            server.add_event_listener("message", lambda event: server.send(event.data))
        else:
            self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def on_upstream(self, event: sw.MessageEvent) -> None:
        assert self.upstream is not None
        burn(5)
        self.upstream.send(f"ack {event.data!r}")

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("boom, as the test asked")
        if message == "spin":
            spin()
        if isinstance(message, str) and message.startswith("burn:"):
            burn(float(message.removeprefix("burn:")))
        ws.send(message)

    def ping(self) -> str:
        return "pong"


async def burnt_chunks(ms: float, steps: int) -> AsyncIterator[str]:
    """A streamed body: each chunk burns ``ms`` of CPU first."""
    for i in range(steps):
        burn(ms)
        yield f"{i}\n"
        await asyncio.sleep(0)


async def burn_in_steps(ms: float, steps: int) -> None:
    for _ in range(steps):
        burn(ms)
        await asyncio.sleep(0)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    path, query = request.path, request.query
    if path == "/usage":
        await hook.next_delivery()
        return sw.Response.json(hook.usage(query["of"]))
    if path == "/alive":
        ref = alive.get(query["name"])
        return sw.Response.json(
            {"alive": ref is not None and ref() is not None, "constructed": constructed}
        )
    if path.startswith("/room/"):
        name = path.removeprefix("/room/").split("/")[0]
        return await env.ROOMS.get(env.ROOMS.id_from_name(name)).fetch(request)
    if path.startswith("/rpc/"):
        name = path.removeprefix("/rpc/")
        return sw.Response(await env.ROOMS.get(env.ROOMS.id_from_name(name)).ping())
    return sw.Response("not found", status=404)


async def fetch_async(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> Any:
    """Routes whose handler must itself be a coroutine (the rest go through `fetch`)."""
    query = request.query
    if request.path == "/sleep":
        await asyncio.sleep(float(query["s"]))
        return sw.Response("slept")
    if request.path == "/steps":
        await burn_in_steps(float(query["ms"]), int(query["n"]))
        return sw.Response("burnt in steps")
    if request.path == "/stream-burn":
        return sw.Response(burnt_chunks(float(query["ms"]), int(query["n"])))
    if request.path == "/spawn":
        # A task the handler creates is charged to the same account; current_task and
        # timeout keep working inside accounted coroutines.
        assert asyncio.current_task() is not None
        async with asyncio.timeout(30):
            await asyncio.create_task(burn_in_steps(float(query["ms"]), 1))
        return sw.Response("spawned")
    return await fetch(request, env, ctx)


def sync_or_async(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response | Any:
    """`/burn` and `/spin` run as plain `def` handlers (the fast path); the rest are async."""
    if request.path == "/burn":
        burn(float(request.query["ms"]))
        return sw.Response("burnt")
    if request.path == "/spin":
        spin()
    return fetch_async(request, env, ctx)


app = sw.App(
    fetch=sync_or_async,
    durable_objects={"ROOMS": Room},
    limits=sw.Limits(cpu_ms=APP_CPU_MS),
    account=lambda request: request.query.get("account", "observer"),
    billing=hook,
    metrics_path="/metrics",
)
