"""The app of bench/fetch.py: ``GET /?how=sw|aiohttp&n=N&url=URL`` makes N sequential requests
to URL from the Worker, with ``sw.fetch`` (the core does the exchange) or with aiohttp's client
on the application thread (a new connection each, as ``sw.fetch`` opens one), and answers the
wall time and the application thread's CPU time per request, in milliseconds."""

from __future__ import annotations

import time

import aiohttp
import sockworker as sw


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    n, url, how = int(request.query["n"]), request.query["url"], request.query["how"]
    cpu, wall = time.thread_time(), time.perf_counter()
    if how == "sw":
        for _ in range(n):
            response = await sw.fetch(url)
            assert response.status == 200
    else:
        for _ in range(n):
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(url) as got,
            ):
                await got.read()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return sw.Response.json({"wall_ms": wall / n * 1e3, "cpu_ms": cpu / n * 1e3})


app = sw.App(fetch=fetch)
