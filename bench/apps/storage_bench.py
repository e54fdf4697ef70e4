"""The app of the storage benchmark (bench/storage.py): each WebSocket message does the same
storage work, so the load generator's messages per second are events per second.

  /one      every connection talks to one object; a message puts its payload under one of 100
            keys and gets it back, then echoes it (the reply leaves once the put is durable)
  /many     each connection gets an object of its own (1,000 at most, reused in turn); the same
            work per message
  /hib      each connection gets an object of its own, which writes once when the socket opens
            and then hibernates (0.5 s): RSS per connection, with storage
  /hib-bare the same without any storage: the baseline of /hib
  /res      like /hib but the object stays resident (its database stays open)
  /res-bare the same without any storage
  /metrics  the meter and the storage's counters (commits, fsyncs), Prometheus text
  /traced   Python's traced allocations (with PYTHONTRACEMALLOC=1), for memory breakdowns
"""

from __future__ import annotations

import itertools
import tracemalloc

import sockworker as sw

OBJECTS = 1_000
_next = itertools.count()


class Busy(sw.DurableObject):
    """Puts and gets per message."""

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        storage = self.ctx.storage
        key = f"k{message[8] if isinstance(message, bytes) and len(message) > 8 else 0}"
        storage.put(key, message)
        ws.send(storage.get(key))


class Sleepy(sw.DurableObject):
    """Holds one socket; writes once (with storage) and goes idle."""

    limits = sw.Limits(hibernate_after=0.5)
    store = True

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        if self.store:
            self.ctx.storage.put("joined", 1)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(message)


class SleepyBare(Sleepy):
    store = False


class Resident(Sleepy):
    limits = sw.Limits(hibernate_after=3600)


class ResidentBare(Resident):
    store = False


NAMESPACES = {
    "BUSY": Busy,
    "SLEEPY": Sleepy,
    "SLEEPY_BARE": SleepyBare,
    "RESIDENT": Resident,
    "RESIDENT_BARE": ResidentBare,
}
ROUTES = {
    "/hib": "SLEEPY",
    "/hib-bare": "SLEEPY_BARE",
    "/res": "RESIDENT",
    "/res-bare": "RESIDENT_BARE",
}


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    path = request.path
    if path == "/traced":
        # Python's own allocations now (with PYTHONTRACEMALLOC set), for memory breakdowns.
        traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else -1
        return sw.Response(str(traced))
    if path == "/one":
        return await env.BUSY.get_by_name("one").fetch(request)
    if path == "/many":
        return await env.BUSY.get_by_name(f"o{next(_next) % OBJECTS}").fetch(request)
    namespace = ROUTES.get(path)
    if namespace is None:
        return sw.Response("not found", status=404)
    binding = getattr(env, namespace)
    return await binding.get_by_name(f"c{next(_next)}").fetch(request)


app = sw.App(fetch=fetch, durable_objects=NAMESPACES, metrics_path="/metrics")
