"""``sockworker.testing``: test an app in-process, the way vitest-pool-workers tests a Worker.

``TestServer(app)`` serves the app on an ephemeral port of 127.0.0.1 on the running asyncio loop
(the real server: the core, its sockets, storage, the output gate and the meter), and gives a
test what it needs to drive it and look inside::

    async with TestServer(app) as server:
        response = await server.fetch("/counter/a", method="POST")
        async with server.connect("/ws") as ws:          # a `websockets` client
            await ws.send("hi")
        stub = server.env.COUNTERS.get_by_name("a")
        assert await server.run_in_object(stub, lambda obj, state: state.storage.get("n")) == 1
        assert await server.run_alarm(stub)              # runs a set alarm now
        await server.hibernate_now(stub)                 # as if it had been idle
        assert server.usage()                            # meter records since the last call

With pytest, the plugin (``sockworker.testing`` is registered as one; or add
``pytest_plugins = ["sockworker.testing"]``) gives the fixture ``sockworker_server``, a
started ``TestServer`` of the app a test's ``sockworker_app`` fixture returns. See
docs/howto/testing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from websockets.asyncio.client import connect as ws_connect

from . import _current
from ._runtime import Runtime
from .app import App
from .billing import UsageRecord
from .durable import DurableObjectStub
from .env import Env
from .logs import CoreLogs

__all__ = ["TestResponse", "TestServer"]

T = TypeVar("T")


class TestResponse:
    """What ``TestServer.fetch`` got: ``status``, ``headers`` (lower-case names), ``body``."""

    __test__ = False  # (not a pytest test class)

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<TestResponse {self.status} {len(self.body)} bytes>"


class TestServer:
    """``app`` served in-process on an ephemeral port (see the module's docstring). Its data
    directory is a fresh temporary one unless ``data_dir`` names one (to test a restart: serve
    a second ``TestServer`` on the same directory)."""

    __test__ = False

    def __init__(
        self, app: App, *, data_dir: str | None = None, shutdown_timeout: float = 5.0
    ) -> None:
        self.app = app
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        #: The data directory (None until started when it is a temporary one).
        self.data_dir = data_dir or app.data_dir
        self.shutdown_timeout = shutdown_timeout
        self._runtime: Runtime | None = None
        self._task: asyncio.Task[None] | None = None
        self._logs: CoreLogs | None = None
        self._records: list[UsageRecord] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> TestServer:
        if self._runtime is not None:
            raise RuntimeError("this TestServer is started already")
        if _current.serving() is not None:
            raise RuntimeError("another server runs in this process (one TestServer at a time)")
        if self.data_dir is None:
            self._temp = tempfile.TemporaryDirectory(prefix="sockworker-test-")
            self.data_dir = self._temp.name
        self._logs = CoreLogs(asyncio.get_running_loop())
        self._logs.start()
        saved = self.app.data_dir
        self.app.data_dir = self.data_dir
        try:
            self._runtime = Runtime(
                self.app, "127.0.0.1", 0, 1, shutdown_timeout=self.shutdown_timeout
            )
        except BaseException:
            self._logs.stop()
            self._cleanup()
            raise
        finally:
            self.app.data_dir = saved
        self.app.meter._tap = []
        self._task = asyncio.get_running_loop().create_task(self._runtime.run())
        # Until run() has set the runtime up (the dispatcher, the meter), nothing is served.
        started = asyncio.ensure_future(self._runtime.started)
        await asyncio.wait([started, self._task], return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            started.cancel()
            self._task.result()
        return self

    async def stop(self) -> None:
        """A graceful shutdown (sockets closed with 1001), as SIGTERM does."""
        runtime, task = self._runtime, self._task
        if runtime is None or task is None:
            return
        runtime.shutdown()
        try:
            await task
        finally:
            self._runtime = self._task = None
            self.app.meter._tap = None
            if self._logs is not None:
                self._logs.stop()
            self._cleanup()

    def _cleanup(self) -> None:
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None
            self.data_dir = None

    async def __aenter__(self) -> TestServer:
        return await self.start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the TestServer is not started")
        return self._runtime

    @property
    def port(self) -> int:
        return self.runtime.server.address[1]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def env(self) -> Env:
        """The app's bindings (``server.env.ROOMS.get_by_name("a")``)."""
        return self.app.env

    # -- clients --------------------------------------------------------------------------------

    async def fetch(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | str = b"",
    ) -> TestResponse:
        """One HTTP/1.1 request over a real connection to the server."""
        data = body.encode() if isinstance(body, str) else body
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            lines = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{self.port}"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            lines += [f"content-length: {len(data)}", "connection: close", "", ""]
            writer.write("\r\n".join(lines).encode() + data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
            status = int(status_line.split(" ", 2)[1])
            got: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                got[name.strip().lower()] = value.strip()
            if got.get("transfer-encoding", "").lower() == "chunked":
                payload = await _read_chunked(reader)
            elif "content-length" in got:
                payload = await reader.readexactly(int(got["content-length"]))
            else:
                payload = await reader.read()
            return TestResponse(status, got, payload)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def connect(self, path: str = "/", **kwargs: Any) -> Any:
        """A ``websockets`` client of ``path`` (``async with server.connect("/ws") as ws``);
        ``kwargs`` go to ``websockets.asyncio.client.connect``."""
        return ws_connect(self.ws_url + path, **kwargs)

    # -- inside objects -------------------------------------------------------------------------

    def _host(self, stub: DurableObjectStub) -> Any:
        if not isinstance(stub, DurableObjectStub):
            raise TypeError("expected a stub: server.env.BINDING.get_by_name(name)")
        return self.runtime.objects.host(stub._namespace, stub.id)

    async def run_in_object(self, stub: DurableObjectStub, callback: Callable[..., T]) -> T:
        """Calls ``callback(instance, state)`` inside the object, as one of its events (made
        resident if it was not; its writes commit as any event's do); awaits it if it returns an
        awaitable. Its result is returned as is (not pickled), so it may be the object's own
        state. An exception resets the object, as in any event, and is raised here."""
        result: T = await self._host(stub).call(callback)
        return result

    async def run_alarm(self, stub: DurableObjectStub) -> bool:
        """Runs the object's alarm now if one is set, whenever it is due, and waits for it;
        False if none is set (Cloudflare's ``runDurableObjectAlarm``). An alarm that raises is
        retried later as usual."""
        task = self._host(stub).fire_alarm(0, early=True)
        if task is None:
            return False
        await task
        return True

    async def hibernate_now(self, stub: DurableObjectStub) -> None:
        """Hibernates the object now, as if it had been idle for ``hibernate_after``: its
        instance goes, its hibernatable sockets stay open. Raises ``RuntimeError`` if it cannot
        (an event or a task of it is running, or it holds a standard-API socket)."""
        host = self.runtime.objects.resident(stub._namespace.binding, stub.id)
        if host is None:
            return
        if not host.idle_hibernatable():
            raise RuntimeError(f"object {stub.id} is busy: it cannot hibernate now")
        host.hibernate()

    def is_resident(self, stub: DurableObjectStub) -> bool:
        """The object has an instance in memory now."""
        host = self.runtime.objects.resident(stub._namespace.binding, stub.id)
        return host is not None and host.instance is not None

    def usage(self) -> list[UsageRecord]:
        """Meter records of what was used since the last call (the billing hook, if any, gets
        them too), one per (account, namespace, object id)."""
        metering = self.runtime.services.metering
        if metering.meter._tap is None:
            raise RuntimeError("the TestServer is not started")
        metering.flush()
        records, metering.meter._tap[:] = list(metering.meter._tap), []
        return records


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readline()
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


# -- the pytest plugin ----------------------------------------------------------------------------

with contextlib.suppress(ImportError):
    import pytest

    _async_fixture: Any = pytest.fixture
    with contextlib.suppress(ImportError):
        # pytest-asyncio runs async fixtures (in its strict mode, only those it made).
        import pytest_asyncio

        _async_fixture = pytest_asyncio.fixture

    async def _sockworker_server(sockworker_app: App) -> AsyncIterator[TestServer]:
        """A started ``TestServer`` of the app the ``sockworker_app`` fixture returns."""
        app = sockworker_app
        if inspect.isawaitable(app):
            app = await app
        async with TestServer(app) as server:
            yield server

    sockworker_server = _async_fixture(name="sockworker_server")(_sockworker_server)
