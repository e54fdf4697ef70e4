"""The small examples of the gallery (docs/gallery.md), each served as its own file documents it:
examples/echo.py echoes, examples/broadcast.py sends each message to the others on its path,
examples/client.py (the resilient client) runs against the echo example and prints the echoes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import aiohttp
from websockets.asyncio.client import connect

from tests.support import ROOT, ServerProcess


async def test_the_echo_example_echoes(make_server: Callable[..., ServerProcess]) -> None:
    echo = make_server("examples.echo:app")
    async with connect(f"{echo.ws}/anywhere") as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello"
        await ws.send(b"\x00\xff")
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\xff"
    async with aiohttp.ClientSession() as http, http.get(echo.http) as page:
        assert page.status == 200 and "connect a WebSocket" in await page.text()


async def test_the_broadcast_example_sends_to_the_others(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("examples.broadcast:app")
    async with (
        connect(f"{server.ws}/room/a") as ann,
        connect(f"{server.ws}/room/a") as bob,
        connect(f"{server.ws}/room/a") as cy,
        connect(f"{server.ws}/room/b") as dan,
        connect(f"{server.ws}/room/b") as eve,
    ):
        await ann.send("hi all")
        assert await asyncio.wait_for(bob.recv(), 10) == "hi all"
        assert await asyncio.wait_for(cy.recv(), 10) == "hi all"
        await dan.send("in b")
        assert await asyncio.wait_for(eve.recv(), 10) == "in b"
        # Not back to the sender, not to another path: the next thing each reads is what
        # follows.
        await cy.send("from cy")
        assert await asyncio.wait_for(ann.recv(), 10) == "from cy"
        assert await asyncio.wait_for(bob.recv(), 10) == "from cy"
        await eve.send("b again")
        assert await asyncio.wait_for(dan.recv(), 10) == "b again"


def test_the_client_example_gets_its_echoes(make_server: Callable[..., ServerProcess]) -> None:
    echo = make_server("examples.echo:app")
    result = subprocess.run(
        [sys.executable, "examples/client.py", f"{echo.ws}/echo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "open (attempt 1)",
        *(f"echo: 'hello {i}'" for i in range(5)),
        "echo: b'\\x00binary\\xff'",
        "close 1000 ''",
    ]
