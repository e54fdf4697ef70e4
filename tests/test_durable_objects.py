"""Durable Objects: ids and stubs, one instance per id, event order, RPC by value, the socket API of
`DurableObjectState` (tags, attachments, counts, broadcast, auto-response), close and failure
handling, and the limits on tags, attachments and sockets.

The server runs tests/apps/rooms.py. Resets are told apart from hibernation by using the STEADY
namespace (hibernate_after=60 s): there, a constructor run can only come from a reset.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.apps.rooms_client import (
    ask,
    ask_json,
    close_all,
    close_record,
    constructed,
    error_record,
    fresh,
    handled,
    http_get,
    module_server,
    open_socket,
    room_path,
    room_socket,
    room_url,
    rpc,
    rpc_raw,
    stats,
)
from tests.rawws import OP_TEXT, RawWebSocket, encode_frame
from tests.support import ServerProcess, get_json, wait_until

HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def rooms() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.rooms:app")


# ---------------------------------------------------------------- ids and stubs


async def test_namespace_ids(rooms: ServerProcess) -> None:
    ids = await get_json(f"{rooms.http}/ids")
    # id_from_name is deterministic, equal by value (and usable as a dict key), and keeps the name
    assert HEX64.fullmatch(ids["a"]), ids["a"]
    assert ids["a"] == ids["a_again"]
    assert ids["a_equal"] is True
    assert ids["a_hash_equal"] is True
    assert ids["a_as_key"] == 1
    assert ids["a_name"] == "a"
    # two names, two ids
    assert HEX64.fullmatch(ids["b"]), ids["b"]
    assert ids["a"] != ids["b"]
    assert ids["a_ne_b"] is True
    assert ids["b_name"] == "b"
    # new_unique_id: unique, no name; id_from_string round-trips
    assert HEX64.fullmatch(ids["u1"]), ids["u1"]
    assert HEX64.fullmatch(ids["u2"]), ids["u2"]
    assert ids["u1"] != ids["u2"]
    assert ids["u_ne"] is True
    assert ids["u_name"] is None
    assert ids["round_trip"] is True
    assert ids["round_trip_named"] is True
    # id_from_string refuses anything but 64 hex characters, with ValueError
    for label, error in ids["bad"].items():
        assert error is not None, f"id_from_string accepted the {label} string"
        assert error["value_error"], (label, error)


async def test_id_from_name_is_stable_across_requests(rooms: ServerProcess) -> None:
    first = await get_json(f"{rooms.http}/ids")
    second = await get_json(f"{rooms.http}/ids")
    assert (first["a"], first["b"]) == (second["a"], second["b"])
    assert first["u1"] not in (second["u1"], second["u2"])


async def test_same_name_reaches_the_same_instance_from_many_connections(
    rooms: ServerProcess,
) -> None:
    name = fresh("same")
    connections = 50

    async def whoami_over_websocket(i: int) -> dict[str, Any]:
        async with room_socket(rooms, "steady", name, tags=[f"c{i}"]) as ws:
            who: dict[str, Any] = await ask_json(ws, "!whoami")
            return who

    async with asyncio.timeout(30):
        answers = await asyncio.gather(*(whoami_over_websocket(i) for i in range(connections)))
    # the object's own fetch (plain HTTP) and an RPC reach it too
    status, body = await http_get(f"{rooms.http}/steady/{name}")
    assert status == 200, body
    answers.append(json.loads(body))
    answers.append(await rpc(rooms, "steady", name, "whoami"))

    assert {a["uuid"] for a in answers} == {answers[0]["uuid"]}, "more than one instance"
    assert {a["pyid"] for a in answers} == {answers[0]["pyid"]}
    assert {a["id"] for a in answers} == {answers[0]["id"]}
    assert HEX64.fullmatch(answers[0]["id"])
    assert answers[0]["name"] == name
    assert answers[0]["cls"] == "SteadyRoom"
    assert constructed(await stats(rooms), name) == 1


async def test_two_names_never_share_an_instance(rooms: ServerProcess) -> None:
    names = [fresh(f"distinct{i}") for i in range(40)]

    async def whoami(name: str) -> dict[str, Any]:
        async with room_socket(rooms, "steady", name) as ws:
            who: dict[str, Any] = await ask_json(ws, "!whoami")
            return who

    async with asyncio.timeout(30):
        # three connections per name, all at once
        answers = await asyncio.gather(*(whoami(name) for name in names for _ in range(3)))
    by_name: dict[str, set[str]] = {}
    ids: dict[str, set[str]] = {}
    for who in answers:
        by_name.setdefault(who["name"], set()).add(who["uuid"])
        ids.setdefault(who["name"], set()).add(who["id"])
    assert set(by_name) == set(names)
    for name in names:
        assert len(by_name[name]) == 1, f"{name} reached {len(by_name[name])} instances"
        assert len(ids[name]) == 1
    all_uuids = [next(iter(u)) for u in by_name.values()]
    assert len(set(all_uuids)) == len(names), "two names share an instance"
    all_ids = [next(iter(i)) for i in ids.values()]
    assert len(set(all_ids)) == len(names), "two names share an id"
    snapshot = await stats(rooms)
    assert all(constructed(snapshot, name) == 1 for name in names)


async def test_new_unique_id_and_id_from_string_reach_one_object(rooms: ServerProcess) -> None:
    made = await get_json(f"{rooms.http}/unique")
    assert HEX64.fullmatch(made["id"])
    assert made["name"] is None
    assert made["who"]["id"] == made["id"]
    assert made["who"]["name"] is None
    again = await get_json(f"{rooms.http}/by-hex/{made['id']}")
    assert again["who"]["uuid"] == made["who"]["uuid"], "id_from_string reached another instance"
    status, body = await http_get(f"{rooms.http}/by-hex/{'g' * 64}")
    assert status == 400, body
    assert json.loads(body)["value_error"] is True


# ---------------------------------------------------------------- event order


@pytest.mark.parametrize("ns", ["steady", "async"], ids=["def-handler", "async-def-handler"])
async def test_events_keep_their_order_under_100_concurrent_senders(
    rooms: ServerProcess, ns: str
) -> None:
    name = fresh(f"order-{ns}")
    senders, per_sender = 100, 200
    ready = 0
    go = asyncio.Event()
    opening = asyncio.Semaphore(50)

    async def sender(session: aiohttp.ClientSession, s: int) -> None:
        nonlocal ready
        async with opening:
            ws = await session.ws_connect(room_url(rooms, ns, name), heartbeat=None)
        async with ws:
            ready += 1
            if ready == senders:
                go.set()
            await go.wait()  # everyone sends at once
            for n in range(per_sender):  # pipelined, no waiting for answers
                await ws.send_str(f"!seq s{s} {n}")
            await ws.send_str(f"!done s{s}")
            msg = await ws.receive(timeout=40)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, f"done s{s}"), msg

    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        asyncio.timeout(50),
        asyncio.TaskGroup() as group,
    ):
        for s in range(senders):
            group.create_task(sender(session, s))

    order = await rpc(rooms, ns, name, "order_seen")
    assert sorted(order) == sorted(f"s{s}" for s in range(senders))
    for s in range(senders):
        assert order[f"s{s}"] == list(range(per_sender)), f"sender s{s} out of order"
    snapshot = await stats(rooms)
    assert constructed(snapshot, name) == 1
    assert handled(snapshot, name)["message"] == senders * (per_sender + 1)


# ---------------------------------------------------------------- RPC


async def test_rpc_arguments_and_results_are_passed_by_value(rooms: ServerProcess) -> None:
    result = await get_json(f"{rooms.http}/rpc-by-value/{fresh('byvalue')}")
    # the object appended 4 to its copy; the caller appended "caller" to its own list
    assert result["args"] == [1, 2, 3, "caller"]
    assert result["result"] == [1, 2, 3, 4]
    assert result["again"] == [1, 2, 3, 4], "the caller's later change reached the object"
    assert result["same"] is False


async def test_rpc_calls_def_and_async_def_methods(rooms: ServerProcess) -> None:
    name = fresh("rpc")
    assert await rpc(rooms, "steady", name, "add", 2, 3) == 5
    assert await rpc(rooms, "steady", name, "add_later", 20, 22) == 42
    assert handled(await stats(rooms), name)["rpc"] == 2


@pytest.mark.parametrize("method", ["_private", "no_such_method"])
async def test_rpc_reaches_only_public_methods(rooms: ServerProcess, method: str) -> None:
    status, body = await rpc_raw(rooms, "steady", fresh("private"), method)
    assert status == 500, f"stub.{method}() answered {body}"


# ---------------------------------------------------------------- tags, counts, attachments


async def test_tags_counts_and_get_websockets(rooms: ServerProcess) -> None:
    name = fresh("tags")
    tag_sets = [["red", "all"], ["blue", "all"], ["red"], []]
    sockets = [await open_socket(rooms, "steady", name, tags=tags) for tags in tag_sets]
    try:
        for ws, tags in zip(sockets, tag_sets, strict=True):
            assert await ask_json(ws, "!tags") == tags
        first = sockets[0]
        assert await ask(first, "!count") == "4"
        assert await ask(first, "!count red") == "2"
        assert await ask(first, "!count all") == "2"
        assert await ask(first, "!count blue") == "1"
        assert await ask(first, "!count green") == "0"
        red = await ask_json(first, "!sockets red")
        assert sorted(s["tags"] for s in red) == sorted([["red", "all"], ["red"]])
        everyone = await ask_json(first, "!sockets")
        assert sorted(map(tuple, (s["tags"] for s in everyone))) == sorted(map(tuple, tag_sets))
        assert all(s["open"] for s in everyone)
        # RPC sees the same sockets
        assert await rpc(rooms, "steady", name, "counts", "red") == 2
        info = await rpc(rooms, "steady", name, "sockets_info", "blue")
        assert [s["tags"] for s in info] == [["blue", "all"]]
    finally:
        await close_all(sockets)


async def test_attachments(rooms: ServerProcess) -> None:
    name = fresh("att")
    value = {"user": "ann", "n": 1, "nested": [1, 2.5, None]}
    async with (
        room_socket(rooms, "steady", name, att=value) as given,
        room_socket(rooms, "steady", name) as bare,
    ):
        assert await ask_json(given, "!att") == repr(value)
        assert await ask_json(bare, "!att") == repr(None)  # never set: None
        assert await ask_json(bare, "!setatt-json [1, 2, 3]") == {"ok": True}
        assert await ask_json(bare, "!att") == repr([1, 2, 3])
        # well inside 16 KiB serialized
        assert await ask_json(bare, "!setatt 16000") == {"ok": True}
        assert await ask_json(bare, "!att") == repr(b"x" * 16000)
        # past 16 KiB serialized: ValueError, and the attachment is unchanged
        refused = await ask_json(bare, "!setatt 16384")
        assert refused["ok"] is False
        assert refused["value_error"] is True, refused
        assert await ask_json(bare, "!att") == repr(b"x" * 16000)
        # not picklable: refused, unchanged
        unpicklable = await ask_json(bare, "!setatt-lambda")
        assert unpicklable["ok"] is False, unpicklable
        assert await ask_json(bare, "!att") == repr(b"x" * 16000)
        # None clears it
        assert await ask_json(bare, "!setatt-json null") == {"ok": True}
        assert await ask_json(bare, "!att") == repr(None)
        # the other socket's attachment is its own
        assert await ask_json(given, "!att") == repr(value)
        infos = await rpc(rooms, "steady", name, "sockets_info")
        assert sorted(i["att"] for i in infos) == sorted([repr(value), repr(None)])


# ---------------------------------------------------------------- limits


async def _refused(rooms: ServerProcess, ns: str, name: str, **kw: Any) -> dict[str, Any]:
    """Connect and expect the object's 400 with the accept_websocket error as JSON."""
    with pytest.raises(InvalidStatus) as refused:
        async with room_socket(rooms, ns, name, **kw):
            pass
    response = refused.value.response
    assert response.status_code == 400, response
    body: dict[str, Any] = json.loads(response.body)
    return body


