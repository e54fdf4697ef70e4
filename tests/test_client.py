"""``sockworker.client.Client`` against real servers: lazy connect, echo through listeners and
``async for``, surviving a server restart with a bounded buffer, giving up, idle close, backoff.

The server is ``tests.apps.echo``; a test that restarts it picks a free port first and passes
``--port`` so the client finds the new process at the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from sockworker.client import BufferFull, Client, ConnectFailed
from sockworker.errors import ConnectionClosed, InvalidArgument, ProtocolError
from sockworker.websocket import CloseEvent

from tests.support import ServerProcess, get_json

KINDS = ("message", "close", "error", "open", "reconnecting")
WITHIN = 10.0


def _id() -> str:
    return uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Events:
    """Records every event the client emits, for the test to await the n-th of a kind."""

    def __init__(self, client: Client, kinds: tuple[str, ...] = KINDS) -> None:
        self.client = client
        self.seen: dict[str, list[Any]] = defaultdict(list)
        self.states: dict[str, list[int]] = defaultdict(list)
        self._changed = asyncio.Event()
        for kind in kinds:
            client.add_event_listener(kind, self._recorder(kind))  # type: ignore[arg-type]

    def _recorder(self, kind: str) -> Callable[[Any], None]:
        def record(event: Any) -> None:
            assert event.type == kind
            self.seen[kind].append(event)
            self.states[kind].append(self.client.ready_state)
            self._changed.set()

        return record

    async def wait_for(self, kind: str, count: int = 1, within: float = WITHIN) -> list[Any]:
        async with asyncio.timeout(within):
            while len(self.seen[kind]) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.seen[kind]

    async def messages(self, count: int, within: float = WITHIN) -> list[str | bytes]:
        return [event.data for event in await self.wait_for("message", count, within)]


@contextlib.asynccontextmanager
async def observer(server: ServerProcess) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """The echo app's /observe socket: one JSON line per close event the server saw."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.ws}/observe") as ws,
    ):
        yield ws


async def server_saw_close(ws: aiohttp.ClientWebSocketResponse, conn_id: str) -> dict[str, Any]:
    async with asyncio.timeout(WITHIN):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            record: dict[str, Any] = json.loads(msg.data)
            if record["id"] == conn_id:
                return record


# -- connecting and echo -------------------------------------------------------------------------


async def test_connects_lazily_on_first_send_and_echoes_via_listener(
    echo_server: ServerProcess,
) -> None:
    before = (await get_json(f"{echo_server.http}/stats"))["counts"]["fetch"]
    client = Client(f"{echo_server.ws}/ws?id={_id()}", protocols=["chat"])
    events = Events(client)
    # A full HTTP round trip to the server gives an eager client every chance to connect.
    after = (await get_json(f"{echo_server.http}/stats"))["counts"]["fetch"]
    assert after == before
    assert client.ready_state == Client.CONNECTING
    assert events.seen["open"] == []

    client.send("hello")
    client.send(b"\x00\x01binary")
    assert client.buffered_amount == len("hello") + 8
    opened = await events.wait_for("open")
    assert opened[0].attempt == 1
    assert client.protocol == "chat"
    assert await events.messages(2) == ["hello", b"\x00\x01binary"]
    assert client.ready_state == Client.OPEN
    assert client.buffered_amount == 0

    client.close(4000, "done")
    assert client.ready_state == Client.CLOSING
    await asyncio.wait_for(client.wait_closed(), WITHIN)
    [close] = events.seen["close"]
    assert (close.code, close.reason, close.was_clean) == (4000, "done", True)
    assert events.states["close"] == [Client.CLOSED]
    assert events.seen["reconnecting"] == [] and events.seen["error"] == []
    with pytest.raises(ConnectionClosed):
        client.send("after close")


