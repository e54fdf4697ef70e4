"""Outgoing WebSockets (SPEC §2.3): a Durable Object opens an upstream socket to a separate
`websockets` server started by the test, keeps it, and relays what comes down it to clients that
connect in later, unrelated requests (tests/apps/relay.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from tests.apps.rooms_client import module_server
from tests.support import ServerProcess, get_json


@pytest.fixture(scope="module")
def relay() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.relay:app")


class Upstream:
    """A `websockets` server in the test process; remembers its connections and what it got."""

    def __init__(self) -> None:
        self.connections: list[ServerConnection] = []
        self.received: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.connected = asyncio.Event()
        self.url = ""

    async def handler(self, connection: ServerConnection) -> None:
        self.connections.append(connection)
        self.connected.set()
        async for message in connection:
            await self.received.put(message)


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), 10)


@contextlib.asynccontextmanager
async def upstream_relayed(
    relay: ServerProcess, prefix: str
) -> AsyncIterator[tuple[str, ClientConnection, Upstream]]:
    """A `websockets` upstream, and a first client of a relay object that opened its socket to
    it: (the object's name, the client, the upstream)."""
    upstream = Upstream()
    async with serve(
        upstream.handler,
        "127.0.0.1",
        0,
        subprotocols=["relay"],  # type: ignore[list-item]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        url = f"{relay.ws}/relay/{name}?upstream=ws://127.0.0.1:{port}/feed"
        async with connect(url) as first:
            await asyncio.wait_for(upstream.connected.wait(), 10)
            yield name, first, upstream


async def test_an_object_relays_its_upstream_to_clients_of_later_requests(
    relay: ServerProcess,
) -> None:
    async with upstream_relayed(relay, "feed") as (name, first, upstream):
        (up,) = upstream.connections
        assert up.request is not None and up.request.path == "/feed"
        # Idle for longer than its hibernate_after (0.2 s, the quantity under test): the
        # outgoing socket keeps the object awake, so its instance state is still there.
        await asyncio.sleep(0.6)
        # A later, unrelated request: no upstream URL, the object still holds the socket.
        async with connect(f"{relay.ws}/relay/{name}") as second:
            status = await get_json(f"{relay.http}/relay/{name}/status")
            assert status["seen"] == [["open", "relay"]] and status["clients"] == 2
            await up.send("tick 1")
            await up.send(b"\x00binary tick")
            for client in (first, second):
                assert await recv(client) == "tick 1"
                assert await recv(client) == b"\x00binary tick"
            # Clients' messages go up the same socket (masked frames: websockets checks).
            await second.send("hello upstream")
            assert await asyncio.wait_for(upstream.received.get(), 10) == "hello upstream"
            assert len(upstream.connections) == 1

            # The upstream closes: the object's close listener runs and tells the clients.
            await up.close(4001, "feed over")
            for client in (first, second):
                assert await recv(client) == "upstream closed 4001"
            status = await get_json(f"{relay.http}/relay/{name}/status")
            assert status["seen"][-1] == ["close", 4001, "feed over", True]


async def test_an_object_keeps_its_upstream_with_metering_off(
    make_server: Callable[..., ServerProcess],
) -> None:
    """With `--no-metering` no event has a meter slot; the socket an object opens is still the
    object's (it keeps it awake and its events reach it)."""
    relay = make_server("tests.apps.relay:app", "--no-metering")
    async with upstream_relayed(relay, "quiet") as (name, first, upstream):
        (up,) = upstream.connections
        # Idle past its hibernate_after (0.2 s, the quantity under test): kept awake.
        await asyncio.sleep(0.6)
        async with connect(f"{relay.ws}/relay/{name}") as second:
            status = await get_json(f"{relay.http}/relay/{name}/status")
            assert status["seen"] == [["open", "relay"]] and status["clients"] == 2
            await up.send("tick 1")
            for client in (first, second):
                assert await recv(client) == "tick 1"


async def misbehaving_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers the handshake, then sends a masked frame, which a server must never send."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(
        hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: relay\r\n\r\n".encode()
    )
    await reader.read(1)  # the relay's client does not speak first; wait for the test's cue
    writer.write(bytes([0x81, 0x82, 1, 2, 3, 4, ord("h") ^ 1, ord("i") ^ 2]))
    await writer.drain()
    await reader.read()  # until the relay closes
    writer.close()


async def test_an_upstream_protocol_error_reaches_the_object(relay: ServerProcess) -> None:
    server = await asyncio.start_server(misbehaving_upstream, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        name = f"bad-{uuid.uuid4().hex[:8]}"
        async with connect(f"{relay.ws}/relay/{name}?upstream=ws://127.0.0.1:{port}/") as client:
            # Any message up is the cue for the upstream to misbehave.
            await client.send("go")
            assert await recv(client) == "upstream closed 1002"
        status = await get_json(f"{relay.http}/relay/{name}/status")
        kinds = [entry[0] for entry in status["seen"]]
        assert kinds == ["open", "error", "close"], status
        assert "masked" in status["seen"][1][1]


async def test_failed_connects_raise_a_clear_error(relay: ServerProcess) -> None:
    async def attempt(url: str) -> dict[str, str]:
        result: dict[str, str] = await get_json(f"{relay.http}/try-connect?url={url}")
        return result

    # Nothing listens there.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    refused = await attempt(f"ws://127.0.0.1:{closed_port}/")
    assert refused["error"] == "ConnectError" and "cannot connect" in refused["message"]
    # A server that answers the upgrade with 404 (this app, on a path it does not route).
    answered = await attempt(f"ws://127.0.0.1:{relay.port}/nowhere")
    assert answered["error"] == "ConnectError" and "HTTP 404" in answered["message"], answered
    unknown = await attempt("ws://no-such-host.invalid/")
    assert unknown["error"] == "ConnectError", unknown
    wrong = await attempt("http://127.0.0.1/")
    assert wrong["error"] == "ConnectError" and "ws://" in wrong["message"], wrong


async def test_the_fetch_form_opens_a_socket_to_accept(relay: ServerProcess) -> None:
    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(f"echo: {message}")

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        result = await get_json(f"{relay.http}/fetch-form?url=ws://127.0.0.1:{port}/")
    assert result == {"reply": "echo: hello from the fetch form"}


async def test_the_relay_example_fans_out_its_upstream(
    make_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = Upstream()
    async with serve(upstream.handler, "127.0.0.1", 0) as feed:
        port = feed.sockets[0].getsockname()[1]
        monkeypatch.setenv("UPSTREAM", f"ws://127.0.0.1:{port}/")
        server = make_server("examples.relay:app")
        async with connect(f"{server.ws}/feed/demo") as first:
            await asyncio.wait_for(upstream.connected.wait(), 10)
            async with connect(f"{server.ws}/feed/demo") as second:
                await upstream.connections[0].send("tick 0")
                assert [await recv(first), await recv(second)] == ["tick 0", "tick 0"]
                await first.send("up")
                assert await asyncio.wait_for(upstream.received.get(), 10) == "up"
        assert len(upstream.connections) == 1


async def test_the_relay_example_when_its_upstream_fails(
    make_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No upstream: the upgrade is answered 502, saying why. The upstream closing: the clients
    are told, and the next client to arrive opens a new upstream socket."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    monkeypatch.setenv("UPSTREAM", f"ws://127.0.0.1:{closed_port}/")
    down = make_server("examples.relay:app")
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{down.ws}/feed/demo")
    assert refused.value.response.status_code == 502
    assert b"upstream unavailable" in refused.value.response.body

    upstream = Upstream()
    async with serve(upstream.handler, "127.0.0.1", 0) as feed:
        monkeypatch.setenv("UPSTREAM", f"ws://127.0.0.1:{feed.sockets[0].getsockname()[1]}/")
        server = make_server("examples.relay:app")
        async with connect(f"{server.ws}/feed/demo") as client:
            await asyncio.wait_for(upstream.connected.wait(), 10)
            upstream.connected.clear()
            await upstream.connections[0].close(1000)
            assert await recv(client) == "upstream closed (1000)"
        async with connect(f"{server.ws}/feed/demo") as later:
            await asyncio.wait_for(upstream.connected.wait(), 10)
            assert len(upstream.connections) == 2
            await upstream.connections[1].send("after")
            assert await recv(later) == "after"