async def test_at_most_10_tags_per_socket(rooms: ServerProcess) -> None:
    name = fresh("ntags")
    ten = [f"t{i}" for i in range(10)]
    async with room_socket(rooms, "steady", name, tags=ten) as ws:
        assert await ask_json(ws, "!tags") == ten
        error = await _refused(rooms, "steady", name, tags=[*ten, "t10"])
        assert error["value_error"] is True, error
        assert await ask(ws, "!count") == "1"  # the refused socket was never counted


async def test_at_most_256_characters_per_tag(rooms: ServerProcess) -> None:
    name = fresh("taglen")
    ascii_tag, wide_tag = "t" * 256, "é" * 256  # characters, not bytes: é is 2 bytes in UTF-8
    async with room_socket(rooms, "steady", name, tags=[ascii_tag, wide_tag]) as ws:
        assert await ask_json(ws, "!tags") == [ascii_tag, wide_tag]
        assert await ask(ws, f"!count {wide_tag}") == "1"
        for too_long in ("t" * 257, "é" * 257):
            error = await _refused(rooms, "steady", name, tags=[too_long])
            assert error["value_error"] is True, error
        assert await ask(ws, "!count") == "1"


async def test_hibernatable_socket_cap_per_object(rooms: ServerProcess) -> None:
    assert (await stats(rooms))["default_max_sockets"] == 32768
    name = fresh("cap")  # SmallRoom sets max_hibernatable_websockets = 5
    sockets = [await open_socket(rooms, "small", name, tags=[f"s{i}"]) for i in range(5)]
    try:
        assert await ask(sockets[0], "!count") == "5"
        error = await _refused(rooms, "small", name)
        assert error["sockworker_error"] is True, error
        # closing one makes room for one more
        await sockets.pop().close()

        async def four() -> bool:
            return bool(await ask(sockets[0], "!count") == "4")

        await wait_until(four, within=10, what="the closed socket to leave the count")
        sockets.append(await open_socket(rooms, "small", name, tags=["again"]))
        assert await ask(sockets[-1], "!count") == "5"
        error = await _refused(rooms, "small", name)
        assert error["sockworker_error"] is True, error
    finally:
        await close_all(sockets)


