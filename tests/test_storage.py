"""Durable Object storage (SPEC §6) through a real server: the KV and SQL APIs, their limits and
errors, transactions, the camelCase names, what survives hibernation, a reset and a restart, and
bad input (a corrupt database, an unusable data directory). The app is tests/apps/store.py;
every call goes through HTTP (`aiohttp`) or a socket (`websockets`).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.support import ServerProcess, get_json, wait_until

APP = "tests.apps.store:app"


@pytest.fixture(scope="module")
def store() -> Iterator[ServerProcess]:
    server = ServerProcess(APP)
    try:
        yield server
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.log_tail()


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def object_file(server: ServerProcess, ns: str, name: str) -> Path:
    """Where the data directory keeps the object's database (SPEC §6: sharded folders)."""
    object_id = hashlib.sha256(f"{ns}\0{name}".encode()).hexdigest()
    return server.data_dir / ns / object_id[:3] / f"{object_id}.sqlite"


async def call(server: ServerProcess, ns: str, name: str, method: str, *args: Any) -> Any:
    """`await stub.METHOD(*args)` through the Worker: {"ok": result} or the error's description."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{server.http}/call/{ns}/{name}", json={"method": method, "args": list(args)}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def ok(server: ServerProcess, ns: str, name: str, method: str, *args: Any) -> Any:
    result = await call(server, ns, name, method, *args)
    assert "ok" in result, result
    return result["ok"]


async def live(server: ServerProcess, name: str) -> int:
    return int((await get_json(f"{server.http}/stats"))["live"].get(name, 0))


async def hibernated(server: ServerProcess, name: str) -> None:
    async def gone() -> bool:
        return await live(server, name) == 0

    await wait_until(gone, within=10, what=f"{name} to hibernate")


# ------------------------------------------------------------------------------------------ KV


async def test_kv_single_and_multi_key_calls(store: ServerProcess) -> None:
    name = fresh("kv")
    assert await ok(store, "STORE", name, "get", "a") is None
    await ok(store, "STORE", name, "put", "a", {"x": [1, 2]})
    assert await ok(store, "STORE", name, "get", "a") == {"x": [1, 2]}
    await ok(store, "STORE", name, "put", [["b", 2], ["c", 3], ["ab", "z"]])
    assert await ok(store, "STORE", name, "get", ["a", "b", "nope"]) == {"a": {"x": [1, 2]}, "b": 2}
    assert await ok(store, "STORE", name, "delete", "b") is True
    assert await ok(store, "STORE", name, "delete", "b") is False
    assert await ok(store, "STORE", name, "delete", ["c", "nope"]) == 1
    await ok(store, "STORE", name, "put", [["d", 4], ["e", 5], ["f", 6]])
    keys = ["a", "ab", "d", "e", "f"]
    listing = await ok(store, "STORE", name, "list", {})
    assert [k for k, _ in listing] == keys
    assert [k for k, _ in await ok(store, "STORE", name, "list", {"prefix": "a"})] == ["a", "ab"]
    bounded = await ok(store, "STORE", name, "list", {"start": "ab", "end": "e"})
    assert [k for k, _ in bounded] == ["ab", "d"]
    after = await ok(store, "STORE", name, "list", {"start_after": "d"})
    assert [k for k, _ in after] == ["e", "f"]
    tail = await ok(store, "STORE", name, "list", {"reverse": True, "limit": 2})
    assert tail == [["f", 6], ["e", 5]]
    assert await ok(store, "STORE", name, "round_trip_types") is True
    assert await ok(store, "STORE", name, "put_and_sync", "synced", 1) == 1
    await ok(store, "STORE", name, "delete_all")
    assert await ok(store, "STORE", name, "list", {}) == []


async def test_kv_limits_refuse_and_write_nothing(store: ServerProcess) -> None:
    name = fresh("limits")
    assert await ok(store, "STORE", name, "put", "é" * 1024, 1) is None  # 2,048 bytes: the limit
    too_long = await call(store, "STORE", name, "put", [["fine", 1], ["é" * 1025, 2]])
    assert too_long["value_error"], too_long
    assert await ok(store, "STORE", name, "get", "fine") is None, "nothing of the call written"
    too_big = await call(store, "STORE", name, "put", "big", "x" * (128 * 1024))
    assert too_big["value_error"] and "128" not in too_big["error"], too_big
    assert await ok(store, "STORE", name, "get", "big") is None
    keys = [f"k{i}" for i in range(129)]
    for method, args in (("get", [keys]), ("delete", [keys]), ("put", [[[k, 1] for k in keys]])):
        refused = await call(store, "STORE", name, method, *args)
        assert refused["value_error"], (method, refused)
    assert (await call(store, "STORE", name, "get", 5))["type_error"]
    refused = await call(store, "STORE", name, "put_unpicklable", "fn")
    assert refused["type_error"] and "fn" in refused["message"], refused
    assert await ok(store, "STORE", name, "get", "fn") is None
    await ok(store, "STORE", name, "put_unloadable", "bad")
    unreadable = await call(store, "STORE", name, "get", "bad")
    assert unreadable["storage_error"] and "bad" in unreadable["message"], unreadable
    assert (await call(store, "STORE", name, "list", {"limit": 0}))["value_error"]
    # The object was not reset by any of this: its own code chose to raise.
    assert await ok(store, "STORE", name, "get", "é" * 1024) == 1


async def test_a_read_returns_a_copy_not_the_cached_value(store: ServerProcess) -> None:
    name = fresh("copy")
    await ok(store, "STORE", name, "put", "list", [1])
    first, second = await ok(store, "STORE", name, "cached_get_twice", "list")
    assert first == [1, "mutated by the caller"]
    assert second == [1]


# ----------------------------------------------------------------------------------------- SQL


async def test_sql_cursor_results_counts_and_errors(store: ServerProcess) -> None:
    name = fresh("sql")
    created = await ok(
        store, "STORE", name, "sql",
        "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT); "
        "INSERT INTO people (name) VALUES (?), (?), (?)", "ann", "bob", "cy",
    )  # fmt: skip
    assert created["rows_written"] == 3 and created["rows"] == []
    selected = await ok(store, "STORE", name, "sql", "SELECT id, name FROM people WHERE id > ?", 1)
    assert selected["columns"] == ["id", "name"]
    assert selected["rows"] == [{"id": 2, "name": "bob"}, {"id": 3, "name": "cy"}]
    assert selected["rows_read"] >= 2 and selected["rows_written"] == 0
    scan = await ok(store, "STORE", name, "sql", "SELECT id FROM people WHERE name LIKE '%b%'")
    assert scan["rows"] == [{"id": 2}] and scan["rows_read"] == 3, "a full scan reads every row"
    updated = await ok(store, "STORE", name, "sql", "UPDATE people SET name = upper(name)")
    assert updated["rows_written"] == 3
    raw = await ok(store, "STORE", name, "sql_raw", "SELECT name FROM people ORDER BY id")
    assert raw == [["ANN"], ["BOB"], ["CY"]]
    assert await ok(store, "STORE", name, "sql_one", "SELECT name FROM people WHERE id = 1") == {
        "name": "ANN"
    }
    assert (await call(store, "STORE", name, "sql_one", "SELECT * FROM people"))["value_error"]
    assert await ok(store, "STORE", name, "sql_blob") == ["00ff", 1.5, None]
    assert await ok(store, "STORE", name, "size") >= 4096
    bad = await call(store, "STORE", name, "sql", "SELEC 1")
    assert bad["storage_error"] and "syntax error" in bad["message"], bad
    missing = await call(store, "STORE", name, "sql", "SELECT * FROM nowhere")
    assert missing["storage_error"] and "no such table" in missing["message"], missing
    for refused in ("SELECT * FROM _sw_kv", "DROP TABLE _sw_meta", "BEGIN", "COMMIT"):
        result = await call(store, "STORE", name, "sql", refused)
        assert result["storage_error"], (refused, result)
    wrong = await call(store, "STORE", name, "sql", "SELECT ?, ?", 1)
    assert wrong["value_error"], wrong
    # Errors do not reset the object, and the KV API still works beside SQL.
    await ok(store, "STORE", name, "put", "k", "v")
    assert await ok(store, "STORE", name, "get", "k") == "v"


# -------------------------------------------------------------------------------- transactions


async def test_transaction_rolls_back_its_block_only(store: ServerProcess) -> None:
    name = fresh("txn")
    await ok(store, "STORE", name, "txn", [["x", 1], ["y", 2]], False)
    assert await ok(store, "STORE", name, "get", ["x", "y", "outside"]) == {
        "x": 1, "y": 2, "outside": 1,
    }  # fmt: skip
    await ok(store, "STORE", name, "delete", "outside")
    failed = await call(store, "STORE", name, "txn", [["x", 10], ["z", 3]], True)
    assert failed["error"] == "ValueError", "the exception propagates"
    assert await ok(store, "STORE", name, "get", ["x", "z", "outside"]) == {"x": 1, "outside": 1}
    rows = await ok(store, "STORE", name, "sql", "SELECT x FROM t")
    assert rows["rows"] == [{"x": 2}], "the SQL of the failed block was undone too"
    await ok(store, "STORE", name, "txn_nested")
    assert await ok(store, "STORE", name, "get", ["outer", "inner"]) == {"outer": 1}
    across = await call(store, "STORE", name, "txn_across_await")
    assert across["error"] == "RuntimeError"
    assert await ok(store, "STORE", name, "get", ["a", "b"]) == {}


async def test_writes_before_an_exception_are_kept(store: ServerProcess) -> None:
    """SPEC §6: only a transaction() block is undone by an exception; the object resets."""
    name = fresh("raise")
    before = await ok(store, "STORE", name, "whoami")
    assert (await call(store, "STORE", name, "put_then_raise", "k", 7))["error"] == "RuntimeError"
    assert await ok(store, "STORE", name, "get", "k") == 7
    assert (await ok(store, "STORE", name, "whoami"))["uuid"] != before["uuid"], "reset"


async def test_camel_case_names(store: ServerProcess) -> None:
    result = await ok(store, "CAMEL", fresh("camel"), "everything")
    assert result == {
        "got": {"a": 1},
        "after": None,
        "b": 2,
        "alarm_set": True,
        "alarm_after": None,
        "columns": ["one"],
        "rows": [{"one": 1}],
        "rows_read": 1,
        "rows_written": 0,
        "size": True,
    }


# ------------------------------------------------------------------ what survives, what refuses


async def test_state_survives_hibernation_reset_and_a_graceful_restart(
    make_server: Any,
) -> None:
    server = make_server(APP)
    name = fresh("durable")
    await ok(server, "STORE", name, "put", "k", "v1")
    await ok(server, "STORE", name, "sql", "CREATE TABLE t (x); INSERT INTO t VALUES (42)")
    await hibernated(server, name)
    assert await ok(server, "STORE", name, "get", "k") == "v1"
    assert (await call(server, "STORE", name, "reset_me"))["error"] == "RuntimeError"
    assert await ok(server, "STORE", name, "get", "k") == "v1"
    assert object_file(server, "STORE", name).exists()
    assert server.stop(signal.SIGTERM) == 0
    again = make_server(APP, "--data-dir", str(server.data_dir))
    assert await ok(again, "STORE", name, "get", "k") == "v1"
    assert (await ok(again, "STORE", name, "sql", "SELECT x FROM t"))["rows"] == [{"x": 42}]


async def test_storage_of_a_reset_instance_refuses(store: ServerProcess) -> None:
    name = fresh("stale")
    await ok(store, "STORE", name, "stash")
    await call(store, "STORE", name, "reset_me")
    refused = await call(store, "STORE", name, "stale_write")
    assert refused["storage_error"] and "reset or hibernated" in refused["message"], refused
    assert await ok(store, "STORE", name, "get", "stale") is None


async def test_block_concurrency_while_holds_events_until_loaded(store: ServerProcess) -> None:
    name = fresh("loader")
    await ok(store, "LOADER", name, "set", 5)
    await hibernated(store, name)
    async with connect(f"{store.ws}/ws/LOADER/{name}", ping_interval=None) as ws:
        await hibernated(store, name)
        # A message and an RPC arrive while the constructor's load is still running.
        await ws.send("m")
        rpc = asyncio.ensure_future(ok(store, "LOADER", name, "seen", "rpc"))
        assert await asyncio.wait_for(ws.recv(), 10) == "5"
        assert await rpc == 5
    loaded = (await get_json(f"{store.http}/stats"))["loaded"][name]
    assert sorted(tag for tag, _ in loaded) == ["message", "rpc"]
    assert all(n == 5 for _, n in loaded), loaded


async def test_tasks_made_with_create_task_keep_the_object_resident(store: ServerProcess) -> None:
    """Bug: a task started with asyncio.create_task let its object hibernate, and the next event
    built a second live instance. The task now keeps its object (hibernate_after is 0.3 s)."""
    name = fresh("task")
    owner = await ok(store, "STORE", name, "spawn", 1.2)

    async def task_done() -> list[str]:
        stats = await get_json(f"{store.http}/stats")
        assert stats["live"].get(name, 0) <= 1, "two live instances of one id"
        assert stats["constructed"][name] == 1, "the object was rebuilt while its task ran"
        return list(stats["tasks_done"].get(name, []))

    assert await wait_until(task_done, within=10, what="the task") == [owner]
    assert (await ok(store, "STORE", name, "whoami"))["constructed"] <= 2


# ------------------------------------------------------------------------------------ bad input


async def test_a_corrupt_database_fails_that_object_only(make_server: Any) -> None:
    server = make_server(APP)
    name = fresh("corrupt")
    path = object_file(server, "STORE", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a database " * 300)
    broken = await call(server, "STORE", name, "get", "k")
    assert broken["storage_error"] and "not a database" in broken["message"], broken
    other = fresh("healthy")
    await ok(server, "STORE", other, "put", "k", 1)
    assert await ok(server, "STORE", other, "get", "k") == 1
    assert (await call(server, "STORE", name, "get", "k"))["storage_error"], "still refused"


def test_an_unusable_data_directory_refuses_to_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(AssertionError, match="cannot start: the data directory"):
        ServerProcess(APP, ("--data-dir", str(blocker / "data")))


def test_a_data_directory_in_use_refuses_a_second_server(make_server: Any) -> None:
    first = make_server(APP)
    with pytest.raises(AssertionError, match="in use by another sockworker server"):
        ServerProcess(APP, ("--data-dir", str(first.data_dir)))


async def test_the_meter_counts_storage_rows(make_server: Any) -> None:
    """SPEC §4: a KV key read or written is one row; SQL counts what its statements read and
    wrote. The totals are served at /metrics by this app."""
    server = make_server(APP)
    name = fresh("rows")
    await ok(server, "STORE", name, "put", [["a", 1], ["b", 2]])
    await ok(server, "STORE", name, "get", ["a", "b", "c"])
    await ok(server, "STORE", name, "sql", "CREATE TABLE t (x); INSERT INTO t VALUES (1), (2)")
    async with aiohttp.ClientSession() as session, session.get(f"{server.http}/metrics") as r:
        text = await r.text()
    totals = dict(line.split() for line in text.splitlines() if line.startswith("sockworker_"))
    assert totals["sockworker_storage_rows_read_total"] == "3"
    assert totals["sockworker_storage_rows_written_total"] == "4"
