#!/usr/bin/env python3
"""Cluster benchmark (SPEC §7): what it costs to serve an object from another node, in one run.

Real `sockworker serve --cluster` nodes sharing one throwaway PostgreSQL (tests/postgres.py),
serving bench/apps/cluster_bench.py:

1. **Forwarding cost per message.** C clients ping-pong (send, await the echo) on one room:
   (a) all connected to the owner node, (b) all connected to the two other nodes of three, whose
   sockets' events go to the owner and whose echoes come back over the node-to-node links. Reported:
   messages/s and the CPU time (utime + stime, /proc/PID/stat) of all node processes together per
   message, and the ratio (b) / (a).
2. **Broadcast across nodes.** S subscribers on one room and one publisher whose messages the
   object broadcasts (`ctx.broadcast`; the publisher's own copy is not counted): all on the
   owner, against a third on each of three nodes (publisher on the owner, then on another
   node). Reported: deliveries/s received by all subscribers, node CPU per delivery, the ratio
   to all-on-the-owner.
3. **Failover.** Three nodes; a client on a node that is not the owner sends every 10 ms; the owner
   is killed (SIGKILL); the time from the kill to the first echo served by the new owner. Repeated
   with a fresh owner process and a fresh room, with lease 2 s / renewal 0.4 s and with the
   defaults (10 s / 3 s).
4. **PostgreSQL load of an idle node** holding N resident objects (made resident by one HTTP
   request each; their class never hibernates): statements per second measured by PostgreSQL
   (`pg_stat_statements`, loaded into the throwaway server for this run) and transactions per
   second (`pg_stat_database`), over an idle window.

The nodes run under `taskset -c 0`; this script (the clients) and PostgreSQL on CPU 1. The
clients are this Python process (asyncio, uvloop when installed): the ping-pong and broadcast
clients speak WebSocket through a small asyncio protocol (a pre-masked frame sent per message,
frames counted as they arrive) so that the client costs little per message; the publisher and
the failover client are `websockets`. The clients' CPU is not counted in the node CPU figures.
Rounds are interleaved (a b, a b, ...); medians over rounds; ratios are taken within a round.

    python bench/cluster.py             # about 6 minutes
    python bench/cluster.py --quick     # about 2 minutes
    python bench/cluster.py --help

Results: bench/results/cluster.md and cluster.json; node logs in bench/results/raw/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # the runner's helpers
    DISTURBED,
    HOST,
    LOADGEN_CPU,
    RESULTS,
    ROOT,
    SERVER_CPU,
    background_load,
    free_port,
    machine,
    pin,
    raise_nofile,
    stop,
    wait_for_port,
    wait_for_quiet,
)

sys.path.insert(0, str(ROOT))

from tests.postgres import Postgres, sql

APP = "bench.apps.cluster_bench:app"
#: The short lease of the failover case, and the defaults of `sockworker serve --cluster`.
FAST_LEASE, FAST_RENEW = 2.0, 0.4
DEFAULT_LEASE, DEFAULT_RENEW = 10.0, 3.0
PAYLOAD = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: How often the failover client sends.
FAILOVER_SEND_EVERY = 0.01
#: How long past its lease a frozen owner's object may take to answer again before the
#: measurement gives up on it (longer than a forwarded event's 30 s timeout).
FROZEN_WAIT = 60.0
#: Seconds within which every PostgreSQL backend has reported its transactions.
PG_STATS_LAG = 11.0


# -- processes ------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(root: int) -> float:
    """utime + stime of `root` and its live descendants (PostgreSQL's backends), seconds."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    family, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        family.update(children)
        frontier += children
    total = 0.0
    for pid in family:
        with contextlib.suppress(OSError):
            total += proc_cpu(pid)
    return total


def process_ticks() -> int:
    """Clock ticks all CPUs spent in processes (user, nice, system; not interrupts, where the
    kernel does loopback networking without charging it to a process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[0]) + int(fields[1]) + int(fields[2])


class Node:
    """One `sockworker serve --cluster` process, pinned to the nodes' CPU."""

    def __init__(
        self, name: str, dsn: str, lease: tuple[float, float] | None, data: Path, log: IO[bytes],
        pinned: bool,
    ) -> None:  # fmt: skip
        self.name = name
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "sockworker", "serve", APP, "--host", HOST,
            "--port", str(self.port), "--cluster", dsn, "--node-id", name,
            "--data-dir", str(data / name), "--log-level", "warning",
        ]  # fmt: skip
        if lease is not None:
            cmd += ["--lease", str(lease[0]), "--lease-renew", str(lease[1])]
        self.proc = subprocess.Popen(
            pin(SERVER_CPU, cmd, pinned),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "SW_BENCH_NODE": name},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def ready(self) -> None:
        problem = wait_for_port(self.port, self.proc, timeout=60)
        if problem:
            self.stop()
            raise RuntimeError(f"node {self.name}: {problem}")

    def url(self, query: str, scheme: str = "ws") -> str:
        return f"{scheme}://{HOST}:{self.port}/?{query}"

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def kill(self, how: signal.Signals = signal.SIGKILL) -> None:
        os.kill(self.proc.pid, how)
        if how == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop(self.proc)