# ---------------------------------------------------------------- broadcast


async def test_broadcast_to_1000_sockets_with_tag_and_exclude(rooms: ServerProcess) -> None:
    name = fresh("broadcast")
    total = 1000

    def tags_of(i: int) -> list[str]:
        return ["all", "even" if i % 2 == 0 else "odd"] + (["tenth"] if i % 10 == 0 else [])

    # socket 0 (tags all, even, tenth) sends every command
    commands: list[tuple[str, Callable[[int], bool], str | bytes]] = [
        ("!broadcast even 1 m1", lambda i: i % 2 == 0 and i != 0, "m1"),
        ("!broadcast - 0 m2", lambda i: True, "m2"),
        ("!broadcast odd 0 m3", lambda i: i % 2 == 1, "m3"),
        ("!bbroadcast tenth 0 m4", lambda i: i % 10 == 0, b"m4"),
        ("!broadcast - 1 m5", lambda i: i != 0, "m5"),
        ("!broadcast nobody 0 m6", lambda i: False, "m6"),
        ("!broadcast odd 1 m7", lambda i: i % 2 == 1, "m7"),  # exclude not in the tag: no-op
        ("!broadcast - 0 end", lambda i: True, "end"),
    ]
    expected = {i: [data for _, match, data in commands if match(i)] for i in range(total)}
    received: dict[int, list[str | bytes]] = {}
    opening = asyncio.Semaphore(100)
    connected = 0
    all_connected = asyncio.Event()
    sockets: dict[int, aiohttp.ClientWebSocketResponse] = {}

    async def member(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal connected
        async with opening:
            ws = await session.ws_connect(room_url(rooms, "room", name, tags=tags_of(i)))
        async with ws:
            sockets[i] = ws
            connected += 1
            if connected == total:
                all_connected.set()
            got: list[str | bytes] = []
            while not got or got[-1] != "end":
                msg = await ws.receive(timeout=40)
                assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), (i, msg)
                got.append(msg.data)
            received[i] = got

    async def conductor() -> None:
        await all_connected.wait()
        first = sockets[0]
        for command, _, _ in commands:
            await first.send_str(command)

    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        asyncio.timeout(55),
        asyncio.TaskGroup() as group,
    ):
        for i in range(total):
            group.create_task(member(session, i))
        group.create_task(conductor())

    assert len(received) == total
    wrong = {i: received[i] for i in range(total) if received[i] != expected[i]}
    assert not wrong, f"{len(wrong)} sockets got the wrong messages, e.g. {list(wrong.items())[:3]}"


