"""Cluster mode (SPEC §7): nodes that share one PostgreSQL. Real `sockworker serve` processes,
a real PostgreSQL (tests/postgres.py), clients over HTTP; the history of every write is read
back from PostgreSQL (the test app stores `log:N -> node` with each increment N)."""

from __future__ import annotations

import asyncio
import json
import pickle
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from tests.postgres import Postgres, TcpProxy, sql
from tests.support import ServerProcess, wait_until

APP = "tests.apps.cluster_counter:app"
LEASE = 2.0
RENEW = 0.4
#: How long a dead owner's objects may take to move: its lease, the rounds that notice, and
#: room for a slow machine (a liveness bound, not a speed measurement).
FAILOVER_BOUND = LEASE + 2 * RENEW + 10.0


def node(
    make_server: Callable[..., ServerProcess], dsn: str, name: str, *extra: str, app: str = APP
) -> ServerProcess:
    return make_server(
        app,
        *extra,
        "--cluster",
        dsn,
        "--node-id",
        name,
        "--lease",
        str(LEASE),
        "--lease-renew",
        str(RENEW),
    )


async def call(session: aiohttp.ClientSession, server: ServerProcess, path: str) -> tuple[int, Any]:
    async with session.get(server.http + path) as response:
        text = await response.text()
        return response.status, (json.loads(text) if response.status == 200 else text)


def history(dsn: str) -> dict[int, str]:
    """Every increment stored, with the node that stored it."""
    rows = sql(
        dsn,
        "SELECT convert_from(key, 'UTF8'), value FROM sw_kv WHERE key >= 'log:' AND key < 'log;'",
    )
    return {int(key[4:]): pickle.loads(value) for key, value in rows}


def stored_count(dsn: str) -> int:
    rows = sql(dsn, "SELECT value FROM sw_kv WHERE key = 'count'")
    return pickle.loads(rows[0][0]) if rows else 0


