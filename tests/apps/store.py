"""Durable Object storage and alarms (SPEC §6), instrumented for the end-to-end tests.

Namespaces (all with storage):
  STORE    Store: every storage call as an RPC method; hibernate_after 0.3 s
  CAMEL    CamelStore: the same calls through Cloudflare's camelCase names
  LOADER   Loader: block_concurrency_while in the constructor loads state before any event
  TOUCH    Touch: a method that touches nothing (the memory test of many ids)

Worker routes
  POST /call/NS/NAME      body {"method": M, "args": [...]}: `await stub.M(*args)`; answers
                          {"ok": result} or {"error", "message", "value_error", "type_error",
                          "storage_error"} (200 either way)
  GET  /ws/NS/NAME        upgrade: a hibernatable socket of the object; text commands below
  GET  /touch/NAME        `await env.TOUCH...ping()` -> "1"
  GET  /usage/NAME        what the billing hook was given for STORE object NAME, summed
  GET  /stats             module globals (constructors, live instances after gc, alarms fired,
                          tasks done), the server's storage and object counters, and its live
                          allocations (the core's bytes, Python's blocks); answered by the
                          Worker without touching any object

Socket commands: "inc" adds 1 to the stored counter "n" and answers the new value; "get"
answers it; "big N" stores N new random bytes under "big", adds 1 to "n" and answers "ok n";
anything else is echoed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
import uuid
import weakref
from collections import defaultdict
from typing import Any

import sockworker as sw
from sockworker import _native

CONSTRUCTED: dict[str, int] = defaultdict(int)
INSTANCES: dict[str, weakref.WeakSet[Any]] = defaultdict(weakref.WeakSet)
ALARMS: dict[str, list[dict[str, Any]]] = defaultdict(list)
TASKS_DONE: dict[str, list[str]] = defaultdict(list)
STALE: dict[str, Any] = {}
LOADED: dict[str, list[Any]] = defaultdict(list)


def _json(value: Any, status: int = 200) -> sw.Response:
    return sw.Response(
        json.dumps(value), status=status, headers={"content-type": "application/json"}
    )


class Unloadable:
    """Pickles fine; fails when unpickled (a class changed since the value was stored)."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_to_load, ())


def _refuse_to_load() -> None:
    raise RuntimeError("this value cannot be loaded any more")