# ---------------------------------------------------------------- auto-response while awake


async def test_auto_response_is_answered_by_the_core_without_the_handler(
    rooms: ServerProcess,
) -> None:
    name = fresh("auto")
    async with room_socket(rooms, "steady", name) as ws:
        assert await ask_json(ws, "!autots") is None  # never auto-answered
        shown = json.dumps(await ask_json(ws, "!auto on"))
        assert "ping" in shown and "pong" in shown, shown
        before = handled(await stats(rooms), name)["message"]
        for _ in range(5):
            assert await ask(ws, "ping") == "pong"
        assert handled(await stats(rooms), name)["message"] == before, "the handler ran"
        # exact match only: anything else reaches the handler (which echoes)
        assert await ask(ws, "ping ") == "ping "
        assert await ask(ws, b"ping") == b"ping"  # a binary "ping" is not the text pair
        stamp = await ask_json(ws, "!autots")
        assert stamp["utc"] is True, stamp
        # several pairs, text and binary
        shown = json.dumps(await ask_json(ws, "!auto multi"))
        assert "ping" in shown and "pong" in shown, shown
        assert await ask(ws, b"\x01ping") == b"\x02pong"
        assert await ask(ws, "ping") == "pong"
        assert await ask(ws, "\x01ping") == "\x01ping"  # text with those bytes: no match
        # off again
        assert await ask_json(ws, "!auto off") is None
        assert await ask(ws, "ping") == "ping"


