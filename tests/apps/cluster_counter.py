"""A counter per name, for the cluster tests: each increment is stored with the node that made
it (``log:N`` -> node), so that a test can read the history from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import pathlib

import sockworker as sw


class Counter(sw.DurableObject):
    async def fetch(self, request: sw.Request) -> sw.Response:
        storage = self.ctx.storage
        if request.path == "/get":
            count = storage.get("count") or 0
            return _json({"count": count, "node": sw.node_id()})
        if request.path == "/slow-inc":
            # Reads, says so (a file the test waits for), holds, then writes: a test can pause
            # the node in between.
            count = storage.get("count") or 0
            _mark(request.query["marker"], count)
            await asyncio.sleep(float(request.query["hold"]))
            return await self._write(count + 1)
        if request.path == "/alarm":
            storage.set_alarm(sw.now() + float(request.query["in"]))
            return _json({"node": sw.node_id()})
        if request.path == "/sql":
            try:
                storage.sql.exec("SELECT 1")
            except sw.StorageError as error:
                return sw.Response(str(error), status=501)
            return sw.Response("the SQL API ran")
        if request.path == "/fired":
            return _json({"fired": storage.get("fired"), "node": sw.node_id()})
        count = storage.get("count") or 0
        return await self._write(count + 1)

    async def _write(self, count: int) -> sw.Response:
        self.ctx.storage.put({"count": count, f"log:{count:08d}": sw.node_id()})
        return _json({"count": count, "node": sw.node_id()})

    async def increment(self, by: int) -> dict[str, object]:
        count = (self.ctx.storage.get("count") or 0) + by
        self.ctx.storage.put({"count": count, f"log:{count:08d}": sw.node_id()})
        return {"count": count, "node": sw.node_id()}

    async def alarm(self) -> None:
        self.ctx.storage.put("fired", sw.node_id())


def _mark(path: str, count: int) -> None:
    pathlib.Path(path).write_text(str(count))


def _json(value: object) -> sw.Response:
    return sw.Response(json.dumps(value), headers={"content-type": "application/json"})


#: The nodes named by the usage records this node's billing hook got.
USAGE_NODES: set[str | None] = set()


class Usage(sw.BillingHook):
    flush_interval = 0.1

    def on_usage(self, records: list[sw.UsageRecord]) -> None:
        USAGE_NODES.update(record.node for record in records)


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    name = request.query.get("name", "lobby")
    stub = env.COUNTER.get_by_name(name)
    if request.path == "/rpc-inc":
        return _json(await stub.increment(int(request.query.get("by", "1"))))
    if request.path == "/usage-nodes":
        return _json(sorted(str(node) for node in USAGE_NODES))
    if request.path == "/node":
        return _json({"node": sw.node_id()})
    try:
        return await stub.fetch(request)
    except sw.ClusterError as error:
        return sw.Response(f"{error}\n", status=503)


app = sw.App(fetch=fetch, durable_objects={"COUNTER": Counter}, billing=Usage())
