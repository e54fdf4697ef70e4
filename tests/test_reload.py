"""``sockworker serve --reload`` and the ``SOCKWORKER_*`` environment defaults, on a real
server: an edit of the app's file closes its sockets with 1012 and the next connection is
served by the new code on the same port, with the objects' storage kept; an edit that does not
load is logged and the old code keeps serving; a variable sets a flag's default, and a bad one
is a usage error naming it."""

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
import os

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
    if request.path == "/pid":
        return sw.Response(str(os.getpid()))
    if request.path == "/inc":
        return sw.Response(str(await env.COUNTER.get_by_name("c").increment()))
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, durable_objects={{"COUNTER": Counter}})
"""


def write_app(directory: Path, version: str) -> None:
    write_source(directory, APP.format(version=version))


def write_source(directory: Path, text: str) -> None:
    path = directory / "reloaded.py"
    # Written whole then renamed: the watcher never sees half a file.
    partial = directory / "reloaded.py.part"
    partial.write_text(text)
    partial.replace(path)


async def echo(url: str, text: str) -> str:
    async with connect(url) as ws:
        await ws.send(text)
        return str(await ws.recv())


async def get(server: ServerProcess, path: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http}{path}") as response:
        assert response.status == 200
        return await response.text()


async def increment(server: ServerProcess) -> str:
    return await get(server, "/inc")


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


async def test_a_broken_edit_keeps_the_old_code_serving_and_the_next_one_replaces_it(
    tmp_path: Path,
) -> None:
    server = reloading(tmp_path)
    try:
        server.wait_for_log(r"watching .* for changes")
        old = await get(server, "/pid")
        async with connect(f"{server.ws}/ws") as ws:
            await ws.send("a")
            assert await ws.recv() == "v1:a"
            mark = server.log_mark()
            write_source(tmp_path, "this is not python(\n")
            await server.wait_for_log_async(
                r"^ERROR sockworker\.reload: the new code of reloaded:app does not load; "
                "the old code keeps serving",
                30,
                mark,
            )
            # The traceback is logged after that line.
            await server.wait_for_log_async("SyntaxError", 30, mark)
            # The socket opened before the bad edit is still open, served by the old code.
            await ws.send("b")
            assert await ws.recv() == "v1:b"
        assert await get(server, "/pid") == old
        assert await echo(f"{server.ws}/ws", "c") == "v1:c"
        # An edit that loads but has no App is refused the same way.
        mark = server.log_mark()
        write_source(tmp_path, "app = 42\n")
        await server.wait_for_log_async(r"reloaded:app is a int, not a sockworker.App", 30, mark)
        assert await get(server, "/pid") == old
        # The next good edit replaces the old code.
        mark = server.log_mark()
        write_app(tmp_path, "v3")
        again = await server.wait_for_log_async(LISTENING.pattern, 30, mark)
        assert int(again.group(1)) == server.port
        assert await echo(f"{server.ws}/ws", "d") == "v3:d"
        assert await get(server, "/pid") != old
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


def test_the_check_of_an_edit_reports_the_apps_own_frames(tmp_path: Path) -> None:
    """What ``--reload`` logs for an edit that raises at import: the app's lines, not the
    import machinery's; and exit status 0 for one that loads."""
    from sockworker.reload import CHECK

    (tmp_path / "raising.py").write_text("def boom():\n    return 1 / 0\n\n\nboom()\n")
    write_app(tmp_path, "v9")

    def check(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", CHECK, target],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = check("raising:app")
    assert done.returncode == 1
    assert f'File "{tmp_path / "raising.py"}", line 5, in <module>' in done.stderr
    assert "return 1 / 0" in done.stderr
    assert done.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "importlib" not in done.stderr
    assert check("reloaded:app").returncode == 0
