"""Flow control in both directions.

Outgoing: a worker sending faster than its client reads must not grow the server without bound:
`send` past max_buffered_bytes (1 MiB in tests.apps.flood) closes the socket with 1008, while
`send_async` makes the worker wait. Incoming: a worker that stops pulling with `async for` makes
the server stop reading that socket, so the client's writes block.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from typing import Any

from tests.rawws import OP_BINARY, OP_TEXT, RawWebSocket, encode_frame
from tests.support import ServerProcess, get_json, wait_until

MAX_BUFFERED = 1 << 20  # max_buffered_bytes of tests/apps/flood.py
CHUNK = 64 << 10
# The server may hold its queue plus what the kernel buffers; anything near this is a leak.
RSS_GROWTH_LIMIT_KIB = 48 << 10
# A client that "never reads": tiny kernel receive buffer, tiny asyncio read-ahead.
NOT_READING = {"rcvbuf": 16 << 10, "limit": 16 << 10}


def _id() -> str:
    return uuid.uuid4().hex


async def _stats(server: ServerProcess, conn_id: str) -> dict[str, Any]:
    stats: dict[str, Any] = await get_json(f"{server.http}/stats?id={conn_id}")
    return stats


async def test_fast_sender_to_non_reading_client_is_closed_with_1008_and_memory_stays_bounded(
    flood_server: ServerProcess,
) -> None:
    conn_id = _id()
    total = 256 << 20  # what the worker would queue if nothing stopped it
    async with await RawWebSocket.connect(
        flood_server.port,
        f"/flood?id={conn_id}&mode=send&chunk={CHUNK}&total={total}",
        **NOT_READING,
    ) as ws:
        baseline = peak = flood_server.rss_kib()
        await ws.send("go")

        deadline = time.monotonic() + 30
        while True:  # poll the external observables: the worker's progress and the server's RSS
            peak = max(peak, flood_server.rss_kib())
            st = await _stats(flood_server, conn_id)
            if st["done"]:
                break
            assert time.monotonic() < deadline, f"sender still running after 30 s: {st}"
            await asyncio.sleep(0.05)
        peak = max(peak, flood_server.rss_kib())

        assert st["stop"] != "total reached", f"all {total} bytes were queued: {st}"
        assert st["sent"] < total
        assert peak - baseline < RSS_GROWTH_LIMIT_KIB, (
            f"server RSS grew by {(peak - baseline) >> 10} MiB (baseline {baseline >> 10} MiB)"
        )

        # Now read: whatever was written before the limit, then the Close frame.
        code, reason = await ws.recv_close(within=20)
    assert code == 1008, (code, reason)


async def test_send_async_waits_for_a_slow_client_instead_of_failing(
    flood_server: ServerProcess,
) -> None:
    conn_id = _id()
    total = 48 << 20  # far more than the queue plus every kernel buffer on the way
    async with await RawWebSocket.connect(
        flood_server.port,
        f"/flood?id={conn_id}&mode=async&chunk={CHUNK}&total={total}",
        **NOT_READING,
    ) as ws:
        baseline = peak = flood_server.rss_kib()
        await ws.send("go")

        # Wait until the worker's progress stops moving (it is parked in send_async).
        last_sent, last_change = -1, time.monotonic()
        deadline = time.monotonic() + 30
        while True:
            peak = max(peak, flood_server.rss_kib())
            st = await _stats(flood_server, conn_id)
            assert not st["done"], f"sender finished while the client was not reading: {st}"
            now = time.monotonic()
            if st["sent"] != last_sent:
                last_sent, last_change = st["sent"], now
            elif st["sent"] > 0 and now - last_change >= 1.0:
                break
            assert now < deadline, f"sender never stalled: {st}"
            await asyncio.sleep(0.05)

        assert st["close"] is None and st["stop"] is None, st
        assert 0 < st["sent"] < total
        assert st["max_buffered"] <= MAX_BUFFERED, st
        assert peak - baseline < RSS_GROWTH_LIMIT_KIB

        # Start reading: the worker resumes and every chunk arrives, in order, then "done".
        for index in range(total // CHUNK):
            message = await ws.recv_message(within=20)
            assert isinstance(message, bytes) and len(message) == CHUNK
            assert struct.unpack("!Q", message[:8])[0] == index
        code, reason = await ws.recv_close(within=20)
    assert (code, reason) == (1000, "done")
    st = await _stats(flood_server, conn_id)
    assert st["stop"] == "total reached" and st["sent"] == total


STOP_AFTER = 8
MESSAGE = 16 << 10
STALL = 2.0  # a write that cannot drain for this long counts as blocked
SWALLOW_LIMIT = 64 << 20


def _pull_frame(seq: int) -> bytes:
    return encode_frame(OP_BINARY, struct.pack("!Q", seq) + b"\xab" * (MESSAGE - 8))


async def test_async_for_that_stops_reading_makes_the_client_writes_block(
    flood_server: ServerProcess,
) -> None:
    conn_id = _id()
    async with await RawWebSocket.connect(
        flood_server.port,
        f"/pull?id={conn_id}&stop_after={STOP_AFTER}",
        sndbuf=16 << 10,
    ) as ws:
        ws.writer.transport.set_write_buffer_limits(high=64 << 10)
        seq = written = 0
        blocked = False
        deadline = time.monotonic() + 30
        # The server may take in what the kernel buffers plus a small queue, nowhere near this.
        while written < SWALLOW_LIMIT and time.monotonic() < deadline:
            frame = _pull_frame(seq)
            ws.writer.write(frame)
            seq += 1
            written += len(frame)
            try:
                await asyncio.wait_for(ws.writer.drain(), STALL)
            except TimeoutError:
                blocked = True
                break
        assert blocked, f"wrote {written >> 20} MiB and the server kept reading"

        st = await _stats(flood_server, conn_id)
        assert st["paused"] and st["received"] == STOP_AFTER, st

        # The worker reads again: the client's writes drain and every message arrives in order.
        await get_json(f"{flood_server.http}/resume?id={conn_id}")
        await asyncio.wait_for(ws.writer.drain(), 20)
        ws.writer.write(encode_frame(OP_TEXT, b"end"))
        await asyncio.wait_for(ws.writer.drain(), 20)

        async def all_received() -> dict[str, Any] | None:
            st = await _stats(flood_server, conn_id)
            return st if st["ended"] else None

        st = await wait_until(all_received, within=20, what="the worker to read everything")
    assert st["received"] == seq
    assert st["received_bytes"] == seq * MESSAGE
    assert st["in_order"]


ABANDON_TRIALS = 16


async def test_send_async_sender_finds_out_when_its_client_vanishes(
    flood_server: ServerProcess,
) -> None:
    """A client reads for a while, then its TCP connection is gone. A worker pacing itself with
    send_async must find out (the socket leaves OPEN, or send_async raises) instead of "sending"
    the rest into the void. Repeated, because the abort lands at a random point of the sender's
    cycle. (A plain `send` flood to this client overflows max_buffered_bytes first: see above.)"""
    outcomes = []
    for _ in range(ABANDON_TRIALS):
        conn_id = _id()
        ws = await RawWebSocket.connect(
            flood_server.port,
            f"/flood?id={conn_id}&mode=async&chunk={CHUNK}&total={1 << 30}",
        )
        await ws.send("go")
        received = 0
        while received < 8 << 20:
            data = await asyncio.wait_for(ws.reader.read(1 << 20), 10)
            assert data, "server closed the flood early"
            received += len(data)
        ws.abort()

        async def finished(conn_id: str = conn_id) -> dict[str, Any] | None:
            st = await _stats(flood_server, conn_id)
            return st if st["done"] else None

        st = await wait_until(finished, within=20, what="the sender to stop")
        outcomes.append((st["stop"], f"{st['sent'] >> 20} MiB"))

    vain = [outcome for outcome in outcomes if outcome[0] == "total reached"]
    assert not vain, (
        f"{len(vain)} of {ABANDON_TRIALS} senders pushed all 1 GiB to a vanished client: {outcomes}"
    )
