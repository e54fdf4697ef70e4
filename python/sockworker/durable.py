"""Durable Objects (SPEC §2.4) and WebSocket hibernation (SPEC §2.5) on the Python side.

An ``_ObjectHost`` stands for one object id while it is resident: it builds the instance when
an event arrives, runs events in arrival order, resets it after an uncaught exception, and once
idle drops the instance, every Python object of its sockets, and itself. What survives
hibernation (the sockets, their tags and attachments, auto-responses, the event timeout) lives in
the core; storage and the alarm live in the object's database.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import inspect
import logging
import os
import pickle
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import _native, cpu
from .errors import InvalidArgument, ResponseError, StorageError
from .http import Headers, Request, Response
from .limits import Limits
from .storage import AlarmInfo, DurableObjectStorage
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
T = TypeVar("T")
_BINDING = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

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


# The Durable Object whose code runs now: set while its handlers run and in every task of its
# own, inherited by the tasks they create (contextvars), so those keep it resident and are
# cancelled when it resets.
current_host: ContextVar[_ObjectHost | None] = ContextVar("sockworker_object", default=None)

#: Alarm retries after a failure: at most this many, the first after 2 s, then doubling.
ALARM_RETRIES = 6
ALARM_FIRST_RETRY = 2.0
#: Keys the read cache of one resident object keeps before it starts over.
CACHE_ENTRIES = 4096


class DurableObjectState:
    """``self.ctx`` of a Durable Object instance. A new one is made for each instance; the state
    it reaches (sockets, storage, alarm) is the object's and survives hibernation."""

    def __init__(self, host: _ObjectHost, generation: int) -> None:
        self._host = host
        self._generation = generation
        self._storage: DurableObjectStorage | None = None
        self.id = host.id

    @property
    def storage(self) -> DurableObjectStorage:
        """The object's storage (SPEC §6): KV, SQL, transactions and the alarm."""
        if self._storage is None:
            self._storage = DurableObjectStorage(self._host, self._generation)
        return self._storage

    def block_concurrency_while(self, awaitable: Awaitable[T]) -> asyncio.Future[T]:
        """Delivers no other event to the object until ``awaitable`` is done (for set-up in the
        constructor, such as loading state from storage). Returns its result as a future. If it
        raises, the object is reset."""
        return self._host.block(awaitable)

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

    def get_websocket_auto_response(self) -> AutoResponse | list[AutoResponse] | None:
        """The pair set (several: a list), kept by the core across hibernation."""
        pairs = [
            AutoResponse(request, response)
            for request, response in self._host.native.auto_responses()
        ]
        if not pairs:
            return None
        return pairs[0] if len(pairs) == 1 else pairs

    def get_websocket_auto_response_timestamp(self, ws: WebSocket) -> datetime.datetime | None:
        stamp = ws._handle.auto_response_timestamp if ws._handle is not None else None
        return None if stamp is None else datetime.datetime.fromtimestamp(stamp, datetime.UTC)

    def set_hibernatable_websocket_event_timeout(self, ms: int | None = None) -> None:
        """An ``async`` WebSocket handler of this object running longer than ``ms`` is
        cancelled (the instance is then reset). None removes the timeout."""
        if ms is not None and (not isinstance(ms, int) or ms <= 0):
            raise InvalidArgument("the event timeout is a positive number of milliseconds or None")
        self._host.native.event_timeout_ms = ms

    def get_hibernatable_websocket_event_timeout(self) -> int | None:
        return self._host.native.event_timeout_ms

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
    blockConcurrencyWhile = block_concurrency_while
    webSocketCount = websocket_count