class Store(sw.DurableObject):
    limits = sw.Limits(hibernate_after=0.3)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.name = ctx.id.name or str(ctx.id)
        CONSTRUCTED[self.name] += 1
        INSTANCES[self.name].add(self)
        self.uuid = uuid.uuid4().hex

    def whoami(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "constructed": CONSTRUCTED[self.name], "id": str(self.ctx.id)}

    # -- KV --------------------------------------------------------------------------------------

    def get(self, key: Any) -> Any:
        return self.ctx.storage.get(key)

    def put(self, key: Any, value: Any = None) -> None:
        if isinstance(key, list):  # JSON has no dicts with a shape check: pairs as a list
            self.ctx.storage.put(dict(key))
        else:
            self.ctx.storage.put(key, value)

    def delete(self, key: Any) -> Any:
        return self.ctx.storage.delete(key)

    def delete_all(self) -> None:
        self.ctx.storage.delete_all()

    def list(self, options: dict[str, Any]) -> list[list[Any]]:
        return [[k, v] for k, v in self.ctx.storage.list(**options).items()]

    def round_trip_types(self) -> bool:
        values = {
            "tuple": (1, "two", 3.0),
            "set": {1, 2, 3},
            "bytes": b"\x00\xff",
            "nested": {"a": [1, {"b": None}], "c": (True, False)},
            "none": None,
            "big_int": 2**80,
            "date": __import__("datetime").date(2026, 12, 1),
        }
        self.ctx.storage.put(values)
        return self.ctx.storage.get(list(values)) == values

    def put_unpicklable(self, key: str) -> None:
        self.ctx.storage.put(key, lambda: None)

    def put_unloadable(self, key: str) -> None:
        self.ctx.storage.put(key, Unloadable())

    async def put_and_sync(self, key: str, value: Any) -> Any:
        self.ctx.storage.put(key, value)
        await self.ctx.storage.sync()
        return self.ctx.storage.get(key)

    def put_then_raise(self, key: str, value: Any) -> None:
        self.ctx.storage.put(key, value)
        raise RuntimeError("after the write")

    def cached_get_twice(self, key: str) -> list[Any]:
        first = self.ctx.storage.get(key)
        if isinstance(first, list):
            first.append("mutated by the caller")
        return [first, self.ctx.storage.get(key)]

    # -- SQL -------------------------------------------------------------------------------------

    def sql(self, query: str, *bindings: Any) -> dict[str, Any]:
        cursor = self.ctx.storage.sql.exec(query, *bindings)
        rows = cursor.to_list()
        return {
            "rows": rows,
            "columns": cursor.column_names,
            "rows_read": cursor.rows_read,
            "rows_written": cursor.rows_written,
        }

    def sql_raw(self, query: str, *bindings: Any) -> list[list[Any]]:
        return [list(row) for row in self.ctx.storage.sql.exec(query, *bindings).raw()]

    def sql_one(self, query: str, *bindings: Any) -> Any:
        return self.ctx.storage.sql.exec(query, *bindings).one()

    def sql_blob(self) -> list[Any]:
        cursor = self.ctx.storage.sql.exec("SELECT ? AS b, ? AS f, ? AS n", b"\x00\xff", 1.5, None)
        row = cursor.one()
        return [row["b"].hex(), row["f"], row["n"]]

    def size(self) -> int:
        return self.ctx.storage.sql.database_size

    # -- transactions ----------------------------------------------------------------------------

    def txn(self, pairs: list[list[Any]], fail: bool) -> None:
        self.ctx.storage.put("outside", 1)
        with self.ctx.storage.transaction():
            for key, value in pairs:
                self.ctx.storage.put(key, value)
            self.ctx.storage.sql.exec("CREATE TABLE IF NOT EXISTS t (x)")
            self.ctx.storage.sql.exec("INSERT INTO t VALUES (?)", len(pairs))
            if fail:
                raise ValueError("undo the block")

    def txn_nested(self) -> None:
        storage = self.ctx.storage
        with storage.transaction():
            storage.put("outer", 1)
            try:
                with storage.transaction():
                    storage.put("inner", 1)
                    raise KeyError("inner only")
            except KeyError:
                pass

    async def txn_across_await(self) -> None:
        storage = self.ctx.storage
        with storage.transaction():
            storage.put("a", 1)
            await asyncio.sleep(0.05)
            storage.put("b", 2)
            raise RuntimeError("undo both")

    # -- the alarm -------------------------------------------------------------------------------

    def set_alarm(self, at: float, fail_times: int = 0) -> None:
        self.ctx.storage.put("fail_times", fail_times)
        self.ctx.storage.set_alarm(at)

    def set_alarm_datetime_naive(self) -> None:
        import datetime

        self.ctx.storage.set_alarm(datetime.datetime.now())

    def get_alarm(self) -> float | None:
        return self.ctx.storage.get_alarm()

    def delete_alarm(self) -> None:
        self.ctx.storage.delete_alarm()

    def alarm(self, info: sw.AlarmInfo) -> None:
        ALARMS[self.name].append(
            {
                "fired": time.time(),
                "retry": info.retry_count,
                "is_retry": info.is_retry,
                "uuid": self.uuid,
                "constructed": CONSTRUCTED[self.name],
            }
        )
        self.ctx.storage.put("alarms", (self.ctx.storage.get("alarms") or 0) + 1)
        left = self.ctx.storage.get("fail_times") or 0
        if left:
            self.ctx.storage.put("fail_times", left - 1)
            raise RuntimeError("the alarm fails on purpose")

    # -- lifecycle -------------------------------------------------------------------------------

    def spawn(self, seconds: float) -> str:
        async def work() -> None:
            await asyncio.sleep(seconds)
            TASKS_DONE[self.name].append(self.uuid)

        asyncio.create_task(work())  # noqa: RUF006 - the object keeps it (the point of the test)
        return self.uuid

    def stash(self) -> str:
        STALE[self.name] = self
        return self.uuid

    def reset_me(self) -> None:
        raise RuntimeError("reset on purpose")

    def stale_write(self) -> Any:
        """Uses the storage of an instance that was reset since ``stash``."""
        old = STALE[self.name]
        assert old is not self
        old.ctx.storage.put("stale", 1)
        return "written"

    # -- sockets ---------------------------------------------------------------------------------

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        storage = self.ctx.storage
        if message == "inc":
            n = (storage.get("n") or 0) + 1
            storage.put("n", n)
            ws.send(str(n))
        elif message == "get":
            ws.send(str(storage.get("n") or 0))
        elif isinstance(message, str) and message.startswith("big "):
            size = int(message.split()[1])
            storage.put("big", os.urandom(size))  # (new bytes: SQLite skips unchanged pages)
            storage.put("n", (storage.get("n") or 0) + 1)
            ws.send(f"ok {storage.get('n')}")
        else:
            ws.send(message)


