"""Plain HTTP through the worker, and the HTTP-level answers to bad requests and bad upgrades."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import aiohttp
import pytest

from tests.rawws import open_tcp, read_http_head, upgrade_request
from tests.support import ServerProcess, get_json, healthy_client


async def test_get_reaches_worker_with_method_path_query_headers(
    echo_server: ServerProcess,
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{echo_server.http}/inspect?a=1&b=two&a=3", headers={"X-Test": "Hello There"}
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Reply"] == "ok"
        assert resp.headers["Content-Type"].startswith("application/json")
        seen = json.loads(await resp.text())

    assert seen["method"] == "GET"
    assert seen["path"] == "/inspect"
    assert seen["query"] == {"a": "1", "b": "two"}  # first value wins
    assert seen["url"].endswith("/inspect?a=1&b=two&a=3")
    assert seen["x_test_lower"] == seen["x_test_upper"] == "Hello There"
    assert seen["missing_header"] == "default"
    assert seen["body_len"] == 0 and seen["text"] == ""
    host, _, port = seen["client"].rpartition(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536 and int(port) != echo_server.port


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


async def test_request_client_is_the_peer_address(echo_server: ServerProcess) -> None:
    reader, writer = await open_tcp(echo_server.port)
    try:
        local_port = writer.get_extra_info("sockname")[1]
        writer.write(b"GET /inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = await read_http_head(reader)
        body = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply.status == 200, reply.raw
    if "chunked" in reply.headers.get("transfer-encoding", ""):
        body = _dechunk(body)
    elif "content-length" in reply.headers:
        body = body[: int(reply.headers["content-length"])]
    assert json.loads(body)["client"] == f"127.0.0.1:{local_port}"


async def test_post_reaches_worker_with_body(echo_server: ServerProcess) -> None:
    body = ("héllo wörld \u2603 " * 2000).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{echo_server.http}/inspect?kind=bytes",
            data=body,
            headers={"X-Test": "posted", "Content-Type": "text/plain; charset=utf-8"},
        ) as resp,
    ):
        assert resp.status == 200
        seen = await resp.json()

    assert seen["method"] == "POST"
    assert seen["path"] == "/inspect"
    assert seen["query"] == {"kind": "bytes"}
    assert seen["x_test_lower"] == "posted"
    assert seen["body_len"] == len(body)
    assert bytes.fromhex(seen["body_hex"]) == body
    assert seen["text"] == body.decode()


async def test_post_large_binary_body_arrives_whole(echo_server: ServerProcess) -> None:
    body = os.urandom(300_000).hex().encode()  # 600 kB, ASCII so request.text() works too
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{echo_server.http}/inspect", data=body) as resp,
    ):
        assert resp.status == 200
        seen = await resp.json()
    assert seen["body_len"] == len(body)
    assert bytes.fromhex(seen["body_hex"]) == body


async def test_post_json_body(echo_server: ServerProcess) -> None:
    payload = {"k": [1, 2, "é"], "nested": {"ok": True}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{echo_server.http}/inspect", json=payload) as resp,
    ):
        assert resp.status == 200
        seen = await resp.json()
    assert seen["method"] == "POST"
    assert seen["json"] == payload


async def test_unknown_path_is_the_apps_404(echo_server: ServerProcess) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{echo_server.http}/definitely/not/here") as resp,
    ):
        assert resp.status == 404
        assert await resp.text() == "not found"


async def test_handler_exception_is_a_bare_500_and_logged_with_traceback(
    echo_server: ServerProcess,
) -> None:
    mark = echo_server.log_mark()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{echo_server.http}/boom") as resp,
    ):
        assert resp.status == 500
        body = await resp.text()
    assert "secret-detail-http-500" not in body
    assert "Traceback" not in body and "RuntimeError" not in body

    await echo_server.wait_for_log_async("secret-detail-http-500", start=mark)
    logged = "\n".join(echo_server.lines[mark:])
    assert "Traceback (most recent call last)" in logged, logged

    # The server goes on serving.
    seen = await get_json(f"{echo_server.http}/inspect?after=boom")
    assert seen["query"] == {"after": "boom"}


MALFORMED = {
    "not-a-request-line": b"THIS IS NOT HTTP\r\n\r\n",
    "header-without-colon": b"GET /inspect HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    "binary-garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_gets_400(echo_server: ServerProcess, request_bytes: bytes) -> None:
    async with healthy_client(echo_server):
        reader, writer = await open_tcp(echo_server.port)
        try:
            writer.write(request_bytes)
            reply = await read_http_head(reader)
        finally:
            writer.close()
            await writer.wait_closed()
        assert reply.status == 400, reply.raw


def _key(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


BAD_KEYS = {
    "missing": None,
    "not-base64": "this is not base64!!",
    "eight-bytes": _key(8),
    "empty": "",
}


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
async def test_upgrade_with_bad_key_gets_400(echo_server: ServerProcess, key: str | None) -> None:
    async with healthy_client(echo_server):
        reader, writer = await open_tcp(echo_server.port)
        try:
            writer.write(upgrade_request(echo_server.port, "/ws?id=badkey", key))
            reply = await read_http_head(reader)
        finally:
            writer.close()
            await writer.wait_closed()
        assert reply.status == 400, reply.raw
        assert "sec-websocket-accept" not in reply.headers


@pytest.mark.parametrize("version", ["8", "14"])
async def test_upgrade_with_wrong_version_gets_426(
    echo_server: ServerProcess, version: str
) -> None:
    async with healthy_client(echo_server):
        reader, writer = await open_tcp(echo_server.port)
        try:
            writer.write(upgrade_request(echo_server.port, "/ws?id=badversion", _key(16), version))
            reply = await read_http_head(reader)
        finally:
            writer.close()
            await writer.wait_closed()
        assert reply.status == 426, reply.raw
        assert reply.headers.get("sec-websocket-version") == "13", reply.raw


async def test_many_bad_requests_at_once_leave_healthy_clients_alone(
    echo_server: ServerProcess,
) -> None:
    async def one_bad(i: int) -> int:
        reader, writer = await open_tcp(echo_server.port)
        try:
            writer.write(list(MALFORMED.values())[i % len(MALFORMED)])
            return (await read_http_head(reader)).status
        finally:
            writer.close()
            await writer.wait_closed()

    async with healthy_client(echo_server):
        statuses = await asyncio.gather(*(one_bad(i) for i in range(60)))
    assert set(statuses) == {400}