async def test_an_auto_response_answers_a_ping_sent_with_the_handshake(
    rooms: ServerProcess,
) -> None:
    """A client may send its first frame right behind its upgrade request: it must find the
    socket already the object's (its auto-response in force), not reach the handler (it did
    when the frame arrived between the 101 and the socket's adoption, with I/O threads)."""
    name = fresh("auto-early")
    async with room_socket(rooms, "steady", name) as ws:
        assert "pong" in json.dumps(await ask_json(ws, "!auto on"))
        before = handled(await stats(rooms), name)["message"]
        for _ in range(20):
            async with await RawWebSocket.connect(
                rooms.port, room_path("steady", name), first=encode_frame(OP_TEXT, b"ping")
            ) as raw:
                assert await raw.recv_message() == "pong"
        assert handled(await stats(rooms), name)["message"] == before, "the handler ran"


async def test_hibernatable_event_timeout_round_trip(rooms: ServerProcess) -> None:
    async with room_socket(rooms, "steady", fresh("evt")) as ws:
        assert await ask(ws, "!evt?") == "None"
        assert await ask(ws, "!evt 5000") == "5000"
        assert await ask(ws, "!evt?") == "5000"
        assert await ask(ws, "!evt none") == "None"


# ---------------------------------------------------------------- closing


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (4001, "bye now"), (3000, "ünï ☃")])
async def test_close_from_the_client_is_answered_then_websocket_close_runs(
    rooms: ServerProcess, code: int, reason: str
) -> None:
    name = fresh("client-close")
    async with room_socket(rooms, "steady", name, tags=["keeper"]) as keeper:
        async with room_socket(rooms, "steady", name, tags=["leaver"], att={"u": 1}) as leaver:
            assert await ask(leaver, "hi") == "hi"
            await asyncio.wait_for(leaver.close(code, reason), 10)
            assert leaver.protocol.close_rcvd is not None, "no Close frame in answer"
            assert leaver.protocol.close_rcvd.code == code  # the core answers with the same code
        record = await close_record(rooms, name, "leaver")
        assert (record["code"], record["reason"], record["was_clean"]) == (code, reason, True)
        assert record["att"] == repr({"u": 1})  # still readable in websocket_close
        # get_websockets() in websocket_close no longer returns the closed socket
        assert record["remaining"] == 1
        assert record["remaining_all_open"] is True
        assert record["count"] == 1
        assert await ask(keeper, "!count") == "1"
        assert constructed(await stats(rooms), name) == 1


