"""Streamed HTTP bodies against the real server (tests/apps/streaming.py): responses from
iterators (chunked, Server-Sent Events, from a Durable Object), what a client sees when the
iterator fails or it leaves, and request bodies read with request.stream(): slices of a body
read whole (by default), or pieces as they arrive (App(stream_request_bodies=True))."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.apps.rooms_client import module_server
from tests.rawws import open_tcp, read_http_head
from tests.support import ServerProcess, get_json, wait_until

MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.streaming:app")


@pytest.fixture(scope="module")
def streamed() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.streaming:streamed_app")


@pytest.fixture(params=["whole", "streamed"])
def either(
    request: pytest.FixtureRequest, server: ServerProcess, streamed: ServerProcess
) -> ServerProcess:
    """Each server: the one that reads request bodies whole, and the one that streams them."""
    return server if request.param == "whole" else streamed


def _name() -> str:
    return uuid.uuid4().hex[:12]


async def _state(server: ServerProcess, name: str) -> dict[str, Any]:
    state: dict[str, Any] = await get_json(f"{server.http}/state/{name}")
    return state


async def _finished(server: ServerProcess, name: str) -> None:
    async def finished() -> bool:
        return bool((await _state(server, name))["finished"])

    await wait_until(finished, within=10, what=f"the generator of {name} to run its finally")


async def test_chunked_body_arrives_whole_and_in_order(server: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http}/chunks?n=200") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
        body = await resp.text()
    assert body == "".join(f"chunk {i}\n" for i in range(200))


async def test_sync_iterator_and_mixed_chunk_types(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{server.http}/sync") as resp:
        assert resp.status == 200
        assert await resp.read() == b"one two three"


async def test_content_length_of_the_handler_is_kept(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{server.http}/sized") as resp:
        assert resp.headers["Content-Length"] == "16"
        assert "Transfer-Encoding" not in resp.headers
        assert await resp.read() == b"chunk 0\nchunk 1\n"


async def test_server_sent_events_arrive_as_they_are_yielded(server: ServerProcess) -> None:
    name = _name()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http}/sse/{name}") as resp,
    ):
        assert resp.headers["Content-Type"] == "text/event-stream"
        # Event 2 is produced only once we ask for it: event 1 arrived unbuffered.
        assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
        async with session.post(f"{server.http}/next/{name}") as nudge:
            assert nudge.status == 200
        assert await resp.content.readuntil(b"\n\n") == b"data: 2\n\n"
        assert await resp.content.read() == b""  # the end of the body
    assert (await _state(server, name))["finished"]


async def test_client_leaving_mid_stream_closes_the_generator(server: ServerProcess) -> None:
    name = _name()
    mark = server.log_mark()
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"{server.http}/hang/{name}")
        assert await resp.content.readline() == b"first\n"
        resp.close()  # drops the connection while the generator waits
    await _finished(server, name)
    async with aiohttp.ClientSession() as session, session.get(f"{server.http}/chunks") as resp:
        assert resp.status == 200
    assert "ERROR" not in "\n".join(server.lines[mark:])


async def test_slow_reader_holds_back_the_generator(server: ServerProcess) -> None:
    """A client that reads nothing: the generator is pulled only while the core (and the
    sockets' buffers) have room, then waits; closing the connection closes it."""
    name = _name()
    reader, writer = await open_tcp(server.port, rcvbuf=4096)
    try:
        writer.write(f"GET /forever/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await read_http_head(reader)
        assert head.status == 200
        previous = -1

        async def stalled() -> bool:
            nonlocal previous
            pulled = int((await _state(server, name))["pulled"])
            still, previous = pulled == previous, pulled
            return still

        await wait_until(stalled, within=30, interval=0.3, what="the generator to wait")
        # 64 KiB chunks: what the kernel's socket buffers hold, the core's 64 KiB, one chunk.
        assert previous * 64 * 1024 < 64 * 1024 * 1024, previous
    finally:
        writer.close()
    await _finished(server, name)


async def test_exception_mid_stream_cuts_the_body(server: ServerProcess) -> None:
    mark = server.log_mark()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http}/fail-late") as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await server.wait_for_log_async(r"exception streaming the body of GET .*/fail-late", start=mark)
    await server.wait_for_log_async(r"RuntimeError: boom late", start=mark)


async def test_exception_before_the_first_chunk_is_a_500(server: ServerProcess) -> None:
    mark = server.log_mark()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.http}/fail-early") as resp,
    ):
        assert resp.status == 500
        assert await resp.text() == "Internal Server Error"
    await server.wait_for_log_async(r"RuntimeError: boom early", start=mark)


