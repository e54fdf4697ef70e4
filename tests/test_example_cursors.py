"""examples/cursors.py, its protocol with `websockets` clients: a participant's moves reach the
others (not itself), a newcomer sees where everyone is, bad input is answered to its sender alone,
and a participant that leaves is removed. (The page itself: tests/test_example_cursors_browser.py.)
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support import ServerProcess

APP = "examples.cursors:app"


@pytest.fixture(scope="module")
def cursors() -> Iterator[ServerProcess]:
    server = ServerProcess(APP)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


async def recv(ws: ClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(message, str)
    parsed: dict[str, Any] = json.loads(message)
    return parsed


def board(server: ServerProcess) -> str:
    return f"{server.ws}/board/{uuid.uuid4().hex[:8]}"


async def test_moves_reach_the_others_and_a_leave_removes(cursors: ServerProcess) -> None:
    url = board(cursors)
    async with connect(url) as ann:
        hello = await recv(ann)
        assert hello["kind"] == "hello" and hello["others"] == []
        ann_id = hello["id"]
        async with connect(url) as bob:
            bob_hello = await recv(bob)
            assert bob_hello["id"] != ann_id
            assert bob_hello["others"] == []  # ann has not moved yet: nothing to draw
            await ann.send(json.dumps({"x": 0.25, "y": 0.75}))
            move = await recv(bob)
            assert move == {
                "kind": "move",
                "id": ann_id,
                "color": hello["color"],
                "x": 0.25,
                "y": 0.75,
            }
            # A newcomer is told where ann is.
            async with connect(url) as cy:
                cy_hello = await recv(cy)
                assert cy_hello["others"] == [
                    {"id": ann_id, "color": hello["color"], "x": 0.25, "y": 0.75}
                ]
            assert await recv(ann) == {"kind": "leave", "id": cy_hello["id"]}
            assert await recv(bob) == {"kind": "leave", "id": cy_hello["id"]}
            # Bob's move goes to ann; ann never got her own (the next thing she reads is bob's).
            await bob.send(json.dumps({"x": 1, "y": 0}))
            assert await recv(ann) == {
                "kind": "move",
                "id": bob_hello["id"],
                "color": bob_hello["color"],
                "x": 1.0,
                "y": 0.0,
            }
        assert await recv(ann) == {"kind": "leave", "id": bob_hello["id"]}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (b"\x00\x01", "send text"),
        ("not json", "not JSON"),
        ("[0.5, 0.5]", "exactly x and y"),
        ('{"x": 0.5}', "exactly x and y"),
        ('{"x": 0.5, "y": 0.5, "z": 1}', "exactly x and y"),
        ('{"x": 1.5, "y": 0.5}', "from 0 to 1"),
        ('{"x": -0.1, "y": 0.5}', "from 0 to 1"),
        ('{"x": "0.5", "y": 0.5}', "from 0 to 1"),
        ('{"x": true, "y": 0.5}', "from 0 to 1"),
        ('{"x": NaN, "y": 0.5}', "from 0 to 1"),
    ],
)
async def test_bad_input_is_answered_to_its_sender_alone(
    cursors: ServerProcess, bad: str | bytes, says: str
) -> None:
    url = board(cursors)
    async with connect(url) as ann, connect(url) as bob:
        await recv(ann)
        bob_id = (await recv(bob))["id"]
        await bob.send(bad)
        error = await recv(bob)
        assert error["kind"] == "error" and says in error["message"], error
        # The socket stays open and works; ann got nothing of the bad message: her next frame
        # is bob's good move.
        await bob.send(json.dumps({"x": 0.5, "y": 0.5}))
        move = await recv(ann)
        assert move["kind"] == "move" and move["id"] == bob_id and move["x"] == 0.5


async def test_the_page_and_the_routes(cursors: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cursors.http}/board/demo") as page:
            assert page.status == 200
            assert page.headers["content-type"].startswith("text/html")
            text = await page.text()
            assert "requestAnimationFrame" in text and "<script src" not in text
        for path in ("/", "/board/", "/board/a/b", "/elsewhere"):
            async with http.get(f"{cursors.http}{path}", allow_redirects=False) as redirect:
                assert redirect.status == 302 and redirect.headers["location"] == "/board/demo"
    # The core answers the page's keep-alive.
    async with connect(board(cursors)) as ws:
        await recv(ws)
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 10) == "pong"
