"""Alarms (SPEC §6) through a real server (tests/apps/store.py, STORE objects hibernate after
0.3 s): on time, waking a hibernated object, retried with backoff, fired after a restart when
they fell due while the server was down, replaced and deleted, and billed as requests.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
from typing import Any

import pytest

from tests.support import ServerProcess, get_json, wait_until
from tests.test_storage import APP, call, hibernated, live, ok


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def store() -> Any:
    server = ServerProcess(APP)
    try:
        yield server
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.log_tail()


async def fired(server: ServerProcess, name: str, count: int, within: float) -> list[Any]:
    async def enough() -> list[Any]:
        alarms = (await get_json(f"{server.http}/stats"))["alarms"].get(name, [])
        return alarms if len(alarms) >= count else []

    return await wait_until(enough, within=within, what=f"{count} alarm(s) of {name}")


async def test_an_alarm_wakes_its_hibernated_object_on_time(store: ServerProcess) -> None:
    name = fresh("ontime")
    at = time.time() + 1.5
    await ok(store, "STORE", name, "set_alarm", at)
    assert await ok(store, "STORE", name, "get_alarm") == pytest.approx(at)
    await hibernated(store, name)
    assert (await get_json(f"{store.http}/stats"))["alarms"].get(name) is None, "fired early"
    (alarm,) = await fired(store, name, 1, within=10)
    late = alarm["fired"] - at
    assert 0 <= late < 0.1, f"fired {late * 1000:.1f} ms after its time"
    assert alarm["retry"] == 0 and alarm["is_retry"] is False
    assert alarm["constructed"] == 2, "the alarm built a new instance of the hibernated object"
    assert await ok(store, "STORE", name, "get_alarm") is None, "done: the alarm is gone"


async def test_a_failing_alarm_is_retried_with_backoff(store: ServerProcess) -> None:
    name = fresh("retry")
    await ok(store, "STORE", name, "set_alarm", time.time() + 0.2, 2)
    attempts = await fired(store, name, 3, within=20)
    assert [a["retry"] for a in attempts] == [0, 1, 2]
    assert [a["is_retry"] for a in attempts] == [False, True, True]
    first, second = (b["fired"] - a["fired"] for a, b in itertools.pairwise(attempts))
    assert 2.0 <= first < 3.0, first
    assert 4.0 <= second < 5.0, second
    assert len({a["uuid"] for a in attempts}) == 3, "each failure reset the instance"
    assert await ok(store, "STORE", name, "get", "alarms") == 3
    assert await ok(store, "STORE", name, "get_alarm") is None

    async def billed() -> dict[str, int]:
        usage = await get_json(f"{store.http}/usage/{name}")
        # 3 RPC calls (set_alarm, get, get_alarm) and 3 runs of the alarm.
        return usage if usage.get("requests") == 3 + 3 else {}

    await wait_until(billed, within=10, what="the alarms billed as requests")


async def test_replaced_and_deleted_alarms(store: ServerProcess) -> None:
    replaced = fresh("replaced")
    await ok(store, "STORE", replaced, "set_alarm", time.time() + 3600)
    at = time.time() + 0.3
    await ok(store, "STORE", replaced, "set_alarm", at)
    (alarm,) = await fired(store, replaced, 1, within=10)
    assert alarm["fired"] >= at
    deleted = fresh("deleted")
    await ok(store, "STORE", deleted, "set_alarm", time.time() + 0.3)
    await ok(store, "STORE", deleted, "delete_alarm")
    assert await ok(store, "STORE", deleted, "get_alarm") is None
    await asyncio.sleep(1.0)  # past the deleted alarm's time: nothing may fire
    assert (await get_json(f"{store.http}/stats"))["alarms"].get(deleted) is None
    naive = await call(store, "STORE", deleted, "set_alarm_datetime_naive")
    assert naive["value_error"], naive


async def test_an_alarm_due_while_the_server_was_down_fires_at_start(make_server: Any) -> None:
    server = make_server(APP)
    name = fresh("down")
    at = time.time() + 1.0
    await ok(server, "STORE", name, "set_alarm", at)
    server.send_signal(signal.SIGKILL)  # not even a graceful stop
    server.kill()
    await asyncio.sleep(max(0.0, at + 0.3 - time.time()))  # the alarm falls due while down
    again = make_server(APP, "--data-dir", str(server.data_dir))
    (alarm,) = await fired(again, name, 1, within=10)
    assert alarm["fired"] >= at
    assert await live(again, name) <= 1
    assert await ok(again, "STORE", name, "get_alarm") is None
