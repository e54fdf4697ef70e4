"""``App`` and the runtime that runs it: the one Python thread with the asyncio loop, the core's
event batches dispatched to handlers, and the lifecycle (serve, graceful shutdown)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from . import _native
from .durable import DurableObjectNamespace, _ObjectHost
from .errors import ResponseError
from .http import Request, Response
from .limits import Limits
from .websocket import WebSocket

__all__ = ["App", "Env", "ExecutionContext"]

logger = logging.getLogger("sockworker")

FetchHandler = Callable[[Request, "Env", "ExecutionContext"], Awaitable[Response] | Response]

SHUTDOWN_GRACE = 10.0
_EV_REQUEST = _native.EV_REQUEST
_EV_MESSAGE = _native.EV_MESSAGE
_EV_CLOSE = _native.EV_CLOSE
_EV_ERROR = _native.EV_ERROR
_EV_DRAINED = _native.EV_DRAINED
_EV_ALL_CLOSED = _native.EV_ALL_CLOSED


class Env:
    """The bindings given to handlers: ``env.NAME`` for each variable given to ``App(env=...)``."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.__dict__.update(values or {})

    def __getattr__(self, name: str) -> Any:
        # Only reached for a name that is not bound: says so (and types env.NAME as Any).
        raise AttributeError(f"env has no binding {name!r}")

    def __repr__(self) -> str:
        return f"Env({', '.join(sorted(self.__dict__))})"


class ExecutionContext:
    """The ``ctx`` argument of a Worker's ``fetch``."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: _Runtime) -> None:
        self._runtime = runtime

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        """Keeps work running after the response is sent; its exceptions are logged."""
        self._runtime.spawn(awaitable, "wait_until")

    waitUntil = wait_until

    def pass_through_on_exception(self) -> None:
        """Accepted for code ported from Cloudflare; there is no origin to pass through to."""


class App:
    """A Worker: ``fetch`` handles every HTTP request and may answer with a WebSocket."""

    def __init__(
        self,
        fetch: FetchHandler | None = None,
        *,
        limits: Limits | None = None,
        env: Mapping[str, Any] | None = None,
        durable_objects: Mapping[str, type] | None = None,
    ) -> None:
        self.fetch = fetch
        self.limits = limits or Limits()
        self.namespaces = {
            binding: DurableObjectNamespace(binding, cls, self.limits)
            for binding, cls in (durable_objects or {}).items()
        }
        clash = set(self.namespaces) & set(env or {})
        if clash:
            raise ValueError(f"env and durable_objects both bind {sorted(clash)}")
        self.env = Env({**(env or {}), **self.namespaces})

    def run(self, host: str = "127.0.0.1", port: int = 8787, *, io_threads: int = 1) -> None:
        """Serves until SIGINT or SIGTERM, then closes every socket with 1001 and returns."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        asyncio.run(self.serve(host, port, io_threads=io_threads))

    async def serve(
        self, host: str = "127.0.0.1", port: int = 8787, *, io_threads: int = 1
    ) -> None:
        """Serves on the running loop until SIGINT or SIGTERM (or ``stop`` of the runtime)."""
        _raise_fd_limit()
        runtime = _Runtime(self, host, port, io_threads)
        await runtime.run()


