"""What a hibernated socket costs the server, pinned: 10,000 sockets of Durable Objects, all
hibernated, grow the server's RSS by less than ``BOUND`` bytes each. The goal is 2 KiB (issue
#12; measured 2.6 KB, docs/topics/design.md "What a socket costs"); the bound is what a
regression would cross (the socket's task once held a whole TLS session: 6 KB), with room for
the noise of a shared machine. Runs in both I/O modes with the rest of the suite."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import resource
import socket
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import ServerProcess, wait_until

SOCKETS = 10_000
BOUND = 4096


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < SOCKETS + 1000:
        pytest.skip(f"needs {SOCKETS + 1000} descriptors, the hard limit is {hard}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def open_socket(port: int) -> socket.socket:
    """One upgraded connection to /room, read just far enough to see the 101."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            "GET /room HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return sock


async def open_many(port: int, n: int) -> list[socket.socket]:
    opened: list[socket.socket] = []
    limit = asyncio.Semaphore(200)

    async def one() -> None:
        async with limit:
            opened.append(await open_socket(port))

    await asyncio.gather(*(one() for _ in range(n)))
    return opened


async def resident(server: ServerProcess) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http}/resident") as response:
        return int(json.loads(await response.text())["resident"])


async def all_hibernated(server: ServerProcess) -> bool:
    return await resident(server) == 0


@pytest.mark.timeout(240)
async def test_10000_hibernated_sockets_stay_under_the_bound(many_descriptors: None) -> None:
    server = ServerProcess("tests.apps.idle_rooms:app")
    held: list[socket.socket] = []
    try:
        # First-use allocations (every room's core state, tables grown once) come before the
        # baseline: a first round of sockets through a whole hibernation, then closed.
        warm = await open_many(server.port, 1000)
        await wait_until(lambda: all_hibernated(server), within=30, what="warm-up hibernated")
        for sock in warm:
            sock.close()
        del warm
        gc.collect()
        await wait_until(
            lambda: _settled(server),
            within=30,
            interval=1.0,
            what="the server's RSS settled after warm-up",
        )
        base = server.rss_kib()
        held = await open_many(server.port, SOCKETS)
        await wait_until(lambda: all_hibernated(server), within=60, what="all rooms hibernated")
        await wait_until(
            lambda: _settled(server), within=30, interval=1.0, what="the server's RSS settled"
        )
        per_socket = (server.rss_kib() - base) * 1024 / SOCKETS
        print(f"\n{SOCKETS:,} hibernated sockets: {per_socket:.0f} B of server RSS each")
        assert per_socket < BOUND, f"{per_socket:.0f} B per hibernated socket (bound {BOUND})"
        # They are all still open: a sample of them is echoed (waking their rooms).
        loop = asyncio.get_running_loop()
        for sock in held[:: SOCKETS // 20]:
            # A masked text frame "ping" (mask 0: the payload as is).
            await loop.sock_sendall(sock, b"\x81\x84\x00\x00\x00\x00ping")
            echoed = b""
            while len(echoed) < 6:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 64), 20)
                assert chunk, "closed instead of echoing"
                echoed += chunk
            assert echoed == b"\x81\x04ping"
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
        server.stop()


_last_rss: dict[int, int] = {}


async def _settled(server: ServerProcess) -> bool:
    """The RSS moved by under 1% since the previous look, a second ago (the allocators return
    freed pages within a second or two)."""
    now = server.rss_kib()
    before = _last_rss.get(server.pid)
    _last_rss[server.pid] = now
    return before is not None and abs(now - before) <= before / 100
