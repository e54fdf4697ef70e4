"""WebSocket hibernation: an idle object is dropped from Python while its sockets stay open in the
core with their tags, attachments, auto-response pairs and timestamps; the next event builds a new
instance. Observed from outside only: the app (tests/apps/rooms.py, hibernate_after=0.5 s) keeps a
weakref to each instance and counts constructor and handler runs in module globals served by a
Worker route that never touches an object.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.apps.rooms_client import (
    HIBERNATE_AFTER,
    ask,
    ask_json,
    census,
    close_all,
    close_record,
    constructed,
    fresh,
    handled,
    http_get,
    is_alive,
    module_server,
    open_socket,
    room_path,
    room_socket,
    room_url,
    rpc,
    stats,
    stays_alive,
    wait_hibernated,
)
from tests.rawws import RawWebSocket
from tests.support import ServerProcess, wait_until


@pytest.fixture(scope="module")
def rooms() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.rooms:app")


@pytest.fixture(scope="module")
def traced_rooms() -> Iterator[ServerProcess]:
    """The same app with tracemalloc started at import (tests/apps/census.py)."""
    yield from module_server("tests.apps.census:app")


# ---------------------------------------------------------------- hibernate and wake


async def test_idle_object_hibernates_and_wakes_with_its_sockets_intact(
    rooms: ServerProcess,
) -> None:
    name = fresh("nap")
    ann = {"user": "ann", "joined": 1.5}
    sockets = [
        await open_socket(rooms, "room", name, tags=["alpha", "all"], att=ann),
        await open_socket(rooms, "room", name, tags=["beta", "all"]),
        await open_socket(rooms, "room", name),
    ]
    try:
        s0, s1, s2 = sockets
        assert await ask_json(s1, "!setatt-json " + json.dumps({"user": "bob"})) == {"ok": True}
        first = await ask_json(s0, "!whoami")
        assert first["constructed"] == 1
        assert await ask(s0, "!count") == "3"
        last_event = time.monotonic()

        gone_at = await wait_hibernated(rooms, name)
        idle = gone_at - last_event
        assert idle >= HIBERNATE_AFTER * 0.8, f"dropped after {idle:.3f}s of idleness"
        assert constructed(await stats(rooms), name) == 1, "something woke the object"

        # the next message builds a new instance
        second = await ask_json(s1, "!whoami")
        assert second["uuid"] != first["uuid"]
        assert second["constructed"] == 2
        assert second["id"] == first["id"]
        assert constructed(await stats(rooms), name) == 2

        # every socket is open, with its tags and attachment, and counted
        assert await ask(s2, "!count") == "3"
        assert await ask(s2, "!count all") == "2"
        assert await ask(s2, "!count alpha") == "1"
        assert await ask_json(s0, "!tags") == ["alpha", "all"]
        assert await ask_json(s1, "!tags") == ["beta", "all"]
        assert await ask_json(s2, "!tags") == []
        assert await ask_json(s0, "!att") == repr(ann)
        assert await ask_json(s1, "!att") == repr({"user": "bob"})
        assert await ask_json(s2, "!att") == repr(None)
        # get_websockets() gives (new) WebSocket objects for the same three sockets
        listed = await ask_json(s0, "!sockets")
        assert sorted((tuple(s["tags"]), s["att"]) for s in listed) == sorted(
            [
                (("alpha", "all"), repr(ann)),
                (("beta", "all"), repr({"user": "bob"})),
                ((), repr(None)),
            ]
        )
        assert all(s["open"] for s in listed)
        assert constructed(await stats(rooms), name) == 2, "one wake-up, one constructor run"

        # and it hibernates again
        await wait_hibernated(rooms, name)
        assert await ask(s2, "still there?") == "still there?"
        assert constructed(await stats(rooms), name) == 3
    finally:
        await close_all(sockets)


async def test_hibernated_object_wakes_for_fetch_and_for_rpc(rooms: ServerProcess) -> None:
    name = fresh("wake")
    async with room_socket(rooms, "room", name, tags=["t"], att=[1, 2]) as ws:
        assert (await ask_json(ws, "!whoami"))["constructed"] == 1
        await wait_hibernated(rooms, name)

        status, body = await http_get(f"{rooms.http}/room/{name}")  # the object's fetch
        assert status == 200, body
        assert json.loads(body)["constructed"] == 2

        await wait_hibernated(rooms, name)
        info = await rpc(rooms, "room", name, "sockets_info")  # an RPC
        assert info == [{"tags": ["t"], "att": repr([1, 2])}]
        assert constructed(await stats(rooms), name) == 3

        await wait_hibernated(rooms, name)
        assert await ask(ws, "hello") == "hello"
        assert constructed(await stats(rooms), name) == 4


async def test_a_burst_on_a_hibernated_object_builds_one_instance_in_order(
    rooms: ServerProcess,
) -> None:
    name = fresh("burst")
    senders, per_sender = 20, 50
    sockets = [await open_socket(rooms, "room", name, tags=[f"s{i}"]) for i in range(senders)]
    try:
        assert (await ask_json(sockets[0], "!whoami"))["constructed"] == 1
        await wait_hibernated(rooms, name)

        async def burst(i: int) -> list[int]:
            ws = sockets[i]
            for n in range(per_sender):
                await ws.send(f"!seq s{i} {n}")
            answer: list[int] = await ask_json(ws, f"!order s{i}")
            return answer

        async with asyncio.timeout(30):
            orders = await asyncio.gather(*(burst(i) for i in range(senders)))
        assert constructed(await stats(rooms), name) == 2, "more than one instance woke up"
        for i, seen in enumerate(orders):
            assert seen == list(range(per_sender)), f"sender s{i} out of order"
    finally:
        await close_all(sockets)


async def test_namespace_limits_override_the_app_hibernate_after(rooms: ServerProcess) -> None:
    # STEADY has `limits = sw.Limits(hibernate_after=60)`; ROOMS uses the app's 0.5 s
    steady, napping = fresh("steady"), fresh("napping")
    async with (
        room_socket(rooms, "steady", steady) as a,
        room_socket(rooms, "room", napping) as b,
    ):
        assert await ask(a, "x") == "x"
        assert await ask(b, "x") == "x"
        await wait_hibernated(rooms, napping)
        await stays_alive(rooms, steady, HIBERNATE_AFTER * 4)
        assert constructed(await stats(rooms), steady) == 1


async def test_url_and_protocol_survive_hibernation(rooms: ServerProcess) -> None:
    name = fresh("origin")
    url = room_url(rooms, "room", name, tags=["p"])
    async with connect(url, subprotocols=[Subprotocol("chat")], ping_interval=None) as ws:
        assert ws.subprotocol == "chat"
        before = await ask_json(ws, "!info")
        assert before["protocol"] == "chat"
        assert before["url"].startswith("ws://") and f"/room/{name}" in before["url"]
        await wait_hibernated(rooms, name)
        assert await ask_json(ws, "!info") == before
        assert constructed(await stats(rooms), name) == 2


async def test_an_object_without_sockets_is_dropped_when_idle(rooms: ServerProcess) -> None:
    name = fresh("nosockets")
    assert await rpc(rooms, "room", name, "add", 1, 2) == 3
    await wait_hibernated(rooms, name)
    assert await rpc(rooms, "room", name, "add", 3, 4) == 7
    assert constructed(await stats(rooms), name) == 2


# ---------------------------------------------------------------- what prevents hibernation


async def test_a_standard_api_socket_prevents_hibernation(rooms: ServerProcess) -> None:
    name = fresh("standard")
    async with room_socket(rooms, "room", name, tags=["h"]) as hibernatable:
        assert await ask(hibernatable, "x") == "x"
        async with room_socket(rooms, "room", name, mode="standard") as standard:
            assert await ask(standard, "echo") == "echo"  # server.accept() + a listener
            await stays_alive(rooms, name, HIBERNATE_AFTER * 4)
            assert await ask(standard, "still echoing") == "still echoing"
        # once the standard socket is gone, only hibernatable sockets remain
        await wait_hibernated(rooms, name)
        assert await ask_json(hibernatable, "!tags") == ["h"]
        assert constructed(await stats(rooms), name) == 2


async def test_pending_wait_until_delays_hibernation(rooms: ServerProcess) -> None:
    name = fresh("waiting")
    pending = HIBERNATE_AFTER * 5
    async with room_socket(rooms, "room", name) as ws:
        assert await ask(ws, f"!wait {pending}") == "waiting"
        started = time.monotonic()
        await stays_alive(rooms, name, pending * 0.6)
        gone_at = await wait_hibernated(rooms, name)
        assert gone_at - started >= pending * 0.9, "dropped while its wait_until task ran"
        assert constructed(await stats(rooms), name) == 1


# ---------------------------------------------------------------- auto-response while hibernated


async def test_auto_response_while_hibernated_runs_no_python_and_moves_the_timestamp(
    rooms: ServerProcess,
) -> None:
    name = fresh("autonap")
    async with (
        room_socket(rooms, "room", name, tags=["pinger"]) as pinger,
        room_socket(rooms, "room", name, tags=["quiet"]) as quiet,
    ):
        shown = json.dumps(await ask_json(pinger, "!auto on"))
        assert "ping" in shown and "pong" in shown, shown
        assert await ask(quiet, "x") == "x"
        await wait_hibernated(rooms, name)
        before = await stats(rooms)

        sent_from = time.time()
        for _ in range(5):
            assert await ask(pinger, "ping") == "pong"
        # protocol pings are answered by the core too
        pong = await pinger.ping()
        await asyncio.wait_for(pong, 10)
        sent_until = time.time()

        after = await stats(rooms)
        assert constructed(after, name) == constructed(before, name), "the constructor ran"
        assert handled(after, name) == handled(before, name), "a handler ran"
        assert after["alive"][name] is False

        # waking it (any other message) shows when the core last answered on each socket
        first = await ask_json(pinger, "!autots")
        assert constructed(await stats(rooms), name) == constructed(before, name) + 1
        assert first is not None, "no auto-response timestamp"
        assert first["utc"] is True, first
        assert sent_from - 1.0 <= first["ts"] <= sent_until + 1.0, (sent_from, first, sent_until)

        # hibernate again, ping again: the timestamp moves
        await wait_hibernated(rooms, name)
        sent_again = time.time()
        assert await ask(pinger, "ping") == "pong"
        assert await is_alive(rooms, name) is False
        second = await ask_json(pinger, "!autots")
        assert second["ts"] > first["ts"], (first, second)
        assert second["ts"] >= sent_again - 1.0
        # only a socket that was auto-answered is stamped
        assert await ask_json(quiet, "!autots") is None


async def test_several_auto_response_pairs_survive_hibernation(rooms: ServerProcess) -> None:
    name = fresh("multinap")
    async with room_socket(rooms, "room", name) as ws:
        await ask(ws, "!auto multi")
        assert await ask(ws, "!evt 7000") == "7000"
        await wait_hibernated(rooms, name)
        before = await stats(rooms)
        assert await ask(ws, b"\x01ping") == b"\x02pong"
        assert await ask(ws, "ping") == "pong"
        after = await stats(rooms)
        assert constructed(after, name) == constructed(before, name)
        assert handled(after, name) == handled(before, name)
        # a message that matches no pair wakes it; the event timeout survived too
        assert await ask(ws, "wake up") == "wake up"
        assert constructed(await stats(rooms), name) == constructed(before, name) + 1
        assert await ask(ws, "!evt?") == "7000"


async def test_event_timeout_cancels_a_slow_async_handler_and_resets(
    rooms: ServerProcess,
) -> None:
    name = fresh("evtslow")  # AsyncRoom: async def websocket_message, hibernate_after=60
    async with room_socket(rooms, "async", name, tags=["slow"]) as ws:
        first = await ask_json(ws, "!whoami")
        assert await ask(ws, "!slow 0.2") == "slept"  # no timeout yet
        assert await ask(ws, "!evt 300") == "300"
        mark = rooms.log_mark()
        await ws.send("!slow 5")
        await rooms.wait_for_log_async(
            rf"exception in .*(?i:message).* of object {first['id']}", within=4, start=mark
        )
        after = await ask_json(ws, "!whoami")  # not "slept": the slow handler was cancelled
        assert after["uuid"] != first["uuid"]
        assert after["constructed"] == 2
        assert await ask(ws, "!evt?") == "300"  # the setting outlives the instance
        assert await ask_json(ws, "!tags") == ["slow"]


async def test_limits_apply_to_a_hibernated_socket(rooms: ServerProcess) -> None:
    name = fresh("bignap")
    async with (
        room_socket(rooms, "room", name, tags=["keeper"]) as keeper,
        room_socket(rooms, "room", name, tags=["big"]) as big,
    ):
        assert await ask(big, "x") == "x"
        await wait_hibernated(rooms, name)
        await big.send(b"x" * ((1 << 20) + 1))  # past the default max_message_size
        with pytest.raises(ConnectionClosed) as exc:
            await asyncio.wait_for(big.recv(), 10)
        assert exc.value.rcvd is not None
        assert exc.value.rcvd.code == 1009
        record = await close_record(rooms, name, "big")
        assert record["code"] == 1009
        assert await ask(keeper, "!count") == "1"


# ---------------------------------------------------------------- closing while hibernated


async def test_client_close_wakes_a_hibernated_object(rooms: ServerProcess) -> None:
    name = fresh("closenap")
    async with room_socket(rooms, "room", name, tags=["keeper"]) as keeper:
        async with room_socket(rooms, "room", name, tags=["leaver"], att="left") as leaver:
            assert await ask(leaver, "x") == "x"
            await wait_hibernated(rooms, name)
            await asyncio.wait_for(leaver.close(4005, "later"), 10)
            assert leaver.protocol.close_rcvd is not None
            assert leaver.protocol.close_rcvd.code == 4005  # answered with the same code
        record = await close_record(rooms, name, "leaver")
        assert (record["code"], record["reason"], record["was_clean"]) == (4005, "later", True)
        assert record["att"] == repr("left")
        assert record["remaining"] == 1
        assert constructed(await stats(rooms), name) == 2
        assert await ask(keeper, "!count") == "1"


async def test_abrupt_disconnect_of_a_hibernated_socket_is_1006(rooms: ServerProcess) -> None:
    name = fresh("abruptnap")
    async with room_socket(rooms, "room", name, tags=["keeper"]) as keeper:
        raw = await RawWebSocket.connect(rooms.port, room_path("room", name, tags=["raw"]))
        await raw.send("hello")
        assert await raw.recv_message() == "hello"
        await wait_hibernated(rooms, name)
        raw.abort()
        record = await close_record(rooms, name, "raw")
        assert (record["code"], record["was_clean"]) == (1006, False)
        assert constructed(await stats(rooms), name) == 2
        assert await ask(keeper, "!count") == "1"


async def test_object_closing_a_socket_after_waking(rooms: ServerProcess) -> None:
    name = fresh("servercloses")
    async with (
        room_socket(rooms, "room", name, tags=["keeper"]) as keeper,
        room_socket(rooms, "room", name, tags=["closed"]) as closed,
    ):
        assert await ask(closed, "x") == "x"
        await wait_hibernated(rooms, name)
        await closed.send("!close 4006 woke up to close")
        with pytest.raises(ConnectionClosed) as exc:
            await asyncio.wait_for(closed.recv(), 10)
        assert exc.value.rcvd is not None
        assert (exc.value.rcvd.code, exc.value.rcvd.reason) == (4006, "woke up to close")

        async def one_left() -> bool:
            return bool(await ask(keeper, "!count") == "1")

        await wait_until(one_left, within=10, what="the closed socket to leave the count")


# ---------------------------------------------------------------- memory of hibernated sockets


@pytest.mark.timeout(120)
async def test_1000_hibernated_sockets_keep_no_python_object_per_socket(
    traced_rooms: ServerProcess,
) -> None:
    server = traced_rooms
    total = 1000
    # Warm up with sockets through a whole hibernate/wake cycle, so that first-use allocations
    # and bounded caches are already there: urllib.parse.urlsplit keeps an lru_cache of the last
    # 128 URLs (each socket's URL is distinct here), ~60 KB however many sockets there are.
    warm = fresh("warm")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        warmers = [
            await session.ws_connect(room_url(server, "room", warm, tags=["w", f"w{i}"]))
            for i in range(150)
        ]
        try:
            await wait_hibernated(server, warm)
            await warmers[0].send_str("x")
            assert (await warmers[0].receive(timeout=10)).data == "x"
            await wait_hibernated(server, warm)
        finally:
            await asyncio.gather(*(ws.close() for ws in warmers), return_exceptions=True)
    await wait_until(
        lambda: _websockets_at_most(server, 0), within=10, what="no WebSocket objects left"
    )
    base = await census(server)
    rss_base = server.rss_kib()

    name = fresh("crowd")
    opening = asyncio.Semaphore(100)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:

            async def join(i: int) -> None:
                async with opening:
                    url = room_url(server, "room", name, tags=["all", f"u{i}"], att={"i": i})
                    sockets.append(await session.ws_connect(url))

            async with asyncio.timeout(60):
                await asyncio.gather(*(join(i) for i in range(total)))

            # while the object holds them, the census does see 1,000 WebSocket objects
            await sockets[0].send_str("!census")
            held = json.loads((await sockets[0].receive(timeout=20)).data)
            assert held["held"] == total
            assert held["websockets"] >= total, held

            await wait_hibernated(server, name, within=20)
            await wait_until(
                lambda: _websockets_at_most(server, 0),
                within=10,
                what="no WebSocket objects left after hibernation",
            )
            hibernated = await census(server)
            rss_hibernated = server.rss_kib()

            assert hibernated["websockets"] == 0, hibernated
            assert hibernated["objects"] == 0, hibernated
            traced_growth = hibernated["traced"] - base["traced"]
            per_socket = traced_growth / total
            rss_per_socket = (rss_hibernated - rss_base) * 1024 / total
            print(
                f"\n1,000 hibernated sockets: tracemalloc growth {traced_growth} B "
                f"({per_socket:.1f} B/socket); RSS growth {rss_hibernated - rss_base} KiB "
                f"({rss_per_socket:.0f} B/socket, informational)"
            )
            assert per_socket < 200, f"{per_socket:.1f} traced bytes per hibernated socket"

            # all of them are still open, and still the object's
            await sockets[0].send_str("!count all")
            assert (await sockets[0].receive(timeout=20)).data == str(total)
            await sockets[0].send_str("!broadcast - 0 still-here")

            async def still_here(ws: aiohttp.ClientWebSocketResponse) -> None:
                while True:
                    msg = await ws.receive(timeout=20)
                    assert msg.type == aiohttp.WSMsgType.TEXT, msg
                    if msg.data == "still-here":
                        return

            async with asyncio.timeout(30):
                await asyncio.gather(*(still_here(ws) for ws in sockets))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def _websockets_at_most(server: ServerProcess, n: int) -> bool:
    snapshot: dict[str, Any] = await census(server)
    return bool(snapshot["websockets"] <= n)