async def test_empty_generator_and_bodiless_answers(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.http}/empty") as resp:
            assert resp.status == 200
            assert await resp.read() == b""
        async with session.get(f"{server.http}/status/204") as resp:
            assert resp.status == 204
            assert await resp.read() == b""
        async with session.head(f"{server.http}/chunks") as resp:
            assert resp.status == 200
            assert await resp.read() == b""
        # The connection is still good for more.
        async with session.get(f"{server.http}/chunks?n=2") as resp:
            assert await resp.text() == "chunk 0\nchunk 1\n"


async def test_durable_object_streams_events_after_its_writes(server: ServerProcess) -> None:
    name = _name()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.http}/do/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
            async with session.get(f"{server.http}/do-count/{name}") as count:
                assert await count.text() == "1"
            async with session.post(f"{server.http}/do-next/{name}") as nudge:
                assert nudge.status == 200
            assert await resp.content.readuntil(b"\n\n") == b"data: 2\n\n"
            async with session.post(f"{server.http}/do-next/{name}") as nudge:
                assert nudge.status == 200
            assert await resp.content.read() == b""
        async with session.get(f"{server.http}/do-count/{name}") as count:
            assert await count.text() == "2"


async def test_request_stream_reads_a_1_mib_body_in_pieces(either: ServerProcess) -> None:
    data = os.urandom(1024 * 1024)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{either.http}/upload", data=data) as resp,
    ):
        assert resp.status == 200
        seen = await resp.json()
    assert seen["bytes"] == len(data)
    assert seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert seen["pieces"] > 1


async def test_request_stream_still_holds_max_body_size(either: ServerProcess) -> None:
    mark = either.log_mark()
    reader, writer = await open_tcp(either.port)
    try:
        size = MAX_BODY + 1
        writer.write(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        writer.write(b"x" * size)  # (not drained: the server answers before reading it all)
        head = await read_http_head(reader)
        assert head.status == 413
    finally:
        writer.close()
    if either.app.endswith(":streamed_app"):
        # The handler was reading it: its stream raised, clearly.
        await either.wait_for_log_async(
            r"RequestBodyError: the request body is larger than max_body_size", start=mark
        )


async def test_streamed_request_reaches_the_handler_before_its_body(
    streamed: ServerProcess,
) -> None:
    """The client sends the second half only once the handler has counted the first: the
    handler ran at the head and read the pieces as they came."""
    name = _name()
    first, second = os.urandom(5000), os.urandom(7000)

    async def body() -> AsyncIterator[bytes]:
        yield first

        async def counted() -> bool:
            return bool(await get_json(f"{streamed.http}/received/{name}") == len(first))

        await wait_until(counted, within=10, what="the handler to read the first piece")
        yield second

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{streamed.http}/incremental/{name}", data=body()) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == len(first) + len(second)


async def test_streamed_request_read_whole_then_body(streamed: ServerProcess) -> None:
    data = os.urandom(300_000)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{streamed.http}/read", data=data) as resp:
            seen = await resp.json()
        assert seen == {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "same": True,
        }
        async with session.post(f"{streamed.http}/body-early", data=b"abc") as resp:
            error = (await resp.json())["error"]
        assert "await request.read()" in error
        # A request without a body is whole at once.
        async with session.post(f"{streamed.http}/body-early") as resp:
            assert await resp.json() == {"bytes": 0}


async def test_streamed_request_echoed_as_it_arrives(streamed: ServerProcess) -> None:
    data = os.urandom(1024 * 1024)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{streamed.http}/echo", data=data) as resp,
    ):
        assert resp.status == 200
        assert await resp.read() == data


async def test_streamed_request_body_too_slow_is_a_408(streamed: ServerProcess) -> None:
    mark = streamed.log_mark()
    reader, writer = await open_tcp(streamed.port)
    try:
        writer.write(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        head = await read_http_head(reader)
        assert head.status == 408
    finally:
        writer.close()
    await streamed.wait_for_log_async(
        r"RequestBodyError: the request body did not arrive within handshake_timeout", start=mark
    )


async def test_sse_example_serves_events(make_server: Callable[..., ServerProcess]) -> None:
    example = make_server("examples.sse:app")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{example.http}/clock") as resp,
    ):
        assert resp.headers["Content-Type"] == "text/event-stream"
        event = await resp.content.readuntil(b"\n\n")
        assert event.startswith(b"data: ")
