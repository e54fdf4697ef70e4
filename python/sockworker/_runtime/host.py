"""The runtime's side of Durable Objects (SPEC §2.4, §2.5, §6): ``ObjectHost``, one object id
while it is resident, and ``Objects``, the hosts resident now.

A host builds the instance when an event arrives, runs events in arrival order, resets it after
an uncaught exception, and once idle drops the instance, every Python object of its sockets, and
itself. What survives hibernation (the sockets, their tags and attachments, auto-responses, the
event timeout) lives in the core; storage and the alarm live in the object's database.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar, copy_context
from typing import Any, TypeVar

from .. import _native
from ..errors import StorageError
from ..http import Response
from ..state import DurableObjectId, DurableObjectState
from ..storage import AlarmInfo
from ..websocket import CloseCode, WebSocket
from .contract import ObjectKind
from .services import Services, as_coroutine

logger = logging.getLogger("sockworker")
T = TypeVar("T")

# Handler methods and the Cloudflare names they are also found under.
HANDLER_NAMES = {
    "websocket_message": "webSocketMessage",
    "websocket_close": "webSocketClose",
    "websocket_error": "webSocketError",
    "alarm": "alarm",
    "fetch": "fetch",
}

# The Durable Object whose code runs now: set while its handlers run and in every task of its
# own, inherited by the tasks they create (contextvars), so those keep it resident and are
# cancelled when it resets.
current_host: ContextVar[ObjectHost | None] = ContextVar("sockworker_object", default=None)

#: Alarm retries after a failure: at most this many, the first after 2 s, then doubling.
ALARM_RETRIES = 6
ALARM_FIRST_RETRY = 2.0
#: Keys the read cache of one resident object keeps before it starts over.
CACHE_ENTRIES = 4096


def _takes_info(method: Callable[..., Any]) -> bool:
    """``alarm(self, info)`` (SPEC §6) rather than ``alarm(self)``."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters
    )


