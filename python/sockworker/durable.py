"""Durable Objects (SPEC §2.4) and WebSocket hibernation (SPEC §2.5) on the Python side.

An ``_ObjectHost`` stands for one object id for the life of the server: it builds the instance
when an event arrives, runs events in arrival order, drops the instance (and every Python object
of its sockets) once it is idle, and resets it after an uncaught exception. What must survive
hibernation (the sockets, their tags and attachments, auto-response stamps) lives in the core.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import inspect
import logging
import os
import pickle
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from . import _native, cpu
from .errors import InvalidArgument, ResponseError
from .http import Headers, Request, Response
from .limits import Limits
from .websocket import WebSocket

if TYPE_CHECKING:
    from .app import Env, _Runtime

__all__ = [
    "AutoResponse",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "now",
]

logger = logging.getLogger("sockworker")

MAX_TAGS = 10
MAX_TAG_CHARS = 256

# Handler methods and the Cloudflare names they are also found under.
HANDLER_NAMES = {
    "websocket_message": "webSocketMessage",
    "websocket_close": "webSocketClose",
    "websocket_error": "webSocketError",
    "alarm": "alarm",
    "fetch": "fetch",
}


def now() -> float:
    """The current time in seconds since the epoch (``time.time()``)."""
    return time.time()


class DurableObjectId:
    """The id of one Durable Object: 64 hex characters; ``name`` is set for ``id_from_name`` ids."""

    __slots__ = ("_hex", "name")

    def __init__(self, hex_id: str, name: str | None = None) -> None:
        self._hex = hex_id
        self.name = name

    def __str__(self) -> str:
        return self._hex

    to_string = __str__
    toString = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DurableObjectId) and other._hex == self._hex

    def equals(self, other: DurableObjectId) -> bool:
        return self == other

    def __hash__(self) -> int:
        return hash(self._hex)

    def __repr__(self) -> str:
        return f"DurableObjectId({self._hex!r}{f', name={self.name!r}' if self.name else ''})"


class AutoResponse:
    """A request/response pair the core answers without waking the object (text or binary)."""

    __slots__ = ("request", "response")

    def __init__(self, request: str | bytes, response: str | bytes) -> None:
        for value in (request, response):
            if not isinstance(value, str | bytes):
                raise TypeError("an AutoResponse pair is str or bytes")
        self.request = request
        self.response = response

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AutoResponse) and (other.request, other.response) == (
            self.request,
            self.response,
        )

    def __hash__(self) -> int:
        return hash((self.request, self.response))

    def __repr__(self) -> str:
        return f"AutoResponse({self.request!r}, {self.response!r})"


class DurableObject:
    """Base class of Durable Objects. Subclasses define ``fetch``, ``websocket_message``,
    ``websocket_close``, ``websocket_error``, ``alarm`` and any public methods (RPC)."""

    #: Overrides of the app's limits for this namespace (fields left at their default inherit).
    limits: ClassVar[Limits | None] = None
    #: Hibernatable WebSockets one object may hold.
    max_hibernatable_websockets: ClassVar[int] = 32_768

    def __init__(self, ctx: DurableObjectState, env: Env) -> None:
        self.ctx = ctx
        self.env = env


class DurableObjectState:
    """``self.ctx`` of a Durable Object. It outlives the instance: it is the object's, not the
    instance's, and holds no Python object per socket."""

    def __init__(self, host: _ObjectHost) -> None:
        self._host = host
        self.id = host.id

    @property
    def storage(self) -> Any:
        raise NotImplementedError("Durable Object storage is not available yet in this version")

    def accept_websocket(self, ws: WebSocket, tags: Iterable[str] = ()) -> None:
        """Accepts the server end of a pair as a hibernatable socket of this object: its events
        go to this object's ``websocket_*`` methods, and it does not keep the object awake."""
        tags = list(tags)
        if any(not isinstance(tag, str) for tag in tags):
            raise InvalidArgument("tags are strings")
        if ws._is_client_end:
            raise ResponseError("accept_websocket takes the server end of the pair")
        if ws._accepted:
            raise ResponseError("this WebSocket was already accepted")
        host = self._host
        host.native.check_accept(host.pending_accepts + 1, tags)
        ws._slot = cpu.current_slot()
        ws._accepted = True
        ws._ready_state = WebSocket.OPEN
        ws._object = host
        ws._tags = tags
        ws._limits = host.namespace.socket_limits
        host.pending_accepts += 1

    def get_websockets(self, tag: str | None = None) -> list[WebSocket]:
        """The open hibernatable sockets (with ``tag``, if given), as fresh objects after a
        hibernation."""
        return [self._host.revive(handle) for handle in self._host.native.sockets(tag)]

    def get_tags(self, ws: WebSocket) -> list[str]:
        if ws._object is not self._host:
            raise InvalidArgument("this WebSocket was not accepted by this object")
        return ws._handle.tags if ws._handle is not None else list(ws._tags)

    def websocket_count(self, tag: str | None = None) -> int:
        """Counts the open hibernatable sockets in the core; wakes nothing."""
        return self._host.native.count(tag)

    def broadcast(
        self, message: str | bytes, tag: str | None = None, exclude: WebSocket | None = None
    ) -> int:
        """Sends ``message`` to every open hibernatable socket (with ``tag``), but ``exclude``.
        The core encodes the frame once; no Python object per socket. Returns how many."""
        excluded = (
            exclude._handle.id if exclude is not None and exclude._handle is not None else None
        )
        return self._host.native.broadcast(message, tag, excluded)

    def set_websocket_auto_response(
        self, pairs: AutoResponse | Sequence[AutoResponse] | None = None
    ) -> None:
        """The core answers each pair's request with its response, without waking the object,
        and stamps the socket (``get_websocket_auto_response_timestamp``). None clears."""
        if pairs is None:
            listed: list[AutoResponse] = []
        elif isinstance(pairs, AutoResponse):
            listed = [pairs]
        else:
            listed = list(pairs)
        if any(not isinstance(pair, AutoResponse) for pair in listed):
            raise TypeError("set_websocket_auto_response takes AutoResponse pairs")
        self._host.native.set_auto_responses([(p.request, p.response) for p in listed])
        self._host.auto_response = (
            pairs if pairs is None or isinstance(pairs, AutoResponse) else listed
        )

    def get_websocket_auto_response(self) -> AutoResponse | list[AutoResponse] | None:
        return self._host.auto_response

    def get_websocket_auto_response_timestamp(self, ws: WebSocket) -> datetime.datetime | None:
        stamp = ws._handle.auto_response_timestamp if ws._handle is not None else None
        return None if stamp is None else datetime.datetime.fromtimestamp(stamp, datetime.UTC)

    def set_hibernatable_websocket_event_timeout(self, ms: int | None = None) -> None:
        """An ``async`` WebSocket handler of this object running longer than ``ms`` is
        cancelled (the instance is then reset). None removes the timeout."""
        if ms is not None and (not isinstance(ms, int) or ms <= 0):
            raise InvalidArgument("the event timeout is a positive number of milliseconds or None")
        self._host.event_timeout = ms

    def get_hibernatable_websocket_event_timeout(self) -> int | None:
        return self._host.event_timeout

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        """Keeps the object awake until ``awaitable`` is done; its exceptions are logged."""
        self._host.track(awaitable, "wait_until")

    # Cloudflare's names, for code ported from Workers.
    acceptWebSocket = accept_websocket
    getWebSockets = get_websockets
    getTags = get_tags
    getWebSocketAutoResponse = get_websocket_auto_response
    setWebSocketAutoResponse = set_websocket_auto_response
    getWebSocketAutoResponseTimestamp = get_websocket_auto_response_timestamp
    setHibernatableWebSocketEventTimeout = set_hibernatable_websocket_event_timeout
    getHibernatableWebSocketEventTimeout = get_hibernatable_websocket_event_timeout
    waitUntil = wait_until


