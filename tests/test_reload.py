"""``sockworker serve --reload`` and the ``SOCKWORKER_*`` environment defaults, on a real
server: an edit of the app's file closes its sockets with 1012 and the next connection is
served by the new code on the same port, with the objects' storage kept; a variable sets a
flag's default, and a bad one is a usage error naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support import LISTENING, ROOT, ServerProcess

APP = """
import sockworker as sw

VERSION = "{version}"


class Counter(sw.DurableObject):
    def increment(self) -> int:
        value = (self.ctx.storage.get("n") or 0) + 1
        self.ctx.storage.put("n", value)
        return value


async def fetch(request, env, ctx):
    if request.path == "/ws":
        client, server = sw.WebSocketPair()
        server.accept()
        server.add_event_listener("message", lambda event: server.send(VERSION + ":" + event.data))
        return sw.Response(status=101, websocket=client)
    if request.path == "/inc":
        return sw.Response(str(await env.COUNTER.get_by_name("c").increment()))
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, durable_objects={{"COUNTER": Counter}})
"""


def write_app(directory: Path, version: str) -> None:
    path = directory / "reloaded.py"
    text = APP.format(version=version)
    # Written whole then renamed: the watcher never sees half a file.
    partial = directory / "reloaded.py.part"
    partial.write_text(text)
    partial.replace(path)


async def echo(url: str, text: str) -> str:
    async with connect(url) as ws:
        await ws.send(text)
        return str(await ws.recv())


async def increment(server: ServerProcess) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http}/inc") as response:
        return await response.text()


def reloading(directory: Path) -> ServerProcess:
    """``sockworker serve --reload`` of the app written (v1) in ``directory``."""
    write_app(directory, "v1")
    return ServerProcess(
        "reloaded:app",
        extra=("--reload", "--reload-dir", str(directory)),
        env={"PYTHONPATH": str(directory)},
    )


async def test_an_edit_restarts_with_1012_and_keeps_storage(tmp_path: Path) -> None:
    server = reloading(tmp_path)
    try:
        server.wait_for_log(r"watching .* for changes")
        assert await increment(server) == "1"
        async with connect(f"{server.ws}/ws") as ws:
            await ws.send("a")
            assert await ws.recv() == "v1:a"
            mark = server.log_mark()
            write_app(tmp_path, "v2")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1012
        # The new code serves on the same port once it logs that it listens.
        again = await server.wait_for_log_async(LISTENING.pattern, 30, mark)
        assert int(again.group(1)) == server.port
        assert await echo(f"{server.ws}/ws", "b") == "v2:b"
        assert await increment(server) == "2"  # storage kept across the restart
    finally:
        assert server.stop() == 0


async def test_a_broken_edit_is_logged_and_the_next_one_serves(tmp_path: Path) -> None:
    server = reloading(tmp_path)
    try:
        mark = server.log_mark()
        (tmp_path / "reloaded.py").write_text("this is not python(\n")
        await server.wait_for_log_async("SyntaxError", 30, mark)
        mark = server.log_mark()
        write_app(tmp_path, "v3")
        await server.wait_for_log_async(LISTENING.pattern, 30, mark)
        assert await echo(f"{server.ws}/ws", "c") == "v3:c"
    finally:
        assert server.stop() == 0


def test_environment_variables_set_the_defaults() -> None:
    server = ServerProcess("tests.apps.echo:app", env={"SOCKWORKER_LOG_FORMAT": "json"})
    try:
        line = server.wait_for_log("listening on").string
        assert "listening on" in json.loads(line)["message"]
    finally:
        server.stop()


def test_a_bad_environment_value_is_a_usage_error_naming_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sockworker", "serve", "tests.apps.echo:app"],
        cwd=ROOT,
        env=dict(os.environ, SOCKWORKER_DURABILITY="sometimes"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SOCKWORKER_DURABILITY='sometimes'" in done.stderr
