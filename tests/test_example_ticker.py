"""examples/ticker.py: one channel's alarm fans each tick out to 10,000 hibernatable sockets, all
of which receive the same frame; a later subscriber counts on from where the channel was; a bad
TICK_MS stops the server at start, saying why.

The 10,000 sockets are plain non-blocking sockets on one asyncio loop (epoll), each with a few
lines of frame parsing: a full WebSocket client per socket would make the test measure itself."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.support import ROOT, ServerProcess

APP = "examples.ticker:app"
SOCKETS = 10_000
TICK_MS = "500"


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SOCKETS + 1000:
        pytest.skip(f"needs {SOCKETS + 1000} descriptors, the hard limit is {hard}")
    # (The server, started after this, inherits the raised limit too.)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Subscriber:
    """One upgraded socket and what has been read from it past the handshake."""

    def __init__(self, sock: socket.socket, rest: bytes) -> None:
        self.sock = sock
        self.buffer = bytearray(rest)

    def _frame(self) -> tuple[int, bytes] | None:
        """The next whole frame in the buffer (taken out of it), None if there is none yet."""
        buf = self.buffer
        if len(buf) < 2:
            return None
        assert not buf[1] & 0x80, "server frames are not masked"
        n, start = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            (n,), start = struct.unpack("!H", buf[2:4]), 4
        assert n < 127, "a tick is small"
        if len(buf) < start + n:
            return None
        opcode, payload = buf[0] & 0x0F, bytes(buf[start : start + n])
        del buf[: start + n]
        return opcode, payload

    async def next_tick(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            frame = self._frame()
            if frame is None:
                chunk = await loop.sock_recv(self.sock, 4096)
                assert chunk, "the server closed a subscriber's socket"
                self.buffer += chunk
                continue
            opcode, payload = frame
            assert opcode == 0x1, f"expected a text frame, got opcode {opcode}: {payload!r}"
            return payload


async def subscribe(port: int, path: str) -> Subscriber:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(
            sock,
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode(),
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, "closed during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head[:80]
    except BaseException:
        sock.close()
        raise
    head, _, rest = head.partition(b"\r\n\r\n")
    return Subscriber(sock, rest)


@pytest.mark.timeout(180)
async def test_every_tick_reaches_10000_sockets(many_descriptors: None) -> None:
    server = ServerProcess(APP, env={"TICK_MS": TICK_MS})
    subscribers: list[Subscriber] = []
    try:
        limit = asyncio.Semaphore(256)

        async def one() -> None:
            async with limit:
                subscribers.append(await subscribe(server.port, "/ticks/fanout"))

        async with asyncio.timeout(120):
            await asyncio.gather(*(one() for _ in range(SOCKETS)))
            # Each socket's first tick; the latest of those, T, was sent after every socket
            # had been accepted (each was, before its own first tick): all must receive T.
            firsts = await asyncio.gather(*(s.next_tick() for s in subscribers))
            last = max(json.loads(first)["tick"] for first in firsts)

            async def up_to_last(subscriber: Subscriber, first: bytes) -> bytes:
                frame, previous = first, None
                while True:
                    tick = json.loads(frame)["tick"]
                    assert previous is None or tick == previous + 1, (previous, tick)
                    if tick == last:
                        return frame
                    assert tick < last
                    frame, previous = await subscriber.next_tick(), tick
                    # (A socket that never gets tick T fails the timeout above.)

            frames = await asyncio.gather(
                *(up_to_last(s, first) for s, first in zip(subscribers, firsts, strict=True))
            )
        # One frame, encoded once: the very same bytes on every socket, counting them all.
        assert len(set(frames)) == 1, set(list(frames)[:3])
        tick: dict[str, Any] = json.loads(frames[0])
        assert tick["tick"] == last and tick["subscribers"] == SOCKETS, tick
    finally:
        for subscriber in subscribers:
            with contextlib.suppress(OSError):
                subscriber.sock.close()
        assert server.stop() == 0, server.log_tail()


async def test_a_later_subscriber_counts_on() -> None:
    server = ServerProcess(APP, env={"TICK_MS": "50"})
    try:
        async with connect(f"{server.ws}/ticks/later") as first:
            ticks = [json.loads(await asyncio.wait_for(first.recv(), 10)) for _ in range(3)]
            assert [t["tick"] for t in ticks] == [ticks[0]["tick"] + n for n in range(3)]
            assert ticks[0]["subscribers"] == 1
            await first.send("ping")  # answered by the core, between the ticks
            while (message := await asyncio.wait_for(first.recv(), 10)) != "pong":
                assert json.loads(message)["tick"] > ticks[-1]["tick"]
        async with connect(f"{server.ws}/ticks/later") as again:
            await again.send("ping")  # at once: answered also before the object adopts it
            frames = [await asyncio.wait_for(again.recv(), 10) for _ in range(2)]
            assert "pong" in frames, frames
            later = json.loads(next(frame for frame in frames if frame != "pong"))
            assert later["tick"] > ticks[-1]["tick"]
        async with connect(f"{server.ws}/ticks/other") as other:
            # Another channel, its own count.
            assert json.loads(await asyncio.wait_for(other.recv(), 10))["tick"] == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.http}/ticks/later") as page:
                assert page.status == 200 and "0.05 s" in await page.text()
            for path in ("/", "/ticks/", "/ticks/a/b"):
                async with http.get(f"{server.http}{path}") as missing:
                    assert missing.status == 404, path
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("fast", "TICK_MS must be an integer (milliseconds), not 'fast'"),
        ("5", "TICK_MS must be from 10 to 3600000 milliseconds, not 5"),
        ("0", "TICK_MS must be from 10 to 3600000 milliseconds, not 0"),
    ],
)
def test_a_bad_tick_stops_the_server_at_start(value: str, says: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sockworker", "serve", APP, "--port", "0"],
        cwd=ROOT,
        env=dict(os.environ, TICK_MS=value),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert says in result.stdout + result.stderr, result.stderr[-2000:]