async def test_async_for_receive_and_context_manager(echo_server: ServerProcess) -> None:
    async with Client(f"{echo_server.ws}/ws-pull?id={_id()}") as client:
        await client.connect()
        assert client.ready_state == Client.OPEN
        for i in range(100):  # more than the client's unread-message high-water mark
            client.send(f"m{i}")
        assert await asyncio.wait_for(client.receive(), WITHIN) == "m0"
        received = []
        async with asyncio.timeout(WITHIN):
            async for message in client:
                received.append(message)
                if len(received) == 99:
                    break
        assert received == [f"m{i}" for i in range(1, 100)]
        await client.send_async(b"last")
        assert await asyncio.wait_for(client.receive(), WITHIN) == b"last"
    assert client.ready_state == Client.CLOSED
    async with asyncio.timeout(WITHIN):
        assert [m async for m in client] == []  # iteration ends once closed
    with pytest.raises(ConnectionClosed):
        await client.receive()


async def test_failing_listeners_are_logged_and_the_client_goes_on(
    echo_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(f"{echo_server.ws}/ws-async?id={_id()}")
    events = Events(client)

    def broken(event: Any) -> None:
        raise RuntimeError("sync-listener-broke")

    async def broken_async(event: Any) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async-listener-broke")

    client.add_event_listener("message", broken)
    client.on("message", broken_async)
    with caplog.at_level(logging.ERROR, logger="sockworker"):
        client.send("one")
        client.send("two")
        assert await events.messages(2) == ["one", "two"]
        client.remove_event_listener("message", broken)
        client.remove_event_listener("message", broken_async)
        client.send("three")
        assert await events.messages(3) == ["one", "two", "three"]
    logged = [r.getMessage() for r in caplog.records if r.name == "sockworker" and r.exc_info]
    texts = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert len(logged) == 4, logged
    assert texts.count("sync-listener-broke") == 2 and texts.count("async-listener-broke") == 2
    assert client.ready_state == Client.OPEN
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)


# -- reconnecting --------------------------------------------------------------------------------


