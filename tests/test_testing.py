"""``sockworker.testing``: an app served in-process, driven the way a user's own tests of a
Durable Object would drive it (vitest-pool-workers' shape): HTTP and WebSocket clients, code
run inside an object, its alarm run at once, hibernation on demand, the meter's records, and
the ``sockworker_server`` fixture of the pytest plugin."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sockworker as sw
from sockworker.testing import TestServer

ALARMS: list[str] = []


class Room(sw.DurableObject):
    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.seen = 0

    async def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self.seen += 1
        count = (self.ctx.storage.get("count") or 0) + 1
        self.ctx.storage.put("count", count)
        ws.send(f"{count}:{message}")

    def remind(self, seconds: float) -> None:
        self.ctx.storage.set_alarm(time.time() + seconds)

    def alarm(self) -> None:
        ALARMS.append(str(self.ctx.id))
        self.ctx.storage.put("reminded", True)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    name = request.path.removeprefix("/room/")
    if request.path.startswith("/room/") and name:
        return await env.ROOMS.get_by_name(name).fetch(request)
    if request.path == "/hello":
        return sw.Response("hello " + request.method)
    return sw.Response("not found", status=404)


def make_app() -> sw.App:
    return sw.App(fetch=fetch, durable_objects={"ROOMS": Room})


@pytest.fixture
def sockworker_app() -> sw.App:
    return make_app()


async def test_fetch_and_websocket_reach_the_real_server(sockworker_server: TestServer) -> None:
    server = sockworker_server
    response = await server.fetch("/hello", method="POST", body="x")
    assert (response.status, response.text()) == (200, "hello POST")
    assert (await server.fetch("/nope")).status == 404
    async with server.connect("/room/a") as ws:
        await ws.send("hi")
        assert await ws.recv() == "1:hi"
        await ws.send("again")
        assert await ws.recv() == "2:again"


async def test_run_in_object_sees_the_instance_and_its_storage(
    sockworker_server: TestServer,
) -> None:
    server = sockworker_server
    async with server.connect("/room/b") as ws:
        await ws.send("one")
        await ws.recv()
    stub = server.env.ROOMS.get_by_name("b")
    seen, stored = await server.run_in_object(
        stub, lambda room, state: (room.seen, state.storage.get("count"))
    )
    assert (seen, stored) == (1, 1)
    # A write made inside commits as any event's does.
    await server.run_in_object(stub, lambda room, state: state.storage.put("count", 10))
    async with server.connect("/room/b") as ws:
        await ws.send("two")
        assert await ws.recv() == "11:two"


async def test_hibernate_now_keeps_the_socket_and_the_storage(
    sockworker_server: TestServer,
) -> None:
    server = sockworker_server
    stub = server.env.ROOMS.get_by_name("c")
    async with server.connect("/room/c") as ws:
        await ws.send("before")
        assert await ws.recv() == "1:before"
        assert server.is_resident(stub)
        await server.hibernate_now(stub)
        assert not server.is_resident(stub)
        await ws.send("after")  # wakes a new instance, on the same socket
        assert await ws.recv() == "2:after"
    assert await server.run_in_object(stub, lambda room, state: room.seen) == 1


async def test_run_alarm_runs_a_set_alarm_now(sockworker_server: TestServer) -> None:
    server = sockworker_server
    stub = server.env.ROOMS.get_by_name("d")
    assert not await server.run_alarm(stub)  # none set
    await stub.remind(3600)
    assert await server.run_alarm(stub)
    assert ALARMS[-1] == str(stub.id)
    assert await server.run_in_object(stub, lambda room, state: state.storage.get("reminded"))
    assert await server.run_in_object(stub, lambda room, state: state.storage.get_alarm()) is None
    assert not await server.run_alarm(stub)  # it ran: nothing is set any more


async def test_usage_reports_what_the_meter_counted(sockworker_server: TestServer) -> None:
    server = sockworker_server
    server.usage()  # forget what came before
    async with server.connect("/room/e") as ws:
        for n in range(3):
            await ws.send(str(n))
            await ws.recv()
    records = [r for r in server.usage() if r.namespace == "ROOMS"]
    assert sum(r.ws_messages_in for r in records) == 3
    assert sum(r.ws_messages_out for r in records) == 3
    assert sum(r.storage_rows_written for r in records) >= 3


async def test_an_exception_inside_resets_the_object_and_is_raised(
    sockworker_server: TestServer,
) -> None:
    server = sockworker_server
    stub = server.env.ROOMS.get_by_name("f")
    before = await server.run_in_object(stub, lambda room, state: id(room))

    def boom(room: Any, state: Any) -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        await server.run_in_object(stub, boom)
    assert await server.run_in_object(stub, lambda room, state: id(room)) != before


async def test_a_restart_on_the_same_data_dir_keeps_storage(tmp_path: Any) -> None:
    for expected in ("1:x", "2:x"):
        async with (
            TestServer(make_app(), data_dir=str(tmp_path)) as server,
            server.connect("/room/g") as ws,
        ):
            await ws.send("x")
            assert await ws.recv() == expected


async def test_one_server_at_a_time(sockworker_server: TestServer) -> None:
    with pytest.raises(RuntimeError, match="one TestServer at a time"):
        await TestServer(make_app()).start()
