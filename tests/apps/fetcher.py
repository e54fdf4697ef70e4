"""The app of tests/test_fetch.py: ``sw.fetch`` called from the Worker and from a Durable Object.

``POST /fetch`` (the Worker) and ``POST /object/NAME/fetch`` (the object NAME) take a JSON
description of the request (``url``, and optionally ``method``, ``headers``, ``body``, ``json``,
``timeout``, ``max_response_size``, ``redirect``, ``ca_file``; ``request``: send a ``sw.Request``
made of it), send it with ``sw.fetch`` and
answer what came back as JSON: the response (``status``, ``headers`` as pairs, ``body`` as
Latin-1 text, ``url``, ``redirected``, ``ok``) or the exception (``error``: its class and the
classes it is an instance of, ``message``). ``GET /usage`` waits for the billing hook's next
delivery and answers the subrequests counted so far, by "worker" or "FETCHERS/<object id>".
``GET /proxy?url=URL`` answers with the response of ``sw.fetch(URL)`` itself.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import sockworker as sw


async def run(spec: dict[str, Any]) -> sw.Response:
    """Sends what ``spec`` says; with ``"request": {method, headers, body}``, as a ``sw.Request``
    (the other keys are arguments beside it); ``give_up_after``: seconds the handler waits for
    the response before it cancels the call."""
    options = {k: v for k, v in spec.items() if k not in ("url", "request", "give_up_after")}
    target: str | sw.Request = spec["url"]
    if "request" in spec:
        given = spec["request"]
        target = sw.Request(
            given["method"], spec["url"], sw.Headers(given["headers"]), given["body"].encode()
        )
    try:
        response = await asyncio.wait_for(sw.fetch(target, **options), spec.get("give_up_after"))
    except Exception as error:
        kinds = [
            kind.__name__
            for kind in (sw.FetchTimeout, sw.FetchError, sw.InvalidArgument, TimeoutError)
            if isinstance(error, kind)
        ]
        return sw.Response.json({"error": type(error).__name__, "is": kinds, "message": str(error)})
    return sw.Response.json(
        {
            "status": response.status,
            "headers": [
                [name, value]
                for name in response.headers
                for value in response.headers.get_all(name)
            ],
            "body": response.body.decode("latin-1"),
            "url": response.url,
            "redirected": response.redirected,
            "ok": response.ok,
            "text": await response.text() if response.body.isascii() else None,
        }
    )


class Fetcher(sw.DurableObject):
    async def fetch(self, request: sw.Request) -> sw.Response:
        return await run(await request.json())


class Usage(sw.BillingHook):
    flush_interval = 0.05

    def __init__(self) -> None:
        self.subrequests: dict[str, int] = defaultdict(int)
        self.waiters: list[asyncio.Future[None]] = []

    def on_usage(self, records: list[sw.UsageRecord]) -> None:
        for record in records:
            key = "worker" if record.namespace is None else f"{record.namespace}/{record.object_id}"
            self.subrequests[key] += record.subrequests
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    async def next_delivery(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        await waiter


USAGE = Usage()


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    parts = request.path.strip("/").split("/")
    if parts == ["fetch"]:
        return await run(await request.json())
    if len(parts) == 3 and parts[0] == "object" and parts[2] == "fetch":
        namespace = env.FETCHERS
        stub = namespace.get(namespace.id_from_name(parts[1]))
        return await stub.fetch(request)
    if parts == ["proxy"]:
        return await sw.fetch(request.query["url"])
    if parts == ["object-id"]:
        return sw.Response(str(env.FETCHERS.id_from_name(request.query["name"])))
    if parts == ["usage"]:
        await USAGE.next_delivery()
        return sw.Response(
            json.dumps(USAGE.subrequests), headers={"content-type": "application/json"}
        )
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, durable_objects={"FETCHERS": Fetcher}, billing=USAGE)