class ObjectHost:
    """One object id while it is resident (or busy): the instance, its events in arrival order,
    its tasks, its open database and read cache. A hibernated object has no host: what survives
    is in the core (its sockets' state in ``native``, its database on disk, its alarm), and the
    next event makes a new host (``Objects.host``)."""

    def __init__(
        self, services: Services, objects: Objects, kind: ObjectKind, object_id: DurableObjectId
    ) -> None:
        self.services = services
        self.objects = objects
        self.kind = kind
        self.cls = kind.cls
        self.id = object_id
        self.native = services.server.object_state(
            kind.binding, str(object_id), self.cls.max_hibernatable_websockets
        )
        if object_id.name is not None:
            self.native.id_name = object_id.name
        # (For the metrics: an object with core state and no host is hibernated.)
        self.native.resident = True
        # Bumped when the instance goes (reset, hibernation): storage of an older one refuses.
        self.generation = 0
        # Cluster mode: the epoch of the lease this host was made under (0 outside).
        self.epoch = 0
        self.state = DurableObjectState(self, 0)
        self.instance: Any = None
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
        self.hibernate_after = float(kind.limits.hibernate_after)
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
            store = self.services.server.open_store(
                self.kind.binding, str(self.id), self.native.key
            )
            self._store = store
        return store

    def remember(self, key: str, data: bytes) -> None:
        cache = self.cache
        if len(cache) >= CACHE_ENTRIES and key not in cache:
            cache.clear()
        cache[key] = data

    # (StorageHost, StateHost: what ctx and ctx.storage use.)

    @property
    def id_name(self) -> str | None:
        return self.id.name

    def store_for(self, generation: int) -> _native.Store:
        if generation != self.generation:
            raise StorageError(
                f"this instance of {self.cls.__name__} ({self.id}) was reset or hibernated; its "
                "storage belongs to the object's new instance"
            )
        return self.store()

    def read(self, rows: int) -> None:
        self.rows_read += rows

    def wrote(self, rows: int) -> None:
        self.rows_written += rows
        self.services.gate.schedule_commit()

    async def sync(self) -> None:
        self.services.gate.commit()
        await self.services.gate.released(self.native.key)

    def account(self) -> str:
        return self.services.metering.current_account()

    def accept(self, ws: WebSocket, tags: list[str]) -> None:
        self.native.check_accept(self.pending_accepts + 1, tags)
        ws._accept_for(self, tags, self.kind.socket_limits)
        self.pending_accepts += 1

    def keep(self, ws: WebSocket) -> None:
        """A standard-API socket of this object (returned by its fetch, or opened by it): it
        keeps the object billed while open, and is closed with 1011 when the object resets."""
        self.standard_sockets.append(ws)
        self.bill()

    def returned(self, response: Response) -> None:
        """The object's fetch answered ``response``: a standard-API socket it accepted is the
        object's (held to its namespace's limits, closed when it resets)."""
        server = response.websocket._peer if response.websocket is not None else None
        if server is not None and server._object is None and server._accepted:
            server._owner = self
            server._limits = self.kind.socket_limits
            self.keep(server)

    def charge_rows(self) -> None:
        """Bills the storage rows of the event that just ran (SPEC §4)."""
        read, written = self.rows_read, self.rows_written
        if not (read or written):
            return
        self.rows_read = self.rows_written = 0
        if self.services.metering.on:
            slot = self.event_slot()
            slot.add(_native.UNIT_STORAGE_ROWS_READ, read)
            slot.add(_native.UNIT_STORAGE_ROWS_WRITTEN, written)

    # -- the meter ------------------------------------------------------------------------------

    def slot(self, account: str) -> _native.Slot:
        slot = self.slots.get(account)
        if slot is None:
            slot = self.services.metering.slot(
                account, self.kind.binding, str(self.id), self.kind.limits
            )
            self.slots[account] = slot
        return slot

    def event_slot(self) -> _native.Slot:
        """The slot of this object's event running now (its account is the caller's)."""
        current = self.services.metering.current_slot()
        if current is not None and current.object_id == str(self.id):
            return current
        return self.slot(self.services.metering.current_account())

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
        if self.billed_since is not None or not self.services.metering.on:
            return
        self.billed_since = self.services.loop.time()
        self.bill_slot = self.event_slot()
        self.services.metering.bill(self)

    def settle(self, force: bool = False) -> None:
        """Accrues the duration up to now; the interval ends if the object is idle and
        hibernatable, or gone (or ``force``, at shutdown)."""
        since, slot = self.billed_since, self.bill_slot
        if since is None or slot is None:
            return
        now = self.services.loop.time()
        slot.add(_native.UNIT_DURATION_US, int((now - since) * 1e6))
        if force or self.instance is None or self.idle_hibernatable():
            self.billed_since = None
            self.services.metering.unbill(self)
        else:
            self.billed_since = now

    # -- instance lifecycle ---------------------------------------------------------------------

    def awake(self) -> Any:
        instance = self.instance
        if instance is None:
            self.state = DurableObjectState(self, self.generation)
            instance = self.cls(self.state, self.services.app.env)
            self.instance = instance
            self.constructed += 1
        return instance

    def revive(self, handle: _native.SocketHandle) -> WebSocket:
        """The Python object of one of this object's sockets, made anew after hibernation."""
        ws = self.sockets.get(handle.id)
        if ws is None:
            ws = WebSocket._revive(handle, self.services, self)
            self.sockets[handle.id] = ws
            self.services.sockets[handle.id] = ws
        return ws

    def sockets_elsewhere(self, tag: str | None) -> list[WebSocket]:
        nodes = self.services.nodes
        if nodes is None:
            return []
        remote = nodes.remote_sockets(self.kind.binding, str(self.id), tag)
        return [self.revive(handle) for handle in remote]

    def broadcast_elsewhere(
        self, message: str | bytes, tag: str | None, excluded: int | None
    ) -> int:
        nodes = self.services.nodes
        if nodes is None:
            return 0
        return nodes.broadcast(self.kind.binding, str(self.id), message, tag, excluded)

    def auto_responses_changed(self, pairs: list[tuple[str | bytes, str | bytes]]) -> None:
        nodes = self.services.nodes
        if nodes is not None:
            nodes.auto_responses_changed(self.kind.binding, str(self.id), pairs)

    def adopt(self, ws: WebSocket, handle: _native.SocketHandle) -> None:
        """Called once the 101 for a socket accepted with ``accept_websocket`` is sent."""
        self.pending_accepts -= 1
        handle.set_origin(ws.url or "", ws.protocol)
        self.native.adopt(handle, ws._take_tags())
        self.sockets[handle.id] = ws

    def drop_instance(self) -> None:
        """Drops the instance and every Python object of its sockets; the core keeps them."""
        self.settle(force=True)
        for socket_id in self.sockets:
            self.services.sockets.pop(socket_id, None)
        self.sockets.clear()
        self.instance = None
        self.generation += 1

    def hibernate(self) -> None:
        """Idle: the instance goes, and so does this host (its database is closed once
        committed). The next event makes a new host."""
        self.drop_instance()
        self.retire()
        logger.debug("object %s of %s hibernated", self.id, self.kind.binding)

    def retire(self) -> None:
        if self.retired:
            return
        self.retired = True
        self.native.resident = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.objects.forget(self)
        if self._store is not None:
            self._store.close()
            self._store = None
        self.cache.clear()
        nodes = self.services.nodes
        if (
            nodes is not None
            and not self.native.sockets(None)
            and not nodes.has_remote(self.kind.binding, str(self.id))
        ):
            # Nothing of the object is left here: another node may take it at once.
            self.services.server.cluster_release(self.kind.binding, str(self.id))

    def reset(self, what: str, error: str | None = None) -> None:
        """After an uncaught exception (or a failed commit): a new instance for the next event.
        Hibernatable sockets stay open; standard-API sockets of the instance are closed with
        1011; its tasks are cancelled."""
        if error is None:
            logger.exception(
                "exception in %s of object %s (%s); resetting it",
                what,
                self.id,
                self.kind.binding,
            )
        else:
            logger.error(
                "%s of object %s (%s) failed: %s; resetting it",
                what,
                self.id,
                self.kind.binding,
                error,
            )
        for ws in self.standard_sockets:
            if ws.ready_state < WebSocket.CLOSING:
                ws.close(CloseCode.INTERNAL_ERROR, "internal error")
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
        self.last_event = self.services.loop.time()
        if self.timer is None and not self.retired:
            self.timer = self.services.loop.call_later(self.hibernate_after, self._check_idle)

    def _check_idle(self) -> None:
        self.timer = None
        self.standard_sockets = [
            ws for ws in self.standard_sockets if ws.ready_state != WebSocket.CLOSED
        ]
        remaining = self.last_event + self.hibernate_after - self.services.loop.time()
        if not self.idle_hibernatable() or remaining > 0:
            delay = remaining if remaining > 0 else self.hibernate_after
            self.timer = self.services.loop.call_later(delay, self._check_idle)
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
                self.services.spawn(self._finish(name, result, ms / 1000 if ms else None), name)
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
        waiter: asyncio.Future[None] = self.services.loop.create_future()
        self.deferred.append(waiter)
        await waiter

    def block(self, awaitable: Awaitable[T]) -> asyncio.Future[T]:
        task = self.services.loop.create_task(as_coroutine(awaitable))
        self.adopt_task(task)
        if self.blocker is None or self.blocker.done():
            self.blocker = task
        else:
            # Blocked already: this one blocks after it.
            previous = self.blocker

            async def after() -> T:
                await asyncio.wait([previous])
                return await task

            self.blocker = self.services.loop.create_task(after())
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
                    self.services.loop.call_soon(self._replay)
                    return
            else:
                entry()
        self.touch()

    async def call(self, name: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs a handler whose result the caller awaits (fetch, RPC); exceptions propagate to
        the caller after resetting the instance. It runs as a task of its own, so its CPU is
        charged to this object (for the caller's account), not to the caller. The result reaches
        the caller once what the call wrote is durable (the output gate)."""
        services = self.services
        if not services.metering.on:
            return await self._invoke(None, name, args, kwargs)
        slot = self.slot(services.metering.current_account())
        coro = services.server.metered(self._invoke(slot, name, args, kwargs), slot)
        return await asyncio.Task(coro, loop=services.loop)

    async def _invoke(
        self,
        slot: _native.Slot | None,
        name: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        current_host.set(self)
        self.in_flight += 1
        try:
            await self._unblocked()
            self.bill()
            method: Any
            if callable(name):  # sockworker.testing's run_in_object: name(instance, state)
                instance = self.awake()
                method, what = functools.partial(name, instance, self.state), "a test callback"
            else:
                method = (
                    self.handler(name)
                    if name in HANDLER_NAMES
                    else getattr(self.awake(), name, None)
                )
                what = "fetch" if name == "fetch" else f"RPC {name}"
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
                self.reset(what)
                failure = error
            if slot is not None and not accepted_here(result, slot):
                slot.add(_native.UNIT_REQUESTS, 1)
            if isinstance(result, Response) and result.stream is not None:
                result.stream = self._streamed(result.stream, slot)
            self.charge_rows()
            # What the call answers (or raises) may depend on what it wrote.
            await self.services.gate.released(self.native.key)
            if failure is not None:
                raise failure
            return result
        finally:
            self.in_flight -= 1
            self.touch()

    async def _streamed(
        self, body: AsyncIterator[bytes | str], slot: _native.Slot | None
    ) -> AsyncIterator[bytes | str]:
        """The streamed body of this object's fetch, as the caller iterates it: each step runs
        as a task of this object (billed to it, as the fetch was), and each chunk waits at the
        output gate until what the object wrote before it is durable."""
        services = self.services
        context = copy_context()
        context.run(current_host.set, self)
        self.in_flight += 1
        try:
            while True:
                step = as_coroutine(anext(body))
                if slot is not None:
                    step = services.server.metered(step, slot)
                try:
                    chunk = await asyncio.Task(step, loop=services.loop, context=context)
                except StopAsyncIteration:
                    return
                finally:
                    self.charge_rows()
                await services.gate.released(self.native.key)
                yield chunk
        finally:
            self.in_flight -= 1
            self.touch()
            close = getattr(body, "aclose", None)
            if close is not None:
                await asyncio.Task(as_coroutine(close()), loop=services.loop, context=context)

    def fire_alarm(self, retry: int, *, early: bool = False) -> asyncio.Task[None] | None:
        """The alarm is due (``retry``: failures so far): runs ``alarm()`` if the object's
        database still says so, as an event of the account that set it; returns its task.
        ``early``: run it even if it is not due yet (``sockworker.testing.run_alarm``)."""
        try:
            alarm = self.store().get_alarm()
        except StorageError:
            logger.exception(
                "the alarm of object %s (%s) could not be read", self.id, self.kind.binding
            )
            return None
        if alarm is None:
            if not early:
                # A stale index entry (the alarm was deleted): writing "none" drops it.
                self.store().set_alarm(None)
                self.services.gate.schedule_commit()
            self.touch()
            return None
        at, account = alarm
        if at > time.time() + 0.001 and not early:
            # Set again for later since it was armed.
            self.services.server.arm_alarm(self.kind.binding, str(self.id), at, 0, self.id.name)
            self.touch()
            return None
        self.in_flight += 1
        services = self.services
        coro = self._alarm(at, retry, account)
        if services.metering.on:
            slot = self.slot(account)
            slot.add(_native.UNIT_REQUESTS, 1)
            coro = services.server.metered(coro, slot)
        return services.loop.create_task(coro)

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
                self.services.gate.schedule_commit()
        finally:
            self.in_flight -= 1
            self.touch()

    def _retry_alarm(self, at: float, retry: int) -> None:
        binding, object_id = self.kind.binding, str(self.id)
        if retry < ALARM_RETRIES:
            delay = ALARM_FIRST_RETRY * 2**retry
            self.services.server.arm_alarm(
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
                self.services.gate.schedule_commit()
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

        self.adopt_task(self.services.loop.create_task(tracked()))

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


def accepted_here(result: Any, slot: _native.Slot) -> bool:
    """The fetch answered with a socket it accepted itself: a connection, not a request."""
    if not isinstance(result, Response) or result.websocket is None:
        return False
    server = result.websocket._peer
    return server is not None and server._slot == slot


class Objects:
    """The hosts resident now, by object id within each namespace and by the key of their
    state in the core (what the core's events name)."""

    def __init__(self, services: Services, kinds: Mapping[str, ObjectKind]) -> None:
        self.services = services
        self.kinds = kinds
        self.by_id: dict[tuple[str, DurableObjectId], ObjectHost] = {}
        self.by_key: dict[int, ObjectHost] = {}

    def host(
        self, kind: ObjectKind, object_id: DurableObjectId, epoch: int | None = None
    ) -> ObjectHost:
        """The resident host of ``object_id``, made if the object hibernated (or never ran).
        In cluster mode this node must own the object (``ClusterError`` if another does); a
        host from an older lease of it is reset first (another node may have written since)."""
        if self.kinds.get(kind.binding) is not kind:
            raise RuntimeError(f"namespace {kind.binding!r} is not one of the app being served")
        host = self.by_id.get((kind.binding, object_id))
        nodes = self.services.nodes
        if epoch is None:
            # (Unless the caller routed the event already and passes the epoch.)
            epoch = nodes.epoch(kind.binding, str(object_id)) if nodes is not None else 0
        if host is not None and host.epoch != epoch:
            host.reset("taking the object back", "its lease was lost and taken again")
            host.retire()
            host = None
        if host is None:
            host = ObjectHost(self.services, self, kind, object_id)
            host.epoch = epoch
            self.by_id[(kind.binding, object_id)] = host
            self.by_key[host.native.key] = host
            if nodes is not None and nodes.needs_gather(kind.binding, str(object_id), epoch):
                # Taken by this node: its events wait until the other nodes have said which
                # sockets of it they hold.
                host.block(nodes.gather(kind, object_id))
            if nodes is not None:
                nodes.took(kind.binding, str(object_id))
        return host

    def lost(self, binding: str, hex_id: str) -> None:
        """Cluster mode: this node lost the object's lease. Its instance goes and its sockets
        here are closed with 1012 (service restart), so that their clients reconnect to the
        object where it is now."""
        host = self.by_id.get((binding, DurableObjectId(hex_id)))
        state = host.native if host is not None else None
        if host is not None:
            host.reset("serving the object", "this node lost its lease")
            host.retire()
        if state is None:
            state = self.services.server.object_state(binding, hex_id, 1)
        for handle in state.sockets(None):
            handle.close(CloseCode.SERVICE_RESTART, "the object moved to another node")

    def resident(self, binding: str, object_id: DurableObjectId) -> ObjectHost | None:
        return self.by_id.get((binding, object_id))

    def forget(self, host: ObjectHost) -> None:
        """``host`` retired (hibernated): the next event of its object makes a new one."""
        if self.by_id.get((host.kind.binding, host.id)) is host:
            del self.by_id[(host.kind.binding, host.id)]
        if self.by_key.get(host.native.key) is host:
            del self.by_key[host.native.key]

    def retire_all(self) -> None:
        """The server stops: every resident host lets its database go."""
        for host in list(self.by_id.values()):
            host.retire()

    def named(self, binding: str, hex_id: str, id_name: str | None) -> ObjectHost | None:
        """The host of an object the core names, made if needed (None: no such namespace)."""
        kind = self.kinds.get(binding)
        if kind is None:
            return None
        return self.host(kind, DurableObjectId(hex_id, id_name))

    def of_socket(self, handle: _native.SocketHandle) -> ObjectHost | None:
        """The host of the object whose hibernatable socket this is, made if it has none."""
        state = handle.object
        name = state.name if state is not None else None
        if state is None or name is None:
            return None
        return self.named(name[0], name[1], state.id_name)

    def of_slot(self, slot: _native.Slot | None) -> ObjectHost | None:
        """The resident object whose event runs in ``slot``, if any; with metering off (no
        slot), the object whose code runs now."""
        if slot is None:
            host = current_host.get()
            return host if host is not None and not host.retired else None
        if slot.namespace is None or slot.object_id is None:
            return None
        return self.by_id.get((slot.namespace, DurableObjectId(slot.object_id)))

    def on_alarm(self, binding: str, object_id: str, id_name: str | None, retry: int) -> None:
        nodes = self.services.nodes
        if nodes is not None:
            try:
                if nodes.route(binding, object_id) is not None:
                    return  # another node owns it, and fires it
            except StorageError as error:
                logger.warning("an alarm of object %s waits: %s", object_id, error)
                self.services.server.arm_alarm(
                    binding, object_id, time.time() + 1.0, retry, id_name
                )
                return
        host = self.named(binding, object_id, id_name)
        if host is None:
            logger.warning(
                "an alarm of object %s names namespace %r, which the app has not",
                object_id,
                binding,
            )
            return
        host.fire_alarm(retry)

    def on_commit_failed(self, key: int, error: str) -> None:
        host = self.by_key.get(key)
        if host is not None:
            host.reset("a storage commit", error)
            if self.services.nodes is not None:
                # (The in-memory copy of its storage may be stale: it is loaded again.)
                host.retire()


def adopt_by_current_host(task: asyncio.Task[Any]) -> None:
    """A task made while a Durable Object's code runs keeps that object resident (SPEC §2.5)."""
    host = current_host.get()
    if host is not None:
        host.adopt_task(task)
