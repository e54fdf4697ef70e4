"""TLS both ways, with a CA and certificates made at test time (trustme): the server serves
https:// and wss:// (`--certfile`/`--keyfile`), and an object opens a wss:// upstream trusting a CA
file; a wrong CA fails the connect with a TLS error."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidMessage

from tests.support import ServerProcess


class Certs:
    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.certfile = root / "server-chain.pem"
        self.keyfile = root / "server-key.pem"
        self.cafile = root / "ca.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.certfile))
        cert.private_key_pem.write_to_path(str(self.keyfile))
        self.ca.cert_pem.write_to_path(str(self.cafile))
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_context)
        self.client_context = ssl.create_default_context()
        self.ca.configure_trust(self.client_context)
        self.other_ca = root / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(self.other_ca))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_relay(certs: Certs) -> Iterator[ServerProcess]:
    server = ServerProcess(
        "tests.apps.relay:app",
        ("--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)),
    )
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


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
            big = "x" * 200_000  # many TLS records, through the pump both ways
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
