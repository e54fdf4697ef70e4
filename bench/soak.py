"""Churn soak (issue #14; not in CI): SOCKETS WebSockets opened, held idle, then dropped without
a Close (TCP reset), for CYCLES cycles, while a healthy client echoes every 100 ms. Reports the
server's RSS and open descriptors after each cycle, and whether the healthy client was served.

    .venv/bin/python bench/soak.py [--sockets 10000] [--cycles 10] [--idle 2] [--warmup 1]

Pass: RSS after the last cycle within 5% of after the first, descriptors back where they were,
no healthy echo lost. Only loopback; every loop is bounded.

The first ``--warmup`` cycles are run the same way but not measured: the first 10,000 sockets
grow pools that stay (tokio's and jemalloc's, CPython's free lists and 1 MiB arenas) and that
the next cycles reuse. What is left after that is CPython's small-object allocator: an arena is
returned only when every object in it is free, so where the long-lived objects of a cycle land
moves RSS within a band of a few MiB (``--breakdown`` shows the core's and glibc's figures
flat meanwhile; run the server with ``PYTHONMALLOC=malloc`` and the band goes; see
bench/README.md, "Soak").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import connect  # noqa: E402

from tests.support import ServerProcess  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def open_socket(port: int, path: str) -> socket.socket:
    """One upgraded connection, read just far enough to know the server answered 101."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:60].decode(errors="replace"))
    return sock


async def open_many(port: int, n: int, path: str) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    limit = asyncio.Semaphore(256)

    async def one() -> None:
        async with limit:
            sockets.append(await open_socket(port, path))

    await asyncio.gather(*(one() for _ in range(n)))
    return sockets


def drop(sockets: list[socket.socket]) -> None:
    """Abruptly: SO_LINGER 0 makes close() send a reset, no Close frame, no FIN."""
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def breakdown(base: str) -> str:
    """What each allocator holds (bench/apps/memory_bench.py's /memory), in MiB."""
    import json
    import urllib.request

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"{base}/memory", timeout=10) as response:
            return dict(json.loads(response.read()))

    m = await asyncio.to_thread(get)
    je, libc = m["jemalloc"], m["glibc"]
    mib = 1 << 20
    return (
        f"jemalloc allocated {je['allocated'] / mib:.1f} resident {je['resident'] / mib:.1f}; "
        f"glibc in use {libc.get('in_use', 0) / mib:.1f} free {libc.get('free', 0) / mib:.1f}; "
        f"python blocks {m['python_blocks']:,} objects {m['python_objects']:,}"
    )


async def healthy(url: str, stop: asyncio.Event, stats: dict[str, float]) -> None:
    async with connect(url, ping_interval=None) as ws:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            await ws.send(f"h{i}")
            if await asyncio.wait_for(ws.recv(), 10) != f"h{i}":
                stats["wrong"] += 1
            stats["echoes"] += 1
            stats["worst"] = max(stats["worst"], time.monotonic() - started)
            i += 1
            await asyncio.sleep(0.1)  # pacing of the healthy client


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds each batch is held idle")
    parser.add_argument(
        "--warmup", type=int, default=1, help="cycles run first and not measured (pools grow)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="serve bench/apps/memory_bench.py (its /echo is examples/echo.py's) and print what "
        "each allocator holds after every cycle",
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    # An echo app that keeps nothing per connection (the test apps record every close).
    app, path = (
        ("bench.apps.memory_bench:app", "/echo") if args.breakdown else ("examples.echo:app", "/ws")
    )
    server = ServerProcess(app)
    stop = asyncio.Event()
    stats = {"echoes": 0.0, "wrong": 0.0, "worst": 0.0}
    try:
        checker = asyncio.create_task(healthy(f"{server.ws}{path}?id=soak", stop, stats))
        await asyncio.sleep(1)
        start_rss, start_fds = rss_kib(server.pid), fds(server.pid)
        print(f"start: RSS {start_rss / 1024:.1f} MiB, {start_fds} descriptors")
        after: list[tuple[int, int]] = []
        for cycle in range(1 - args.warmup, args.cycles + 1):
            began = time.monotonic()
            sockets = await open_many(server.port, args.sockets, path)
            peak = rss_kib(server.pid)
            await asyncio.sleep(args.idle)  # pacing: the sockets sit idle
            drop(sockets)
            # Wait (bounded) for the server to notice every reset and give memory back.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if fds(server.pid) <= start_fds + 2:
                    break
                await asyncio.sleep(0.2)  # polling an external observable
            await asyncio.sleep(6)  # pacing: one check of the memory keeper (every 5 s)
            rss, open_fds = rss_kib(server.pid), fds(server.pid)
            if cycle > 0:
                after.append((rss, open_fds))
            label = f"cycle {cycle:2}" if cycle > 0 else "warm-up "
            print(
                f"{label}: {args.sockets} opened in {time.monotonic() - began:5.1f} s, "
                f"peak RSS {peak / 1024:6.1f} MiB, after drop {rss / 1024:6.1f} MiB, "
                f"{open_fds} descriptors"
            )
            if args.breakdown:
                print("          " + await breakdown(server.http))
        stop.set()
        await checker
    finally:
        server.stop()
    first, last = after[0][0], after[-1][0]
    drift = (last - first) / first * 100
    print(
        f"RSS after the last cycle vs the first: {drift:+.1f}%; descriptors "
        f"{after[-1][1]} (start {start_fds}); healthy client: {int(stats['echoes'])} echoes, "
        f"{int(stats['wrong'])} wrong, slowest {stats['worst'] * 1000:.0f} ms"
    )
    ok = abs(drift) <= 5 and after[-1][1] <= start_fds + 2 and stats["wrong"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