async def test_survives_a_server_restart_and_delivers_what_was_buffered_in_order(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = _free_port()
    server = make_server("tests.apps.echo:app", "--port", str(port))
    client = Client(
        f"ws://127.0.0.1:{port}/ws?id={_id()}",
        max_buffered_messages=5,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    events = Events(client)
    client.send("before")
    assert await events.messages(1) == ["before"]

    assert await asyncio.to_thread(server.stop, signal.SIGTERM) == 0
    [lost] = await events.wait_for("close")
    assert lost.code == 1001  # the server's "going away" on shutdown
    assert events.states["close"] == [Client.CONNECTING]  # not final: it will reconnect
    await events.wait_for("reconnecting", 2)  # it is retrying, and failing, meanwhile

    # Large enough that handing them over takes several writes, so "fresh" below is sent
    # while some of them may still be queued.
    buffered = [f"down-{i}-" + "x" * 200_000 for i in range(5)]
    for message in buffered:
        client.send(message)
    with pytest.raises(BufferFull, match="max_buffered_messages is 5"):
        client.send("one too many")
    assert client.buffered_amount == sum(len(m) for m in buffered)
    assert client.ready_state == Client.CONNECTING

    def send_fresh(event: Any) -> None:
        if event.data == buffered[0]:  # the first echo after the restart
            client.send("fresh")

    client.on("message", send_fresh)
    make_server("tests.apps.echo:app", "--port", str(port))
    reconnected = await events.wait_for("open", 2)
    assert reconnected[1].attempt >= 2
    echoed = await events.messages(7)
    assert [m[:7] for m in echoed] == ["before", *(m[:7] for m in buffered), "fresh"]
    assert echoed == ["before", *buffered, "fresh"]
    assert client.buffered_amount == 0

    client.send("after")
    assert (await events.messages(8))[-1] == "after"
    delays = [event.delay for event in events.seen["reconnecting"]]
    assert all(0 < delay <= 0.2 for delay in delays), delays
    assert [event.attempt for event in events.seen["reconnecting"]] == list(
        range(1, len(delays) + 1)
    )
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)
    assert len(events.seen["close"]) == 2 and events.seen["error"] == []


async def test_gives_up_after_max_attempts_and_fails_pending_sends(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("tests.apps.echo:app")
    client = Client(
        f"{server.ws}/ws?id={_id()}",
        max_attempts=3,
        backoff_initial=0.01,
        backoff_max=0.05,
    )
    events = Events(client)
    await client.connect()
    assert await asyncio.to_thread(server.stop, signal.SIGTERM) == 0
    await events.wait_for("close")

    pending = asyncio.ensure_future(client.send_async("never delivered"))
    with pytest.raises(ConnectFailed, match="after 3 failed attempt") as failed:
        await asyncio.wait_for(pending, WITHIN)
    assert failed.value.attempts == 3
    assert isinstance(failed.value.__cause__, OSError)  # connection refused
    assert isinstance(failed.value, ConnectionClosed) and isinstance(failed.value, ConnectionError)

    await asyncio.wait_for(client.wait_closed(), WITHIN)
    assert client.ready_state == Client.CLOSED
    assert [e.attempt for e in events.seen["reconnecting"]] == [1, 2, 3]
    [error] = events.seen["error"]
    assert isinstance(error.error, ConnectFailed)
    lost, final = events.seen["close"]
    assert lost.code == 1001
    assert events.states["close"] == [Client.CONNECTING, Client.CLOSED]
    assert (final.code, final.was_clean) == (1006, False)
    assert "gave up" in final.reason
    with pytest.raises(ConnectFailed):
        client.send("later")
    with pytest.raises(ConnectFailed):
        await client.connect()
    with pytest.raises(ConnectFailed):
        await client.receive()


async def test_refused_from_the_start_and_rejected_handshakes(echo_server: ServerProcess) -> None:
    refused = Client(f"ws://127.0.0.1:{_free_port()}/", max_attempts=2, backoff_initial=0.01)
    refused_events = Events(refused)
    with pytest.raises(ConnectFailed, match="after 2 failed attempt"):
        await asyncio.wait_for(refused.connect(), WITHIN)
    assert [e.attempt for e in refused_events.seen["reconnecting"]] == [2]
    assert isinstance(refused_events.seen["reconnecting"][0].error, OSError)

    once = Client(f"ws://127.0.0.1:{_free_port()}/", reconnect=False)
    with pytest.raises(ConnectFailed, match="after 1 failed attempt"):
        await asyncio.wait_for(once.connect(), WITHIN)

    # A 404 will not get better by retrying: one attempt, even with max_attempts=None.
    not_found = Client(f"{echo_server.ws}/no-such-route")
    not_found_events = Events(not_found)
    not_found.send("lost")
    await asyncio.wait_for(not_found.wait_closed(), WITHIN)
    [error] = not_found_events.seen["error"]
    assert "not retried" in str(error.error) and "404" in str(error.error)
    assert error.error.attempts == 1
    assert not_found_events.seen["reconnecting"] == []


async def test_connection_lost_without_reconnect_is_final(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server("tests.apps.echo:app")
    client = Client(f"{server.ws}/ws?id={_id()}", reconnect=False)
    events = Events(client)
    await client.connect()
    assert await asyncio.to_thread(server.stop, signal.SIGTERM) == 0
    await asyncio.wait_for(client.wait_closed(), WITHIN)
    [close] = events.seen["close"]
    assert close.code == 1001 and events.states["close"] == [Client.CLOSED]
    with pytest.raises(ConnectionClosed):
        client.send("x")


# -- idle close ----------------------------------------------------------------------------------


async def test_idle_close_then_reopen_on_next_send(echo_server: ServerProcess) -> None:
    conn_id = _id()
    async with observer(echo_server) as watch:
        client = Client(f"{echo_server.ws}/ws?id={conn_id}", idle_timeout=0.3)
        events = Events(client)
        client.send("one")
        assert await events.messages(1) == ["one"]

        [idle] = await events.wait_for("close")
        assert (idle.code, idle.reason, idle.was_clean) == (1000, "idle", True)
        assert events.states["close"] == [Client.CONNECTING]  # not closed: reopens on demand
        seen = await server_saw_close(watch, conn_id)
        assert (seen["code"], seen["reason"]) == (1000, "idle")
        assert events.seen["reconnecting"] == []  # an idle close is not a lost connection
        assert len(events.seen["open"]) == 1  # and it stays closed until the next send

        client.send("two")
        opened = await events.wait_for("open", 2)
        assert opened[1].attempt == 1
        assert await events.messages(2) == ["one", "two"]
        client.close()
        await asyncio.wait_for(client.wait_closed(), WITHIN)
    assert events.seen["error"] == [] and events.seen["reconnecting"] == []


async def test_close_before_connecting_drops_buffered_messages() -> None:
    client = Client(f"ws://127.0.0.1:{_free_port()}/", backoff_initial=5.0, backoff_max=5.0)
    events = Events(client)
    client.close()  # never connected: the close event follows, clean
    await asyncio.wait_for(client.wait_closed(), WITHIN)
    [close] = events.seen["close"]
    assert (close.code, close.was_clean) == (1000, True)

    backing_off = Client(f"ws://127.0.0.1:{_free_port()}/", backoff_initial=5.0, backoff_max=5.0)
    events = Events(backing_off)
    pending = asyncio.ensure_future(backing_off.send_async("queued"))
    await events.wait_for("reconnecting")  # first attempt refused; now waiting ~5 s
    backing_off.close(4001, "stop")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(pending, WITHIN)
    await asyncio.wait_for(backing_off.wait_closed(), 1.0)  # does not sit out the backoff
    [close] = events.seen["close"]
    assert isinstance(close, CloseEvent)
    assert (close.code, close.reason, close.was_clean) == (4001, "stop", False)


# -- backoff and arguments -----------------------------------------------------------------------


def test_backoff_delays_grow_to_the_cap_and_are_jittered() -> None:
    exact = Client(
        "ws://example.invalid/", backoff_initial=0.1, backoff_factor=2, backoff_max=1.0, jitter=0
    )
    assert [exact.backoff_delay(n) for n in range(1, 8)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    )
    assert exact.backoff_delay(10_000) == pytest.approx(1.0)  # no overflow far out

    jittered = Client("ws://example.invalid/", backoff_initial=0.1, backoff_max=10.0, jitter=0.5)
    for retry, base in [(1, 0.1), (3, 0.4), (10, 10.0)]:
        samples = [jittered.backoff_delay(retry) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in samples), (retry, min(samples), max(samples))
        assert len(set(samples)) > 150  # random, not a fixed fraction
        assert max(samples) - min(samples) > base * 0.3  # spread over the jitter range
    means = [sum(jittered.backoff_delay(n) for _ in range(200)) / 200 for n in range(1, 6)]
    assert means == sorted(means)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"url": "http://127.0.0.1/"}, InvalidArgument),
        ({"url": "not a url"}, InvalidArgument),
        ({"url": 42}, TypeError),
        ({"max_buffered_messages": 0}, InvalidArgument),
        ({"max_attempts": 0}, InvalidArgument),
        ({"max_attempts": 1.5}, TypeError),
        ({"backoff_initial": 0}, InvalidArgument),
        ({"backoff_initial": -1.0}, InvalidArgument),
        ({"backoff_max": 0.01}, InvalidArgument),  # below backoff_initial
        ({"backoff_factor": 0.5}, InvalidArgument),
        ({"jitter": 1.5}, InvalidArgument),
        ({"jitter": -0.1}, InvalidArgument),
        ({"jitter": float("nan")}, InvalidArgument),
        ({"idle_timeout": 0}, InvalidArgument),
        ({"connect_timeout": -1}, InvalidArgument),
        ({"reconnect": "yes"}, TypeError),
        ({"protocols": [""]}, InvalidArgument),
        ({"headers": {"x-a": "b\r\nx-evil: 1"}}, InvalidArgument),
        ({"max_buffered_messages": True}, TypeError),
        ({"query": {"n": 1}}, TypeError),
        ({"query": "n=1"}, TypeError),
        ({"should_reconnect": True}, TypeError),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    args = {"url": "ws://127.0.0.1:1/", **kwargs}
    url = args.pop("url")
    with pytest.raises(error):
        Client(url, **args)
    if error is InvalidArgument:
        assert issubclass(error, ValueError)


async def test_bad_calls_are_rejected() -> None:
    client = Client("ws://127.0.0.1:1/")
    with pytest.raises(TypeError):
        client.send(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        client.add_event_listener("bogus", print)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        client.close(999)
    with pytest.raises(InvalidArgument):
        client.close(1000, "r" * 124)
    assert client.ready_state == Client.CONNECTING  # nothing was sent, nothing started
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)


async def test_a_close_listener_can_stop_the_reconnect(echo_server: ServerProcess) -> None:
    client = Client(f"{echo_server.ws}/ws?id={_id()}", backoff_initial=0.01)
    events = Events(client)

    def on_close(event: Any) -> None:
        if event.code == 4001:  # the application's "go away for good"
            client.close()

    client.on("close", on_close)
    client.send("!close 4001 kicked")
    await asyncio.wait_for(client.wait_closed(), WITHIN)
    kicked, final = events.seen["close"]
    assert (kicked.code, kicked.reason) == (4001, "kicked")
    assert events.states["close"] == [Client.CONNECTING, Client.CLOSED]
    assert final.code == 1000
    assert events.seen["reconnecting"] == [] and len(events.seen["open"]) == 1


async def test_a_message_too_large_for_the_client_is_an_error_then_it_reconnects(
    echo_server: ServerProcess,
) -> None:
    client = Client(f"{echo_server.ws}/ws?id={_id()}", max_message_size=1000, backoff_initial=0.01)
    events = Events(client)
    client.send("x" * 1001)  # the server echoes it; the client refuses the echo
    [error] = await events.wait_for("error")
    assert isinstance(error.error, ProtocolError)
    [close] = await events.wait_for("close")
    assert (close.code, close.was_clean) == (1009, False)
    assert events.states["close"] == [Client.CONNECTING]
    await events.wait_for("open", 2)
    client.send("small")
    assert await events.messages(1) == ["small"]
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)