def start_nodes(
    names: list[str], dsn: str, lease: tuple[float, float] | None, data: Path, log: IO[bytes],
    pinned: bool,
) -> list[Node]:  # fmt: skip
    nodes = [Node(name, dsn, lease, data, log, pinned) for name in names]
    try:
        for node in nodes:
            node.ready()
    except Exception:
        for node in nodes:
            node.stop()
        raise
    return nodes


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def own(node: Node, room: str, mode: str) -> None:
    """Makes `node` the owner of the room: the first node to reach an object takes its lease."""
    answer = http_get(node.url(f"room={room}&mode={mode}", "http"))
    if answer != node.name:
        raise RuntimeError(f"room {room} is owned by {answer!r}, not {node.name}")


# -- a small WebSocket client ---------------------------------------------------------------------


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client frame (FIN, masked), made once and sent as often as needed: the server does not
    care that the mask repeats, and the client then costs one write per message."""
    assert len(payload) < 126
    key = os.urandom(4)
    masked = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + masked


CLOSE_FRAME = masked_frame((1000).to_bytes(2, "big"), 0x8)
#: What the nodes send the clients: unmasked text frames of PAYLOAD bytes (of one repeated
#: letter, so the header's two bytes never occur inside a payload).
DATA_HEADER = bytes([0x81, PAYLOAD])
DATA_FRAME = PAYLOAD + 2


class Tally:
    """Data frames received by a group of connections, and a waiter for a threshold."""

    def __init__(self) -> None:
        self.total = 0
        self.threshold = 0
        self.waiter: asyncio.Future[None] | None = None

    def add(self, frames: int) -> None:
        self.total += frames
        waiter = self.waiter
        if waiter is not None and self.total >= self.threshold and not waiter.done():
            waiter.set_result(None)

    async def reach(self, threshold: int, within: float) -> bool:
        if self.total >= threshold:
            return True
        self.threshold = threshold
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, within)
            return True
        except TimeoutError:
            return False
        finally:
            self.waiter = None


class RawClient(asyncio.Protocol):
    """A WebSocket client connection that counts the data frames it receives (into a Tally) and,
    in ping-pong, sends the next message as each echo arrives. Answers pings; never compresses."""

    def __init__(self, path: str, tally: Tally, pingpong: bytes | None = None) -> None:
        self.path = path
        self.tally = tally
        self.pingpong = pingpong
        self.running = False
        # (uvloop's transports are not asyncio.Transport subclasses.)
        self.transport: Any = None
        self.head: bytearray | None = bytearray()
        self.buf = bytearray()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.errors = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .encode()
        )  # fmt: skip

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status, rest = bytes(self.head[:end]), self.head[end + 4 :]
            self.head = None
            if not status.startswith(b"HTTP/1.1 101"):
                if not self.opened.done():
                    self.opened.set_exception(RuntimeError(status.split(b"\r\n")[0].decode()))
                return
            if not self.opened.done():
                self.opened.set_result(None)
            if not rest:
                return
            data = bytes(rest)
        buf = self.buf
        if (
            not buf
            and len(data) == data.count(DATA_HEADER) * DATA_FRAME
            and data[:2] == DATA_HEADER
        ):
            # The common read: whole frames of the expected message and nothing else (checked at
            # C speed), so that the client costs far less per message than the nodes.
            frames = len(data) // DATA_FRAME
            self.tally.add(frames)
            if self.running and self.pingpong is not None and self.transport is not None:
                self.transport.write(self.pingpong * frames)
            return
        buf += data
        pos, size, frames = 0, len(buf), 0
        while size - pos >= 2:
            length = buf[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            end = pos + header + length
            if end > size:
                break
            opcode = buf[pos] & 0x0F
            if opcode in (0x1, 0x2):
                frames += 1
                if length != PAYLOAD:
                    self.errors += 1
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(masked_frame(bytes(buf[pos + header : end]), 0xA))
            elif opcode == 0x8 and self.transport is not None:
                self.transport.close()
            pos = end
        del buf[:pos]
        if frames:
            self.tally.add(frames)
            if self.running and self.pingpong is not None and self.transport is not None:
                # One echo per message in flight: each echo sends the next message.
                self.transport.write(self.pingpong * frames)

    def start(self) -> None:
        self.running = True
        if self.pingpong is not None and self.transport is not None:
            self.transport.write(self.pingpong)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(f"connection lost: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)

    async def close(self) -> None:
        self.running = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(CLOSE_FRAME)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), 5)
        self.transport.close()


async def open_clients(
    targets: list[tuple[Node, str]], tally: Tally, pingpong: bytes | None = None
) -> list[RawClient]:
    """Opens one RawClient per (node, query), a few at a time (a burst of handshakes through a
    node that forwards each to the owner would only measure the burst)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(16)

    async def one(node: Node, query: str) -> RawClient:
        async with gate:
            client = RawClient(f"/?{query}", tally, pingpong)
            await loop.create_connection(lambda: client, HOST, node.port)
            await asyncio.wait_for(client.opened, 30)
            return client

    return list(await asyncio.gather(*(one(node, query) for node, query in targets)))