async def test_close_from_an_aiohttp_client(rooms: ServerProcess) -> None:
    name = fresh("aiohttp-close")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(room_url(rooms, "steady", name, tags=["aio"])) as ws,
    ):
        await ws.send_str("hello")
        assert (await ws.receive(timeout=10)).data == "hello"
        await asyncio.wait_for(ws.close(code=4003, message=b"aiohttp says bye"), 10)
        assert ws.close_code == 4003
    record = await close_record(rooms, name, "aio")
    assert (record["code"], record["reason"], record["was_clean"]) == (
        4003,
        "aiohttp says bye",
        True,
    )


async def test_close_from_the_object(rooms: ServerProcess) -> None:
    name = fresh("server-close")
    async with room_socket(rooms, "steady", name, tags=["keeper"]) as keeper:
        async with room_socket(rooms, "steady", name, tags=["closed"]) as closed:
            await closed.send("!close 4002 server says bye")
            with pytest.raises(ConnectionClosed) as exc:
                await asyncio.wait_for(closed.recv(), 10)
            assert exc.value.rcvd is not None, "no Close frame from the server"
            assert (exc.value.rcvd.code, exc.value.rcvd.reason) == (4002, "server says bye")

        async def one_left() -> bool:
            return bool(await ask(keeper, "!count") == "1")

        await wait_until(one_left, within=10, what="the closed socket to leave the count")
        assert await ask_json(keeper, "!tags") == ["keeper"]
    # websocket_close reports the code the peer answered with (websockets echoes ours)
    record = await close_record(rooms, name, "closed")
    assert record["code"] == 4002
    assert (record["reason"], record["was_clean"]) == ("server says bye", True)


async def test_abrupt_disconnect_gives_1006_not_clean(rooms: ServerProcess) -> None:
    name = fresh("abrupt")
    async with room_socket(rooms, "steady", name, tags=["keeper"]) as keeper:
        raw = await RawWebSocket.connect(rooms.port, room_path("steady", name, tags=["gone"]))
        await raw.send("hello")
        assert await raw.recv_message() == "hello"
        raw.abort()  # TCP gone, no Close frame
        record = await close_record(rooms, name, "gone")
        assert record["code"] == 1006
        assert record["was_clean"] is False
        assert record["remaining"] == 1
        assert await ask(keeper, "!count") == "1"


async def test_protocol_error_reaches_websocket_error(rooms: ServerProcess) -> None:
    name = fresh("protoerr")
    async with room_socket(rooms, "steady", name, tags=["keeper"]) as keeper:
        async with await RawWebSocket.connect(
            rooms.port, room_path("steady", name, tags=["bad"])
        ) as raw:
            await raw.send_frame(OP_TEXT, b"\xff\xfe not utf-8")
            code, _ = await raw.recv_close()
        assert code == 1007
        record = await error_record(rooms, name, "bad")
        assert record["error"] == "ProtocolError"
        closed = await close_record(rooms, name, "bad")
        assert closed["code"] == 1007
        assert closed["remaining"] == 1
        assert await ask(keeper, "hi") == "hi"