# -- computed URLs, should_reconnect, reconnect() ------------------------------------------------


async def _server_url(client: Client, events: Events) -> str:
    """The URL the echo server's socket saw for the client's current connection."""
    count = len(events.seen["message"]) + 1
    client.send("!info")
    info: str = (await events.messages(count))[-1]  # type: ignore[assignment]
    url: str = json.loads(info)["url"]
    return url


async def test_the_url_and_the_query_are_computed_for_each_attempt(
    echo_server: ServerProcess,
) -> None:
    conn_id = _id()
    attempts = 0

    def next_url() -> str:
        nonlocal attempts
        attempts += 1
        return f"{echo_server.ws}/ws?id={conn_id}&attempt={attempts}"

    tokens = iter(["t1", "t2"])

    async def next_query() -> dict[str, str]:
        await asyncio.sleep(0)  # a token from somewhere that takes a round trip
        return {"token": next(tokens)}

    client = Client(next_url, query=next_query, backoff_initial=0.01)
    events = Events(client)
    assert client.url is None  # nothing computed before the first attempt
    first = f"{echo_server.ws}/ws?id={conn_id}&attempt=1&token=t1"
    assert await _server_url(client, events) == first
    assert client.url == first

    client.send("!close 4000 again")  # the server closes; the client reconnects
    await events.wait_for("open", 2)
    second = f"{echo_server.ws}/ws?id={conn_id}&attempt=2&token=t2"
    assert await _server_url(client, events) == second
    assert client.url == second
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)

    static = Client(f"{echo_server.ws}/ws?id={conn_id}", query={"room": "a b"})
    assert static.url == f"{echo_server.ws}/ws?id={conn_id}&room=a+b"
    async with static:
        assert await _server_url(static, Events(static)) == static.url