def _raise_fd_limit() -> None:
    """Every socket is a descriptor: take the hard limit, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logger.warning("could not raise the open-file limit from %d", soft)


class _Runtime:
    """Owns the native server for one run of an app and dispatches its events."""

    def __init__(self, app: App, host: str, port: int, io_threads: int) -> None:
        limits = app.limits
        self.app = app
        self.server = _native.Server(
            host,
            port,
            io_threads=io_threads,
            max_message_size=limits.max_message_size,
            max_buffered_bytes=limits.max_buffered_bytes,
            handshake_timeout=float(limits.handshake_timeout),
            idle_timeout=float(limits.idle_timeout),
            max_connections=limits.max_connections,
            max_body_size=limits.max_body_size,
        )
        self.ctx = ExecutionContext(self)
        self.sockets: dict[int, WebSocket] = {}
        # Durable Objects by the key the core gives their sockets' events.
        self.objects: dict[int, _ObjectHost] = {}
        for namespace in app.namespaces.values():
            namespace._runtime = self
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop = asyncio.get_running_loop()
        self.stopped = self.loop.create_future()
        self.shutting_down = False

    async def run(self) -> None:
        loop = self.loop
        host, port = self.server.address
        shown = f"[{host}]" if ":" in host else host
        loop.add_reader(self.server.fileno(), self.dispatch)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.shutdown)
        logger.info("listening on http://%s:%d", shown, port)
        try:
            await self.stopped
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            loop.remove_reader(self.server.fileno())
            self.server.stop()
            for task in list(self.tasks):
                task.cancel()
            logger.info("stopped")

    def shutdown(self) -> None:
        """Stops accepting and closes every socket with 1001; the run ends when all are closed."""
        if self.shutting_down or self.stopped.done():
            return
        self.shutting_down = True
        logger.info("shutting down: closing %d sockets with 1001", self.server.open_sockets)
        self.server.shutdown(1001, "server shutting down")
        self.loop.call_later(SHUTDOWN_GRACE, self._stop)

    def _stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    # -- the hot path: one call per batch of core events -----------------------------------------

    def dispatch(self) -> None:
        try:
            self._dispatch(self.server.drain())
        finally:
            # Writes what the batch's handlers sent, in as few system calls as it can.
            self.server.flush()

    def _dispatch(self, events: list[tuple[Any, ...]]) -> None:
        sockets = self.sockets
        start = 0
        while start < len(events):
            index = start
            # One try around the loop (free in CPython 3.11) rather than one per event: a bug of
            # ours in one event is logged and must not cost the rest of the batch. Handlers' own
            # exceptions are handled where they run.
            try:
                for index in range(start, len(events)):
                    event = events[index]
                    kind = event[0]
                    if kind == _EV_MESSAGE:
                        socket = sockets.get(event[1]) or self.revive(event[1])
                        if socket is not None:
                            socket._on_message(event[2])
                    elif kind == _EV_REQUEST:
                        self.on_request(*event[1:])
                    elif kind == _EV_CLOSE:
                        socket = sockets.pop(event[1], None)
                        if socket is None and event[5] is not None:
                            socket = self.revive_closed(event[5])
                        if socket is not None:
                            socket._on_close(event[2], event[3], event[4])
                    elif kind == _EV_ERROR:
                        socket = sockets.get(event[1]) or self.revive(event[1])
                        if socket is not None:
                            socket._on_error(event[2])
                    elif kind == _EV_DRAINED:
                        socket = sockets.get(event[1])
                        if socket is not None:
                            socket._on_drained()
                    elif kind == _EV_ALL_CLOSED:
                        self._stop()
                return
            except Exception:
                logger.exception("internal error dispatching event %r", events[index][:2])
                start = index + 1

    def revive(self, socket_id: int) -> WebSocket | None:
        """The socket of a hibernated object: a new Python object for it (the object itself
        is rebuilt by the handler call that follows)."""
        handle = self.server.socket(socket_id)
        key = handle.object_key if handle is not None else None
        host = self.objects.get(key) if key is not None else None
        if host is None or handle is None:
            return None
        return host.revive(handle)

    def revive_closed(self, handle: _native.SocketHandle) -> WebSocket | None:
        key = handle.object_key
        host = self.objects.get(key) if key is not None else None
        return WebSocket._revive(handle, self, host) if host is not None else None

    def spawn(self, awaitable: Awaitable[Any], what: str) -> None:
        task = self.loop.create_task(_as_coroutine(awaitable))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("exception in a background task", exc_info=error)

    # -- HTTP requests ---------------------------------------------------------------------------

    def on_request(
        self,
        reply: _native.PendingReply,
        method: str,
        target: str,
        headers: list[tuple[str, bytes]],
        body: bytes,
        peer: str,
    ) -> None:
        request = Request._from_core(method, target, headers, body, peer)
        handler = self.app.fetch
        if handler is None:
            reply.respond(404, [("content-type", b"text/plain; charset=utf-8")], b"Not Found")
            return
        try:
            result = handler(request, self.app.env, self.ctx)
        except Exception:
            self._fail(reply, request)
            return
        if inspect.isawaitable(result):
            self.spawn(self._answer_later(reply, request, result), "fetch")
        else:
            self._answer(reply, request, result)

    async def _answer_later(
        self, reply: _native.PendingReply, request: Request, result: Awaitable[Response]
    ) -> None:
        try:
            response = await result
        except Exception:
            self._fail(reply, request)
            return
        self._answer(reply, request, response)

    def _fail(self, reply: _native.PendingReply, request: Request) -> None:
        logger.exception("exception in fetch for %s %s", request.method, request.url)
        reply.respond(
            500, [("content-type", b"text/plain; charset=utf-8")], b"Internal Server Error"
        )

    def _answer(self, reply: _native.PendingReply, request: Request, response: object) -> None:
        try:
            if not isinstance(response, Response):
                raise ResponseError(
                    f"fetch must return a sockworker.Response, not {type(response).__name__}"
                )
            if response.websocket is None:
                reply.respond(response.status, response.headers.raw(), response.body)
                return
            self._upgrade(reply, request, response)
        except Exception:
            self._fail(reply, request)

    def _upgrade(self, reply: _native.PendingReply, request: Request, response: Response) -> None:
        client = response.websocket
        assert client is not None
        server = client._peer
        if response.status != 101:
            raise ResponseError("a Response with a websocket must have status 101")
        if server is None:
            raise ResponseError("Response(websocket=...) takes the client end of a WebSocketPair")
        if server._handle is not None:
            raise ResponseError("this WebSocketPair was already returned in a response")
        if not server._accepted:
            raise ResponseError("call server.accept() before returning the client end")
        if not reply.is_websocket:
            raise ResponseError(
                "status 101 with a websocket answers only a WebSocket upgrade request"
            )
        headers = response.headers
        handle = reply.accept_websocket(headers.raw())
        url = "ws" + request.url.removeprefix("http")
        self.sockets[handle.id] = server
        server._bind(handle, self, url, headers.get("sec-websocket-protocol", ""))
        if isinstance(server._object, _ObjectHost):
            server._object.adopt(server, handle)


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