# ---------------------------------------------------------------- an exception resets the instance


async def _trigger(rooms: ServerProcess, kind: str, name: str) -> ClientConnection | None:
    """Make the handler of `kind` raise; returns the victim socket if it should stay open."""
    if kind == "fetch":
        status, body = await http_get(f"{rooms.http}/steady/{name}?raise=1")
        assert status == 500, body
        assert "fetch-failure" not in body, "the exception's text leaked to the client"
        return None
    if kind == "rpc":
        status, body = await rpc_raw(rooms, "steady", name, "boom")
        assert status == 500, f"the caller did not see the RPC's exception: {body}"
        return None
    if kind == "websocket_message":
        victim = await open_socket(rooms, "steady", name, tags=["victim"])
        await victim.send("!raise")
        return victim
    if kind == "websocket_close":
        victim = await open_socket(rooms, "steady", name, tags=["victim", "raise-on-close"])
        await victim.close(4000, "the handler will raise")
        return None
    assert kind == "websocket_error"
    raw = await RawWebSocket.connect(
        rooms.port, room_path("steady", name, tags=["victim", "raise-on-error"])
    )
    async with raw:
        await raw.send_frame(OP_TEXT, b"\xc3\x28")  # invalid UTF-8
        code, _ = await raw.recv_close()
    assert code == 1007
    return None


LOG_KIND = {
    "fetch": "fetch",
    "rpc": "boom|rpc",
    "websocket_message": "message",
    "websocket_close": "close",
    "websocket_error": "error",
}


@pytest.mark.parametrize("kind", list(LOG_KIND))
async def test_exception_in_a_handler_resets_the_instance_and_sockets_stay_open(
    rooms: ServerProcess, kind: str
) -> None:
    name = fresh(f"reset-{kind}")
    async with (
        room_socket(rooms, "steady", name, tags=["a"], att={"who": "a"}) as a,
        room_socket(rooms, "steady", name, tags=["b"]) as b,
    ):
        before = await ask_json(a, "!whoami")
        assert before["constructed"] == 1
        mark = rooms.log_mark()
        victim = await _trigger(rooms, kind, name)
        try:
            await rooms.wait_for_log_async(
                rf"exception in .*(?i:{LOG_KIND[kind]}).* of object {before['id']}", start=mark
            )
            after = await ask_json(a, "!whoami")
            assert after["uuid"] != before["uuid"], "the instance was not reset"
            assert after["constructed"] == 2, "not exactly one new instance"
            assert after["id"] == before["id"]
            # every hibernatable socket is still open and still belongs to the object
            open_now = 3 if victim is not None else 2

            async def settled() -> bool:
                return bool(await ask(b, "!count") == str(open_now))

            await wait_until(settled, within=10, what=f"{open_now} sockets counted")
            assert await ask_json(a, "!tags") == ["a"]
            assert await ask_json(a, "!att") == repr({"who": "a"})
            await b.send("!broadcast - 0 after-reset")
            assert await asyncio.wait_for(a.recv(), 10) == "after-reset"
            assert await asyncio.wait_for(b.recv(), 10) == "after-reset"
            if victim is not None:
                assert await asyncio.wait_for(victim.recv(), 10) == "after-reset"
                assert await ask_json(victim, "!tags") == ["victim"]
        finally:
            if victim is not None:
                await victim.close()
    assert constructed(await stats(rooms), name) == 2


# ---------------------------------------------------------------- Cloudflare's camelCase names


