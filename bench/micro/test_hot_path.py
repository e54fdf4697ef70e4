"""Micro-benchmarks of the Python side of the hot path (pytest-benchmark; `make bench-micro`):
dispatching a batch of N message events to a `def` listener that echoes, and `ws.send`.

A real native server and a real socket are used (one raw client connection whose output a thread
discards), so `send` goes through the core's outbox exactly as in production; only the event
batch is synthesised, the way the core's `drain()` shapes it.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sockworker as sw
from sockworker import _native
from sockworker._runtime.core import Runtime
from sockworker._runtime.services import Services

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Bound:
    """A server end bound to a live core socket, and a dispatcher around it."""

    def __init__(self) -> None:
        limits = sw.Limits(max_buffered_bytes=1 << 30)
        self.server = _native.Server(
            "127.0.0.1",
            0,
            io_threads=1,
            max_message_size=limits.max_message_size,
            max_buffered_bytes=limits.max_buffered_bytes,
            handshake_timeout=5.0,
            idle_timeout=0.0,
            max_connections=10,
            max_body_size=1 << 20,
        )
        self.client = socket.create_connection(self.server.address)
        self.client.sendall(UPGRADE)
        event = self._next_event()
        reply = event[1]
        _client_end, self.ws = sw.WebSocketPair()
        self.ws.accept()
        handle = reply.accept_websocket([])
        self.runtime: Any = Runtime.__new__(Runtime)
        self.runtime.services = Services.__new__(Services)
        self.runtime.services.sockets = {handle.id: self.ws}
        self.runtime.server = self.server
        self.ws._bind(handle, self.runtime.services, "ws://x/", "")
        self.id = handle.id
        self.stop = threading.Event()
        self.reader = threading.Thread(target=self._discard, daemon=True)
        self.reader.start()

    def _next_event(self) -> tuple[Any, ...]:
        fd = self.server.fileno()
        while True:
            select.select([fd], [], [], 5.0)
            events = list(self.server.drain())
            self.server.flush()
            if events:
                return events[0]

    def _discard(self) -> None:
        self.client.settimeout(0.2)
        while not self.stop.is_set():
            try:
                if not self.client.recv(1 << 20):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.reader.join()
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module")
def bound() -> Iterator[Bound]:
    b = Bound()
    yield b
    b.close()


def test_send_64b(benchmark: Any, bound: Bound) -> None:
    payload = os.urandom(64)
    benchmark(bound.ws.send, payload)


@pytest.mark.parametrize("batch", [1, 16, 256])
def test_dispatch_batch_to_def_echo(benchmark: Any, bound: Bound, batch: int) -> None:
    ws = bound.ws
    ws._listeners["message"].clear()
    ws.add_event_listener("message", lambda event: ws.send(event.data))
    events = [(_native.EV_MESSAGE, bound.id, "x" * 64)] * batch

    def dispatch() -> None:
        bound.runtime._dispatch(events)
        bound.server.flush()

    benchmark(dispatch)
    benchmark.extra_info["per_message_us"] = benchmark.stats.stats.mean * 1e6 / batch