def _takes_info(method: Callable[..., Any]) -> bool:
    """``alarm(self, info)`` (SPEC §6) rather than ``alarm(self)``."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters
    )


class _ObjectHost:
    """One object id while it is resident (or busy): the instance, its events in arrival order,
    its tasks, its open database and read cache. A hibernated object has no host: what survives
    is in the core (its sockets' state in ``native``, its database on disk, its alarm), and the
    next event makes a new host (``DurableObjectNamespace._host``)."""

    def __init__(self, namespace: DurableObjectNamespace, object_id: DurableObjectId) -> None:
        runtime = namespace._bound()
        self.runtime = runtime
        self.namespace = namespace
        self.cls = namespace.cls
        self.id = object_id
        self.native = runtime.server.object_state(
            namespace.binding, str(object_id), self.cls.max_hibernatable_websockets
        )
        if object_id.name is not None:
            self.native.id_name = object_id.name
        runtime.hosts_by_key[self.native.key] = self
        # Bumped when the instance goes (reset, hibernation): storage of an older one refuses.
        self.generation = 0
        self.state = DurableObjectState(self, 0)
        self.instance: DurableObject | None = None
        self.constructed = 0
        self.sockets: dict[int, WebSocket] = {}
        self.standard_sockets: list[WebSocket] = []
        self.pending_accepts = 0
        self.in_flight = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        # block_concurrency_while: the task blocking, and the events waiting for it, in order.
        self.blocker: asyncio.Task[Any] | None = None
        self.deferred: deque[Callable[[], None] | asyncio.Future[None]] = deque()
        self.last_event = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.hibernate_after = float(namespace.limits.hibernate_after)
        self.retired = False
        # Storage: the open database (made on first use) and its read cache (pickled values,
        # b"" for a key known to be absent); rows counted since the last event ended.
        self._store: _native.Store | None = None
        self.cache: dict[str, bytes] = {}
        self.rows_read = 0
        self.rows_written = 0
        # The meter: a slot per account, and the open interval of billable duration.
        self.slots: dict[str, _native.Slot] = {}
        self.billed_since: float | None = None
        self.bill_slot: _native.Slot | None = None

    # -- storage --------------------------------------------------------------------------------

    def store(self) -> _native.Store:
        store = self._store
        if store is None:
            store = self.runtime.server.open_store(
                self.namespace.binding, str(self.id), self.native.key
            )
            self._store = store
        return store

    def remember(self, key: str, data: bytes) -> None:
        cache = self.cache
        if len(cache) >= CACHE_ENTRIES and key not in cache:
            cache.clear()
        cache[key] = data

    def charge_rows(self) -> None:
        """Bills the storage rows of the event that just ran (SPEC §4)."""
        read, written = self.rows_read, self.rows_written
        if not (read or written):
            return
        self.rows_read = self.rows_written = 0
        if self.runtime.app.metering:
            slot = self.event_slot()
            slot.add(_native.UNIT_STORAGE_ROWS_READ, read)
            slot.add(_native.UNIT_STORAGE_ROWS_WRITTEN, written)

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

    def event_slot(self) -> _native.Slot:
        """The slot of this object's event running now (its account is the caller's)."""
        current = cpu.current_slot()
        if current is not None and current.object_id == str(self.id):
            return current
        return self.slot(self.runtime.current_account())

    def idle_hibernatable(self) -> bool:
        """Idle and holding only hibernatable sockets: not billed for duration (SPEC §4)."""
        return not (
            self.in_flight
            or self.tasks
            or self.pending_accepts
            or self.deferred
            or self.blocker is not None
            or any(ws.ready_state != WebSocket.CLOSED for ws in self.standard_sockets)
        )

    def bill(self) -> None:
        """The object is (still) active: its duration accrues from now if it did not."""
        if self.billed_since is not None or not self.runtime.app.metering:
            return
        self.billed_since = self.runtime.loop.time()
        self.bill_slot = self.event_slot()
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
            self.state = DurableObjectState(self, self.generation)
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

    def drop_instance(self) -> None:
        """Drops the instance and every Python object of its sockets; the core keeps them."""
        self.settle(force=True)
        for socket_id in self.sockets:
            self.runtime.sockets.pop(socket_id, None)
        self.sockets.clear()
        self.instance = None
        self.generation += 1

    def hibernate(self) -> None:
        """Idle: the instance goes, and so does this host (its database is closed once
        committed). The next event makes a new host."""
        self.drop_instance()
        self.retire()
        logger.debug("object %s of %s hibernated", self.id, self.namespace.binding)

    def retire(self) -> None:
        if self.retired:
            return
        self.retired = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.namespace._hosts.get(self.id) is self:
            del self.namespace._hosts[self.id]
        if self.runtime.hosts_by_key.get(self.native.key) is self:
            del self.runtime.hosts_by_key[self.native.key]
        if self._store is not None:
            self._store.close()
            self._store = None
        self.cache.clear()

    def reset(self, kind: str, error: str | None = None) -> None:
        """After an uncaught exception (or a failed commit): a new instance for the next event.
        Hibernatable sockets stay open; standard-API sockets of the instance are closed with
        1011; its tasks are cancelled."""
        if error is None:
            logger.exception(
                "exception in %s of object %s (%s); resetting it",
                kind,
                self.id,
                self.namespace.binding,
            )
        else:
            logger.error(
                "%s of object %s (%s) failed: %s; resetting it",
                kind,
                self.id,
                self.namespace.binding,
                error,
            )
        for ws in self.standard_sockets:
            if ws.ready_state < WebSocket.CLOSING:
                ws.close(1011, "internal error")
        self.standard_sockets.clear()
        running = asyncio.current_task()
        for task in list(self.tasks):
            if task is not running:
                task.cancel()
        self.cache.clear()
        self.drop_instance()

    # -- hibernation clock ----------------------------------------------------------------------

    def touch(self) -> None:
        self.charge_rows()
        self.settle()
        self.last_event = self.runtime.loop.time()
        if self.timer is None and not self.retired:
            self.timer = self.runtime.loop.call_later(self.hibernate_after, self._check_idle)

    def _check_idle(self) -> None:
        self.timer = None
        self.standard_sockets = [
            ws for ws in self.standard_sockets if ws.ready_state != WebSocket.CLOSED
        ]
        remaining = self.last_event + self.hibernate_after - self.runtime.loop.time()
        if not self.idle_hibernatable() or remaining > 0:
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
        """Runs a handler for an event that returns nothing (socket events)."""
        if self.blocker is not None:
            self.deferred.append(lambda: self.run(name, *args))
            return
        self.bill()
        self.in_flight += 1
        context = current_host.set(self)
        try:
            try:
                handler = self.handler(name)  # may run the constructor
            except Exception:
                self.reset(f"the constructor (for {name})")
                return
            if self.blocker is not None:
                # The constructor blocked concurrency: this event waits for it too.
                self.deferred.append(lambda: self.run(name, *args))
                return
            if handler is None:
                return
            try:
                result = handler(*args)
            except Exception:
                self.reset(name)
                return
            if inspect.isawaitable(result):
                ms = self.native.event_timeout_ms
                self.in_flight += 1  # until _finish ends
                self.runtime.spawn(self._finish(name, result, ms / 1000 if ms else None), name)
        finally:
            current_host.reset(context)
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

    async def _unblocked(self) -> None:
        """Waits, in arrival order, while ``block_concurrency_while`` holds the object."""
        if self.blocker is None:
            return
        waiter: asyncio.Future[None] = self.runtime.loop.create_future()
        self.deferred.append(waiter)
        await waiter

    def block(self, awaitable: Awaitable[T]) -> asyncio.Future[T]:
        task = self.runtime.loop.create_task(_as_coroutine(awaitable))
        self.adopt_task(task)
        if self.blocker is None or self.blocker.done():
            self.blocker = task
        else:
            # Blocked already: this one blocks after it.
            previous = self.blocker

            async def after() -> T:
                await asyncio.wait([previous])
                return await task

            self.blocker = self.runtime.loop.create_task(after())
            self.adopt_task(self.blocker)
        blocker = self.blocker
        blocker.add_done_callback(lambda done: self._unblock(done))
        return task

    def _unblock(self, done: asyncio.Task[Any]) -> None:
        if done is not self.blocker:
            return
        self.blocker = None
        if not done.cancelled() and done.exception() is not None:
            self.reset("block_concurrency_while", repr(done.exception()))
        self._replay()

    def _replay(self) -> None:
        """Delivers the events that waited, in order, until one blocks again. A waiting call is
        woken and the rest continue after it has started."""
        while self.deferred and self.blocker is None:
            entry = self.deferred.popleft()
            if isinstance(entry, asyncio.Future):
                if not entry.done():
                    entry.set_result(None)
                    self.runtime.loop.call_soon(self._replay)
                    return
            else:
                entry()
        self.touch()

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Runs a handler whose result the caller awaits (fetch, RPC); exceptions propagate to
        the caller after resetting the instance. It runs as a task of its own, so its CPU is
        charged to this object (for the caller's account), not to the caller. The result reaches
        the caller once what the call wrote is durable (the output gate)."""
        runtime = self.runtime
        if not runtime.app.metering:
            return await self._invoke(None, name, args, kwargs)
        slot = self.slot(runtime.current_account())
        coro = cpu.Metered(self._invoke(slot, name, args, kwargs), slot, runtime.server)
        return await asyncio.Task(coro, loop=runtime.loop)

    async def _invoke(
        self, slot: _native.Slot | None, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        current_host.set(self)
        self.in_flight += 1
        try:
            await self._unblocked()
            self.bill()
            method = (
                self.handler(name) if name in HANDLER_NAMES else getattr(self.awake(), name, None)
            )
            await self._unblocked()  # (the constructor may have blocked)
            if method is None or not callable(method):
                # The caller's mistake, not the object's: no reset.
                raise AttributeError(f"{self.cls.__name__} has no method {name!r}")
            result: Any = None
            failure: BaseException | None = None
            try:
                result = method(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as error:
                self.reset("fetch" if name == "fetch" else f"RPC {name}")
                failure = error
            if slot is not None and not _accepted_here(result, slot):
                slot.add(_native.UNIT_REQUESTS, 1)
            self.charge_rows()
            # What the call answers (or raises) may depend on what it wrote.
            await self.runtime.released(self.native.key)
            if failure is not None:
                raise failure
            return result
        finally:
            self.in_flight -= 1
            self.touch()

    def fire_alarm(self, retry: int) -> None:
        """The alarm is due (``retry``: failures so far): runs ``alarm()`` if the object's
        database still says so, as an event of the account that set it."""
        try:
            alarm = self.store().get_alarm()
        except StorageError:
            logger.exception(
                "the alarm of object %s (%s) could not be read", self.id, self.namespace.binding
            )
            return
        if alarm is None:
            # A stale index entry (the alarm was deleted): writing "none" drops it.
            self.store().set_alarm(None)
            self.runtime.schedule_commit()
            self.touch()
            return
        at, account = alarm
        if at > time.time() + 0.001:
            # Set again for later since it was armed.
            self.runtime.server.arm_alarm(self.namespace.binding, str(self.id), at, 0, self.id.name)
            self.touch()
            return
        self.in_flight += 1
        runtime = self.runtime
        coro = self._alarm(at, retry, account)
        if runtime.app.metering:
            slot = self.slot(account)
            slot.add(_native.UNIT_REQUESTS, 1)
            coro = cpu.Metered(coro, slot, runtime.server)
        runtime.loop.create_task(coro)

    async def _alarm(self, at: float, retry: int, account: str) -> None:
        current_host.set(self)
        try:
            await self._unblocked()
            self.bill()
            try:
                handler = self.handler("alarm")
                await self._unblocked()
                if handler is not None:
                    result = handler(AlarmInfo(retry)) if _takes_info(handler) else handler()
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                self.reset(f"alarm (attempt {retry + 1})")
                self._retry_alarm(at, retry)
                return
            # Done: unless alarm() set a new one, the alarm is gone.
            store = self.store()
            current = store.get_alarm()
            if current is not None and current[0] == at:
                store.set_alarm(None)
                self.runtime.schedule_commit()
        finally:
            self.in_flight -= 1
            self.touch()

    def _retry_alarm(self, at: float, retry: int) -> None:
        binding, object_id = self.namespace.binding, str(self.id)
        if retry < ALARM_RETRIES:
            delay = ALARM_FIRST_RETRY * 2**retry
            self.runtime.server.arm_alarm(
                binding, object_id, time.time() + delay, retry + 1, self.id.name
            )
            return
        logger.error(
            "the alarm of object %s (%s) failed %d times; it is dropped",
            object_id,
            binding,
            retry + 1,
        )
        try:
            store = self.store()
            current = store.get_alarm()
            if current is not None and current[0] == at:
                store.set_alarm(None)
                self.runtime.schedule_commit()
        except StorageError:
            logger.exception("the failed alarm of object %s could not be dropped", object_id)

    def adopt_task(self, task: asyncio.Task[Any]) -> None:
        """``task`` keeps the object resident until it is done (it is cancelled on reset)."""
        if task in self.tasks or task.done():
            return
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self.touch()

    def track(self, awaitable: Awaitable[Any], what: str) -> None:
        async def tracked() -> None:
            current_host.set(self)
            try:
                await awaitable
            except Exception:
                logger.exception("exception in %s of object %s", what, self.id)

        self.adopt_task(self.runtime.loop.create_task(tracked()))

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


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


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
            server._owner = host
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
        if not _BINDING.fullmatch(binding):
            # (It names the namespace's folder in the data directory.)
            raise InvalidArgument(
                f"a Durable Object binding is letters, digits, '_', '-' and '.', not {binding!r}"
            )
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
        """The resident host of ``object_id``, made if the object hibernated (or never ran)."""
        host = self._hosts.get(object_id)
        if host is None:
            host = _ObjectHost(self, object_id)
            self._hosts[object_id] = host
        return host
