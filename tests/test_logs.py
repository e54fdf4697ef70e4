"""Logs: the core's records reach the server's output through Python's logging (logger
``sockworker``), ``--log-level`` applies to them, and ``--log-format json`` writes one JSON object
per line. Against ``tests.apps.loud``, whose answers make the core log. (That the level filters in
the core, before a record is even formatted, is tested in ``rust/core/src/logs.rs``.)"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

import aiohttp

from tests.support import ServerProcess

WITHIN = 10.0
CORE_ERROR = "invalid response from the application"
CONNECTION_DEBUG = "HTTP connection from 127.0.0.1"


async def _status(server: ServerProcess, path: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{server.http}{path}") as resp:
        return resp.status


async def _send_garbage(server: ServerProcess) -> bytes:
    """Something that is not HTTP: the core answers 400, and logs why at DEBUG."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), WITHIN)  # until the core closes it
    writer.close()
    await writer.wait_closed()
    return answer


async def test_a_record_of_the_core_reaches_the_log(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("tests.apps.loud:app")
    mark = server.log_mark()
    assert await _status(server, "/bad-header") == 500
    line = server.wait_for_log(f"{CORE_ERROR}", timeout=WITHIN, start=mark).string
    # The text format, the logger of the core, and what the core says: which header, and why.
    assert line == (
        f"ERROR sockworker: {CORE_ERROR}: invalid value of response header "
        '"x-broken" (control characters such as CR, LF and NUL are not allowed)'
    ), line
    assert await _status(server, "/") == 200  # and the server goes on


async def test_the_log_level_applies_to_the_core(
    make_server: Callable[..., ServerProcess],
) -> None:
    debug = make_server("tests.apps.loud:app", "--log-level", "debug")
    assert (await _send_garbage(debug)).startswith(b"HTTP/1.1 400")
    line = debug.wait_for_log(CONNECTION_DEBUG, timeout=WITHIN).string
    assert line.startswith("DEBUG sockworker: "), line

    info = make_server("tests.apps.loud:app", "--log-level", "info")
    assert (await _send_garbage(info)).startswith(b"HTTP/1.1 400")
    # A record logged after the garbage: once it is in the log, the debug one would be too.
    assert await _status(info, "/bad-header") == 500
    info.wait_for_log(CORE_ERROR, timeout=WITHIN)
    assert CONNECTION_DEBUG not in info.log_text()


async def test_json_log_format(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server("tests.apps.loud:app", "--log-format", "json")
    assert await _status(server, "/bad-header") == 500
    assert await _status(server, "/boom") == 500
    server.wait_for_log("loud-boom", timeout=WITHIN)
    server.wait_for_log(CORE_ERROR, timeout=WITHIN)
    entries = [json.loads(line) for line in server.log_text().splitlines()]
    listening = next(e for e in entries if e["message"].startswith("listening on"))
    assert listening["level"] == "INFO" and listening["logger"] == "sockworker"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", listening["time"])
    core = next(e for e in entries if e["message"].startswith(CORE_ERROR))
    assert core["level"] == "ERROR" and core["logger"] == "sockworker"
    assert core["target"] == "sockworker_core::server"
    boom = next(
        e
        for e in entries
        if "exception in fetch for GET" in e["message"] and "/boom" in e["message"]
    )
    assert "RuntimeError: loud-boom" in boom["exception"]
    assert "target" not in boom