async def close_clients(clients: list[RawClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


# -- measurement windows ----------------------------------------------------------------------


@dataclass
class Window:
    """CPU of every node, of PostgreSQL and of this process, and the time, at one instant."""

    wall: float
    nodes: dict[str, float]
    postgres: float
    client: float
    busy: float  # every CPU of the machine in processes (user, nice, system), seconds

    @classmethod
    def now(cls, nodes: list[Node], pg_pid: int | None) -> Window:
        return cls(
            time.perf_counter(),
            {node.name: node.cpu() for node in nodes},
            tree_cpu(pg_pid) if pg_pid else 0.0,
            time.process_time(),
            process_ticks() / CLK_TCK,
        )


def window_figures(before: Window, after: Window, events: int) -> dict[str, Any]:
    seconds = after.wall - before.wall
    node_cpu = {name: after.nodes[name] - before.nodes[name] for name in before.nodes}
    total = sum(node_cpu.values())
    postgres = after.postgres - before.postgres
    client = after.client - before.client
    return {
        "seconds": seconds,
        "events": events,
        "per_s": events / seconds,
        "node_cpu_s": node_cpu,
        "node_cores": total / seconds,
        "node_cpu_us_per_event": total / events * 1e6 if events else None,
        "postgres_cores": postgres / seconds,
        "client_cores": client / seconds,
        # Whatever other processes used meanwhile (other sessions' work, mostly).
        "other_cores": max(0.0, (after.busy - before.busy) - total - postgres - client) / seconds,
    }


async def measured(what: str, run: Any, attempts: int) -> dict[str, Any]:
    """`run()` (a coroutine function giving window figures), again (up to `attempts` in all)
    while other work used more than DISTURBED cores during its window."""
    for attempt in range(1, attempts + 1):
        wait_for_quiet(5)
        seen = conditions()
        figures: dict[str, Any] = await run()
        figures.update(seen, attempts=attempt)
        if figures["other_cores"] <= DISTURBED:
            break
        print(f"  ({what}: other work used {figures['other_cores']:.2f} cores; "
              f"{'again' if attempt < attempts else 'kept'})", flush=True)  # fmt: skip
    return figures


def conditions() -> dict[str, Any]:
    """The machine's load average and the cores other work kept busy, just before a measurement
    (our idle nodes are part of the latter: a few renewal rounds a second)."""
    return {"loadavg": list(os.getloadavg()), "background": background_load(0.3)}


async def pingpong(
    nodes: list[Node], owner: Node, at: list[Node], clients: int, room: str, warmup: float,
    duration: float, pg_pid: int | None,
) -> dict[str, Any]:  # fmt: skip
    """`clients` connections spread over `at`, each sending a message as its echo arrives."""
    own(owner, room, "echo")
    tally = Tally()
    frame = masked_frame(b"p" * PAYLOAD)
    query = f"room={room}&mode=echo"
    conns = await open_clients(
        [(at[i % len(at)], query) for i in range(clients)], tally, pingpong=frame
    )
    try:
        for conn in conns:
            conn.start()
        await asyncio.sleep(warmup)
        start_count, before = tally.total, Window.now(nodes, pg_pid)
        await asyncio.sleep(duration)
        after, end_count = Window.now(nodes, pg_pid), tally.total
    finally:
        await close_clients(conns)
    figures = window_figures(before, after, end_count - start_count)
    figures["errors"] = sum(conn.errors for conn in conns)
    return figures


async def broadcast(
    nodes: list[Node], owner: Node, publisher_at: Node, subscribers_at: list[Node],
    subscribers: int, room: str, window: int, warmup: float, duration: float, pg_pid: int | None,
) -> dict[str, Any]:  # fmt: skip
    """`subscribers` connections spread over `subscribers_at` and one publisher; the publisher
    keeps at most `window` messages whose broadcast has not reached every subscriber."""
    from websockets.asyncio.client import connect

    own(owner, room, "broadcast")
    tally = Tally()
    query = f"room={room}&mode=broadcast"
    subs = await open_clients(
        [(subscribers_at[i % len(subscribers_at)], query) for i in range(subscribers)], tally
    )
    stalls = 0
    try:
        async with connect(
            publisher_at.url(query), compression=None, ping_interval=None, max_queue=None
        ) as publisher:
            message = "b" * PAYLOAD

            async def drain() -> None:  # (its own copy of each broadcast)
                with contextlib.suppress(Exception):
                    async for _ in publisher:
                        pass

            drainer = asyncio.create_task(drain())
            # Every subscriber is known to the object (on whichever node) before the clock runs.
            await publisher.send(message)
            if not await tally.reach(subscribers, 30):
                raise RuntimeError(
                    f"{tally.total} of {subscribers} subscribers got the first message"
                )
            sent = 1
            stop_at = time.perf_counter() + warmup + duration
            before: Window | None = None
            start_count = 0
            measure_at = time.perf_counter() + warmup
            while True:
                now = time.perf_counter()
                if before is None and now >= measure_at:
                    start_count, before = tally.total, Window.now(nodes, pg_pid)
                if now >= stop_at:
                    break
                if not await tally.reach((sent - window) * subscribers, 5):
                    stalls += 1
                    # Some deliveries went missing: carry on from what arrived.
                    sent = tally.total // subscribers + window
                await publisher.send(message)
                sent += 1
            after, end_count = Window.now(nodes, pg_pid), tally.total
            drainer.cancel()
    finally:
        await close_clients(subs)
    assert before is not None
    figures = window_figures(before, after, end_count - start_count)
    figures["stalls"] = stalls
    figures["errors"] = sum(sub.errors for sub in subs)
    return figures


async def failover_once(
    nodes: list[Node], room: str, lease: tuple[float, float], freeze: bool = False
) -> dict[str, Any]:
    """nodes[0] owns the room, a client on nodes[1] sends every 10 ms; nodes[0] is killed (or,
    with `freeze`, stopped with SIGSTOP, as a machine that stops answering without closing its
    connections; it is killed once the measurement is over)."""
    from websockets.asyncio.client import connect

    owner, holder = nodes[0], nodes[1]
    own(owner, room, "node")
    replies: list[tuple[float, str, int]] = []
    sent: dict[int, float] = {}
    new_owner: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    killed_at = 0.0
    bound = lease[0] + 2 * lease[1] + (FROZEN_WAIT if freeze else 30)
    first: float | None = None
    async with connect(
        holder.url(f"room={room}&mode=node"), compression=None, max_queue=None
    ) as ws:

        async def send() -> None:
            for seq in range(1_000_000):
                sent[seq] = time.perf_counter()
                await ws.send(str(seq))
                await asyncio.sleep(FAILOVER_SEND_EVERY)

        async def receive() -> None:
            async for message in ws:
                node, seq = str(message).split()
                now = time.perf_counter()
                replies.append((now, node, int(seq)))
                if node != owner.name and killed_at and not new_owner.done():
                    new_owner.set_result(now)

        sender = asyncio.create_task(send())
        receiver = asyncio.create_task(receive())
        try:
            for _ in range(1000):
                if sum(node == owner.name for _, node, _ in replies) >= 20:
                    break
                await asyncio.sleep(0.01)
            else:
                raise RuntimeError("no steady echoes from the owner")
            # Somewhere in the owner's renewal round, not at a fixed phase of it.
            await asyncio.sleep(random.uniform(0, lease[1]))
            killed_at = time.perf_counter()
            owner.kill(signal.SIGSTOP if freeze else signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                first = await asyncio.wait_for(asyncio.shield(new_owner), bound)
            await asyncio.sleep(0.5)
            # (Before a frozen owner is killed: its death would let the held messages go again.)
            answered = {seq for _, _, seq in replies}
            answers = len(replies)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if freeze:
                owner.kill(signal.SIGKILL)
        await ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(receiver, 5)
    until = first if first is not None else killed_at + bound
    sent_before_first = [seq for seq, at in sent.items() if at < until]
    new = next((node for _, node, _ in replies if node != owner.name), None)
    return {
        # None: no echo from a new owner within `bound` seconds.
        "seconds": first - killed_at if first is not None else None,
        "bound_s": bound,
        "new_owner": new,
        "sent_before_recovery": len(sent_before_first),
        "unanswered": sum(seq not in answered for seq in sent_before_first),
        "answered_twice": answers - len(answered),
    }


async def failover(
    dsn: str, lease: tuple[float, float] | None, reps: int, tag: str, data: Path,
    log: IO[bytes], pinned: bool, freeze: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """`reps` kills of the owner; the survivors stay, the owner is a fresh process each time."""
    effective = lease or (DEFAULT_LEASE, DEFAULT_RENEW)
    nodes = start_nodes(["n0", "n1", "n2"], dsn, lease, data, log, pinned)
    results = []
    try:
        for rep in range(reps):
            result = await failover_once(nodes, f"fo-{tag}-{rep}", effective, freeze)
            results.append(result)
            print(f"  failover {tag} {rep + 1}/{reps}: {fmt(result['seconds'], 2)} s "
                  f"(new owner {result['new_owner']}, {result['unanswered']} unanswered)",
                  flush=True)  # fmt: skip
            if rep + 1 < reps:
                nodes[0] = Node("n0", dsn, lease, data, log, pinned)
                nodes[0].ready()
    finally:
        for node in nodes:
            node.stop()
    return results


# -- PostgreSQL ---------------------------------------------------------------------------------


def start_postgres() -> tuple[Postgres, bool]:
    """The harness's throwaway server, with pg_stat_statements loaded for this run (ALTER SYSTEM
    in its own data directory: the harness's defaults stay as the tests use them). False when
    the module cannot be loaded: then only pg_stat_database's transactions are reported."""
    pg = Postgres()
    pg.start()
    available = sql(
        pg.dsn(), "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
    )[0][0]
    if not available:
        print("pg_stat_statements is not installed: counting transactions only", flush=True)
        return pg, False
    sql(pg.dsn(), "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    pg.restart()
    sql(pg.dsn(), "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return pg, True


def postmaster(pg: Postgres) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((pg.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    return None


@dataclass
class PgCounters:
    """What PostgreSQL counted for one database: statements by text, and transactions."""

    statements: dict[str, tuple[int, float]] = field(default_factory=dict)  # calls, total ms
    xacts: int = 0

    @classmethod
    def read(cls, pg: Postgres, dbname: str, pgss: bool) -> PgCounters:
        # From the `postgres` database: these queries are not counted in `dbname`'s figures.
        counters = cls()
        xacts = sql(
            pg.dsn(),
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            dbname,
        )
        counters.xacts = int(xacts[0][0]) if xacts else 0
        if pgss:
            rows = sql(
                pg.dsn(),
                "SELECT query, sum(calls), sum(total_exec_time) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s) GROUP BY query",
                dbname,
            )
            counters.statements = {query: (int(calls), float(ms)) for query, calls, ms in rows}
        return counters

    def since(self, before: PgCounters) -> tuple[int, dict[str, tuple[int, float]]]:
        delta = {}
        for query, (calls, ms) in self.statements.items():
            old_calls, old_ms = before.statements.get(query, (0, 0.0))
            if calls > old_calls:
                delta[query] = (calls - old_calls, ms - old_ms)
        return self.xacts - before.xacts, delta


def short(query: str) -> str:
    """A statement's first words, for the table."""
    words = " ".join(query.split())
    return words if len(words) <= 60 else words[:57] + "..."


async def resident_objects(node: Node, objects: int, first: int = 0) -> float:
    """One HTTP request to each of `objects` objects (`first` on) of a class that never
    hibernates (made resident by it when new); returns the seconds it took."""
    import aiohttp

    started = time.perf_counter()
    queue = iter(range(first, first + objects))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            async with session.get(node.url(f"room=idle-{i}&mode=echo", "http")) as response:
                body = await response.text()
                if response.status != 200 or body != node.name:
                    raise RuntimeError(f"object idle-{i}: {response.status} {body[:200]}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(16)))
    return time.perf_counter() - started


async def postgres_load(
    pg: Postgres, pgss: bool, objects: int, idle: float, data: Path, log: IO[bytes], pinned: bool
) -> dict[str, Any]:
    """One node with the default lease holds `objects` resident objects and does nothing else."""
    dsn = pg.create_database()
    dbname = dsn.rsplit("/", 1)[1]
    (node,) = start_nodes(["solo"], dsn, None, data, log, pinned)
    pg_pid = postmaster(pg)
    try:
        load_start, load_start_cpu = PgCounters.read(pg, dbname, pgss), node.cpu()
        loading = await resident_objects(node, objects)
        load_end_cpu = node.cpu()
        # The same requests to objects already resident here (their leases held): what the
        # first request's lease and load added.
        again = min(objects, 2000)
        again_cpu = node.cpu()
        again_s = await resident_objects(node, again)
        again_cpu = node.cpu() - again_cpu
        # A backend reports its transactions to pg_stat_database at most once a second, and an
        # idle one up to 10 s later (PGSTAT_IDLE_INTERVAL): the loading's must be in before the
        # window opens.
        await asyncio.sleep(PG_STATS_LAG)
        before = PgCounters.read(pg, dbname, pgss)
        window_start = Window.now([node], pg_pid)
        await asyncio.sleep(idle)
        window_end = Window.now([node], pg_pid)
        after = PgCounters.read(pg, dbname, pgss)
        held = sql(
            dsn,
            "SELECT count(*) FROM sw_lease_status WHERE node = 'solo' AND live",
        )[0][0]
    finally:
        node.stop()
    seconds = window_end.wall - window_start.wall
    load_xacts, load_statements = before.since(load_start)
    xacts, statements = after.since(before)
    calls = sum(c for c, _ in statements.values())
    renewals = {q: v for q, v in statements.items() if "UPDATE sw_nodes n SET" in q}
    rounds = sum(c for c, _ in renewals.values())
    renew_ms = sum(ms for _, ms in renewals.values())
    return {
        "objects": objects,
        "held_after": int(held),
        "loading_s": loading,
        "loading_statements": sum(c for c, _ in load_statements.values()) if pgss else None,
        "loading_by_statement": {
            short(q): {"calls": c, "mean_ms": ms / c}
            for q, (c, ms) in sorted(load_statements.items())
        },
        "loading_node_cpu_s": load_end_cpu - load_start_cpu,
        "resident_requests": again,
        "resident_requests_s": again_s,
        "resident_node_cpu_s": again_cpu,
        "loading_xacts": load_xacts,
        "idle_s": seconds,
        "statements": calls if pgss else None,
        "statements_per_s": calls / seconds if pgss else None,
        "xacts": xacts,
        "xacts_per_s": xacts / seconds,
        "rounds": rounds if pgss else None,
        "statements_per_round": calls / rounds if rounds else None,
        "renewal_ms": renew_ms / rounds if rounds else None,
        "by_statement": {short(q): c for q, (c, _) in sorted(statements.items())},
        "node_cpu_s": sum(window_end.nodes.values()) - sum(window_start.nodes.values()),
        "postgres_cores": (window_end.postgres - window_start.postgres) / seconds,
    }


# -- the run --------------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


PINGPONG_CASES = {
    "a": "all clients on the owner",
    "b": "all clients on the 2 other nodes",
}
BROADCAST_CASES = {
    "a": "all subscribers and the publisher on the owner",
    "b": "a third of the subscribers on each node, publisher on the owner",
    "c": "a third of the subscribers on each node, publisher on another node",
}


async def main_async(args: argparse.Namespace) -> int:
    pinned = not args.no_pin
    parts = {int(part) for part in args.parts.split(",") if part}
    raise_nofile()
    info = machine()  # (before pinning: it counts the CPUs this process may use)
    if pinned:
        # The clients, and PostgreSQL (started from here, it inherits this), on the other core.
        os.sched_setaffinity(0, {int(LOADGEN_CPU)})
    started = time.perf_counter()
    raw = RESULTS / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {"pingpong": {}, "broadcast": {}, "failover": {}, "postgres": None}
    pg, pgss = start_postgres()
    with (
        pg,
        tempfile.TemporaryDirectory(prefix="sw-bench-cluster-") as tmp,
        (raw / "cluster-nodes.log").open("wb") as log,
    ):
        data = Path(tmp)
        pg_pid = postmaster(pg)
        dsn = pg.create_database()
        print(f"PostgreSQL {pg.bindir} on port {pg.port}; pg_stat_statements: {pgss}", flush=True)

        # 1 and 2: one set of three nodes, rounds interleaved.
        nodes = start_nodes(["n0", "n1", "n2"], dsn, (FAST_LEASE, FAST_RENEW), data, log, pinned)
        owner, others = nodes[0], nodes[1:]
        try:
            for rnd in range(args.rounds if parts & {1, 2} else 0):
                print(f"round {rnd + 1}/{args.rounds}", flush=True)
                for case, at in (("a", [owner]), ("b", others)) if 1 in parts else ():
                    room = f"pp-{case}-{rnd}"
                    figures = await measured(
                        f"pingpong {case}",
                        lambda at=at, room=room: pingpong(
                            nodes, owner, at, args.clients, room, args.warmup, args.duration,
                            pg_pid,
                        ),
                        args.attempts,
                    )  # fmt: skip
                    runs["pingpong"].setdefault(case, []).append(figures)
                    print(f"  pingpong {case}: {figures['per_s']:,.0f} msgs/s, "
                          f"{figures['node_cpu_us_per_event']:.1f} µs node CPU/msg, "
                          f"client {figures['client_cores']:.2f} cores", flush=True)  # fmt: skip
                layouts = {
                    "a": (owner, [owner]),
                    "b": (owner, nodes),
                    "c": (others[0], nodes),
                }
                for case, (publisher_at, subscribers_at) in layouts.items() if 2 in parts else ():
                    room = f"bc-{case}-{rnd}"
                    figures = await measured(
                        f"broadcast {case}",
                        lambda p=publisher_at, s=subscribers_at, room=room: broadcast(
                            nodes, owner, p, s, args.subscribers, room, args.window,
                            args.warmup, args.duration, pg_pid,
                        ),
                        args.attempts,
                    )  # fmt: skip
                    runs["broadcast"].setdefault(case, []).append(figures)
                    print(f"  broadcast {case}: {figures['per_s']:,.0f} deliveries/s, "
                          f"{figures['node_cpu_us_per_event']:.2f} µs node CPU/delivery, "
                          f"client {figures['client_cores']:.2f} cores", flush=True)  # fmt: skip
        finally:
            for node in nodes:
                node.stop()

        # 3: failover, each with its own nodes.
        if 3 in parts:
            print("failover", flush=True)
            runs["failover"]["fast"] = await failover(
                dsn, (FAST_LEASE, FAST_RENEW), args.failovers, "fast", data, log, pinned
            )
            if args.default_failovers:
                runs["failover"]["default"] = await failover(
                    dsn, None, args.default_failovers, "default", data, log, pinned
                )
            if args.frozen_failovers:
                runs["failover"]["frozen"] = await failover(
                    dsn, (FAST_LEASE, FAST_RENEW), args.frozen_failovers, "frozen", data, log,
                    pinned, freeze=True,
                )  # fmt: skip

        # 4: an idle node's statements.
        if 4 in parts:
            print(f"PostgreSQL load: {args.objects:,} resident objects, {args.idle:g} s idle",
                  flush=True)  # fmt: skip
            pgl = await postgres_load(pg, pgss, args.objects, args.idle, data, log, pinned)
            runs["postgres"] = pgl
            print(f"  {fmt(pgl['statements_per_s'], 2)} statements/s, "
                  f"{pgl['xacts_per_s']:.2f} transactions/s", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - started
    summary = summarize(runs)
    text = markdown(args, info, runs, summary, pgss, elapsed)
    (RESULTS / "cluster.md").write_text(text)
    (RESULTS / "cluster.json").write_text(
        json.dumps(
            {"machine": info, "args": vars(args), "runs": runs, "summary": summary}, indent=1
        )
    )
    print(text)
    return 0


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"pingpong": {}, "broadcast": {}, "failover": {}}
    for kind in ("pingpong", "broadcast"):
        for case, rows in runs[kind].items():
            summary[kind][case] = {
                key: median([row[key] for row in rows])
                for key in ("per_s", "node_cpu_us_per_event", "node_cores", "client_cores",
                            "postgres_cores")
            }  # fmt: skip
        base = runs[kind].get("a", [])
        for case, rows in runs[kind].items():
            # Within each round: this case against case (a) of the same round.
            pairs = list(zip(rows, base, strict=False))
            summary[kind][case]["ratio_per_s"] = median(
                [row["per_s"] / a["per_s"] for row, a in pairs]
            )
            summary[kind][case]["ratio_cpu"] = median(
                [
                    row["node_cpu_us_per_event"] / a["node_cpu_us_per_event"]
                    for row, a in pairs
                    if row["node_cpu_us_per_event"] and a["node_cpu_us_per_event"]
                ]
            )
    for kind, reps in runs["failover"].items():
        # A failover that did not happen within the bound counts as the bound (a lower bound).
        seconds = [rep["seconds"] if rep["seconds"] is not None else rep["bound_s"] for rep in reps]
        summary["failover"][kind] = {
            "reps": len(seconds),
            "median_s": statistics.median(seconds),
            "worst_s": max(seconds),
            "best_s": min(seconds),
            "timed_out": sum(rep["seconds"] is None for rep in reps),
            "unanswered": sum(rep["unanswered"] for rep in reps),
            "sent_before_recovery": sum(rep["sent_before_recovery"] for rep in reps),
            "answered_twice": sum(rep["answered_twice"] for rep in reps),
        }
    return summary


def markdown(
    args: argparse.Namespace, info: dict[str, str], runs: dict[str, Any], summary: dict[str, Any],
    pgss: bool, elapsed: float,
) -> str:  # fmt: skip
    command = "python bench/cluster.py" + (" --quick" if args.quick else "")
    lines = [
        "# Cluster benchmark",
        "",
        f"Measured {info['date']} on {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, sockworker at {info['commit']}; `{command}`, {elapsed:.0f} s. "
        f"Nodes (`sockworker serve --cluster`) on CPU 0; the clients (this script: Python asyncio, "
        f"their CPU not counted) and PostgreSQL on CPU 1. {args.rounds} interleaved rounds of "
        f"{args.duration:g} s (after {args.warmup:g} s of warm-up); medians over rounds; ratios "
        "within each round, then their median. Node CPU is utime + stime of every node process "
        "(/proc/PID/stat, 10 ms ticks) over the window, divided by the messages (deliveries) in "
        "it.",
        "",
        f"## 1. Forwarding cost: {args.clients} clients ping-pong {PAYLOAD} B on one room, "
        "3 nodes (lease 2 s, renewal 0.4 s)",
        "",
        "| case | msgs/s | node CPU µs/msg | nodes' cores | client cores | msgs/s vs (a) "
        "| CPU/msg vs (a) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for case, label in PINGPONG_CASES.items():
        med = summary["pingpong"].get(case)
        if med is None:
            continue
        lines.append(
            f"| ({case}) {label} | {fmt(med['per_s'])} | {fmt(med['node_cpu_us_per_event'], 1)} | "
            f"{fmt(med['node_cores'], 2)} | {fmt(med['client_cores'], 2)} | "
            f"{fmt(med['ratio_per_s'], 2)} | {fmt(med['ratio_cpu'], 2)} |"
        )
    ratio = summary["pingpong"].get("b", {}).get("ratio_cpu")
    if ratio is not None:
        lines += [
            "",
            f"**Forwarding adds {100 * (ratio - 1):.0f}% node CPU per message** (median of the "
            f"rounds' (b) / (a); the goal is at most 30%). Node CPU per message by node, "
            "each round (owner n0; µs):",
            "",
        ]
        for case in PINGPONG_CASES:
            for rnd, row in enumerate(runs["pingpong"].get(case, [])):
                split = ", ".join(
                    f"{name} {cpu / row['events'] * 1e6:.1f}"
                    for name, cpu in row["node_cpu_s"].items()
                )
                lines.append(f"- ({case}) round {rnd + 1}: {split}")
    lines += [
        "",
        f"## 2. Broadcast: {args.subscribers} subscribers and one publisher on one room, "
        f"{PAYLOAD} B, at most {args.window} broadcasts in flight",
        "",
        "| case | deliveries/s | node CPU µs/delivery | nodes' cores | client cores "
        "| deliveries/s vs (a) | CPU/delivery vs (a) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for case, label in BROADCAST_CASES.items():
        med = summary["broadcast"].get(case)
        if med is None:
            continue
        lines.append(
            f"| ({case}) {label} | {fmt(med['per_s'])} | {fmt(med['node_cpu_us_per_event'], 2)} | "
            f"{fmt(med['node_cores'], 2)} | {fmt(med['client_cores'], 2)} | "
            f"{fmt(med['ratio_per_s'], 2)} | {fmt(med['ratio_cpu'], 2)} |"
        )
    stalls = sum(row["stalls"] for rows in runs["broadcast"].values() for row in rows)
    errors = sum(row["errors"] for kind in ("pingpong", "broadcast")
                 for rows in runs[kind].values() for row in rows)  # fmt: skip
    lines += [
        "",
        f"Broadcasts that did not reach every subscriber within 5 s: {stalls}; frames of an "
        f"unexpected size: {errors}.",
        "",
        "## 3. Failover: the owner killed (SIGKILL; or frozen, SIGSTOP) while a client on another "
        "node sends every "
        f"{FAILOVER_SEND_EVERY * 1000:.0f} ms; kill → first echo from the new owner",
        "",
        "| lease / renewal | kills | median | best | worst | bound (lease + poll) "
        "| sent before recovery | never answered | answered twice |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    kinds = (
        ("fast", FAST_LEASE, FAST_RENEW, "", "--failovers"),
        ("default", DEFAULT_LEASE, DEFAULT_RENEW, " (the defaults)", "--default-failovers"),
        ("frozen", FAST_LEASE, FAST_RENEW, ", owner frozen (SIGSTOP)", "--frozen-failovers"),
    )
    for kind, lease, renew, what, flag in kinds:
        bound = lease + min(renew / 2, 0.25)
        med = summary["failover"].get(kind)
        label = f"{lease:g} s / {renew:g} s{what}"
        if med is None:
            lines.append(
                f"| {label} | not measured (`{flag} 0`) | — | — | — | {bound:.2f} s | — | — | — |"
            )
            continue
        over = "≥ " if med["timed_out"] else ""
        lines.append(
            f"| {label} | {med['reps']} | {med['median_s']:.2f} s | {med['best_s']:.2f} s | "
            f"{over}{med['worst_s']:.2f} s | {bound:.2f} s | {med['sent_before_recovery']} | "
            f"{med['unanswered']} | {med['answered_twice']} |"
        )
    timed_out = sum(med["timed_out"] for med in summary["failover"].values())
    lines += [
        "",
        "The bound: a lease is renewed at the start of each round, so a dead owner's lease expires "
        "between (lease - renewal) and lease after the kill; the node holding the socket retries "
        "every min(renewal / 2, 0.25 s) until it can take the object. Each kill is a fresh owner "
        "process and a fresh room; the two other nodes stay up. A frozen owner (SIGSTOP: its "
        "connections stay open, as with a machine that stops answering) is killed after the "
        f"measurement. Failovers with no echo from a new owner within the wait: {timed_out} "
        '(counted as the wait, marked ≥). "Never answered": messages sent before the first '
        "echo from the new owner that got no echo within 0.5 s after it.",
    ]
    pgl = runs["postgres"]
    if pgl is None:
        lines += ["", "## 4. PostgreSQL load: not measured (`--parts`)"]
    else:
        lines += postgres_lines(pgl, pgss)
    lines += conditions_lines(runs)
    return "\n".join(lines) + "\n"


def postgres_lines(pgl: dict[str, Any], pgss: bool) -> list[str]:
    acquire = next(
        (v for q, v in pgl["loading_by_statement"].items() if q.startswith("WITH me AS")), None
    )
    lines = [
        "",
        f"## 4. PostgreSQL load of an idle node with {pgl['objects']:,} resident objects "
        f"(lease {DEFAULT_LEASE:g} s, renewal every {DEFAULT_RENEW:g} s: the defaults)",
        "",
        "| measured by PostgreSQL over the idle window | value |",
        "|---|--:|",
        f"| idle window | {pgl['idle_s']:.1f} s |",
        f"| leases held (still valid) at the end | {pgl['held_after']:,} |",
        f"| statements/s (pg_stat_statements calls) | {fmt(pgl['statements_per_s'], 2)} |",
        f"| renewal rounds in the window | {fmt(pgl['rounds'])} |",
        f"| statements per round | {fmt(pgl['statements_per_round'], 2)} |",
        f"| transactions/s (pg_stat_database xact_commit + xact_rollback) | "
        f"{fmt(pgl['xacts_per_s'], 2)} |",
        f"| renewal statement, execution time per round ({pgl['objects']:,} leases) | "
        f"{fmt(pgl['renewal_ms'], 1)} ms |",
        f"| node CPU over the window | {pgl['node_cpu_s'] / pgl['idle_s'] * 100:.2f}% of a core |",
        f"| PostgreSQL CPU over the window | {pgl['postgres_cores'] * 100:.2f}% of a core |",
        f"| making the objects resident (1 HTTP request each, 16 at a time) | "
        f"{pgl['loading_s']:.1f} s, {fmt(pgl['loading_statements'])} statements, "
        f"{fmt(pgl['loading_xacts'])} transactions |",
        f"| node CPU per object made resident (its first request) | "
        f"{pgl['loading_node_cpu_s'] / pgl['objects'] * 1e6:,.0f} µs |",
        f"| the same request to an object already resident ({pgl['resident_requests']:,}: "
        f"{pgl['resident_requests_s']:.1f} s) | "
        f"{pgl['resident_node_cpu_s'] / pgl['resident_requests'] * 1e6:,.0f} µs |",
        f"| taking a lease (the statement's execution time in PostgreSQL, mean) | "
        f"{fmt(acquire['mean_ms'] if acquire else None, 3)} ms |",
        "",
        "Statements in the idle window, by text: "
        + "; ".join(f"`{q}`: {c}" for q, c in pgl["by_statement"].items())
        + ".",
    ]
    if not pgss:
        lines.append("(pg_stat_statements could not be loaded: transactions only.)")
    return lines


def conditions_lines(runs: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Conditions of each measurement: load average (1, 5, 15 min) and the cores busy just "
        "before it (bg: other work and our idle nodes), then the cores other work used during "
        f"its window (other; over {DISTURBED} it was measured again, up to `--attempts` times):",
        "",
    ]
    for kind in ("pingpong", "broadcast"):
        for case, rows in runs[kind].items():
            parts = [
                f"r{i + 1}: {' '.join(f'{v:.2f}' for v in row['loadavg'])}, "
                f"bg {fmt(row['background'], 2)}, other {row['other_cores']:.2f}"
                + (f" (attempt {row['attempts']})" if row["attempts"] > 1 else "")
                for i, row in enumerate(rows)
            ]
            lines.append(f"- {kind} ({case}): " + "; ".join(parts))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 2 s, 3 failovers at the short lease and none at the default "
                    "(its bound is given), 10 s idle")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--clients", type=int, default=50, help="ping-pong connections")
    ap.add_argument("--subscribers", type=int, default=300)
    ap.add_argument("--window", type=int, default=16, help="broadcasts in flight")
    ap.add_argument("--failovers", type=int, default=None, help="kills at lease 2 s / renew 0.4 s")
    ap.add_argument("--default-failovers", type=int, default=None,
                    help="kills at the default lease 10 s / renew 3 s")  # fmt: skip
    ap.add_argument(
        "--frozen-failovers",
        type=int,
        default=None,
        help="owners stopped with SIGSTOP instead of killed (lease 2 s / renew 0.4 s)",
    )
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--idle", type=float, default=None, help="seconds of the idle window")
    ap.add_argument("--parts", default="1,2,3,4", help="which of the four measurements to run")
    ap.add_argument("--attempts", type=int, default=None,
                    help="measure again (up to this many times) while other work used more than "
                    f"{DISTURBED} cores")  # fmt: skip
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    quick = {"rounds": 1, "duration": 2.0, "failovers": 3, "default_failovers": 0,
             "frozen_failovers": 0, "idle": 10.0, "attempts": 1}  # fmt: skip
    full = {"rounds": 3, "duration": 5.0, "failovers": 10, "default_failovers": 3,
            "frozen_failovers": 3, "idle": 30.0, "attempts": 2}  # fmt: skip
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
