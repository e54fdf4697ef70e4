"""Wake latency of a hibernated Durable Object, against the same room awake.

Serves examples/broadcast.py (a room per path; a message goes to the room's other sockets), opens
ROOMS rooms with two sockets each, waits until every room has hibernated (hibernate_after, default
10 s, plus a margin), then for each room in turn sends one message from the first socket and times
its arrival at the second: that path includes re-creating the room (constructor, then handler).
The same message sent again right after gives the awake figure. The server runs on CPU 0, this
client on CPU 1.

    .venv/bin/python bench/wake.py [--rooms 100] [--hibernate-after 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
SERVE_ARGS = ("examples.broadcast:app", "--port", "0")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server() -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen(
        [*("taskset", "-c", "0", sys.executable, "-m", "sockworker", "serve"), *SERVE_ARGS],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    found = re.search(r":(\d+)$", server.stderr.readline().strip())
    if found is None:
        server.kill()
        raise SystemExit("the server did not start")
    return server, int(found.group(1))


async def main(rooms: int, hibernate_after: float) -> None:
    os.sched_setaffinity(0, {1})
    server, port = start_server()
    try:
        pairs = []
        for room in range(rooms):
            url = f"ws://127.0.0.1:{port}/wake-{room}"
            pairs.append((await connect(url), await connect(url)))
        await asyncio.sleep(hibernate_after + 2)  # the figure needs every room asleep: wait it out
        asleep, awake = [], []
        for sender, receiver in pairs:
            for sink in (asleep, awake):
                start = time.perf_counter()
                await sender.send("x")
                await receiver.recv()
                sink.append((time.perf_counter() - start) * 1e6)
        for name, values in (("hibernated", asleep), ("awake", awake)):
            print(
                f"{name:>10}: p50 {statistics.median(values):7.0f} µs  "
                f"p99 {percentile(values, 0.99):7.0f} µs  ({len(values)} rooms)"
            )
        cost = statistics.median(asleep) - statistics.median(awake)
        print(f"wake cost (p50 difference): {cost:.0f} µs")
    finally:
        server.terminate()
        server.wait(15)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--hibernate-after", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.rooms, args.hibernate_after))