class _ObjectHost:
    """One object id: the instance while awake, its event bookkeeping, its core state."""

    def __init__(self, namespace: DurableObjectNamespace, object_id: DurableObjectId) -> None:
        runtime = namespace._bound()
        self.runtime = runtime
        self.namespace = namespace
        self.cls = namespace.cls
        self.id = object_id
        self.native = _native.ObjectState(self.cls.max_hibernatable_websockets)
        self.state = DurableObjectState(self)
        self.instance: DurableObject | None = None
        self.constructed = 0
        self.sockets: dict[int, WebSocket] = {}
        self.standard_sockets: list[WebSocket] = []
        self.pending_accepts = 0
        self.in_flight = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.auto_response: AutoResponse | list[AutoResponse] | None = None
        self.event_timeout: int | None = None
        self.last_event = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.hibernate_after = float(namespace.limits.hibernate_after)
        # The meter: a slot per account, and the open interval of billable duration.
        self.slots: dict[str, _native.Slot] = {}
        self.billed_since: float | None = None
        self.bill_slot: _native.Slot | None = None

    # -- the meter ------------------------------------------------------------------------------

    def slot(self, account: str) -> _native.Slot:
        slot = self.slots.get(account)
        if slot is None:
            limits = self.namespace.limits
            slot = self.runtime.meter._native.slot(
                account, self.namespace.binding, str(self.id), limits.cpu_ms, limits.wall_ms or 0
            )
            self.slots[account] = slot
        return slot

    def idle_hibernatable(self) -> bool:
        """Idle and holding only hibernatable sockets: not billed for duration (SPEC §4)."""
        return not (
            self.in_flight
            or self.tasks
            or self.pending_accepts
            or any(ws.ready_state != WebSocket.CLOSED for ws in self.standard_sockets)
        )

    def bill(self) -> None:
        """The object is (still) active: its duration accrues from now if it did not."""
        if self.billed_since is not None or not self.runtime.app.metering:
            return
        self.billed_since = self.runtime.loop.time()
        current = cpu.current_slot()
        self.bill_slot = (
            current
            if current is not None and current.object_id == str(self.id)
            else self.slot(self.runtime.current_account())
        )
        self.runtime.billing_hosts.add(self)

    def settle(self, force: bool = False) -> None:
        """Accrues the duration up to now; the interval ends if the object is idle and
        hibernatable, or gone (or ``force``, at shutdown)."""
        since, slot = self.billed_since, self.bill_slot
        if since is None or slot is None:
            return
        now = self.runtime.loop.time()
        slot.add(_native.UNIT_DURATION_US, int((now - since) * 1e6))
        if force or self.instance is None or self.idle_hibernatable():
            self.billed_since = None
            self.runtime.billing_hosts.discard(self)
        else:
            self.billed_since = now

    # -- instance lifecycle ---------------------------------------------------------------------

    def awake(self) -> DurableObject:
        instance = self.instance
        if instance is None:
            instance = self.cls(self.state, self.runtime.app.env)
            self.instance = instance
            self.constructed += 1
        return instance

    def revive(self, handle: _native.SocketHandle) -> WebSocket:
        """The Python object of one of this object's sockets, made anew after hibernation."""
        ws = self.sockets.get(handle.id)
        if ws is None:
            ws = WebSocket._revive(handle, self.runtime, self)
            self.sockets[handle.id] = ws
            self.runtime.sockets[handle.id] = ws
        return ws

    def adopt(self, ws: WebSocket, handle: _native.SocketHandle) -> None:
        """Called once the 101 for a socket accepted with ``accept_websocket`` is sent."""
        self.pending_accepts -= 1
        handle.set_origin(ws.url or "", ws.protocol)
        self.native.adopt(handle, ws._tags)
        ws._tags = []
        self.sockets[handle.id] = ws

    def hibernate(self) -> None:
        """Drops the instance and every Python object of its sockets; the core keeps them."""
        self.settle(force=True)
        for socket_id in self.sockets:
            self.runtime.sockets.pop(socket_id, None)
        self.sockets.clear()
        self.instance = None
        logger.debug("object %s of %s hibernated", self.id, self.namespace.binding)

    def reset(self, kind: str) -> None:
        """After an uncaught exception: a new instance for the next event. Hibernatable sockets
        stay open; standard-API sockets of the instance are closed with 1011."""
        logger.exception(
            "exception in %s of object %s (%s); resetting it", kind, self.id, self.namespace.binding
        )
        for ws in self.standard_sockets:
            if ws.ready_state < WebSocket.CLOSING:
                ws.close(1011, "internal error")
        self.standard_sockets.clear()
        self.hibernate()

    # -- hibernation clock ----------------------------------------------------------------------

    def touch(self) -> None:
        self.settle()
        self.last_event = self.runtime.loop.time()
        if self.timer is None:
            self.timer = self.runtime.loop.call_later(self.hibernate_after, self._check_idle)

    def _check_idle(self) -> None:
        self.timer = None
        if self.instance is None:
            return
        self.standard_sockets = [
            ws for ws in self.standard_sockets if ws.ready_state != WebSocket.CLOSED
        ]
        busy = self.in_flight or self.tasks or self.standard_sockets or self.pending_accepts
        remaining = self.last_event + self.hibernate_after - self.runtime.loop.time()
        if busy or remaining > 0:
            delay = remaining if remaining > 0 else self.hibernate_after
            self.timer = self.runtime.loop.call_later(delay, self._check_idle)
            return
        self.hibernate()

    # -- running events -------------------------------------------------------------------------

    def handler(self, name: str) -> Callable[..., Any] | None:
        instance = self.awake()
        found = getattr(instance, name, None)
        if found is None:
            found = getattr(instance, HANDLER_NAMES[name], None)
        return found

    def run(self, name: str, *args: Any) -> None:
        """Runs a handler for an event that returns nothing (socket events, alarm)."""
        self.bill()
        self.in_flight += 1
        try:
            try:
                handler = self.handler(name)  # may run the constructor
            except Exception:
                self.reset(f"the constructor (for {name})")
                return
            if handler is None:
                return
            try:
                result = handler(*args)
            except Exception:
                self.reset(name)
                return
            if inspect.isawaitable(result):
                timeout = (
                    self.event_timeout / 1000 if self.event_timeout and name != "alarm" else None
                )
                self.in_flight += 1  # until _finish ends
                self.runtime.spawn(self._finish(name, result, timeout), name)
        finally:
            self.in_flight -= 1
            self.touch()

    async def _finish(self, name: str, result: Awaitable[Any], seconds: float | None) -> None:
        try:
            async with asyncio.timeout(seconds):
                await result
        except Exception:
            self.reset(name)
        finally:
            self.in_flight -= 1
            self.touch()

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Runs a handler whose result the caller awaits (fetch, RPC); exceptions propagate to
        the caller after resetting the instance. It runs as a task of its own, so its CPU is
        charged to this object (for the caller's account), not to the caller."""
        runtime = self.runtime
        if not runtime.app.metering:
            return await self._invoke(None, name, args, kwargs)
        slot = self.slot(runtime.current_account())
        coro = cpu.Metered(self._invoke(slot, name, args, kwargs), slot, runtime.server)
        return await asyncio.Task(coro, loop=runtime.loop)

    async def _invoke(
        self, slot: _native.Slot | None, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.bill()
        self.touch()
        method = self.handler(name) if name in HANDLER_NAMES else getattr(self.awake(), name, None)
        if method is None or not callable(method):
            # The caller's mistake, not the object's: no reset.
            raise AttributeError(f"{self.cls.__name__} has no method {name!r}")
        self.in_flight += 1
        result: Any = None
        try:
            result = method(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            self.reset("fetch" if name == "fetch" else f"RPC {name}")
            raise
        finally:
            self.in_flight -= 1
            if slot is not None and not _accepted_here(result, slot):
                slot.add(_native.UNIT_REQUESTS, 1)
            self.touch()
        return result

    def track(self, awaitable: Awaitable[Any], what: str) -> None:
        async def tracked() -> None:
            try:
                await awaitable
            except Exception:
                logger.exception("exception in %s of object %s", what, self.id)

        task = self.runtime.loop.create_task(tracked())
        self.tasks.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self.tasks.discard(task)
            self.touch()

        task.add_done_callback(done)

    # -- socket events (ObjectEvents) -----------------------------------------------------------

    def socket_message(self, ws: WebSocket, data: str | bytes) -> None:
        self.run("websocket_message", ws, data)

    def socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        handle = ws._handle
        if handle is not None:
            self.sockets.pop(handle.id, None)
        self.run("websocket_close", ws, code, reason, was_clean)

    def socket_error(self, ws: WebSocket, error: BaseException) -> None:
        self.run("websocket_error", ws, error)


def _accepted_here(result: Any, slot: _native.Slot) -> bool:
    """The fetch answered with a socket it accepted itself: a connection, not a request."""
    if not isinstance(result, Response) or result.websocket is None:
        return False
    server = result.websocket._peer
    return server is not None and server._slot == slot


class DurableObjectStub:
    """The way to one object: ``await stub.fetch(request)`` and ``await stub.method(*args)``
    (arguments and results are passed by value: pickled)."""

    __slots__ = ("_namespace", "id", "name")

    def __init__(self, namespace: DurableObjectNamespace, object_id: DurableObjectId) -> None:
        self._namespace = namespace
        self.id = object_id
        self.name = object_id.name

    async def fetch(
        self, request: Request | str, *, method: str = "GET", headers: Any = None, body: bytes = b""
    ) -> Response:
        if isinstance(request, str):
            request = Request(method, request, Headers(headers), body)
        host = self._namespace._host(self.id)
        response = await host.call("fetch", request)
        if not isinstance(response, Response):
            raise ResponseError(f"{host.cls.__name__}.fetch must return a Response")
        server = response.websocket._peer if response.websocket is not None else None
        if server is not None and server._object is None and server._accepted:
            server._limits = self._namespace.socket_limits
            host.standard_sockets.append(server)
            host.bill()  # a standard-API socket keeps the object billed while it is open
        return response

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_") or name in HANDLER_NAMES or name in HANDLER_NAMES.values():
            raise AttributeError(f"{name!r} cannot be called through a stub")

        async def rpc(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            result = await self._namespace._host(self.id).call(name, *args, **kwargs)
            return pickle.loads(pickle.dumps(result))

        rpc.__name__ = name
        return rpc

    def __repr__(self) -> str:
        return f"<DurableObjectStub {self._namespace.binding} {self.id}>"


class DurableObjectNamespace:
    """``env.BINDING``: makes ids and stubs for one Durable Object class."""

    def __init__(self, binding: str, cls: type[DurableObject], app_limits: Limits) -> None:
        if not (isinstance(cls, type) and issubclass(cls, DurableObject)):
            raise TypeError(f"durable_objects[{binding!r}] must be a DurableObject subclass")
        self.binding = binding
        self.cls = cls
        if cls.limits is not None:
            cls.limits._for_namespace(binding)
        self.limits = cls.limits.over(app_limits) if cls.limits is not None else app_limits
        #: Sockets accepted by this namespace's objects are held to these (None: the app's).
        self.socket_limits = self.limits if cls.limits is not None else None
        self._runtime: _Runtime | None = None
        self._hosts: dict[DurableObjectId, _ObjectHost] = {}

    def id_from_name(self, name: str) -> DurableObjectId:
        digest = hashlib.sha256(f"{self.binding}\0{name}".encode()).hexdigest()
        return DurableObjectId(digest, name)

    def new_unique_id(self) -> DurableObjectId:
        return DurableObjectId(os.urandom(32).hex())

    def id_from_string(self, hex_id: str) -> DurableObjectId:
        if not isinstance(hex_id, str) or len(hex_id) != 64:
            raise InvalidArgument("a Durable Object id is 64 hex characters")
        try:
            bytes.fromhex(hex_id)
        except ValueError:
            raise InvalidArgument("a Durable Object id is 64 hex characters") from None
        return DurableObjectId(hex_id.lower())

    def get(self, object_id: DurableObjectId) -> DurableObjectStub:
        if not isinstance(object_id, DurableObjectId):
            raise TypeError("get() takes a DurableObjectId (use id_from_name for a name)")
        return DurableObjectStub(self, object_id)

    def get_by_name(self, name: str) -> DurableObjectStub:
        return self.get(self.id_from_name(name))

    idFromName = id_from_name
    newUniqueId = new_unique_id
    idFromString = id_from_string
    getByName = get_by_name

    def _bound(self) -> _Runtime:
        if self._runtime is None:
            raise RuntimeError("Durable Objects are reachable only while the app is serving")
        return self._runtime

    def _host(self, object_id: DurableObjectId) -> _ObjectHost:
        host = self._hosts.get(object_id)
        if host is None:
            host = _ObjectHost(self, object_id)
            self._hosts[object_id] = host
            self._bound().objects[host.native.key] = host
        return host
