"""Outgoing HTTP (``sw.fetch``): a Worker and a Durable Object of tests/apps/fetcher.py, served by
the real server, send requests to an aiohttp upstream the test starts on an ephemeral port (and
one over HTTPS, with the trustme certificates of the TLS tests) and report what came back; and an
app served in-process by sockworker.testing does the same."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import sockworker as sw
from aiohttp import web
from sockworker.testing import TestServer

from tests.apps.rooms_client import module_server
from tests.support import ServerProcess
from tests.test_tls import Certs


@pytest.fixture(scope="module")
def fetcher() -> Iterator[ServerProcess]:
    yield from module_server("tests.apps.fetcher:app")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


class Upstream:
    """An aiohttp server in the test process; ``hung`` is set once a request reached /hang."""

    def __init__(self) -> None:
        self.hung = asyncio.Event()
        self.never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.url = ""

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": [[k.lower(), v] for k, v in request.headers.items()],
                "body": body.decode("latin-1"),
            },
            headers={"x-upstream": "yes"},
        )

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"status {code}")

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for n in range(int(request.query.get("chunks", "5"))):
            await response.write(f"chunk {n};".encode() * int(request.query.get("repeat", "1")))
        await response.write_eof()
        return response

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.query["size"]))

    async def hang(self, request: web.Request) -> web.Response:
        self.hung.set()
        await self.never
        return web.Response(text="never")

    async def redirect(self, request: web.Request) -> web.Response:
        hops = int(request.query.get("hops", "1"))
        code = int(request.query.get("code", "302"))
        target = "/echo" if hops <= 1 else f"/redirect?hops={hops - 1}&code={code}"
        raise web.HTTPFound(target) if code == 302 else web.HTTPSeeOther(target)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/big", self.big)
        app.router.add_get("/hang", self.hang)
        app.router.add_route("*", "/redirect", self.redirect)
        return app


@asynccontextmanager
async def upstream(ssl: Any = None) -> AsyncIterator[Upstream]:
    up = Upstream()
    runner = web.AppRunner(up.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl)
    await site.start()
    port = runner.addresses[0][1]
    up.url = f"{'https' if ssl else 'http'}://127.0.0.1:{port}"
    try:
        yield up
    finally:
        up.never.cancel()
        await runner.cleanup()


async def ask(server: ServerProcess, spec: dict[str, Any], where: str = "/fetch") -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.http}{where}", json=spec) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


def header(result: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in result["headers"] if key == name]


WHERE = ["/fetch", "/object/fetcher-a/fetch"]


@pytest.mark.parametrize("where", WHERE)
async def test_get_and_post_with_headers_both_ways(fetcher: ServerProcess, where: str) -> None:
    async with upstream() as up:
        got = await ask(fetcher, {"url": f"{up.url}/echo?q=1", "headers": {"X-Test": "one"}}, where)
        assert got["status"] == 200 and got["ok"] is True and got["redirected"] is False
        assert got["url"] == f"{up.url}/echo?q=1"
        assert header(got, "x-upstream") == ["yes"]
        echoed = json.loads(got["body"])
        assert echoed["method"] == "GET" and echoed["path"] == "/echo?q=1" and echoed["body"] == ""
        assert ["x-test", "one"] in echoed["headers"]
        assert ["host", up.url.removeprefix("http://")] in echoed["headers"]

        # A space and non-ASCII are percent-encoded (UTF-8), escapes already there kept.
        got = await ask(fetcher, {"url": f"{up.url}/echo?q=a b&é=%41"}, where)
        assert json.loads(got["body"])["path"] == "/echo?q=a%20b&%C3%A9=%41"
        assert got["url"] == f"{up.url}/echo?q=a%20b&%C3%A9=%41"

        spec = {"url": f"{up.url}/echo", "method": "POST", "body": "héllo", "headers": {"a": "b"}}
        echoed = json.loads((await ask(fetcher, spec, where))["body"])
        assert echoed["method"] == "POST" and echoed["body"] == "héllo".encode().decode("latin-1")
        assert ["content-type", "text/plain;charset=UTF-8"] in echoed["headers"]
        assert ["content-length", str(len("héllo".encode()))] in echoed["headers"]

        spec = {"url": f"{up.url}/echo", "method": "PUT", "json": {"n": [1, 2]}}
        echoed = json.loads((await ask(fetcher, spec, where))["body"])
        assert echoed["method"] == "PUT" and json.loads(echoed["body"]) == {"n": [1, 2]}
        assert ["content-type", "application/json"] in echoed["headers"]


async def test_a_request_object_is_sent_with_its_method_headers_and_body(
    fetcher: ServerProcess,
) -> None:
    async with upstream() as up:
        headers = [["x-from", "request"], ["x-twice", "1"], ["x-twice", "2"]]
        request = {"method": "patch", "headers": headers, "body": "payload"}
        spec = {"url": f"{up.url}/echo", "request": request}
        echoed = json.loads((await ask(fetcher, spec))["body"])
        assert echoed["method"] == "PATCH" and echoed["body"] == "payload"
        assert ["x-from", "request"] in echoed["headers"]
        # A repeated header is sent as given, one line each.
        assert [v for k, v in echoed["headers"] if k == "x-twice"] == ["1", "2"]
        # Arguments beside the Request win over its own.
        spec = {"url": f"{up.url}/echo", "request": request, "method": "POST", "body": "other"}
        echoed = json.loads((await ask(fetcher, spec))["body"])
        assert echoed["method"] == "POST" and echoed["body"] == "other"


@pytest.mark.parametrize("where", WHERE)
async def test_error_statuses_are_responses(fetcher: ServerProcess, where: str) -> None:
    async with upstream() as up:
        for code in (404, 500):
            got = await ask(fetcher, {"url": f"{up.url}/status/{code}"}, where)
            assert (got["status"], got["ok"], got["text"]) == (code, False, f"status {code}")


async def test_a_chunked_response_is_read_whole(fetcher: ServerProcess) -> None:
    async with upstream() as up:
        got = await ask(fetcher, {"url": f"{up.url}/chunked?chunks=50&repeat=100"})
        # Read whole: the upstream connection's framing is not passed on.
        assert got["status"] == 200 and header(got, "transfer-encoding") == []
        assert got["body"] == "".join(f"chunk {n};" * 100 for n in range(50))


async def test_a_handler_returns_a_fetched_response_as_its_own(fetcher: ServerProcess) -> None:
    async with upstream() as up, aiohttp.ClientSession() as session:
        url = f"{up.url}/chunked?chunks=3"
        async with session.get(f"{fetcher.http}/proxy", params={"url": url}) as response:
            assert response.status == 200
            assert await response.read() == b"chunk 0;chunk 1;chunk 2;"
        url = f"{up.url}/status/404"
        async with session.get(f"{fetcher.http}/proxy", params={"url": url}) as response:
            assert (response.status, await response.text()) == (404, "status 404")


async def test_redirects_are_followed_or_returned(fetcher: ServerProcess) -> None:
    async with upstream() as up:
        got = await ask(fetcher, {"url": f"{up.url}/redirect?hops=3"})
        assert got["status"] == 200 and got["redirected"] is True
        assert got["url"] == f"{up.url}/echo"
        # 303 after a POST: a GET without the body.
        spec = {"url": f"{up.url}/redirect?code=303", "method": "POST", "body": "data"}
        echoed = json.loads((await ask(fetcher, spec))["body"])
        assert echoed["method"] == "GET" and echoed["body"] == ""
        manual = await ask(fetcher, {"url": f"{up.url}/redirect", "redirect": "manual"})
        assert manual["status"] == 302 and header(manual, "location") == ["/echo"]
        assert manual["redirected"] is False
        endless = await ask(fetcher, {"url": f"{up.url}/redirect?hops=30"})
        assert endless["error"] == "FetchError" and "more than 20 redirects" in endless["message"]


@pytest.mark.parametrize("where", WHERE)
async def test_a_timeout_against_an_upstream_that_never_answers(
    fetcher: ServerProcess, where: str
) -> None:
    async with upstream() as up:
        asking = asyncio.ensure_future(
            ask(fetcher, {"url": f"{up.url}/hang", "timeout": 0.5}, where)
        )
        await asyncio.wait_for(up.hung.wait(), 10)
        got = await asyncio.wait_for(asking, 10)
        assert got["error"] == "FetchTimeout" and "TimeoutError" in got["is"], got
        assert "FetchError" in got["is"] and f"{up.url}/hang" in got["message"]
        assert "timed out" in got["message"]


async def test_a_connect_that_does_not_complete_times_out(fetcher: ServerProcess) -> None:
    # A listening socket whose accept queue is full (backlog 0, never accepted): Linux drops
    # the SYN of any further connect, which then never completes.
    listener = socket.socket()
    fillers = [socket.socket() for _ in range(3)]
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        spec = {"url": f"http://127.0.0.1:{port}/", "connect_timeout": 0.3, "timeout": 20}
        got = await ask(fetcher, spec)
    finally:
        for sock in (listener, *fillers):
            sock.close()
    assert got["error"] == "FetchTimeout", got
    assert f"connecting to http://127.0.0.1:{port}/ timed out" in got["message"]


async def test_a_cancelled_fetch_closes_its_connection(fetcher: ServerProcess) -> None:
    got_request, closed = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        await reader.read()  # b"" once the fetch's connection is closed
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        # The handler stops waiting long before the fetch's own timeout (30 s by default).
        spec = {"url": f"http://127.0.0.1:{port}/", "give_up_after": 0.5}
        got = await asyncio.wait_for(ask(fetcher, spec), 10)
        assert got["error"] == "TimeoutError" and "FetchError" not in got["is"], got
        assert got_request.is_set()
        await asyncio.wait_for(closed.wait(), 10)


async def test_refused_unknown_host_and_bad_urls_fail_clearly(fetcher: ServerProcess) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    url = f"http://127.0.0.1:{closed_port}/x"
    refused = await ask(fetcher, {"url": url})
    assert refused["error"] == "FetchError" and "cannot connect" in refused["message"]
    assert url in refused["message"]
    unknown = await ask(fetcher, {"url": "http://no-such-host.invalid/"})
    assert unknown["error"] == "FetchError" and "no-such-host.invalid" in unknown["message"]
    for bad in ("ftp://example.com/", "http:///path", "http://h:99999/"):
        got = await ask(fetcher, {"url": bad})
        assert got["error"] == "InvalidArgument", got
    got = await ask(fetcher, {"url": "http://127.0.0.1/", "headers": {"bad name": "x"}})
    assert got["error"] == "InvalidArgument" and "header" in got["message"]
    got = await ask(fetcher, {"url": "http://127.0.0.1/", "body": "x"})
    assert got["error"] == "TypeError" and "GET" in got["message"]


async def test_an_oversized_response_fails(fetcher: ServerProcess) -> None:
    async with upstream() as up:
        ok = await ask(fetcher, {"url": f"{up.url}/big?size=1000", "max_response_size": 1000})
        assert ok["status"] == 200 and len(ok["body"]) == 1000
        # A HEAD's Content-Length is the length of a body it does not get.
        spec = {"url": f"{up.url}/big?size=5000", "method": "HEAD", "max_response_size": 10}
        head = await ask(fetcher, spec)
        assert (
            head["status"] == 200
            and head["body"] == ""
            and header(head, "content-length") == ["5000"]
        )
        # Declared by Content-Length: refused before the body is read.
        big = await ask(fetcher, {"url": f"{up.url}/big?size=1001", "max_response_size": 1000})
        assert big["error"] == "FetchError" and "over 1000 bytes" in big["message"]
        # Chunked, with no length: cut off once past the limit.
        spec = {"url": f"{up.url}/chunked?chunks=200&repeat=100", "max_response_size": 10000}
        chunked = await ask(fetcher, spec)
        assert chunked["error"] == "FetchError" and "over 10000 bytes" in chunked["message"]


@pytest.mark.parametrize("where", WHERE)
async def test_https_with_a_ca_file(fetcher: ServerProcess, certs: Certs, where: str) -> None:
    async with upstream(ssl=certs.server_context) as up:
        spec = {"url": f"{up.url}/echo", "ca_file": str(certs.cafile)}
        got = await ask(fetcher, spec, where)
        assert got["status"] == 200 and json.loads(got["body"])["method"] == "GET"
        wrong = await ask(fetcher, {"url": f"{up.url}/echo", "ca_file": str(certs.other_ca)}, where)
        assert wrong["error"] == "FetchError" and "TLS" in wrong["message"], wrong
        plain = await ask(fetcher, {"url": f"{up.url.replace('https', 'http')}/echo"}, where)
        assert plain["error"] == "FetchError", plain


async def test_each_fetch_is_a_subrequest_of_its_caller(fetcher: ServerProcess) -> None:
    name = f"meter-{uuid.uuid4().hex[:8]}"
    async with upstream() as up, aiohttp.ClientSession() as session:
        async with session.get(f"{fetcher.http}/object-id?name={name}") as response:
            object_key = f"FETCHERS/{await response.text()}"
        async with session.get(f"{fetcher.http}/usage") as response:
            before = await response.json()
        for _ in range(3):
            await ask(fetcher, {"url": f"{up.url}/echo"}, f"/object/{name}/fetch")
        await ask(fetcher, {"url": f"{up.url}/status/404"})
        async with session.get(f"{fetcher.http}/usage") as response:
            after = await response.json()
    assert after.get(object_key, 0) == 3, after
    assert after["worker"] - before.get("worker", 0) == 1, (before, after)


async def test_fetch_from_an_app_served_in_process() -> None:
    """The testing harness (TestServer) serves the app on the test's own loop: the upstream and
    the app share it, and the exchange runs in the core."""
    async with upstream() as up:

        async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
            got = await sw.fetch(f"{up.url}/status/404")
            return sw.Response(await got.text(), status=got.status)

        async with TestServer(sw.App(fetch=fetch)) as server:
            response = await server.fetch("/")
            assert (response.status, response.text()) == (404, "status 404")
            assert sum(record.subrequests for record in server.usage()) == 1
