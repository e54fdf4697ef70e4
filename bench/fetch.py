"""Outgoing HTTP: ``sw.fetch`` against aiohttp's client called from the same Worker handler.

Starts an aiohttp upstream (a 1,000-byte body) in this process and serves
bench/apps/fetch_bench.py in each I/O mode (``SOCKWORKER_IO_THREADS`` 0 and 2); the handler makes
REQUESTS sequential requests per round, one way then the other, ROUNDS rounds. Prints the median
per request of the wall time and of the application thread's CPU time (in the single-thread
mode that thread also runs the core's I/O, so its CPU includes the exchange).

    .venv/bin/python bench/fetch.py [--requests 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]


async def hello(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 1000)


def serve(io_threads: int) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, SOCKWORKER_IO_THREADS=str(io_threads), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "sockworker", "serve", "bench.apps.fetch_bench:app"]
    server = subprocess.Popen(
        [*argv, "--port", "0"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    assert server.stderr is not None
    while True:
        line = server.stderr.readline()
        if not line:
            raise RuntimeError("the server did not start")
        found = re.search(r"listening on http://[^:]+:(\d+)", line)
        if found:
            return server, int(found.group(1))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    upstream = web.Application()
    upstream.router.add_get("/", hello)
    runner = web.AppRunner(upstream)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    print("| I/O threads | client | wall per request | app thread CPU per request |")
    print("|---|---|---|---|")
    try:
        for io_threads in (0, 2):
            server, port = await asyncio.to_thread(serve, io_threads)
            results: dict[str, list[dict[str, float]]] = {"sw": [], "aiohttp": []}
            try:
                async with aiohttp.ClientSession() as session:
                    for _ in range(args.rounds):
                        for how, into in results.items():
                            query = {"how": how, "n": str(args.requests), "url": url}
                            async with session.get(f"http://127.0.0.1:{port}/", params=query) as r:
                                into.append(await r.json())
            finally:
                server.terminate()
                await asyncio.to_thread(server.wait)
            for how, runs in results.items():
                wall = statistics.median(run["wall_ms"] for run in runs)
                cpu = statistics.median(run["cpu_ms"] for run in runs)
                name = "sw.fetch" if how == "sw" else "aiohttp"
                print(f"| {io_threads} | {name} | {wall * 1000:.0f} µs | {cpu * 1000:.0f} µs |")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