class CamelStore(sw.DurableObject):
    def everything(self) -> dict[str, Any]:
        storage = self.ctx.storage
        storage.put("a", 1)
        got = storage.get(["a", "missing"])
        storage.deleteAll()
        after = storage.get("a")
        storage.transactionSync(lambda: storage.put("b", 2))
        storage.setAlarm(time.time() + 3600)
        alarm = storage.getAlarm()
        storage.deleteAlarm()
        cursor = storage.sql.exec("SELECT 1 AS one")
        return {
            "got": got,
            "after": after,
            "b": storage.get("b"),
            "alarm_set": alarm is not None,
            "alarm_after": storage.getAlarm(),
            "columns": cursor.columnNames,
            "rows": cursor.toArray(),
            "rows_read": cursor.rowsRead,
            "rows_written": cursor.rowsWritten,
            "size": storage.sql.databaseSize > 0,
        }


class Loader(sw.DurableObject):
    """Loads "n" from storage in the constructor, with a pause, under block_concurrency_while."""

    limits = sw.Limits(hibernate_after=0.3)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.name = ctx.id.name or str(ctx.id)
        CONSTRUCTED[self.name] += 1
        INSTANCES[self.name].add(self)
        self.n: int | None = None
        ctx.block_concurrency_while(self.load())

    async def load(self) -> None:
        await asyncio.sleep(0.2)
        self.n = self.ctx.storage.get("n") or 0

    def seen(self, tag: str) -> Any:
        LOADED[self.name].append([tag, self.n])
        return self.n

    def set(self, n: int) -> None:
        self.ctx.storage.put("n", n)

    def fetch(self, request: sw.Request) -> sw.Response:
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        LOADED[self.name].append(["message", self.n])
        ws.send(str(self.n))


class Touch(sw.DurableObject):
    limits = sw.Limits(hibernate_after=0.2)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        TOUCHED.add(self)

    def ping(self) -> int:
        return 1


TOUCHED: weakref.WeakSet[Touch] = weakref.WeakSet()


NAMESPACES = {"STORE": Store, "CAMEL": CamelStore, "LOADER": Loader, "TOUCH": Touch}


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "value_error": isinstance(exc, ValueError),
        "type_error": isinstance(exc, TypeError),
        "storage_error": isinstance(exc, sw.StorageError),
    }


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    parts = request.path.strip("/").split("/")
    if parts[0] == "stats":
        gc.collect()
        return _json(
            {
                "constructed": CONSTRUCTED,
                "live": {name: len(instances) for name, instances in INSTANCES.items()},
                "alarms": ALARMS,
                "tasks_done": TASKS_DONE,
                "loaded": LOADED,
                "touched_live": len(TOUCHED),
                "traced": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
                "python_blocks": sys.getallocatedblocks(),
                "core_allocated": _native.allocator_stats()[0],
            }
        )
    if parts[0] == "usage":
        return _json(USAGE.get(str(env.STORE.id_from_name(parts[1])), {}))
    if parts[0] == "touch":
        stub = env.TOUCH.get(env.TOUCH.id_from_name(parts[1]))
        return sw.Response(str(await stub.ping()))
    if parts[0] == "call" and len(parts) == 3:
        namespace = getattr(env, parts[1])
        stub = namespace.get(namespace.id_from_name(parts[2]))
        call = json.loads(request.body)
        try:
            result = await getattr(stub, call["method"])(*call.get("args", []))
        except Exception as exc:
            return _json(_error(exc))
        return _json({"ok": result})
    if parts[0] == "ws" and len(parts) == 3:
        namespace = getattr(env, parts[1])
        return await namespace.get(namespace.id_from_name(parts[2])).fetch(request)
    return sw.Response("not found", status=404)


class Usage(sw.BillingHook):
    """Sums every record per object, for GET /usage/NAME."""

    flush_interval = 0.1

    def on_usage(self, records: list[sw.UsageRecord]) -> None:
        for record in records:
            if record.object_id is None or record.namespace != "STORE":
                continue
            total = USAGE[record.object_id]
            for field in ("requests", "storage_rows_read", "storage_rows_written"):
                total[field] = total.get(field, 0) + getattr(record, field)


USAGE: dict[str, dict[str, int]] = defaultdict(dict)

app = sw.App(fetch=fetch, durable_objects=NAMESPACES, metrics_path="/metrics", billing=Usage())
