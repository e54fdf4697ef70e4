"""CPU accounting, CPU limits, the meter and the billing hooks (SPEC §3 `cpu_ms`, §4), observed
from outside: requests to tests/apps/billing.py, usage read back through its billing hook.

Each test bills its traffic to an account of its own (``?account=``), so tests share one server
without seeing each other's usage. ``/usage`` answers only after the hook's next delivery, which
holds everything counted before it was asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.apps.billing import APP_CPU_MS, ROOM_CPU_MS
from tests.apps.rooms_client import module_server
from tests.support import ServerProcess, get_json, wait_until

# What one handler costs beyond the CPU it burns itself: parsing, dispatch, the response, and
# its share of a batch (a few hundred microseconds at most, on a loaded machine a few ms).
OVERHEAD_MS = 6.0


@pytest.fixture(scope="module")
def billing() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.billing:app")


def account() -> str:
    return f"acct-{uuid.uuid4().hex[:10]}"


async def get(server: ServerProcess, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.http}{path}") as resp:
        return resp.status, await resp.text()


async def usage(server: ServerProcess, of: str) -> dict[str, dict[str, float]]:
    result: dict[str, dict[str, float]] = await get_json(f"{server.http}/usage?of={of}")
    return result


def object_key(name: str) -> str:
    """How /usage names the object `name` of the ROOMS namespace (its id, from the name)."""
    return "ROOMS/" + hashlib.sha256(f"ROOMS\0{name}".encode()).hexdigest()


async def ask(ws: ClientConnection, message: str) -> str | bytes:
    await ws.send(message)
    return await asyncio.wait_for(ws.recv(), 10)


# ---------------------------------------------------------------- CPU accounting


async def test_a_handler_burning_20ms_of_cpu_is_charged_20ms(billing: ServerProcess) -> None:
    who = account()
    assert await get(billing, f"/burn?ms=20&account={who}") == (200, "burnt")
    worker = (await usage(billing, who))["worker"]
    # The handler burned 20 ms of thread CPU time (measured by the same clock): the charge can
    # only add our overhead to it.
    assert 20 <= worker["cpu_ms"] <= 20 + OVERHEAD_MS, worker
    assert worker["requests"] == 1


async def test_waiting_is_not_charged(billing: ServerProcess) -> None:
    who = account()
    assert await get(billing, f"/sleep?s=0.5&account={who}") == (200, "slept")
    worker = (await usage(billing, who))["worker"]
    assert worker["cpu_ms"] < OVERHEAD_MS, worker
    assert worker["requests"] == 1


async def test_an_async_handler_is_charged_the_sum_of_its_steps(billing: ServerProcess) -> None:
    who = account()
    assert await get(billing, f"/steps?ms=10&n=3&account={who}") == (200, "burnt in steps")
    worker = (await usage(billing, who))["worker"]
    assert 30 <= worker["cpu_ms"] <= 30 + OVERHEAD_MS, worker


async def test_a_task_the_handler_creates_is_charged_to_it(billing: ServerProcess) -> None:
    who = account()
    assert await get(billing, f"/spawn?ms=15&account={who}") == (200, "spawned")
    worker = (await usage(billing, who))["worker"]
    assert 15 <= worker["cpu_ms"] <= 15 + OVERHEAD_MS, worker


async def test_a_streamed_body_is_charged_to_its_request(billing: ServerProcess) -> None:
    who = account()
    assert await get(billing, f"/stream-burn?ms=10&n=3&account={who}") == (200, "0\n1\n2\n")
    worker = (await usage(billing, who))["worker"]
    assert 30 <= worker["cpu_ms"] <= 30 + OVERHEAD_MS, worker
    assert worker["requests"] == 1


async def test_an_objects_streamed_body_is_charged_to_the_object(billing: ServerProcess) -> None:
    who, room = account(), f"cpu-{uuid.uuid4().hex[:8]}"
    path = f"/room/{room}/stream-burn?ms=10&n=3&account={who}"
    assert await get(billing, path) == (200, "0\n1\n2\n")
    sums = await usage(billing, who)
    obj = sums[object_key(room)]
    assert 30 <= obj["cpu_ms"] <= 30 + 3 * OVERHEAD_MS, obj
    assert sums["worker"]["cpu_ms"] < OVERHEAD_MS, sums["worker"]


async def test_an_object_is_charged_for_its_own_events(billing: ServerProcess) -> None:
    who, room = account(), f"cpu-{uuid.uuid4().hex[:8]}"
    async with connect(f"{billing.ws}/room/{room}?account={who}") as ws:
        assert await ask(ws, "burn:20") == "burn:20"
        assert await ask(ws, "plain") == "plain"
    assert (await get(billing, f"/rpc/{room}?account={who}")) == (200, "pong")
    sums = await usage(billing, who)
    obj = sums[object_key(room)]
    assert 20 <= obj["cpu_ms"] <= 20 + 3 * OVERHEAD_MS, obj
    # The Worker forwarded the upgrade and the RPC: two requests; the object accepted one
    # connection and answered one RPC.
    assert sums["worker"]["requests"] == 2
    assert sums["worker"]["cpu_ms"] < OVERHEAD_MS
    assert (obj["requests"], obj["ws_connections"]) == (1, 1)
    assert (obj["ws_messages_in"], obj["ws_messages_out"]) == (2, 2)


async def test_auto_responses_are_counted_apart_from_messages(billing: ServerProcess) -> None:
    who, room = account(), f"auto-{uuid.uuid4().hex[:8]}"
    async with connect(f"{billing.ws}/room/{room}?account={who}") as ws:
        assert await ask(ws, "hello") == "hello"
        for _ in range(3):
            assert await ask(ws, "ping") == "pong"
    obj = (await usage(billing, who))[object_key(room)]
    assert (obj["auto_responses"], obj["ws_messages_in"], obj["ws_messages_out"]) == (3, 1, 1)
    # 1 connection and 1 message at 20 messages per request.
    assert obj["billable_requests"] == 1 + 1 / 20
    assert obj["bytes_in"] > 0 and obj["bytes_out"] > 0


async def test_an_outgoing_socket_is_metered_to_the_object_that_opened_it(
    billing: ServerProcess,
) -> None:
    who, room = account(), f"dial-{uuid.uuid4().hex[:8]}"
    acks: asyncio.Queue[str | bytes] = asyncio.Queue()

    async def upstream(connection: ServerConnection) -> None:
        for i in range(3):
            await connection.send(f"feed {i}")
        async for message in connection:
            await acks.put(message)

    async with serve(upstream, "127.0.0.1", 0) as feed:
        port = feed.sockets[0].getsockname()[1]
        path = f"/room/{room}/dial?account={who}&url=ws://127.0.0.1:{port}/"
        assert await get(billing, path) == (200, "dialled")
        got = [await asyncio.wait_for(acks.get(), 10) for _ in range(3)]
    assert got == [f"ack 'feed {i}'" for i in range(3)]
    obj = (await usage(billing, who))[object_key(room)]
    # The listener's events ran as the object's, 5 ms of CPU each; its messages are the
    # object's; an outgoing socket is not a connection (Cloudflare counts it as a subrequest).
    assert (obj["ws_messages_in"], obj["ws_messages_out"], obj["ws_connections"]) == (3, 3, 0)
    assert obj["cpu_ms"] >= 15, obj
    assert obj["requests"] == 1


# ---------------------------------------------------------------- CPU limit


async def test_a_busy_loop_is_stopped_at_the_cpu_limit(billing: ServerProcess) -> None:
    who, room, other = account(), f"spin-{uuid.uuid4().hex[:8]}", f"calm-{uuid.uuid4().hex[:8]}"
    base = f"{billing.ws}/room/{{}}?account={who}"
    async with (
        connect(base.format(room)) as hibernatable,
        connect(base.format(room) + "&standard=1") as standard,
        connect(base.format(other)) as bystander,
    ):
        assert await ask(hibernatable, "a") == "a"
        assert await ask(standard, "b") == "b"
        assert await ask(bystander, "c") == "c"
        built = (await get_json(f"{billing.http}/alive?name={other}"))["constructed"]

        # `while True: pass` in a message handler of an object with cpu_ms=50: the watchdog
        # raises CpuLimitExceeded inside it. The bystander's message, sent while the loop runs,
        # is answered once it is stopped.
        await hibernatable.send("spin")
        assert await ask(bystander, "still here") == "still here"

        # SPEC §2.5: the instance is reset; the hibernatable socket stays open, the standard
        # socket of the instance is closed with 1011.
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(standard.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert await ask(hibernatable, "after") == "after"

        # The same in an HTTP event: the object's fetch spins, the request answers 503.
        status, body = await get(billing, f"/room/{room}/spin?account={who}")
        assert status == 503, body
        # The Worker's own plain `def` fetch, too (its limit is the app's).
        status, body = await get(billing, f"/spin?account={who}")
        assert status == 503, body

        assert await ask(bystander, "and now") == "and now"
        after = (await get_json(f"{billing.http}/alive?name={other}"))["constructed"]
        assert after[other] == built[other], "the bystander object was not reset"
        assert after[room] >= built[room] + 1

    sums = await usage(billing, who)
    spun = sums[object_key(room)]
    # Two spins in the object, each stopped soon after its 50 ms.
    assert 2 * ROOM_CPU_MS <= spun["cpu_ms"] <= 2 * ROOM_CPU_MS + 200, spun
    assert APP_CPU_MS <= sums["worker"]["cpu_ms"] <= APP_CPU_MS + 100, sums["worker"]
    assert "CpuLimitExceeded" in billing.log_tail()


# ---------------------------------------------------------------- admission


async def test_admit_rejects_an_upgrade_before_anything_is_counted(
    billing: ServerProcess,
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{billing.ws}/room/never?account=blocked"):
            pass
    assert refused.value.response.status_code == 429
    assert await get(billing, "/burn?ms=1&account=blocked") == (429, "quota exceeded")
    assert await usage(billing, "blocked") == {}


# ---------------------------------------------------------------- duration


async def test_duration_is_billed_only_while_an_object_is_not_idle_and_hibernatable(
    billing: ServerProcess,
) -> None:
    who_h, who_s = account(), account()
    async with (
        connect(f"{billing.ws}/room/dur-{who_h}?account={who_h}") as hibernatable,
        connect(f"{billing.ws}/room/dur-{who_s}?account={who_s}&standard=1") as standard,
    ):
        assert await ask(hibernatable, "x") == "x"
        assert await ask(standard, "y") == "y"
        before = await usage(billing, who_s)
        # The quantity under test is one second of residency.
        await asyncio.sleep(1.0)
        held = await usage(billing, who_s)
        idle = await usage(billing, who_h)
    gb = 128 / 1024

    def duration(sums: dict[str, dict[str, float]]) -> float:
        return sum(v.get("duration_gb_s", 0.0) for k, v in sums.items() if k != "worker")

    # A standard socket keeps its object billed the whole second (at 128 MB: 0.125 GB-s).
    assert duration(held) - duration(before) >= 0.9 * gb, (before, held)
    # Only hibernatable sockets, and idle: a few milliseconds of events at most.
    assert duration(idle) < 0.05 * gb, idle


# ---------------------------------------------------------------- Prometheus


async def test_the_totals_are_exposed_as_prometheus_text(billing: ServerProcess) -> None:
    assert await get(billing, f"/burn?ms=1&account={account()}") == (200, "burnt")
    status, text = await get(billing, "/metrics")
    assert status == 200
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["sockworker_requests_total"] >= 1
    assert values["sockworker_cpu_ms_total"] > 0
    assert "# TYPE sockworker_ws_messages_in_total counter" in text
    # The core's allocator, as gauges: what it holds is at most what it keeps resident.
    allocated = values["sockworker_memory_allocated_bytes"]
    assert 0 < allocated <= values["sockworker_memory_resident_bytes"]
    assert "# TYPE sockworker_memory_resident_bytes gauge" in text


async def test_no_metrics_path_unless_the_app_asks(echo_server: ServerProcess) -> None:
    status, text = await get(echo_server, "/metrics")
    assert "sockworker_requests_total" not in text, (status, text)


# ---------------------------------------------------------------- exact partition


def _sum(records: list[dict[str, Any]], field: str, where: Callable[[dict[str, Any]], bool]) -> Any:
    return sum(r[field] for r in records if where(r))


async def test_records_partition_the_totals_across_hibernation_reset_and_shutdown(
    make_server: Callable[..., ServerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "billing.jsonl"
    monkeypatch.setenv("BILLING_LOG", str(log))
    server = make_server("tests.apps.billing:app")
    n, m, room = 6, 20, "ledger"
    url = f"{server.ws}/room/{room}?account=ledger"
    clients = [await connect(url) for _ in range(n)]
    received = 0
    for client in clients:
        for i in range(m // 2):
            assert await ask(client, f"first {i}") == f"first {i}"
            received += 1

    async def hibernated() -> bool:
        return not (await get_json(f"{server.http}/alive?name={room}"))["alive"]

    await wait_until(hibernated, within=10, what="the room to hibernate")
    # One message resets the instance (it raises): counted in, never answered.
    await clients[0].send("boom")
    for client in clients:
        for i in range(m // 2, m - (client is clients[0])):
            assert await ask(client, f"second {i}") == f"second {i}"
            received += 1

    assert server.stop(signal.SIGTERM) == 0
    for client in clients:
        await client.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    records = [line["record"] for line in lines if "record" in line]
    totals = [line["totals"] for line in lines if "totals" in line][-1]

    def in_room(r: dict[str, Any]) -> bool:
        return r["account"] == "ledger" and r["namespace"] == "ROOMS"

    assert _sum(records, "ws_connections", in_room) == n
    assert _sum(records, "ws_messages_in", in_room) == n * m
    assert _sum(records, "ws_messages_out", in_room) == received == n * m - 1
    assert _sum(records, "requests", in_room) == 0
    worker = _sum(records, "requests", lambda r: r["account"] == "ledger" and not r["namespace"])
    assert worker == n
    # Every unit of every record adds up to the totals: nothing lost, nothing twice.
    for field in (
        "requests",
        "ws_connections",
        "ws_messages_in",
        "ws_messages_out",
        "auto_responses",
        "bytes_in",
        "bytes_out",
    ):
        assert _sum(records, field, lambda r: True) == totals[field], field
    for field in ("cpu_ms", "duration_gb_s", "billable_requests"):
        assert math.isclose(_sum(records, field, lambda r: True), totals[field], rel_tol=1e-9)
    # Connections close at shutdown and the last delivery comes after: an object holding only
    # hibernatable sockets was billed a little duration, for its events.
    assert _sum(records, "duration_gb_s", in_room) > 0