async def test_camel_case_handlers_and_state_methods(rooms: ServerProcess) -> None:
    name = fresh("camel")
    async with (
        room_socket(rooms, "camel", name, tags=["x", "y"], att={"k": "v"}) as ws,
        room_socket(rooms, "camel", name, tags=["leaver"]) as leaver,
    ):
        assert (await ask_json(ws, "!whoami"))["cls"] == "CamelRoom"
        assert await ask(ws, "echo me") == "echo me"  # webSocketMessage
        assert await ask_json(ws, "!tags") == ["x", "y"]  # getTags
        assert await ask_json(ws, "!att") == repr({"k": "v"})  # serialize/deserializeAttachment
        assert len(await ask_json(ws, "!sockets")) == 2  # getWebSockets
        assert len(await ask_json(ws, "!sockets x")) == 1
        shown = json.dumps(await ask_json(ws, "!camel-auto"))  # set/getWebSocketAutoResponse
        assert "ping" in shown and "pong" in shown, shown
        assert await ask(ws, "ping") == "pong"
        stamp = await ask_json(ws, "!camel-autots")  # getWebSocketAutoResponseTimestamp
        assert stamp is not None and stamp["utc"] is True, stamp
        assert await ask(ws, "!camel-evt") == "1234"  # set/getHibernatableWebSocketEventTimeout
        assert await ask(ws, "!camel-wait") == "waiting"  # waitUntil
        await leaver.close(4010, "camel bye")
        record = await close_record(rooms, name, "leaver")  # webSocketClose
        assert (record["code"], record["reason"], record["was_clean"]) == (4010, "camel bye", True)
    assert handled(await stats(rooms), name)["message"] >= 9


# ---------------------------------------------------------------- the chat example


@pytest.fixture(scope="module")
def chat() -> Iterator[ServerProcess]:
    yield from module_server("examples.chat:app")


async def _next_event(ws: ClientConnection, me: str) -> Any:
    """The next chat event, skipping the notice of one's own join (if the room sends it) and the
    history a newcomer is sent first."""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if event != {"kind": "join", "user": me, "text": ""} and event["kind"] != "history":
            return event


async def _history(ws: ClientConnection) -> list[tuple[str, str]]:
    """What a newcomer is sent first: the room's last messages, oldest first."""
    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert event["kind"] == "history", event
    return [(m["user"], m["text"]) for m in event["messages"]]


async def test_chat_example(chat: ServerProcess) -> None:
    room = fresh("chat")
    status, page = await http_get(f"{chat.http}/room/{room}")
    assert status == 200
    assert "new WebSocket(" in page and '"ping"' in page
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{chat.http}/", allow_redirects=False) as resp,
    ):
        assert (resp.status, resp.headers["location"]) == (302, "/room/lobby")

    async with (
        room_socket(chat, "room", room, user="ann") as ann,
        room_socket(chat, "room", fresh("elsewhere"), user="carol") as carol,
    ):
        assert await _history(ann) == [] and await _history(carol) == []
        async with room_socket(chat, "room", room, user="bob") as bob:
            assert await _next_event(ann, "ann") == {"kind": "join", "user": "bob", "text": ""}
            await bob.send("hello, ann")
            said = {"kind": "message", "user": "bob", "text": "hello, ann"}
            assert await _next_event(ann, "ann") == said
            assert await _next_event(bob, "bob") == said  # the sender sees it too
            assert await ask(ann, "ping") == "pong"  # the page's keep-alive
        assert await _next_event(ann, "ann") == {"kind": "leave", "user": "bob", "text": ""}
        # another room heard none of it
        await carol.send("anyone?")
        assert await _next_event(carol, "carol") == {
            "kind": "message",
            "user": "carol",
            "text": "anyone?",
        }
    # A newcomer gets the last 100 messages of the room, oldest first.
    async with room_socket(chat, "room", room, user="dan") as dan:
        assert await _history(dan) == [("bob", "hello, ann")]
        for i in range(105):
            await dan.send(f"m{i}")
            assert (await _next_event(dan, "dan"))["text"] == f"m{i}"
    async with room_socket(chat, "room", room, user="eve") as eve:
        history = await _history(eve)
        assert len(history) == 100
        assert history[0] == ("dan", "m5") and history[-1] == ("dan", "m104")