async def test_what_the_url_callable_raises_fails_the_attempt(echo_server: ServerProcess) -> None:
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("the token service is down")
        return f"{echo_server.ws}/ws?id={_id()}"

    client = Client(flaky, backoff_initial=0.01)
    events = Events(client)
    await asyncio.wait_for(client.connect(), WITHIN)  # an OSError is retried
    [retry] = events.seen["reconnecting"]
    assert isinstance(retry.error, OSError) and retry.attempt == 2
    assert events.seen["open"][0].attempt == 2
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)

    for bad, cause in [(lambda: "http://127.0.0.1/", InvalidArgument), (lambda: 42, TypeError)]:
        broken = Client(bad, backoff_initial=0.01)  # type: ignore[arg-type]
        with pytest.raises(ConnectFailed, match="not retried") as failed:
            await asyncio.wait_for(broken.connect(), WITHIN)
        assert isinstance(failed.value.__cause__, cause)


async def test_should_reconnect_decides_from_the_close_code(
    echo_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[tuple[int, str]] = []

    def should_reconnect(code: int, reason: str) -> bool:
        asked.append((code, reason))
        if code == 4002:
            raise RuntimeError("predicate-broke")
        return code != 4001  # the application's "banned"

    client = Client(
        f"{echo_server.ws}/ws?id={_id()}", should_reconnect=should_reconnect, backoff_initial=0.01
    )
    events = Events(client)
    client.send("!close 4000 retry")
    await events.wait_for("open", 2)
    with caplog.at_level(logging.ERROR, logger="sockworker"):
        client.send("!close 4002 odd")  # a predicate that raises is logged; the default holds
        await events.wait_for("open", 3)
    assert any(r.exc_info and str(r.exc_info[1]) == "predicate-broke" for r in caplog.records)
    client.send("!close 4001 banned")
    await asyncio.wait_for(client.wait_closed(), WITHIN)

    assert asked == [(4000, "retry"), (4002, "odd"), (4001, "banned")]
    codes = [(e.code, e.reason) for e in events.seen["close"]]
    assert codes == [(4000, "retry"), (4002, "odd"), (4001, "banned")]
    assert events.states["close"] == [Client.CONNECTING, Client.CONNECTING, Client.CLOSED]
    assert len(events.seen["reconnecting"]) == 2 and events.seen["error"] == []
    with pytest.raises(ConnectionClosed):
        client.send("after")


async def test_reconnect_after_giving_up_and_after_close(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = _free_port()
    client = Client(f"ws://127.0.0.1:{port}/ws?id={_id()}", max_attempts=2, backoff_initial=0.01)
    events = Events(client)
    with pytest.raises(ConnectFailed):
        await asyncio.wait_for(client.connect(), WITHIN)
    assert client.ready_state == Client.CLOSED

    make_server("tests.apps.echo:app", "--port", str(port))
    client.reconnect()
    assert client.ready_state == Client.CONNECTING
    await asyncio.wait_for(client.connect(), WITHIN)
    assert [e.attempt for e in events.seen["open"]] == [1]  # a fresh count
    client.send("back")
    assert await events.messages(1) == ["back"]

    client.close(4000, "bye")
    client.reconnect()  # during the closing handshake: it completes, then the client restarts
    await events.wait_for("open", 2)
    client.send("again")
    assert await events.messages(2) == ["back", "again"]
    gave_up, closed = events.seen["close"][:2]
    assert gave_up.code == 1006 and (closed.code, closed.reason) == (4000, "bye")
    assert events.states["close"][:2] == [Client.CLOSED, Client.CLOSED]
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)


async def test_reconnect_while_open_closes_and_connects_to_the_new_url(
    echo_server: ServerProcess,
) -> None:
    first_id, second_id = _id(), _id()
    ids = iter([first_id, second_id])
    async with observer(echo_server) as watch:
        client = Client(lambda: f"{echo_server.ws}/ws?id={next(ids)}")
        events = Events(client)
        await asyncio.wait_for(client.connect(), WITHIN)
        client.reconnect(4000, "new token")
        seen = await server_saw_close(watch, first_id)
        assert (seen["code"], seen["reason"]) == (4000, "new token")
        await events.wait_for("open", 2)
    [closed] = events.seen["close"]
    assert (closed.code, closed.reason) == (4000, "new token")
    assert events.states["close"] == [Client.CONNECTING]
    assert f"id={second_id}" in await _server_url(client, events)
    assert events.seen["reconnecting"] == []  # no backoff for a reconnect asked for
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)


async def test_reconnect_cuts_a_backoff_wait_short(
    make_server: Callable[..., ServerProcess],
) -> None:
    port = _free_port()
    client = Client(f"ws://127.0.0.1:{port}/ws?id={_id()}", backoff_initial=60, backoff_max=60)
    events = Events(client)
    client.send("queued")
    await events.wait_for("reconnecting")  # the first attempt was refused; now 30-60 s to wait
    make_server("tests.apps.echo:app", "--port", str(port))
    client.reconnect()
    # Within the 10 s of WITHIN, far inside the backoff: only reconnect() can have connected.
    assert await events.messages(1) == ["queued"]
    assert [e.attempt for e in events.seen["open"]] == [1]
    client.close()
    await asyncio.wait_for(client.wait_closed(), WITHIN)
