"""Client-side helpers for the tests of tests/apps/rooms.py (Durable Objects and hibernation).

Imports no sockworker: the tests talk to the server over sockets only, with `websockets` and
`aiohttp`. See the docstring of tests/apps/rooms.py for the routes and socket commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
from websockets.asyncio.client import ClientConnection, connect

from tests.support import ServerProcess, get_json, wait_until

# The app's limits (tests/apps/rooms.py); the test process does not import the app.
HIBERNATE_AFTER = 0.5
ASK_TIMEOUT = 10.0


def fresh(prefix: str) -> str:
    """An object name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def module_server(app: str) -> Iterator[ServerProcess]:
    """Body of a module-scoped fixture: the server must exit 0 on SIGTERM."""
    server = ServerProcess(app)
    try:
        yield server
    finally:
        rc = server.stop(signal.SIGTERM)
        assert rc == 0, f"server {app} exited with {rc} after SIGTERM; log:\n{server.log_tail()}"


def room_path(ns: str, name: str, *, tags: list[str] | None = None) -> str:
    """The request target of an upgrade, for tests/rawws.py clients."""
    suffix = f"?{urlencode({'tags': json.dumps(tags)})}" if tags is not None else ""
    return f"/{ns}/{name}{suffix}"


def room_url(
    server: ServerProcess,
    ns: str,
    name: str,
    *,
    tags: list[str] | None = None,
    att: Any = None,
    **query: str,
) -> str:
    params = dict(query)
    if tags is not None:
        params["tags"] = json.dumps(tags)
    if att is not None:
        params["att"] = json.dumps(att)
    suffix = f"?{urlencode(params)}" if params else ""
    return f"{server.ws}/{ns}/{name}{suffix}"


@contextlib.asynccontextmanager
async def room_socket(
    server: ServerProcess,
    ns: str,
    name: str,
    *,
    tags: list[str] | None = None,
    att: Any = None,
    **query: str,
) -> AsyncIterator[ClientConnection]:
    """A `websockets` client on an object's hibernatable socket (no keep-alive pings)."""
    url = room_url(server, ns, name, tags=tags, att=att, **query)
    async with connect(url, ping_interval=None, open_timeout=10) as ws:
        yield ws


async def open_socket(
    server: ServerProcess,
    ns: str,
    name: str,
    *,
    tags: list[str] | None = None,
    att: Any = None,
    **query: str,
) -> ClientConnection:
    """Like `room_socket`, for tests that hold several sockets (close with `close_all`)."""
    url = room_url(server, ns, name, tags=tags, att=att, **query)
    return await connect(url, ping_interval=None, open_timeout=10)


async def close_all(sockets: list[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def ask(ws: ClientConnection, message: str | bytes, within: float = ASK_TIMEOUT) -> Any:
    """Send one message and return the next one received."""
    await ws.send(message)
    try:
        return await asyncio.wait_for(ws.recv(), within)
    except TimeoutError:
        raise AssertionError(f"no answer to {message!r} within {within} s") from None


async def ask_json(ws: ClientConnection, message: str, within: float = ASK_TIMEOUT) -> Any:
    reply = await ask(ws, message, within)
    assert isinstance(reply, str), reply
    return json.loads(reply)


async def stats(server: ServerProcess) -> dict[str, Any]:
    """Counters kept in the app's module globals; this route never touches an object."""
    result: dict[str, Any] = await get_json(f"{server.http}/stats")
    return result


async def census(server: ServerProcess) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(f"{server.http}/census")
    return result


def constructed(snapshot: dict[str, Any], name: str) -> int:
    return int(snapshot["constructed"].get(name, 0))


def handled(snapshot: dict[str, Any], name: str) -> dict[str, int]:
    return dict(snapshot["handled"].get(name, {}))


async def is_alive(server: ServerProcess, name: str) -> bool:
    return bool((await stats(server))["alive"].get(name, False))


async def wait_hibernated(server: ServerProcess, name: str, within: float = 10.0) -> float:
    """Poll /stats until the app's weakref to the instance is dead; returns when (monotonic)."""

    async def gone() -> bool:
        snapshot = await stats(server)
        return name in snapshot["alive"] and not snapshot["alive"][name]

    await wait_until(gone, within=within, what=f"object {name!r} to hibernate")
    return time.monotonic()


async def stays_alive(server: ServerProcess, name: str, duration: float) -> None:
    """Assert the instance is resident during the whole of `duration` seconds."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert await is_alive(server, name), f"object {name!r} was dropped"
        await asyncio.sleep(0.05)


async def close_record(
    server: ServerProcess, name: str, tag: str, within: float = 10.0
) -> dict[str, Any]:
    """The first websocket_close record of object `name` for a socket carrying `tag`."""

    async def find() -> dict[str, Any] | None:
        for record in (await stats(server))["closes"]:
            if record["name"] == name and tag in record["tags"]:
                return dict(record)
        return None

    record = await wait_until(find, within=within, what=f"websocket_close of {name}/{tag}")
    assert record is not None
    return record


async def error_record(
    server: ServerProcess, name: str, tag: str, within: float = 10.0
) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        for record in (await stats(server))["errors"]:
            if record["name"] == name and tag in record["tags"]:
                return dict(record)
        return None

    record = await wait_until(find, within=within, what=f"websocket_error of {name}/{tag}")
    assert record is not None
    return record


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def rpc(server: ServerProcess, ns: str, name: str, method: str, *args: Any) -> Any:
    """`await stub.METHOD(*args)` made by the Worker; returns the result (fails on an error)."""
    status, body = await rpc_raw(server, ns, name, method, *args)
    assert status == 200, (method, status, body)
    return json.loads(body)["result"]


async def rpc_raw(
    server: ServerProcess, ns: str, name: str, method: str, *args: Any
) -> tuple[int, str]:
    query = urlencode({"args": json.dumps(list(args))})
    return await http_get(f"{server.http}/rpc/{ns}/{name}/{method}?{query}")
