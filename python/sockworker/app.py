"""``App`` and the runtime that runs it: the one Python thread with the asyncio loop, the core's
event batches dispatched to handlers, and the lifecycle (serve, graceful shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import resource
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from . import _loop, _native, cpu
from .billing import BillingHook, Meter, Pricing
from .durable import DurableObjectId, DurableObjectNamespace, _ObjectHost, current_host
from .errors import CpuLimitExceeded, ResponseError, StorageError, WallLimitExceeded
from .http import Request, Response
from .limits import Limits
from .logs import TEXT_FORMAT, CoreLogs
from .outgoing import ConnectError
from .websocket import WebSocket

__all__ = ["App", "Env", "ExecutionContext"]

logger = logging.getLogger("sockworker")

FetchHandler = Callable[[Request, "Env", "ExecutionContext"], Awaitable[Response] | Response]
AccountOf = Callable[[Request], str]
_REQUESTS = _native.UNIT_REQUESTS
_PLAIN = [("content-type", b"text/plain; charset=utf-8")]

#: Seconds a graceful shutdown waits for sockets to close (``--shutdown-timeout``).
SHUTDOWN_GRACE = 10.0
_EV_REQUEST = _native.EV_REQUEST
_EV_MESSAGE = _native.EV_MESSAGE
_EV_CLOSE = _native.EV_CLOSE
_EV_ERROR = _native.EV_ERROR
_EV_DRAINED = _native.EV_DRAINED
_EV_ALL_CLOSED = _native.EV_ALL_CLOSED
_EV_CONNECTED = _native.EV_CONNECTED
_EV_ALARM = _native.EV_ALARM
_EV_RELEASED = _native.EV_RELEASED
_EV_COMMIT_FAILED = _native.EV_COMMIT_FAILED

#: Where Durable Object storage lives when neither App(data_dir=) nor --data-dir says.
DEFAULT_DATA_DIR = "./.sockworker/data"


class Env:
    """The bindings given to handlers: ``env.NAME`` for each item of ``App(env=...)`` and each
    Durable Object namespace of ``App(durable_objects=...)``. An unbound name raises
    ``AttributeError``."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.__dict__.update(values or {})

    def __getattr__(self, name: str) -> Any:
        # Only reached for a name that is not bound: says so (and types env.NAME as Any).
        raise AttributeError(f"env has no binding {name!r}")

    def __repr__(self) -> str:
        return f"Env({', '.join(sorted(self.__dict__))})"


