"""TLS both ways, with a CA and certificates made at test time (trustme): the server serves
https:// and wss:// (`--certfile`/`--keyfile`), and an object opens a wss:// upstream trusting a CA
file; a wrong CA fails the connect with a TLS error. A wss:// socket is driven by its connection
task (the application thread never writes its frames to the descriptor, as it may for ws://):
batches of replies, flow control and the closing handshake are checked over TLS in both I/O
modes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import struct
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidMessage

from tests.support import Certs, ServerProcess, wait_until


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


def _tls_server(app: str, certs: Certs) -> Iterator[ServerProcess]:
    server = ServerProcess(app, certs.serve_args())
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def tls_relay(certs: Certs) -> Iterator[ServerProcess]:
    yield from _tls_server("tests.apps.relay:app", certs)


@pytest.fixture(scope="module")
def tls_echo(certs: Certs) -> Iterator[ServerProcess]:
    yield from _tls_server("tests.apps.echo:app", certs)


@pytest.fixture(scope="module")
def tls_flood(certs: Certs) -> Iterator[ServerProcess]:
    yield from _tls_server("tests.apps.flood:app", certs)


async def _https_json(server: ServerProcess, certs: Certs, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{server.port}{path}", ssl=certs.client_context) as r,
    ):
        return json.loads(await r.text())


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


async def test_wss_both_ways(certs: Certs, tls_relay: ServerProcess) -> None:
    assert "listening on https://" in tls_relay.log_tail()
    got: asyncio.Queue[str | bytes] = asyncio.Queue()
    ups: list[ServerConnection] = []
    ready = asyncio.Event()

    async def upstream(connection: ServerConnection) -> None:
        ups.append(connection)
        ready.set()
        async for message in connection:
            await got.put(message)

    async with serve(
        upstream,
        "127.0.0.1",
        0,
        ssl=certs.server_context,
        subprotocols=["relay"],  # type: ignore[list-item]
    ) as feed:
        port = feed.sockets[0].getsockname()[1]
        upstream_url = f"wss://localhost:{port}/tls-feed"
        name = f"tls-{uuid.uuid4().hex[:8]}"
        url = (
            f"wss://127.0.0.1:{tls_relay.port}/relay/{name}"
            f"?upstream={q(upstream_url)}&ca={q(str(certs.cafile))}"
        )
        async with connect(url, ssl=certs.client_context) as client:
            await asyncio.wait_for(ready.wait(), 10)
            await ups[0].send("over tls")
            assert await asyncio.wait_for(client.recv(), 10) == "over tls"
            await client.send("and back up")
            assert await asyncio.wait_for(got.get(), 10) == "and back up"
            big = "x" * 200_000  # many TLS records, both ways
            await ups[0].send(big)
            assert await asyncio.wait_for(client.recv(), 10) == big

        # Plain HTTPS to the same server, with aiohttp.
        async with aiohttp.ClientSession() as session:
            status_url = f"https://127.0.0.1:{tls_relay.port}/relay/{name}/status"
            async with session.get(status_url, ssl=certs.client_context) as resp:
                assert resp.status == 200
                assert (await resp.json())["seen"][0] == ["open", "relay"]


async def test_a_wrong_ca_fails_the_connect_with_a_tls_error(
    certs: Certs, tls_relay: ServerProcess
) -> None:
    async def noop(connection: ServerConnection) -> None:
        await connection.wait_closed()

    async with serve(noop, "127.0.0.1", 0, ssl=certs.server_context) as feed:
        port = feed.sockets[0].getsockname()[1]
        base = f"https://127.0.0.1:{tls_relay.port}/try-connect?url={q(f'wss://localhost:{port}/')}"
        async with aiohttp.ClientSession() as session:

            async def attempt(ca: Path) -> dict[str, str]:
                async with session.get(f"{base}&ca={q(str(ca))}", ssl=certs.client_context) as r:
                    result: dict[str, str] = json.loads(await r.text())
                    return result

            wrong = await attempt(certs.other_ca)
            assert wrong["error"] == "ConnectError" and "TLS" in wrong["message"], wrong
            right = await attempt(certs.cafile)
            assert right["error"] is None, right


async def test_a_plain_client_cannot_talk_to_the_tls_server(tls_relay: ServerProcess) -> None:
    # The TLS server reads a plain HTTP request as a bad TLS record and drops the connection.
    with pytest.raises(InvalidMessage):
        async with connect(f"ws://127.0.0.1:{tls_relay.port}/relay/x", open_timeout=5):
            pass
    # The server is unharmed.
    assert tls_relay.proc.poll() is None


async def test_a_batch_of_many_replies_over_wss_comes_back_intact(
    certs: Certs, tls_echo: ServerProcess
) -> None:
    # Sent without waiting, the messages reach the server many to a read, so the replies are
    # one batch of the application's: a plain socket's would be written to its descriptor by
    # the application thread; these must be encrypted by the socket's task. Sizes from bytes to
    # past rustls's 64 KiB of records per write.
    rng = random.Random(12)
    sizes = [rng.choice((1, 7, 125, 126, 1000, 4000, 17_000)) for _ in range(600)]
    sizes[100:100] = [70_000, 200_000, 1 << 20]
    messages: list[str | bytes] = [
        rng.randbytes(size) if i % 2 else "".join(rng.choices("aé€😀", k=size // 4 + 1))
        for i, size in enumerate(sizes)
    ]
    url = f"wss://127.0.0.1:{tls_echo.port}/ws?id=batch-{uuid.uuid4().hex[:8]}"
    async with connect(url, ssl=certs.client_context, max_size=None, max_queue=None) as ws:
        for message in messages:
            await ws.send(message)
        for i, message in enumerate(messages):
            assert await asyncio.wait_for(ws.recv(), 20) == message, f"message {i}"


async def test_wss_flow_control_delivers_everything_in_order(
    certs: Certs, tls_flood: ServerProcess
) -> None:
    # send_async parks the worker while the socket's queue is full: over TLS the queue drains
    # as fast as the task encrypts and the kernel takes the records, and nothing is lost.
    conn_id, chunk, total = uuid.uuid4().hex, 64 << 10, 16 << 20
    url = (
        f"wss://127.0.0.1:{tls_flood.port}/flood?id={conn_id}&mode=async"
        f"&chunk={chunk}&total={total}"
    )
    async with connect(url, ssl=certs.client_context, max_size=None) as ws:
        await ws.send("go")
        for index in range(total // chunk):
            message = await asyncio.wait_for(ws.recv(), 20)
            assert isinstance(message, bytes) and len(message) == chunk
            assert struct.unpack("!Q", message[:8])[0] == index
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 20)
        assert (ws.close_code, ws.close_reason) == (1000, "done")
    st = await _https_json(tls_flood, certs, f"/stats?id={conn_id}")
    assert st["stop"] == "total reached" and st["sent"] == total, st
    assert st["max_buffered"] <= 1 << 20, st


async def _upgrade_then_drop(port: int, certs: Certs, conn_id: str) -> None:
    """A wss:// socket whose TCP connection is reset: no Close frame, no close_notify."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=certs.client_context)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws?id={conn_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.transport.abort()


async def test_wss_closes_like_ws(certs: Certs, tls_echo: ServerProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    url = f"wss://127.0.0.1:{tls_echo.port}/ws?id="
    # The server closes: the client gets its code (and the TLS session ends cleanly after).
    async with connect(url + f"server-{tag}", ssl=certs.client_context) as ws:
        await ws.send("!close 4000 bye")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert (ws.close_code, ws.close_reason) == (4000, "bye")
    # The client closes.
    async with connect(url + f"client-{tag}", ssl=certs.client_context) as ws:
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 10) == "hi"
        await ws.close(4001, "done")
    # The connection is lost.
    await _upgrade_then_drop(tls_echo.port, certs, f"lost-{tag}")

    async def closes() -> dict[str, tuple[int, bool]]:
        stats = await _https_json(tls_echo, certs, "/stats")
        return {c["id"]: (c["code"], c["was_clean"]) for c in stats["closes"] if tag in c["id"]}

    async def all_three() -> bool:
        return len(await closes()) == 3

    await wait_until(all_three, within=10, what="three close events")
    assert await closes() == {
        f"server-{tag}": (4000, True),
        f"client-{tag}": (4001, True),
        f"lost-{tag}": (1006, False),
    }
