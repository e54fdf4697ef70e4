"""The output gate and durability (SPEC §6): a reply never leaves before the write it depends on
is durable; a failed commit drops the reply and closes the socket with 1011; an acknowledged
increment survives kill -9 of the server. The app is tests/apps/store.py ("inc" on a socket adds
one to a stored counter and answers the new value).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support import ServerProcess, get_json

APP = "tests.apps.store:app"
KILL_RUNS = 6


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def counter(server: ServerProcess, name: str) -> ClientConnection:
    return await connect(f"{server.ws}/ws/STORE/{name}", ping_interval=None, open_timeout=10)


async def read_counter(server: ServerProcess, name: str) -> int:
    ws = await counter(server, name)
    try:
        await ws.send("get")
        return int(await asyncio.wait_for(ws.recv(), 10))
    finally:
        await ws.close()


async def test_a_reply_waits_for_its_commit(tmp_path: Path, make_server: Any) -> None:
    """The committer waits for a file before each fsync (a hook for this test): while it is
    absent, the reply to a write, and any other output of the server, is held."""
    release = tmp_path / "release-commits"
    server = make_server(APP, env={"SOCKWORKER_TEST_COMMIT_GATE": str(release)})
    name = fresh("gate")
    ws = await counter(server, name)
    try:
        await ws.send("inc")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        # The gate is one for the whole server: a Worker's answer waits behind the write too.
        stats = asyncio.ensure_future(get_json(f"{server.http}/stats"))
        await asyncio.sleep(0.2)
        assert not stats.done(), "an answer overtook a write that is not durable yet"
        release.touch()
        assert await asyncio.wait_for(ws.recv(), 10) == "1"
        assert (await asyncio.wait_for(stats, 10))["constructed"][name] == 1
        await ws.send("inc")
        assert await asyncio.wait_for(ws.recv(), 10) == "2"
        await ws.send("echo, no write")
        assert await asyncio.wait_for(ws.recv(), 10) == "echo, no write"
    finally:
        await ws.close()


def _limit_file_size() -> None:
    # Every file the server writes is then at most 1 MiB: the object's log hits it after a few
    # commits of 100 kB values (a full disk, for that object).
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


async def test_a_failed_commit_drops_the_reply_and_closes_1011(make_server: Any) -> None:
    server = make_server(APP, preexec=_limit_file_size)
    name = fresh("full")
    ws = await counter(server, name)
    acknowledged = 0
    try:
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(40):
                await ws.send("big 100000")
                reply = await asyncio.wait_for(ws.recv(), 10)
                acknowledged = int(str(reply).split()[1])
    finally:
        await ws.close()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011, closed.value
    assert acknowledged >= 2, "some commits fit under the limit before one did not"
    server.wait_for_log(r"storage commit of .* failed", timeout=10)
    # The write whose reply was dropped is not there; the ones acknowledged are.
    assert await read_counter(server, name) == acknowledged
    # Other objects keep working.
    other = await counter(server, fresh("other"))
    await other.send("inc")
    assert await asyncio.wait_for(other.recv(), 10) == "1"
    await other.close()


async def test_acknowledged_increments_survive_kill_9(make_server: Any, tmp_path: Path) -> None:
    """A client increments a stored counter one message at a time, each acknowledged by the
    object's reply; the server is killed with SIGKILL at a random moment; after a restart the
    counter is never below the last acknowledged value (and at most one above it: the one
    increment that was sent and not acknowledged)."""
    data_dir = tmp_path / "data"
    name = fresh("kill")
    runs: list[dict[str, int]] = []
    rng = random.Random()
    for run in range(KILL_RUNS):
        server = make_server(APP, "--data-dir", str(data_dir))
        start = await read_counter(server, name)
        if run > 0:
            last = runs[-1]
            assert last["acknowledged"] <= start <= last["acknowledged"] + 1, (runs, start)
            runs[-1]["after_restart"] = start
        ws = await counter(server, name)
        acknowledged = start

        async def increment(ws: ClientConnection = ws) -> None:
            nonlocal acknowledged
            while True:
                await ws.send("inc")
                acknowledged = int(await ws.recv())

        pump = asyncio.ensure_future(increment())
        await asyncio.sleep(rng.uniform(0.2, 0.8))  # the random moment of the kill
        server.send_signal(signal.SIGKILL)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pump, 10)
        server.kill()
        assert acknowledged > start, "the run made progress before the kill"
        runs.append({"start": start, "acknowledged": acknowledged})
    final = make_server(APP, "--data-dir", str(data_dir))
    after = await read_counter(final, name)
    last = runs[-1]
    assert last["acknowledged"] <= after <= last["acknowledged"] + 1, (runs, after)
    last["after_restart"] = after
    print("kill -9 runs:", json.dumps(runs))
