"""``WebSocket``, one class for every socket, and ``WebSocketPair`` (SPEC §2.2).

A ``WebSocket`` is a thin handle: frames, buffers and the closing handshake live in the core.
``send`` queues and returns; events arrive from the core in batches and are dispatched here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle
from collections import deque
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import _native
from ._current import current_slot
from .errors import ConnectionClosed, InvalidArgument, ProtocolError, ResponseError

if TYPE_CHECKING:
    from ._native import Slot, SocketHandle
    from .limits import Limits

__all__ = ["CloseCode", "CloseEvent", "ErrorEvent", "MessageEvent", "WebSocket", "WebSocketPair"]

logger = logging.getLogger("sockworker")

EventType = Literal["message", "close", "error"]
Listener = Callable[[Any], Awaitable[None] | None]

# The pull API pauses reading from the peer past this many unread messages, and resumes
# once the application has read down to the low mark.
INBOX_HIGH = 64
INBOX_LOW = 16
MAX_ATTACHMENT_BYTES = _native.MAX_ATTACHMENT_BYTES


class CloseCode(IntEnum):
    """The close codes of RFC 6455 §7.4.1 that the server itself uses or reports (an ``int``:
    any code from 3000 to 4999 is the application's own)."""

    NORMAL_CLOSURE = _native.CLOSE_NORMAL
    GOING_AWAY = _native.CLOSE_GOING_AWAY
    PROTOCOL_ERROR = _native.CLOSE_PROTOCOL_ERROR
    #: Reported when the peer's Close carried no code (never sent).
    NO_STATUS_RCVD = _native.CLOSE_NO_STATUS
    #: Reported when the connection ended without a closing handshake (never sent).
    ABNORMAL_CLOSURE = _native.CLOSE_ABNORMAL
    INVALID_DATA = _native.CLOSE_INVALID_PAYLOAD
    POLICY_VIOLATION = _native.CLOSE_POLICY_VIOLATION
    MESSAGE_TOO_BIG = _native.CLOSE_TOO_BIG
    INTERNAL_ERROR = _native.CLOSE_INTERNAL_ERROR
    #: Sent on every socket when the server restarts (SIGHUP, ``--reload``): reconnect now.
    #: (A code only the Python side sends, so it is defined here.)
    SERVICE_RESTART = 1012


def check_close(code: int, reason: str) -> None:
    """Raises ``InvalidArgument`` (a ``ValueError``) for a code or reason a peer would reject
    (the core's rule), ``TypeError`` for a code that is not an int."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"a close code is an int, not {type(code).__name__}")
    _native.check_close(code, reason)


class MessageEvent:
    """What a "message" listener receives: ``data``, a str (text message) or bytes (binary)."""

    __slots__ = ("data",)
    type = "message"

    def __init__(self, data: str | bytes) -> None:
        self.data = data


class CloseEvent:
    """What a "close" listener receives: ``code``, ``reason`` and ``was_clean`` (False when the
    connection ended without a closing handshake: code 1006)."""

    __slots__ = ("code", "reason", "was_clean")
    type = "close"

    def __init__(self, code: int, reason: str, was_clean: bool) -> None:
        self.code = code
        self.reason = reason
        self.was_clean = was_clean

    @property
    def wasClean(self) -> bool:
        """Cloudflare's name of ``was_clean``."""
        return self.was_clean


class ErrorEvent:
    """What an "error" listener receives: ``error``, the exception (a ``ProtocolError`` when the
    peer broke the protocol; the close event follows)."""

    __slots__ = ("error",)
    type = "error"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @property
    def message(self) -> str:
        """The error's text, as Cloudflare's ``ErrorEvent.message``."""
        return str(self.error)


class ObjectEvents(Protocol):
    """Where the events of a hibernatable socket go: its Durable Object's host."""

    def socket_message(self, ws: WebSocket, data: str | bytes) -> None: ...
    def socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None: ...
    def socket_error(self, ws: WebSocket, error: BaseException) -> None: ...


class _Host(Protocol):
    """What a socket needs from the runtime that dispatches its events."""

    def spawn(self, coro: Awaitable[Any], what: str) -> None: ...


class WebSocket:
    """One end of a WebSocket. Server code uses the ``server`` end of a ``WebSocketPair``."""

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3

    __slots__ = (
        "__weakref__",
        "_accepted",
        "_attachment",
        "_close_request",
        "_drain_waiters",
        "_extensions",
        "_handle",
        "_host",
        "_inbox",
        "_is_client_end",
        "_limits",
        "_listeners",
        "_object",
        "_owner",
        "_paused",
        "_peer",
        "_pending",
        "_protocol",
        "_reader",
        "_ready_state",
        "_slot",
        "_tags",
        "_url",
    )

    def __init__(self, *, _client_end: bool = False) -> None:
        self._handle: SocketHandle | None = None
        self._host: _Host | None = None
        self._ready_state = WebSocket.CONNECTING
        self._accepted = False
        self._is_client_end = _client_end
        # The client end carries the server end it was paired with, for the runtime to bind.
        self._peer: WebSocket | None = None
        # The Durable Object host of a hibernatable socket (events go to its handlers).
        self._object: ObjectEvents | None = None
        # The Durable Object that accepted this standard-API socket: its failed commit closes it.
        self._owner: object | None = None
        self._tags: list[str] = []
        # The meter slot billed for the connection and its traffic: whoever accepted it.
        self._slot: Slot | None = None
        self._attachment: bytes | None = None
        self._listeners: dict[str, list[tuple[Listener, bool]]] = {
            "message": [],
            "close": [],
            "error": [],
        }
        self._pending: list[str | bytes] = []
        self._close_request: tuple[int, str] | None = None
        # Made on first use: most sockets use listeners, and a deque costs ~600 bytes.
        self._inbox: deque[str | bytes] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # The per-socket limits of the namespace whose object accepted it (None: the app's).
        self._limits: Limits | None = None
        self._url: str | None = None
        self._protocol = ""
        self._extensions = ""

    # -- state ---------------------------------------------------------------------------------

    @property
    def ready_state(self) -> int:
        return self._ready_state

    @property
    def url(self) -> str | None:
        """The URL the socket was opened with (None before it is)."""
        return self._url

    @property
    def protocol(self) -> str:
        """The subprotocol chosen in the handshake ("" for none)."""
        return self._protocol

    @property
    def extensions(self) -> str:
        """The extensions negotiated in the handshake ("" for none)."""
        return self._extensions

    @property
    def buffered_amount(self) -> int:
        """Bytes queued for this socket and not yet written to the network."""
        if self._handle is not None:
            return self._handle.buffered_amount
        return sum(len(m) for m in self._pending)

    def accept(self) -> None:
        """Accepts the server end for the standard API: events go to listeners or ``async for``.
        Messages sent before the handler returns are queued and go out right after the 101.
        (A Durable Object's hibernatable socket uses ``ctx.accept_websocket`` instead.)"""
        if self._is_client_end:
            raise ResponseError("accept() the server end of the pair; return the client end")
        if self._accepted:
            raise ResponseError("accept() was already called on this WebSocket")
        self._accepted = True
        self._ready_state = WebSocket.OPEN
        self._slot = current_slot()

    # -- listeners -----------------------------------------------------------------------------

    def add_event_listener(self, type: EventType, listener: Listener) -> None:
        """Calls ``listener(event)`` for each "message" (``MessageEvent``), "close"
        (``CloseEvent``) or "error" (``ErrorEvent``) event; it may be a ``def`` (called
        directly, the fast path) or an ``async def`` (run as a task; tasks start in event
        order). An exception in a listener is logged with its traceback and the socket is
        closed with 1011. ``on`` is the same method."""
        if type not in self._listeners:
            raise InvalidArgument(f"event type is 'message', 'close' or 'error', not {type!r}")
        self._listeners[type].append((listener, inspect.iscoroutinefunction(listener)))
        if type == "message" and self._inbox:
            # Messages that came before the first listener (an outgoing socket's greeting, read
            # while `await sw.connect()` returned) go to it first, in order, from a task (so
            # they are charged to whoever added the listener).
            asyncio.get_running_loop().create_task(self._replay_inbox())

    async def _replay_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            self._to_listeners(inbox.popleft())
        if self._paused and self._handle is not None:
            self._paused = False
            self._handle.set_paused(False)

    on = add_event_listener

    def remove_event_listener(self, type: EventType, listener: Listener) -> None:
        """Stops calling ``listener`` for ``type`` events (nothing if it was not added)."""
        self._listeners[type] = [
            pair for pair in self._listeners.get(type, []) if pair[0] != listener
        ]

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Queues a message (str: text, bytes: binary) and returns at once. Raises
        ``ConnectionClosed`` after ``close()`` or after the close event."""
        handle = self._handle
        if handle is not None and self._ready_state == WebSocket.OPEN:
            if handle.send(data):
                # Not queued (not SEND_QUEUED): the connection is closing or gone (SEND_DROPPED),
                # or the queue passed max_buffered_bytes and the core is closing it with 1008
                # (SEND_OVERFLOW). The close event
                # follows; until then the socket is CLOSING and further sends raise.
                self._ready_state = WebSocket.CLOSING
            return
        if self._ready_state >= WebSocket.CLOSING:
            raise ConnectionClosed("send() on a closing or closed WebSocket")
        if not self._accepted:
            raise ResponseError("accept() the WebSocket before sending")
        if not isinstance(data, str | bytes | bytearray | memoryview):
            raise TypeError(f"a WebSocket message is str or bytes, not {type(data).__name__}")
        self._pending.append(data if isinstance(data, str) else bytes(data))

    async def send_async(self, data: str | bytes) -> None:
        """Queues a message, then waits while the queue is above the high-water mark.
        Raises ``ConnectionClosed`` when the socket is closing or closed, so a sending loop
        ends instead of spinning on a dead connection."""
        self.send(data)
        if self._ready_state != WebSocket.OPEN:
            raise ConnectionClosed("the WebSocket closed while sending")
        handle = self._handle
        while (
            handle is not None
            and self._ready_state == WebSocket.OPEN
            and handle.buffered_amount > handle.high_water
        ):
            if not handle.request_drain():
                break
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Starts the closing handshake. The code must be 1000-1003, 1007-1014 or 3000-4999 and
        the reason at most 123 bytes of UTF-8, else ``InvalidArgument`` (a ``ValueError``); a code
        that is not an ``int`` (a ``CloseCode`` is one) raises ``TypeError``. The close event
        follows when the peer answers (or after 5 s, as 1006)."""
        check_close(code, reason)
        if self._ready_state >= WebSocket.CLOSING:
            return
        self._ready_state = WebSocket.CLOSING
        if self._handle is not None:
            self._handle.close(code, reason)
        else:
            self._close_request = (code, reason)

    # -- attachment ------------------------------------------------------------------------------

    def serialize_attachment(self, value: Any) -> None:
        """Keeps ``value`` (pickled, at most 16 KiB) with the socket, in the core: it survives
        hibernation. ``deserialize_attachment()`` returns a copy."""
        data = pickle.dumps(value)
        if len(data) > MAX_ATTACHMENT_BYTES:
            raise InvalidArgument(
                f"a serialized attachment is at most {MAX_ATTACHMENT_BYTES} bytes, not {len(data)}"
            )
        if self._handle is not None:
            self._handle.set_attachment(data)
        else:
            self._attachment = data

    def deserialize_attachment(self) -> Any:
        """A copy of the value given to ``serialize_attachment`` (None if there is none)."""
        data = self._handle.attachment if self._handle is not None else self._attachment
        return None if data is None else pickle.loads(data)

    serializeAttachment = serialize_attachment
    deserializeAttachment = deserialize_attachment

    # Cloudflare's names, for code ported from Workers.
    addEventListener = add_event_listener
    removeEventListener = remove_event_listener
    readyState = ready_state
    bufferedAmount = buffered_amount
    sendAsync = send_async
    READY_STATE_CONNECTING = CONNECTING
    READY_STATE_OPEN = OPEN
    READY_STATE_CLOSING = CLOSING
    READY_STATE_CLOSED = CLOSED

    # -- pull API --------------------------------------------------------------------------------

    def __aiter__(self) -> WebSocket:
        return self

    async def __anext__(self) -> str | bytes:
        while not self._inbox:
            if self._inbox is None:
                self._inbox = deque()
            if self._ready_state == WebSocket.CLOSED:
                raise StopAsyncIteration
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        assert self._inbox is not None
        message = self._inbox.popleft()
        if self._paused and len(self._inbox) <= INBOX_LOW and self._handle is not None:
            self._paused = False
            self._handle.set_paused(False)
        return message

    async def receive(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` once the socket is closed.

        ``async for message in ws`` and ``receive()`` are the pull API, used when no "message"
        listener is registered. While more than 64 messages wait unread, the core stops reading
        the socket (TCP backpressure reaches the peer); it resumes once 16 or fewer wait."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise ConnectionClosed("the WebSocket is closed") from None

    # -- from the runtime -----------------------------------------------------------------------

    def _accept_for(self, events: ObjectEvents, tags: list[str], limits: Limits | None) -> None:
        """``ctx.accept_websocket``: a hibernatable socket of ``events``'s object, bound once
        its 101 is sent."""
        if self._is_client_end:
            raise ResponseError("accept_websocket takes the server end of the pair")
        if self._accepted:
            raise ResponseError("this WebSocket was already accepted")
        self._slot = current_slot()
        self._accepted = True
        self._ready_state = WebSocket.OPEN
        self._object = events
        self._tags = tags
        self._limits = limits

    def _take_tags(self) -> list[str]:
        """The tags given to ``accept_websocket``, handed to the core once the 101 is sent."""
        tags, self._tags = self._tags, []
        return tags

    def _object_tags(self, events: object) -> list[str] | None:
        """The tags, if this is a hibernatable socket of ``events``'s object (else None)."""
        if self._object is not events:
            return None
        return self._handle.tags if self._handle is not None else list(self._tags)

    def _socket_id(self) -> int | None:
        return self._handle.id if self._handle is not None else None

    def _auto_response_timestamp(self) -> float | None:
        return self._handle.auto_response_timestamp if self._handle is not None else None

    def _bind(self, handle: SocketHandle, host: _Host, url: str, protocol: str) -> None:
        self._handle = handle
        self._host = host
        self._url = url
        self._protocol = protocol
        self._extensions = handle.extensions
        if self._attachment is not None:
            handle.set_attachment(self._attachment)
            self._attachment = None
        for message in self._pending:
            handle.send(message)
        self._pending.clear()
        if self._close_request is not None:
            handle.close(*self._close_request)

    @classmethod
    def _outgoing(cls, slot: Slot | None, accepted: bool) -> WebSocket:
        """An outgoing socket, open (``accepted``: already accepted, the ``sw.connect`` form)."""
        ws = cls()
        ws._slot = slot
        ws._accepted = accepted
        ws._ready_state = WebSocket.OPEN
        return ws

    @classmethod
    def _revive(cls, handle: SocketHandle, host: _Host, events: ObjectEvents) -> WebSocket:
        """A new object for a hibernatable socket that lives on in the core."""
        ws = cls()
        ws._handle = handle
        ws._host = host
        ws._object = events
        ws._accepted = True
        ws._ready_state = WebSocket.OPEN
        ws._url = handle.url
        ws._protocol = handle.protocol
        ws._extensions = handle.extensions
        return ws

    def _on_message(self, data: str | bytes) -> None:
        if self._object is not None:
            self._object.socket_message(self, data)
            return
        listeners = self._listeners["message"]
        if not listeners or self._inbox:  # (messages queued before a listener go first)
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(data)
            if self._reader is not None and not self._reader.done():
                self._reader.set_result(None)
            if not self._paused and len(self._inbox) >= INBOX_HIGH and self._handle is not None:
                self._paused = True
                self._handle.set_paused(True)
            return
        if self._ready_state == WebSocket.OPEN:
            self._to_listeners(data)

    def _to_listeners(self, data: str | bytes) -> None:
        self._emit("message", MessageEvent(data))

    def _on_close(self, code: int, reason: str, was_clean: bool) -> None:
        self._ready_state = WebSocket.CLOSED
        if self._object is not None:
            self._object.socket_close(self, code, reason, was_clean)
            return
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)
        self._on_drained()
        self._emit("close", CloseEvent(code, reason, was_clean))
        # The close is a socket's last event: its listeners go, and with them the cycle a
        # listener that names its socket makes (socket -> listener -> socket), so the socket is
        # freed now by its reference count, not at some later collection of the cyclic GC.
        for listeners in self._listeners.values():
            listeners.clear()

    def _on_error(self, message: str) -> None:
        if self._object is not None:
            self._object.socket_error(self, ProtocolError(message))
            return
        self._emit("error", ErrorEvent(ProtocolError(message)))

    def _on_drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _emit(self, kind: str, event: Any) -> None:
        """Calls the listeners of ``kind`` with ``event``, in order (on the per-message path:
        one frame for all of them)."""
        for listener, is_async in self._listeners[kind]:
            try:
                result = listener(event)
            except Exception:
                self._listener_failed(kind)
                continue
            if is_async or (result is not None and inspect.isawaitable(result)):
                assert self._host is not None and result is not None
                self._host.spawn(self._await_listener(result, kind), kind)

    async def _await_listener(self, result: Awaitable[None], kind: str) -> None:
        try:
            await result
        except Exception:
            self._listener_failed(kind)

    def _listener_failed(self, kind: str) -> None:
        logger.exception(
            "exception in a WebSocket %s listener (%s); closing it with 1011", kind, self.url
        )
        if self._ready_state < WebSocket.CLOSING:
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def __repr__(self) -> str:
        state = ("CONNECTING", "OPEN", "CLOSING", "CLOSED")[self._ready_state]
        return f"<WebSocket {state} {self.url or ''}>"


def WebSocketPair() -> tuple[WebSocket, WebSocket]:
    """Returns ``(client, server)``: return ``client`` in ``Response(status=101, websocket=client)``
    and use ``server`` (after ``server.accept()``)."""
    server = WebSocket()
    client = WebSocket(_client_end=True)
    client._peer = server
    return client, server