class ExecutionContext:
    """The ``ctx`` argument of a Worker's ``fetch``. Cloudflare's names ``waitUntil`` and
    ``passThroughOnException`` are the same methods."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: _Runtime) -> None:
        self._runtime = runtime

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        """Keeps work running after the response is sent; its exceptions are logged."""
        self._runtime.spawn(awaitable, "wait_until")

    waitUntil = wait_until

    def pass_through_on_exception(self) -> None:
        """Accepted for code ported from Cloudflare; there is no origin to pass through to."""

    passThroughOnException = pass_through_on_exception


class App:
    """A Worker: ``fetch(request, env, ctx)`` (a ``def`` or an ``async def``) handles every
    HTTP request and returns a ``Response``, which may carry a WebSocket (status 101). With no
    ``fetch``, every request gets 404.

    An uncaught exception in ``fetch`` is logged (logger ``sockworker``, with its traceback) and
    answered ``500 Internal Server Error`` with no detail in the body; returning something else
    than a ``Response`` is treated the same way. ``CpuLimitExceeded`` (the event passed
    ``Limits.cpu_ms``) is answered ``503 Service Unavailable``.

    ``app.meter.totals()`` is a ``UsageRecord`` of everything counted since the app was made.
    """

    def __init__(
        self,
        fetch: FetchHandler | None = None,
        *,
        limits: Limits | None = None,
        env: Mapping[str, Any] | None = None,
        durable_objects: Mapping[str, type] | None = None,
        account: AccountOf | None = None,
        billing: BillingHook | None = None,
        pricing: Pricing | None = None,
        metrics_path: str | None = None,
        metering: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        durability: str = "full",
        allowed_origins: Iterable[str] | None = None,
        compression: bool = False,
    ) -> None:
        """
        Args:
            fetch: the Worker's handler, ``fetch(request, env, ctx) -> Response``.
            limits: the app's ``Limits``; a Durable Object class may override fields for its
                namespace with a class attribute ``limits``.
            env: items that become attributes of the ``env`` argument.
            durable_objects: ``{"BINDING": DurableObjectSubclass}``; each becomes
                ``env.BINDING``, a ``DurableObjectNamespace``. A binding may not also be in
                ``env`` (``ValueError``).
            account: ``account(request) -> str``, the label every unit the request causes is
                billed to (default ``"default"``). Raising, or returning something else than a
                ``str``, answers 500.
            billing: a ``BillingHook``: receives the usage records, and may refuse requests.
            pricing: the ``Pricing`` ratios.
            metrics_path: a path answered with the totals as Prometheus text (off by default;
                not billed, not admitted).
            metering: False turns CPU accounting, CPU limits and the meter off.
            data_dir: where Durable Object storage lives (default ``./.sockworker/data``).
            durability: ``"full"`` (a commit is on disk before what depends on it is sent) or
                ``"normal"`` (in the operating system's cache: it survives a crash of the
                server, not of the machine).
            allowed_origins: e.g. ``["https://example.com"]``: a WebSocket upgrade whose
                ``Origin`` header is not one of them is answered 403 by the core before any
                handler runs (requests without ``Origin``, which browsers always send, are let
                through).
            compression: True accepts permessage-deflate (RFC 7692) when a client offers it.
        """
        if durability not in ("full", "normal"):
            raise ValueError(f'durability is "full" or "normal", not {durability!r}')
        self.fetch = fetch
        self.limits = limits or Limits()
        self.account = account
        self.billing = billing
        self.pricing = pricing or Pricing()
        self.meter = Meter(self.pricing)
        self.metrics_path = metrics_path
        self.metering = metering
        self.data_dir = data_dir
        self.durability = durability
        self.allowed_origins = None if allowed_origins is None else list(allowed_origins)
        self.compression = compression
        if isinstance(allowed_origins, str):
            raise TypeError("allowed_origins is a list of origins, not one string")
        self.namespaces = {
            binding: DurableObjectNamespace(binding, cls, self.limits)
            for binding, cls in (durable_objects or {}).items()
        }
        clash = set(self.namespaces) & set(env or {})
        if clash:
            raise ValueError(f"env and durable_objects both bind {sorted(clash)}")
        self.env = Env({**(env or {}), **self.namespaces})

    def run(
        self,
        host: str = "127.0.0.1",
        port: int = 8787,
        *,
        io_threads: int | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        shutdown_timeout: float = SHUTDOWN_GRACE,
    ) -> None:
        """Serves until SIGINT or SIGTERM, then closes every socket with 1001 and returns
        (after ``shutdown_timeout`` seconds at most).

        With ``certfile`` (a PEM certificate chain) and ``keyfile`` (its PEM key) it serves
        ``https://`` and ``wss://`` (rustls; TLS 1.2 and 1.3). A missing or unreadable file, or
        one without a usable certificate or key, raises ``ServerStartError`` before anything
        is served, as does an address in use. ``io_threads`` is the number of threads doing
        socket I/O besides the one Python thread that runs the application; with 0 that thread
        does the I/O too (the single-thread mode). The default is ``$SOCKWORKER_IO_THREADS``,
        else 0 when the process has one core to itself (its CPU affinity or cgroup quota) and 1
        otherwise. Logging is set up (INFO, to stderr) unless the program configured it.
        """
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
        threads = _loop.io_threads(io_threads)
        serving = self.serve(
            host,
            port,
            io_threads=threads,
            certfile=certfile,
            keyfile=keyfile,
            shutdown_timeout=shutdown_timeout,
        )
        _loop.run(serving, single_thread=threads == 0)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8787,
        *,
        io_threads: int | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        shutdown_timeout: float = SHUTDOWN_GRACE,
    ) -> None:
        """``run``, on the running asyncio loop: serves until SIGINT or SIGTERM. The
        single-thread mode (``io_threads=0``) needs the loop ``run`` makes; on another loop the
        server gets one I/O thread instead."""
        if not isinstance(shutdown_timeout, int | float) or shutdown_timeout < 0:
            raise ValueError("shutdown_timeout is a number of seconds >= 0")
        _raise_fd_limit()
        # A file past RLIMIT_FSIZE is then an error (a full disk for that object), not a kill.
        with contextlib.suppress(ValueError, OSError, AttributeError):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # First, so that what the core logs while it starts is delivered too.
        core_logs = CoreLogs(asyncio.get_running_loop())
        core_logs.start()
        try:
            runtime = _Runtime(self, host, port, _loop.io_threads(io_threads), certfile, keyfile)
            runtime.shutdown_timeout = float(shutdown_timeout)
            await runtime.run()
        finally:
            core_logs.stop()


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

    #: The runtime serving now (one per process), for ``sw.connect``.
    current: _Runtime | None = None

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        io_threads: int,
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        limits = app.limits
        self.app = app
        every = [limits] + [ns.limits for ns in app.namespaces.values()]
        reactor = _loop.reactor_of(asyncio.get_running_loop()) if io_threads == 0 else None
        if io_threads == 0 and reactor is None:
            logger.debug("not on sockworker's event loop: one I/O thread instead of none")
            io_threads = 1
        self.io_threads = io_threads
        self.server = _native.Server(
            host,
            port,
            limits=limits._socket_limits(),
            max_connections=limits.max_connections,
            max_body_size=limits.max_body_size,
            handshake_timeout=float(limits.handshake_timeout),
            io_threads=io_threads,
            metering=app.metering,
            certfile=certfile,
            keyfile=keyfile,
            # The watchdog looks every tenth of the smallest CPU or wall limit (5 to 100 ms).
            smallest_cpu_limit=min(
                [lim.cpu_ms for lim in every] + [lim.wall_ms for lim in every if lim.wall_ms]
            )
            / 1000,
            # Storage exists for apps with Durable Objects.
            data_dir=os.fspath(app.data_dir or DEFAULT_DATA_DIR) if app.namespaces else None,
            durability=app.durability,
            allowed_origins=app.allowed_origins,
            log_blocked_after=float(limits.log_blocked_after),
            on_blocked=self._on_blocked,
            compression=app.compression,
            reactor=reactor,
        )
        self.shutdown_timeout = SHUTDOWN_GRACE
        self.scheme = "https" if certfile else "http"
        self.ctx = ExecutionContext(self)
        self.meter = app.meter
        # The Worker's slot per account.
        self.worker_slots: dict[str, _native.Slot] = {}
        # Objects resident and billed for duration now.
        self.billing_hosts: set[_ObjectHost] = set()
        self.flush_timer: asyncio.TimerHandle | None = None
        # Outgoing sockets being opened: token -> (future, url, slot, owner, accepted).
        self.connecting: dict[int, tuple[asyncio.Future[WebSocket], str, Any, Any, bool]] = {}
        self.next_token = 1
        self.sockets: dict[int, WebSocket] = {}
        # Resident Durable Objects by the key of their core state (a failed commit names it).
        self.hosts_by_key: dict[int, _ObjectHost] = {}
        # Results waiting for the output gate, by token.
        self.gate_waiters: dict[int, asyncio.Future[bool]] = {}
        self.next_gate_token = 1
        self.commit_scheduled = False
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
        previous_factory = loop.get_task_factory()
        _Runtime.current = self
        if self.app.metering:
            cpu._server = self.server
            self._schedule_flush()
        loop.set_task_factory(
            cpu.task_factory(self.server if self.app.metering else None, _adopt_by_current_host)
        )
        server = self.server
        self.meter._storage_bytes = lambda: server.storage_bytes
        self.meter._storage_stats = server.storage_stats
        threads = self.io_threads
        mode = "single-thread" if threads == 0 else f"{threads} I/O thread{'s' * (threads > 1)}"
        logger.info("listening on %s://%s:%d (%s)", self.scheme, shown, port, mode)
        try:
            await self.stopped
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            loop.remove_reader(self.server.fileno())
            self.server.stop()
            for task in list(self.tasks):
                task.cancel()
            if self.flush_timer is not None:
                self.flush_timer.cancel()
            _Runtime.current = None
            for future, *_ in self.connecting.values():
                if not future.done():
                    future.set_exception(ConnectError("the server stopped"))
            loop.set_task_factory(previous_factory)
            self.meter._storage_bytes = lambda: 0
            self.meter._storage_stats = lambda: (0,) * 7
            for waiter in self.gate_waiters.values():
                if not waiter.done():
                    waiter.set_result(False)
            if self.app.metering:
                cpu._server = None
                # Every object stops accruing duration; the hook gets the last records.
                for resident in list(self.billing_hosts):
                    resident.settle(force=True)
                self.meter._deliver(self.app.billing)
            logger.info("stopped")

    def shutdown(self) -> None:
        """Stops accepting and closes every socket with 1001; the run ends when all are closed."""
        if self.shutting_down or self.stopped.done():
            return
        self.shutting_down = True
        logger.info("shutting down: closing %d sockets with 1001", self.server.open_sockets)
        self.server.shutdown(1001, "server shutting down")
        self.loop.call_later(self.shutdown_timeout, self._stop)

    def _stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    # -- the meter -------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        hook = self.app.billing
        interval = hook.flush_interval if hook is not None else BillingHook.flush_interval
        self.flush_timer = self.loop.call_later(interval, self._flush)

    def _flush(self) -> None:
        """Brings every resident object's duration up to now, then gives the hook its records."""
        for resident in list(self.billing_hosts):
            resident.settle()
        self.meter._deliver(self.app.billing)
        self._schedule_flush()

    # -- a blocked loop --------------------------------------------------------------------------

    def _on_blocked(self, kind: int, seconds: float) -> None:
        """Called by the core's watchdog, on its own thread, when one event has held the loop
        for ``Limits.log_blocked_after``: logs what runs, where, and the Python stack."""
        frame = sys._current_frames().get(self.server.thread_ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
        slot = self.server.current_slot() if self.app.metering else None
        where = "the Worker"
        if slot is not None and slot.namespace is not None:
            where = f"object {slot.object_id} of {slot.namespace}"
        self.meter._blocked_events += 1
        logger.warning(
            "the event loop is blocked: a %s event of %s has run for %.1f s (every other socket "
            "and request waits; run blocking calls with `await asyncio.to_thread(...)`); "
            "Python stack:\n%s",
            _EVENT_KINDS.get(kind, "?"),
            where,
            seconds,
            stack.rstrip(),
        )

    def worker_slot(self, account: str) -> _native.Slot:
        slot = self.worker_slots.get(account)
        if slot is None:
            limits = self.app.limits
            slot = self.meter._native.slot(
                account, None, None, limits.cpu_ms, float(limits.wall_ms or 0)
            )
            self.worker_slots[account] = slot
        return slot

    def current_account(self) -> str:
        """The account of the code running now (the caller of a stub, say)."""
        slot = self.server.current_slot() if self.app.metering else None
        return slot.account if slot is not None else "default"

    # -- the hot path: one call per batch of core events -----------------------------------------

    def dispatch(self) -> None:
        try:
            self._dispatch(self.server.drain())
        finally:
            # Charges the batch's CPU time, and writes what its handlers sent in as few system
            # calls as it can.
            self.server.flush()

    def _dispatch(self, events: _native.Batch) -> None:
        sockets = self.sockets
        done = False
        while not done:
            event: tuple[Any, ...] = ()
            # One try around the loop (free in CPython 3.11) rather than one per event: a bug of
            # ours in one event is logged and must not cost the rest of the batch. Handlers' own
            # exceptions are handled where they run. Iterating the batch tells the core which
            # event runs (CPU accounting, the CPU-limit watchdog).
            try:
                for event in events:
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
                    elif kind == _EV_RELEASED:
                        waiter = self.gate_waiters.pop(event[1], None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(event[2])
                    elif kind == _EV_ALARM:
                        self.on_alarm(event[1], event[2], event[3], event[4])
                    elif kind == _EV_COMMIT_FAILED:
                        host = self.hosts_by_key.get(event[1])
                        if host is not None:
                            host.reset("a storage commit", event[2])
                    elif kind == _EV_ALL_CLOSED:
                        self._stop()
                    elif kind == _EV_CONNECTED:
                        self.on_connected(*event[1:])
                done = True
            except Exception:
                logger.exception("internal error dispatching event %r", event[:2])

    # -- storage and the output gate -------------------------------------------------------------

    def schedule_commit(self) -> None:
        """Something was written: commit at the start of the next loop iteration (the end of a
        batch of events commits anyway), so writes of one iteration share one commit."""
        if not self.commit_scheduled:
            self.commit_scheduled = True
            self.loop.call_soon(self.commit)

    def commit(self) -> None:
        self.commit_scheduled = False
        self.server.commit()

    async def released(self, owner: int) -> None:
        """Waits until what was sent (and written) before is durable: how a result of object
        ``owner`` passes the output gate. Raises ``StorageError`` when its commit failed."""
        token = self.next_gate_token
        self.next_gate_token += 1
        if self.server.hold_token(owner, token) is None:
            return
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self.gate_waiters[token] = waiter
        if not await waiter:
            raise StorageError(
                "a storage commit failed; the object was reset and its result dropped"
            )

    def on_alarm(self, binding: str, object_id: str, id_name: str | None, retry: int) -> None:
        namespace = self.app.namespaces.get(binding)
        if namespace is None:
            logger.warning(
                "an alarm of object %s names namespace %r, which the app has not",
                object_id,
                binding,
            )
            return
        namespace._host(DurableObjectId(object_id, id_name)).fire_alarm(retry)

    # -- outgoing sockets ------------------------------------------------------------------------

    async def connect(
        self,
        url: str,
        protocols: list[str],
        headers: list[tuple[str, str]],
        accepted: bool,
        ca_file: str | None = None,
    ) -> WebSocket:
        """Opens an outgoing socket billed to, and kept by, the code running now."""
        slot = self.server.current_slot() if self.app.metering else None
        owner = self.owner_of(slot)
        token, self.next_token = self.next_token, self.next_token + 1
        future: asyncio.Future[WebSocket] = self.loop.create_future()
        self.connecting[token] = (future, url, slot, owner, accepted)
        self.server.connect(url, protocols, headers, slot, token, ca_file)
        return await future

    def owner_of(self, slot: _native.Slot | None) -> _ObjectHost | None:
        """The Durable Object whose event runs now, if any."""
        if slot is None or slot.namespace is None or slot.object_id is None:
            return None
        namespace = self.app.namespaces.get(slot.namespace)
        if namespace is None:
            return None
        return namespace._hosts.get(namespace.id_from_string(slot.object_id))

    def on_connected(
        self,
        token: int,
        handle: _native.SocketHandle | None,
        protocol: str,
        error: str | None,
    ) -> None:
        future, url, slot, owner, accepted = self.connecting.pop(token)
        if handle is None:
            if not future.done():
                future.set_exception(ConnectError(error or "connect failed"))
            return
        if future.done():  # the caller gave up (cancelled): nobody will use the socket
            handle.close(1001, "going away")
            return
        # Bound now, in the batch that opened it, so no message of it can come unclaimed.
        ws = WebSocket()
        ws._slot = slot
        ws._accepted = accepted
        ws._ready_state = WebSocket.OPEN
        self.sockets[handle.id] = ws
        ws._bind(handle, self, url, protocol)
        if owner is not None:
            owner.standard_sockets.append(ws)
            owner.bill()
            handle.set_owner(owner.native.key)
        future.set_result(ws)

    def host_of(self, handle: _native.SocketHandle) -> _ObjectHost | None:
        """The host of the object whose hibernatable socket this is, made if it has none."""
        state = handle.object
        name = state.name if state is not None else None
        namespace = self.app.namespaces.get(name[0]) if name is not None else None
        if state is None or name is None or namespace is None:
            return None
        return namespace._host(DurableObjectId(name[1], state.id_name))

    def revive(self, socket_id: int) -> WebSocket | None:
        """The socket of a hibernated object: a new Python object for it (the object itself
        is rebuilt by the handler call that follows)."""
        handle = self.server.socket(socket_id)
        host = self.host_of(handle) if handle is not None else None
        if host is None or handle is None:
            return None
        return host.revive(handle)

    def revive_closed(self, handle: _native.SocketHandle) -> WebSocket | None:
        host = self.host_of(handle)
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
        app = self.app
        if app.metrics_path is not None and request.path == app.metrics_path:
            # The operator's endpoint: not billed, not admitted.
            text = app.meter._prometheus().encode()
            reply.respond(200, [("content-type", b"text/plain; version=0.0.4")], text)
            return
        slot: _native.Slot | None = None
        if app.metering:
            try:
                account = app.account(request) if app.account is not None else "default"
                if not isinstance(account, str):
                    raise TypeError(f"App(account=...) must return a str, not {account!r}")
                refusal = app.billing.admit(request, account) if app.billing is not None else None
            except Exception:
                logger.exception("exception labelling or admitting %s %s", method, request.url)
                reply.respond(500, _PLAIN, b"Internal Server Error")
                return
            if refusal is not None:
                # Refused before anything is counted: no request, no connection.
                self._answer(reply, request, refusal, None)
                return
            slot = self.worker_slot(account)
            self.server.relabel(slot)
        handler = app.fetch
        if handler is None:
            self._count(slot, None)
            reply.respond(404, _PLAIN, b"Not Found")
            return
        try:
            result = handler(request, app.env, self.ctx)
        except Exception as error:
            self._fail(reply, request, slot, error)
            return
        if inspect.isawaitable(result):
            self.spawn(self._answer_later(reply, request, result, slot), "fetch")
        else:
            self._answer(reply, request, result, slot)

    async def _answer_later(
        self,
        reply: _native.PendingReply,
        request: Request,
        result: Awaitable[Response],
        slot: _native.Slot | None,
    ) -> None:
        try:
            response = await result
        except Exception as error:
            self._fail(reply, request, slot, error)
            return
        self._answer(reply, request, response, slot)

    @staticmethod
    def _count(slot: _native.Slot | None, response: object) -> None:
        """One request for the Worker, unless it answered with a socket it accepted itself
        (that is one connection, counted by the core when the 101 goes out)."""
        if slot is None:
            return
        if isinstance(response, Response) and response.websocket is not None:
            server = response.websocket._peer
            if server is not None and server._slot == slot:
                return
        slot.add(_REQUESTS, 1)

    def _fail(
        self,
        reply: _native.PendingReply,
        request: Request,
        slot: _native.Slot | None,
        error: BaseException,
    ) -> None:
        self._count(slot, None)
        if isinstance(error, CpuLimitExceeded):
            logger.error("fetch for %s %s exceeded its CPU limit", request.method, request.url)
            reply.respond(503, _PLAIN, b"Service Unavailable: CPU limit exceeded")
            return
        if isinstance(error, WallLimitExceeded):
            logger.error(
                "fetch for %s %s exceeded its wall-time limit", request.method, request.url
            )
            reply.respond(503, _PLAIN, b"Service Unavailable: time limit exceeded")
            return
        logger.error("exception in fetch for %s %s", request.method, request.url, exc_info=error)
        reply.respond(500, _PLAIN, b"Internal Server Error")

    def _answer(
        self,
        reply: _native.PendingReply,
        request: Request,
        response: object,
        slot: _native.Slot | None,
    ) -> None:
        try:
            if not isinstance(response, Response):
                raise ResponseError(
                    f"fetch must return a sockworker.Response, not {type(response).__name__}"
                )
            if response.websocket is None:
                reply.respond(response.status, response.headers.raw(), response.body)
            else:
                self._upgrade(reply, request, response)
        except Exception as error:
            self._fail(reply, request, slot, error)
            return
        self._count(slot, response)

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
        chosen = headers.get("sec-websocket-protocol")
        if chosen is not None:
            offered = [
                name.strip()
                for value in request.headers.get_all("sec-websocket-protocol")
                for name in value.split(",")
            ]
            if chosen.strip() not in offered:
                raise ResponseError(
                    f"the subprotocol {chosen!r} chosen in the 101 response was not offered by the "
                    f"client (it offered {', '.join(offered) if offered else 'none'}); the client "
                    "would fail the handshake"
                )
        if "sec-websocket-extensions" in headers:
            raise ResponseError("the core negotiates WebSocket extensions; do not set the header")
        limits = server._limits._socket_limits() if server._limits is not None else None
        handle = reply.accept_websocket(headers.raw(), server._slot, limits)
        url = "ws" + request.url.removeprefix("http")
        self.sockets[handle.id] = server
        server._bind(handle, self, url, headers.get("sec-websocket-protocol", ""))
        if isinstance(server._object, _ObjectHost):
            server._object.adopt(server, handle)
        elif isinstance(server._owner, _ObjectHost):
            handle.set_owner(server._owner.native.key)


_EVENT_KINDS = {
    _native.EV_REQUEST: "request",
    _native.EV_MESSAGE: "message",
    _native.EV_CLOSE: "close",
    _native.EV_ERROR: "error",
    _native.EV_DRAINED: "drained",
    _native.EV_CONNECTED: "connected",
    _native.EV_STEP: "async step",
}


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _adopt_by_current_host(task: asyncio.Task[Any]) -> None:
    """A task made while a Durable Object's code runs keeps that object resident (SPEC §2.5)."""
    host = current_host.get()
    if host is not None:
        host.adopt_task(task)