async def test_three_nodes_serve_one_object_through_its_owner(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    nodes = [node(make_server, pg_dsn, f"n{i}") for i in range(3)]
    async with aiohttp.ClientSession() as session:
        answers = [await call(session, nodes[i % 3], "/inc?name=room") for i in range(9)]
        assert [status for status, _ in answers] == [200] * 9
        assert [body["count"] for _, body in answers] == list(range(1, 10))
        owners = {body["node"] for _, body in answers}
        assert owners == {"n0"}, "the first node to reach the object owns it; the others forward"
        status, body = await call(session, nodes[2], "/rpc-inc?name=room&by=5")
        assert (status, body) == (200, {"count": 14, "node": "n0"}), "RPC is forwarded too"
        # Another object may land elsewhere: the one that first reaches it owns it.
        status, body = await call(session, nodes[1], "/inc?name=other")
        assert (status, body) == (200, {"count": 1, "node": "n1"})
        # Metering is per node: each node's billing hook gets records that name it.
        for index, server in enumerate(nodes):

            async def named(server: ServerProcess = server, index: int = index) -> bool:
                return f"n{index}" in (await call(session, server, "/usage-nodes"))[1]

            await wait_until(named, within=10, interval=0.1, what=f"n{index}'s usage records")
    leases = sql(pg_dsn, "SELECT node, epoch FROM sw_leases ORDER BY node")
    assert leases == [("n0", 1), ("n1", 1)]
    assert stored_count(pg_dsn) in (14, 1)  # (two objects: look at one of them)
    assert history(pg_dsn)[14] == "n0"


async def test_renewal_rewrites_no_lease_row(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    """A round renews the node's heartbeat, which keeps every lease of it valid: the lease rows
    are not written again (one row per round, whatever the number of objects)."""
    server = node(make_server, pg_dsn, "n0")
    async with aiohttp.ClientSession() as session:
        for name in ("a", "b", "c"):
            assert (await call(session, server, f"/inc?name={name}"))[0] == 200
    versions = sql(pg_dsn, "SELECT object_id, xmin::text FROM sw_leases ORDER BY object_id")
    assert len(versions) == 3
    beats = [sql(pg_dsn, "SELECT heartbeat_at FROM sw_nodes WHERE node = 'n0'")[0][0]]

    async def renewed() -> bool:
        beat = sql(pg_dsn, "SELECT heartbeat_at FROM sw_nodes WHERE node = 'n0'")[0][0]
        if beat != beats[-1]:
            beats.append(beat)
        return len(beats) > 3

    await wait_until(renewed, within=10, interval=0.05, what="three renewal rounds")
    assert sql(pg_dsn, "SELECT object_id, xmin::text FROM sw_leases ORDER BY object_id") == versions
    assert sql(pg_dsn, "SELECT count(*) FROM sw_lease_status WHERE live") == [(3,)]


async def test_a_killed_owner_fails_over_and_no_acknowledged_write_is_lost(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    nodes = [node(make_server, pg_dsn, f"n{i}") for i in range(3)]
    acked: list[tuple[int, str, float]] = []
    refused: list[str] = []
    stop = asyncio.Event()

    async def client(server: ServerProcess) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                status, body = await call(session, server, "/inc?name=room")
                if status == 200:
                    acked.append((body["count"], body["node"], time.monotonic()))
                else:
                    refused.append(body)

    async with aiohttp.ClientSession() as session:
        assert (await call(session, nodes[0], "/inc?name=room"))[1]["node"] == "n0"
    acked.append((1, "n0", time.monotonic()))
    clients = [asyncio.create_task(client(nodes[i])) for i in (1, 2)]
    await wait_until(lambda: _true(len(acked) >= 20), within=20, what="20 increments")
    nodes[0].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await wait_until(
        lambda: _true(any(n != "n0" for _, n, _t in acked)),
        within=FAILOVER_BOUND,
        what="an increment served by the new owner",
    )
    first = min(t for _, n, t in acked if n != "n0")
    await wait_until(
        lambda: _true(sum(n != "n0" for _, n, _t in acked) >= 20),
        within=20,
        what="20 increments on the new owner",
    )
    stop.set()
    await asyncio.gather(*clients)
    print(
        f"failover: {first - killed:.2f} s (lease {LEASE} s); "
        f"acked {len(acked)}, refused {len(refused)}"
    )
    counts = [count for count, _, _ in acked]
    assert len(counts) == len(set(counts)), "no increment acknowledged twice"
    stored = history(pg_dsn)
    for count, owner, _ in acked:
        assert stored.get(count) == owner, f"acknowledged increment {count} by {owner} was lost"
    assert stored_count(pg_dsn) == max(stored), "the count is the last increment stored"
    # A request in flight to the dead owner is the only kind that may fail, with a clear error.
    assert all("may or may not have run" in text for text in refused), refused
    assert len(refused) <= 2


async def test_a_paused_owner_is_fenced_and_its_output_dropped(
    make_server: Callable[..., ServerProcess], pg_dsn: str, tmp_path: Path
) -> None:
    first, second = node(make_server, pg_dsn, "n0"), node(make_server, pg_dsn, "n1")
    marker = tmp_path / "read"
    async with aiohttp.ClientSession() as session:
        assert (await call(session, first, "/inc?name=room"))[1] == {"count": 1, "node": "n0"}
        slow = asyncio.create_task(
            call(session, first, f"/slow-inc?name=room&hold=1&marker={marker}")
        )
        await wait_until(
            lambda: _true(marker.exists()), within=10, what="the slow increment's read"
        )
        first.send_signal(signal.SIGSTOP)
        try:
            # Until its lease has expired in PostgreSQL's own clock, nobody may take the object.
            await wait_until(
                lambda: _true(sql(pg_dsn, "SELECT NOT live FROM sw_lease_status")[0][0]),
                within=FAILOVER_BOUND,
                what="the paused owner's lease to expire",
            )
            status, body = await call(session, second, "/inc?name=room")
            assert (status, body) == (200, {"count": 2, "node": "n1"})
        finally:
            first.send_signal(signal.SIGCONT)
        status, _text = await slow
        assert status != 200, "the stale owner's answer was dropped"
        assert "fenced" in first.log_text(), first.log_tail()
        # Its next event is forwarded to the new owner.
        assert (await call(session, first, "/inc?name=room"))[1] == {"count": 3, "node": "n1"}
    assert history(pg_dsn) == {1: "n0", 2: "n1", 3: "n1"}, "never two owners that both commit"
    assert stored_count(pg_dsn) == 3
    assert sql(pg_dsn, "SELECT node, epoch FROM sw_leases") == [("n1", 2)]


async def test_postgres_unreachable_fails_clearly_and_loses_nothing(
    make_server: Callable[..., ServerProcess], postgres: Postgres, pg_dsn: str
) -> None:
    dbname = pg_dsn.rsplit("/", 1)[1]
    with TcpProxy("127.0.0.1", postgres.port) as proxy:
        server = node(make_server, proxy.dsn_for(dbname), "n0")
        async with aiohttp.ClientSession() as session:
            assert (await call(session, server, "/inc?name=room"))[1]["count"] == 1
            proxy.cut()
            status, _text = await call(session, server, "/inc?name=room")
            assert status >= 500 and status != 200
            assert "cluster database" in server.log_text(), server.log_tail()
            proxy.restore()
            answers = [await call(session, server, "/inc?name=room") for _ in range(3)]
    assert [status for status, _ in answers] == [200] * 3
    counts = [body["count"] for _, body in answers]
    assert counts == [2, 3, 4], "the failed increment was not stored, the acknowledged ones were"
    assert history(pg_dsn) == {1: "n0", 2: "n0", 3: "n0", 4: "n0"}


async def test_an_alarm_of_a_dead_node_fires_on_another(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    first, second = node(make_server, pg_dsn, "n0"), node(make_server, pg_dsn, "n1")
    async with aiohttp.ClientSession() as session:
        assert (await call(session, first, "/alarm?name=room&in=1"))[1] == {"node": "n0"}
        first.send_signal(signal.SIGKILL)

        async def fired() -> Any:
            status, body = await call(session, second, "/fired?name=room")
            return status == 200 and body["fired"]

        assert (
            await wait_until(fired, within=FAILOVER_BOUND + 2, interval=0.2, what="the alarm")
            == "n1"
        )
    assert sql(pg_dsn, "SELECT count(*) FROM sw_alarms") == [(0,)], "a fired alarm is deleted"


async def test_a_restarted_node_takes_its_objects_back_at_once(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    first = node(make_server, pg_dsn, "n0")
    async with aiohttp.ClientSession() as session:
        assert (await call(session, first, "/inc?name=room"))[1] == {"count": 1, "node": "n0"}
        first.send_signal(signal.SIGKILL)
        first.wait_exit(10)
        again = node(make_server, pg_dsn, "n0")
        # Its lease from before is still live in PostgreSQL: the same node id takes it back
        # with a new epoch, without waiting for it to expire.
        assert (await call(session, again, "/inc?name=room"))[1] == {"count": 2, "node": "n0"}
    assert sql(pg_dsn, "SELECT node, epoch FROM sw_leases") == [("n0", 2)]


def take_waits_for_a_lock(dsn: str) -> bool:
    """A node's take of a lease (its INSERT INTO sw_leases) waits for a row lock now."""
    rows = sql(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE '%INSERT INTO sw_leases%'",
    )
    return rows[0][0] > 0


async def test_a_node_taking_an_object_serves_other_requests_meanwhile(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    """Taking an object asks PostgreSQL; the event loop serves other requests while it waits
    (the statement once ran on the loop's thread: a slow PostgreSQL stopped the whole node)."""
    server = node(make_server, pg_dsn, "n0")
    async with aiohttp.ClientSession() as session:
        assert (await call(session, server, "/inc?name=warm"))[1] == {"count": 1, "node": "n0"}
        # A transaction of the test's holds the node's row: a take reads it FOR SHARE, so it
        # waits for this transaction.
        with psycopg.connect(pg_dsn) as blocker:
            blocker.execute("SELECT 1 FROM sw_nodes WHERE node = 'n0' FOR UPDATE")
            taking = asyncio.create_task(call(session, server, "/inc?name=new"))
            await wait_until(
                lambda: asyncio.to_thread(take_waits_for_a_lock, pg_dsn),
                within=10,
                what="the take to wait for the test's lock",
            )
            # The node answers what needs no object, and an object it holds, meanwhile.
            answered = await asyncio.wait_for(call(session, server, "/node"), 10)
            assert answered == (200, {"node": "n0"})
            counted = await asyncio.wait_for(call(session, server, "/inc?name=warm"), 10)
            assert counted == (200, {"count": 2, "node": "n0"})
            assert not taking.done(), "the take waits for the lock"
        # (The transaction ended with the block: the take goes on.)
        assert await asyncio.wait_for(taking, 10) == (200, {"count": 1, "node": "n0"})


async def test_the_sql_api_is_refused_with_a_clear_error(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    server = node(make_server, pg_dsn, "n0")
    async with aiohttp.ClientSession() as session:
        status, text = await call(session, server, "/sql?name=room")
        assert status == 501
        assert "not available in cluster mode" in text and "KV API" in text
        # The object is unharmed: its KV works.
        assert (await call(session, server, "/inc?name=room"))[1]["count"] == 1


def test_cluster_flags_need_cluster(make_server: Callable[..., ServerProcess]) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sockworker", "serve", APP, "--lease", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "need --cluster" in done.stderr


async def _true(value: bool) -> bool:
    return value


ROOM_APP = "tests.apps.cluster_room:app"


def room_node(
    make_server: Callable[..., ServerProcess], dsn: str, name: str, *extra: str
) -> ServerProcess:
    return node(make_server, dsn, name, *extra, app=ROOM_APP)


async def next_kind(ws: Any, kind: str) -> dict[str, Any]:
    """The next message of `kind` (joins and leaves of others may come first)."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["kind"] == kind:
            return message


async def test_a_room_with_clients_on_three_nodes(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    from websockets.asyncio.client import connect

    nodes = [room_node(make_server, pg_dsn, f"n{i}") for i in range(3)]
    async with (
        connect(nodes[0].ws + "/?room=r&user=ann") as ann,
        connect(nodes[1].ws + "/?room=r&user=bob") as bob,
        connect(nodes[2].ws + "/?room=r&user=cy") as cy,
    ):
        for ws in (ann, bob, cy):
            assert (await next_kind(ws, "history"))["owner"] == "n0"
        # Tags and attachments of sockets held by other nodes are the object's.
        await bob.send("whoami")
        you = await next_kind(bob, "you")
        assert (you["user"], you["tags"]) == ("bob", ["bob"])
        await cy.send("list")
        assert (await next_kind(cy, "list"))["users"] == ["ann", "bob", "cy"]
        # A message from any node reaches every socket, in the one order the owner made
        # (two clients on two nodes have no order between them before it).
        await bob.send("hello")
        await cy.send("world")
        seen = []
        for ws in (ann, bob, cy):
            first, second = await next_kind(ws, "message"), await next_kind(ws, "message")
            seen.append([(first["user"], first["text"]), (second["user"], second["text"])])
        assert seen[0] == seen[1] == seen[2]
        assert sorted(seen[0]) == [("bob", "hello"), ("cy", "world")]
        # A broadcast that leaves out its sender, held by another node than the owner.
        await cy.send("shout")
        assert (await next_kind(ann, "shout"))["user"] == "cy"
        assert (await next_kind(bob, "shout"))["user"] == "cy"
        await cy.send("whoami")
        assert json.loads(await asyncio.wait_for(cy.recv(), 10))["kind"] == "you", "not to cy"
        # The auto-response is answered by the node that holds the socket, not the owner.
        await cy.send("ping")
        assert await asyncio.wait_for(cy.recv(), 10) == "pong"
        async with aiohttp.ClientSession() as session:
            status, body = await call(session, nodes[1], "/count?room=r")
        assert (status, body) == (200, {"sockets": 3, "node": "n0"})
        # A leave on another node reaches the owner and the others.
        await cy.close()
        assert (await next_kind(ann, "leave"))["user"] == "cy"
        assert (await next_kind(bob, "leave"))["user"] == "cy"
    stored = sql(pg_dsn, "SELECT value FROM sw_kv WHERE key = 'history'")
    assert [tuple(m) for m in pickle.loads(stored[0][0])] == seen[0], "stored in that order"


async def test_sockets_on_surviving_nodes_stay_open_when_the_owner_dies(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    from websockets.asyncio.client import connect

    nodes = [room_node(make_server, pg_dsn, f"n{i}") for i in range(3)]
    async with aiohttp.ClientSession() as session:
        # The owner is n0: it reaches the object first.
        assert (await call(session, nodes[0], "/count?room=r"))[1]["node"] == "n0"
    async with (
        connect(nodes[1].ws + "/?room=r&user=bob") as bob,
        connect(nodes[2].ws + "/?room=r&user=cy") as cy,
    ):
        for ws in (bob, cy):
            assert (await next_kind(ws, "history"))["owner"] == "n0"
        await bob.send("before")
        for ws in (bob, cy):
            assert (await next_kind(ws, "message"))["owner"] == "n0"
        nodes[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # Sent while the owner is dead: relayed once another node owns the room.
        await bob.send("after")
        for ws in (bob, cy):
            message = await asyncio.wait_for(next_kind(ws, "message"), FAILOVER_BOUND)
            assert (message["user"], message["text"]) == ("bob", "after")
            assert message["owner"] in ("n1", "n2")
        print(f"socket failover: {time.monotonic() - killed:.2f} s")
        # The new owner knows both sockets (also the one on the node that did not send).
        await cy.send("list")
        assert (await next_kind(cy, "list"))["users"] == ["bob", "cy"]
    stored = sql(pg_dsn, "SELECT value FROM sw_kv WHERE key = 'history'")
    assert pickle.loads(stored[0][0]) == [["bob", "before"], ["bob", "after"]]


async def test_workers_share_one_port_as_nodes_of_one_cluster(pg_dsn: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.postgres import free_port

    port = free_port()
    argv = [sys.executable, "-m", "sockworker", "serve", APP, "--port", str(port)]
    argv += ["--data-dir", str(tmp_path), "--cluster", pg_dsn, "--workers", "2"]
    argv += ["--lease", str(LEASE), "--lease-renew", str(RENEW)]
    log_path = tmp_path / "workers.log"
    # (Started and stopped from the test's loop: a blocking start of a few ms is harmless.)
    with log_path.open("wb") as log, subprocess.Popen(argv, stderr=log) as supervisor:  # noqa: ASYNC220
        try:
            await _two_workers_serve(pg_dsn, port)
            supervisor.send_signal(signal.SIGTERM)
            assert supervisor.wait(30) == 0, log_path.read_text()
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
    live = sql(pg_dsn, "SELECT count(*) FROM sw_lease_status WHERE live")
    assert live == [(0,)], "a clean shutdown gives its leases up"


async def _two_workers_serve(pg_dsn: str, port: int) -> None:
    async def both_registered() -> bool:
        exists = sql(pg_dsn, "SELECT to_regclass('sw_nodes') IS NOT NULL")[0][0]
        return bool(exists) and len(sql(pg_dsn, "SELECT node FROM sw_nodes")) == 2

    await wait_until(both_registered, within=30, interval=0.1, what="two workers")
    seen: set[str] = set()
    counts: dict[str, list[int]] = {}
    # (A new connection per request: the kernel picks a worker per connection.)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def served() -> bool:
            for name in ("a", "b", "c", "d"):
                # (The object's answer names its owner; /node, the worker that took the request.)
                async with session.get(f"http://127.0.0.1:{port}/node") as response:
                    seen.add((await response.json())["node"])
                async with session.get(f"http://127.0.0.1:{port}/inc?name={name}") as response:
                    counts.setdefault(name, []).append((await response.json())["count"])
            return len(seen) == 2

        # The kernel spreads connections over the workers (SO_REUSEPORT).
        await wait_until(served, within=30, interval=0, what="both workers to answer")
    assert {node.rsplit("-", 1)[1] for node in seen} == {"w0", "w1"}
    for name, values in counts.items():
        assert values == list(range(1, len(values) + 1)), f"object {name}: one owner, in order"


async def test_the_owner_hibernates_while_other_nodes_hold_its_sockets(
    make_server: Callable[..., ServerProcess], pg_dsn: str
) -> None:
    from websockets.asyncio.client import connect

    owner = room_node(make_server, pg_dsn, "n0", "--log-level", "debug")
    holder = room_node(make_server, pg_dsn, "n1")
    async with aiohttp.ClientSession() as session:
        assert (await call(session, owner, "/count?room=r"))[1]["node"] == "n0"
    mark = owner.log_mark()
    async with connect(holder.ws + "/?room=r&user=ann") as ann:
        assert (await next_kind(ann, "history"))["owner"] == "n0"
        await ann.send("whoami")
        before = (await next_kind(ann, "you"))["instance"]
        # The room leaves the owner's memory; the socket stays open on the holder.
        await asyncio.to_thread(owner.wait_for_log, r"object \w+ of ROOMS hibernated", 10, mark)
        await ann.send("whoami")
        you = await next_kind(ann, "you")
        assert you["instance"] == before + 1, "the next message made a new instance"
        assert (you["user"], you["tags"]) == ("ann", ["ann"]), "tags and attachment survived"
        await ann.send("ping")
        assert await asyncio.wait_for(ann.recv(), 10) == "pong"
