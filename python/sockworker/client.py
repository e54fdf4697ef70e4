"""``sockworker.client``: an asyncio WebSocket client that reconnects (SPEC §8).

It owns one logical connection to a URL across many transport connections (``websockets``):
lazy connect, backoff with jitter, a bounded send buffer, idle close, and the ``WebSocket`` surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from ssl import SSLContext
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.client import process_exception
from websockets.exceptions import ConnectionClosed as TransportClosed
from websockets.exceptions import InvalidURI, PayloadTooBig
from websockets.exceptions import ProtocolError as TransportProtocolError
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .errors import ConnectionClosed, InvalidArgument, LimitExceeded, ProtocolError
from .outgoing import ConnectError
from .websocket import INBOX_HIGH, INBOX_LOW, CloseEvent, ErrorEvent, MessageEvent, check_close

__all__ = [
    "BufferFull",
    "Client",
    "ConnectFailed",
    "OpenEvent",
    "ReconnectingEvent",
]

logger = logging.getLogger("sockworker")

EventType = Literal["message", "close", "error", "open", "reconnecting"]
Listener = Callable[[Any], Awaitable[None] | None]
#: Computes the URL before each connection attempt (a ``def`` or an ``async def``).
UrlProvider = Callable[[], str | Awaitable[str]]
#: Computes query parameters added to the URL before each connection attempt.
QueryProvider = Callable[[], Mapping[str, str] | Awaitable[Mapping[str, str]]]
#: Decides, from the code and reason of a lost connection, whether to reconnect.
ReconnectPredicate = Callable[[int, str], bool]

# Code 1006 is never sent on the wire: it reports a connection that ended without a closing
# handshake (RFC 6455 §7.1.5), which is also what a client that gave up has to report.
ABNORMAL_CLOSURE = 1006
IDLE_REASON = "idle"


class BufferFull(LimitExceeded):
    """``send()`` found ``max_buffered_messages`` messages already waiting to be sent (while
    disconnected, or faster than the connection takes them). The message was not queued."""


class ConnectFailed(ConnectError, ConnectionClosed):
    """The client gave up connecting: ``attempts`` consecutive attempts failed (``max_attempts``
    reached, ``reconnect=False``, or an error retrying cannot fix, such as HTTP 404). The last
    attempt's exception is the ``__cause__``. The client is closed until ``reconnect()``."""

    def __init__(self, message: str, url: str, attempts: int) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts


class OpenEvent:
    """A connection opened; ``attempt`` is 1 for a first try, n for the n-th try in a row."""

    __slots__ = ("attempt", "protocol")
    type = "open"

    def __init__(self, attempt: int, protocol: str) -> None:
        self.attempt = attempt
        self.protocol = protocol


class ReconnectingEvent:
    """The client waits ``delay`` seconds, then makes connection attempt number ``attempt``.
    ``error`` is why the previous attempt failed, None after a lost connection."""

    __slots__ = ("attempt", "delay", "error")
    type = "reconnecting"

    def __init__(self, delay: float, attempt: int, error: BaseException | None) -> None:
        self.delay = delay
        self.attempt = attempt
        self.error = error


class _Outgoing:
    """One message not yet handed to the transport, and the ``send_async`` waiting for it."""

    __slots__ = ("data", "size", "waiter")

    def __init__(self, data: str | bytes, waiter: asyncio.Future[None] | None) -> None:
        self.data = data
        self.size = len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode())
        self.waiter = waiter


def _number(name: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} is a number, not {type(value).__name__}")
    if value < minimum or (not inclusive and value == minimum) or value != value:
        bound = ">=" if inclusive else ">"
        raise InvalidArgument(f"{name} must be {bound} {minimum}, not {value!r}")
    return float(value)


def _integer(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} is an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, not {value!r}")
    return value


def _secure(url: str) -> bool:
    """Whether ``url`` is ``wss://``; ``InvalidArgument`` unless it is a WebSocket URL."""
    try:
        return parse_uri(url).secure
    except InvalidURI as exc:
        raise InvalidArgument(f"url must be a ws:// or wss:// URL, not {url!r}") from exc


def _query_pairs(values: object) -> list[tuple[str, str]]:
    if not isinstance(values, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in values.items()
    ):
        raise TypeError(f"query parameters are a mapping of str to str, not {values!r}")
    return list(values.items())


def _with_query(url: str, pairs: list[tuple[str, str]]) -> str:
    """``url`` with ``pairs`` appended to its query string (after any it already has)."""
    if not pairs:
        return url
    parts = urlsplit(url)
    extra = urlencode(pairs)
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


async def _resolved(value: Any) -> Any:
    """The value of a provider's call: awaited when it is awaitable (an ``async def``)."""
    return await value if inspect.isawaitable(value) else value


def _handshake_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    if headers is None:
        return []
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    for pair in pairs:
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], str)
        ):
            raise TypeError(f"headers are (str, str) pairs or a str mapping, not {pair!r}")
        if not pair[0] or any(c in pair[0] + pair[1] for c in "\r\n"):
            raise InvalidArgument(f"invalid handshake header {pair[0]!r}")
    return pairs


class Client:
    """A WebSocket client for one URL that survives lost connections.

    It connects on the first ``send`` (or ``await connect()``), reconnects with exponential
    backoff and jitter, keeps messages sent while disconnected (at most
    ``max_buffered_messages``) and sends them, in order, once connected. ``close()`` ends it,
    and only ``reconnect()`` starts it again.

    ``url`` is a ``ws://`` or ``wss://`` URL, or a callable (``def`` or ``async def``) called
    before every connection attempt that returns one; ``query`` (a mapping, or such a callable
    returning one) adds parameters to it, a fresh token per attempt for example.
    ``should_reconnect(code, reason)`` is asked whether to reconnect after a connection was lost;
    returning False closes the client with that code.
    """

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3

    def __init__(
        self,
        url: str | UrlProvider,
        *,
        query: Mapping[str, str] | QueryProvider | None = None,
        protocols: Sequence[str] = (),
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        ssl: SSLContext | None = None,
        max_buffered_messages: int = 1000,
        reconnect: bool = True,
        max_attempts: int | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        backoff_factor: float = 2.0,
        jitter: float = 0.5,
        idle_timeout: float | None = None,
        connect_timeout: float | None = 10.0,
        max_message_size: int | None = 1 << 20,
        should_reconnect: ReconnectPredicate | None = None,
    ) -> None:
        if isinstance(url, str):
            secure = _secure(url)
        elif callable(url):
            secure = ssl is not None  # checked against each computed URL
        else:
            raise TypeError(f"url is a str or a callable returning one, not {type(url).__name__}")
        if query is not None and not callable(query):
            _query_pairs(query)
        if should_reconnect is not None and not callable(should_reconnect):
            raise TypeError(f"should_reconnect is callable, not {should_reconnect!r}")
        if isinstance(protocols, str):
            protocols = [protocols]
        if not all(isinstance(p, str) and p and p.isprintable() for p in protocols):
            raise InvalidArgument(f"protocols are non-empty strings, not {protocols!r}")
        if ssl is not None and not isinstance(ssl, SSLContext):
            raise TypeError(f"ssl is an ssl.SSLContext or None, not {type(ssl).__name__}")
        if ssl is not None and not secure:
            raise InvalidArgument("ssl is for wss:// URLs; this one is ws://")
        if not isinstance(reconnect, bool):
            raise TypeError(f"reconnect is a bool, not {type(reconnect).__name__}")
        self._url_source = url
        self._query_source = query
        # The URL of the current (or last) connection attempt; a computed one is known only then.
        self._url: str | None = None
        if isinstance(url, str) and not callable(query):
            self._url = _with_query(url, _query_pairs(query or {}))
        self._should_reconnect = should_reconnect
        self._protocols = [Subprotocol(p) for p in protocols]
        self._headers = _handshake_headers(headers)
        self._ssl = ssl
        self._max_buffered = _integer("max_buffered_messages", max_buffered_messages, minimum=1)
        self._reconnect = reconnect
        self._max_attempts = (
            None if max_attempts is None else _integer("max_attempts", max_attempts, minimum=1)
        )
        self._backoff_initial = _number(
            "backoff_initial", backoff_initial, minimum=0, inclusive=False
        )
        self._backoff_max = _number("backoff_max", backoff_max, minimum=self._backoff_initial)
        self._backoff_factor = _number("backoff_factor", backoff_factor, minimum=1)
        self._jitter = _number("jitter", jitter, minimum=0)
        if self._jitter > 1:
            raise InvalidArgument(f"jitter must be between 0 and 1, not {jitter!r}")
        self._idle_timeout = (
            None
            if idle_timeout is None
            else _number("idle_timeout", idle_timeout, minimum=0, inclusive=False)
        )
        self._connect_timeout = (
            None
            if connect_timeout is None
            else _number("connect_timeout", connect_timeout, minimum=0, inclusive=False)
        )
        self._max_message_size = (
            None
            if max_message_size is None
            else _integer("max_message_size", max_message_size, minimum=1)
        )
        self._random = random.Random()

        self._ready_state = Client.CONNECTING
        # The subprotocol and extensions the server chose for the current (or last) connection.
        self.protocol = ""
        self.extensions = ""
        self._listeners: dict[str, list[tuple[Listener, bool]]] = {
            "message": [],
            "close": [],
            "error": [],
            "open": [],
            "reconnecting": [],
        }
        self._listener_tasks: set[asyncio.Task[None]] = set()
        # Messages not yet handed to the transport, oldest first, across connections.
        self._outgoing: deque[_Outgoing] = deque()
        self._outgoing_bytes = 0
        self._inbox: deque[str | bytes] = deque()
        self._inbox_readers: list[asyncio.Future[None]] = []
        self._open_waiters: list[asyncio.Future[None]] = []
        # The one task that connects, serves a connection and reconnects; None while dormant
        # (before the first send, after an idle close) and once closed.
        self._task: asyncio.Task[None] | None = None
        self._conn: ClientConnection | None = None
        self._idle_closing = False
        self._draining = False
        self._last_activity = 0.0
        self._final = False
        self._close_request: tuple[int, str] = (1000, "")
        self._failure: ConnectFailed | None = None
        # reconnect(): attempt now with a fresh count (_retry_now); close the open connection
        # with this code and reason first (_restart); start again once close() completes.
        self._retry_now = False
        self._restart: tuple[int, str] | None = None
        self._reopen_when_closed = False
        # Counts reopenings, so that a connection task of an earlier life stays out of this one.
        self._generation = 0
        # Made on first use, inside the event loop.
        self._wake_writer: asyncio.Event | None = None
        self._inbox_room: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        # Cuts a backoff wait short: set by close() and reconnect().
        self._interrupt: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The URL of the current or last connection attempt: the one given, or the one the
        ``url`` or ``query`` callables computed (None before they were first called)."""
        return self._url

    @property
    def _where(self) -> str:
        return self._url or f"a URL from {self._url_source!r}"

    @property
    def ready_state(self) -> int:
        """CONNECTING while there is no open connection but there will be one (before the first
        send, while reconnecting, after an idle close); OPEN; CLOSING after ``close()``; CLOSED."""
        return self._ready_state

    @property
    def buffered_amount(self) -> int:
        """Bytes sent with ``send`` and not yet written to the network (waiting for a connection,
        or in the transport's write buffer)."""
        conn = self._conn
        written = 0
        if conn is not None and conn.transport is not None:
            written = conn.transport.get_write_buffer_size()
        return self._outgoing_bytes + written

    @property
    def buffered_messages(self) -> int:
        """Messages waiting to be handed to the transport (bounded by ``max_buffered_messages``)."""
        return len(self._outgoing)

    def backoff_delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1, 2, ...) of a (re)connection: the base
        ``backoff_initial * backoff_factor ** (retry - 1)``, capped at ``backoff_max``, then
        reduced by a random fraction of up to ``jitter`` of itself."""
        retry = _integer("retry", retry, minimum=1)
        exponent = min(retry - 1, 1024)  # past this the cap applies anyway; avoids overflow
        try:
            base = self._backoff_initial * self._backoff_factor**exponent
        except OverflowError:
            base = self._backoff_max
        base = min(base, self._backoff_max)
        return base * (1.0 - self._jitter * self._random.random())

    # -- listeners -----------------------------------------------------------------------------

    def add_event_listener(self, type: EventType, listener: Listener) -> None:
        """Calls ``listener(event)`` for each "message", "close", "error", "open" or
        "reconnecting" event; a ``def`` is called directly, an ``async def`` runs as a task.
        An exception in a listener is logged (logger "sockworker") and changes nothing else."""
        if type not in self._listeners:
            raise InvalidArgument(
                f"event type is 'message', 'close', 'error', 'open' or 'reconnecting', not {type!r}"
            )
        if not callable(listener):
            raise TypeError(f"a listener is callable, not {listener!r}")
        self._listeners[type].append((listener, inspect.iscoroutinefunction(listener)))

    on = add_event_listener

    def remove_event_listener(self, type: EventType, listener: Listener) -> None:
        """Stops calling ``listener`` for ``type`` events (nothing if it was not added)."""
        if type in self._listeners:
            self._listeners[type] = [pair for pair in self._listeners[type] if pair[0] != listener]

    # -- connecting ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Opens the connection now (instead of on the first send) and waits until it is open.

        Raises ``ConnectFailed`` when the client gives up, ``ConnectionClosed`` after ``close()``.
        """
        if self._final:
            raise self._closed_error()
        if self._ready_state == Client.OPEN:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._open_waiters.append(waiter)
        self._start()
        await waiter

    def _start(self) -> None:
        if self._task is None and not self._final:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def reconnect(self, code: int = 1000, reason: str = "") -> None:
        """Connects again now, with a fresh count of attempts and no backoff wait, computing
        the URL anew. An open connection is closed first with ``code`` and ``reason`` (the
        messages still queued wait for the new one); a client that gave up, or was closed,
        starts again (a ``close()`` still in progress completes first). ``await connect()``
        after it waits until the connection is open."""
        check_close(code, reason)
        asyncio.get_running_loop()  # RuntimeError outside one, as for send()
        state = self._ready_state
        if state == Client.CLOSED:
            self._reopen()
        elif state == Client.CLOSING:
            self._reopen_when_closed = True
        else:
            self._retry_now = True
            if self._conn is not None and state == Client.OPEN:
                self._restart = (code, reason)
                self._wake_event().set()
            self._interrupt_event().set()
            self._start()  # a dormant client (never connected, or closed when idle)

    def _reopen(self) -> None:
        """A CLOSED client becomes CONNECTING again, as if new, and connects."""
        self._generation += 1
        self._final = False
        self._failure = None
        self._close_request = (1000, "")
        self._reopen_when_closed = False
        self._retry_now = False
        self._restart = None
        self._ready_state = Client.CONNECTING
        for event in (self._stop, self._interrupt, self._closed):
            if event is not None:
                event.clear()
        self._start()

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Sends a message (str: text, bytes: binary) without blocking: it is queued, and
        handed to the connection in order, opening one first if there is none.

        Raises ``BufferFull`` when ``max_buffered_messages`` are already waiting,
        ``ConnectionClosed`` (``ConnectFailed`` if it gave up) once the client is closing."""
        self._queue(data, None)

    async def send_async(self, data: str | bytes) -> None:
        """Sends a message and waits until it is handed to the transport (written, or in its
        write buffer below the high-water mark). Raises like ``send``, and ``ConnectionClosed``
        (``ConnectFailed`` if it gave up) if the client closes before the message goes out."""
        waiter = asyncio.get_running_loop().create_future()
        self._queue(data, waiter)
        await waiter

    def _queue(self, data: str | bytes, waiter: asyncio.Future[None] | None) -> None:
        if not isinstance(data, str | bytes | bytearray | memoryview):
            raise TypeError(f"a WebSocket message is str or bytes, not {type(data).__name__}")
        if self._final:
            raise self._closed_error()
        if len(self._outgoing) >= self._max_buffered:
            state = "connected" if self._ready_state == Client.OPEN else "not connected"
            raise BufferFull(
                f"{len(self._outgoing)} messages are already waiting to be sent to {self._where} "
                f"({state}); max_buffered_messages is {self._max_buffered}"
            )
        self._start()  # first, so that without a running loop nothing is queued
        item = _Outgoing(data if isinstance(data, str | bytes) else bytes(data), waiter)
        self._outgoing.append(item)
        self._outgoing_bytes += item.size
        if self._wake_writer is not None:
            self._wake_writer.set()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Closes the client for good: messages already queued are sent first if a connection
        is open, otherwise they are dropped. The "close" event follows; no reconnect."""
        check_close(code, reason)
        if self._final:
            return
        self._final = True
        self._close_request = (code, reason)
        self._ready_state = Client.CLOSING
        for event in (self._stop, self._interrupt, self._wake_writer):
            if event is not None:
                event.set()
        if self._task is None:
            # Dormant: no connection to close. The event still follows close(), not inside it.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._finish(self._unconnected_close_event())
            else:
                loop.call_soon(lambda: self._finish(self._unconnected_close_event()))

    async def wait_closed(self) -> None:
        """Waits until the client is CLOSED (after ``close()``, or when it gave up)."""
        if self._ready_state == Client.CLOSED:
            return
        await self._closed_event().wait()

    # -- pull API --------------------------------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> str | bytes:
        """The next message (when no "message" listener is registered); ends once CLOSED.
        Reading stops while 64 messages are unread, so a slow reader slows the server."""
        while not self._inbox:
            if self._ready_state == Client.CLOSED:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._inbox_readers.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._inbox_readers:
                    self._inbox_readers.remove(waiter)
        message = self._inbox.popleft()
        if len(self._inbox) <= INBOX_LOW and self._inbox_room is not None:
            self._inbox_room.set()
        return message

    async def receive(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` (``ConnectFailed`` if it gave up)
        once the client is closed and every received message was read."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise self._closed_error() from None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # -- the connection task -----------------------------------------------------------------------

    async def _run(self) -> None:
        """Connects, serves the connection until it ends, and decides what comes next."""
        after_loss = False
        generation = self._generation
        try:
            while True:
                opened = await self._open(after_loss)
                if opened is None:
                    # close() during connecting; unless a listener of the give-up already
                    # called reconnect(), and this task has no say any more.
                    if self._generation == generation and self._ready_state != Client.CLOSED:
                        self._finish(self._unconnected_close_event())
                    return
                conn, attempt = opened
                event = await self._serve(conn, attempt)
                restarted, self._restart = self._restart is not None, None
                if self._final or not (
                    restarted or self._idle_closing or self._wants_reconnect(event)
                ):
                    self._final = True
                    self._finish(event)
                    return
                idle = self._idle_closing
                self._ready_state = Client.CONNECTING
                self._emit("close", event)
                if self._final:  # a close listener called close()
                    self._finish(self._unconnected_close_event())
                    return
                if idle and not self._outgoing and not self._open_waiters and not self._retry_now:
                    # Dormant until the next send. No await between the check and here, so
                    # a send() from now on starts a new task.
                    self._task = None
                    return
                after_loss = not idle
        except asyncio.CancelledError:
            self._abandon("the client's task was cancelled")
            raise
        except Exception as exc:  # a bug here must not leave senders waiting forever
            logger.exception("sockworker client for %s failed", self._where)
            self._abandon(f"the client failed: {exc!r}")

    def _wants_reconnect(self, event: CloseEvent) -> bool:
        """After a lost connection: ``reconnect=True`` and ``should_reconnect`` agrees."""
        if not self._reconnect:
            return False
        if self._should_reconnect is None:
            return True
        try:
            return bool(self._should_reconnect(event.code, event.reason))
        except Exception:
            # As with a failing listener: logged, and the client does what it would by default.
            logger.exception("exception in should_reconnect (%s); reconnecting", self._where)
            return True

    def _abandon(self, why: str) -> None:
        self._final = True
        if self._ready_state != Client.CLOSED:
            self._finish(CloseEvent(ABNORMAL_CLOSURE, why, False))

    async def _open(self, after_loss: bool) -> tuple[ClientConnection, int] | None:
        """Attempts until a connection opens (returns it and the attempt number), or returns
        None: the client gave up (it is then CLOSED) or ``close()`` was called."""
        self._ready_state = Client.CONNECTING
        stop = self._stop_event()
        attempt = 0
        last_error: BaseException | None = None
        interrupt = self._interrupt_event()
        while True:
            if stop.is_set():
                return None
            if self._retry_now:  # reconnect(): start counting again, and attempt at once
                self._retry_now = False
                attempt, after_loss, last_error = 0, False, None
            retry = attempt + 1 if after_loss else attempt
            if retry:
                delay = self.backoff_delay(retry)
                logger.debug(
                    "reconnecting to %s in %.3fs (attempt %d)", self._where, delay, attempt + 1
                )
                self._emit("reconnecting", ReconnectingEvent(delay, attempt + 1, last_error))
                interrupt.clear()
                if not (stop.is_set() or self._retry_now):  # (a listener may have called them)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await interrupt.wait()
                if stop.is_set():
                    return None
                if self._retry_now:
                    continue
            attempt += 1
            dial = asyncio.get_running_loop().create_task(self._dial())
            stopped = asyncio.get_running_loop().create_task(stop.wait())
            try:
                await asyncio.wait({dial, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not dial.done():
                    dial.cancel()
                    with contextlib.suppress(BaseException):
                        await dial
            if dial.cancelled():
                return None
            error = dial.exception()
            if error is None:
                conn = dial.result()
                if stop.is_set():
                    code, reason = self._close_request
                    await conn.close(code, reason)
                    return None
                return conn, attempt
            last_error = error
            fatal = process_exception(error) if isinstance(error, Exception) else error
            out_of_attempts = self._max_attempts is not None and attempt >= self._max_attempts
            if fatal is not None or not self._reconnect or out_of_attempts:
                self._give_up(attempt, error, retryable=fatal is None)
                return None
            logger.debug("connecting to %s failed: %r", self._where, error)

    async def _dial(self) -> ClientConnection:
        # One timeout for computing the URL and opening the connection: an attempt is bounded.
        async with asyncio.timeout(self._connect_timeout):
            url = await self._next_url()
            extra: dict[str, Any] = {}
            if self._ssl is not None:
                extra["ssl"] = self._ssl
            return await ws_connect(
                url,
                subprotocols=self._protocols or None,
                additional_headers=self._headers or None,
                open_timeout=None,
                max_size=self._max_message_size,
                **extra,
            )

    async def _next_url(self) -> str:
        """The URL for this attempt, from the ``url`` and ``query`` given (calling them when
        they are callables). What they raise fails the attempt, retried as a connection error
        would be: an ``OSError`` or a timeout is retried, anything else gives up."""
        source = self._url_source
        url = source if isinstance(source, str) else await _resolved(source())
        if not isinstance(url, str):
            raise TypeError(f"the url callable returned {url!r}, not a str")
        query = self._query_source
        if query is not None:
            values = await _resolved(query()) if callable(query) else query
            url = _with_query(url, _query_pairs(values))
        secure = _secure(url)
        self._url = url
        if self._ssl is not None and not secure:
            raise InvalidArgument(f"ssl is for wss:// URLs; {url!r} is ws://")
        return url

    def _give_up(self, attempts: int, error: BaseException, *, retryable: bool) -> None:
        if retryable:
            why = f"gave up connecting to {self._where} after {attempts} failed attempt(s)"
        else:
            why = f"cannot connect to {self._where} (not retried)"
        failure = ConnectFailed(f"{why}: {error}", self._url or "", attempts)
        failure.__cause__ = error
        self._failure = failure
        self._final = True
        logger.warning("%s: %r", why, error)
        self._finish(CloseEvent(ABNORMAL_CLOSURE, why, False), error=failure)

    async def _serve(self, conn: ClientConnection, attempt: int) -> CloseEvent:
        """Runs one open connection until it closes; returns its close event (not yet emitted)."""
        loop = asyncio.get_running_loop()
        self._conn = conn
        self._retry_now = False  # a reconnect() during the attempt that opened it is answered
        self._idle_closing = False
        self._draining = False
        self._last_activity = loop.time()
        self.protocol = conn.subprotocol or ""
        response = conn.response
        self.extensions = response.headers.get("Sec-WebSocket-Extensions", "") if response else ""
        self._ready_state = Client.OPEN if not self._final else Client.CLOSING
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._emit("open", OpenEvent(attempt, self.protocol))
        wake = self._wake_event()
        wake.set()  # what was buffered while disconnected goes out first
        reader = loop.create_task(self._read(conn))
        writer = loop.create_task(self._write(conn))
        idler = loop.create_task(self._watch_idle(conn)) if self._idle_timeout else None
        try:
            await conn.wait_closed()
            # Whatever the connection received before it closed is still delivered.
            self._draining = True
            self._room_event().set()
            wake.set()
            protocol_error = await reader
            await writer
        finally:
            for task in (reader, writer, idler):
                if task is not None and not task.done():
                    task.cancel()
            if conn.state is not State.CLOSED and conn.transport is not None:
                conn.transport.abort()  # only when this task itself was cancelled
            if idler is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await idler
            self._conn = None
        if protocol_error is not None:
            self._emit("error", ErrorEvent(protocol_error))
        rcvd = conn.protocol.close_rcvd
        sent = conn.protocol.close_sent
        if rcvd is not None:
            return CloseEvent(rcvd.code, rcvd.reason, sent is not None)
        if sent is not None:
            # The client failed the connection (a message too big, invalid UTF-8) and stopped
            # reading, or the server never answered: the code it sent says why.
            return CloseEvent(sent.code, sent.reason, False)
        return CloseEvent(ABNORMAL_CLOSURE, "", False)

    async def _read(self, conn: ClientConnection) -> ProtocolError | None:
        loop = asyncio.get_running_loop()
        room = self._room_event()
        while True:
            while (
                len(self._inbox) >= INBOX_HIGH
                and not self._listeners["message"]
                and not self._draining
            ):
                room.clear()
                await room.wait()
            try:
                data = await conn.recv()
            except TransportClosed as exc:
                cause = exc.__cause__
                if isinstance(cause, TransportProtocolError | PayloadTooBig | UnicodeDecodeError):
                    return ProtocolError(str(cause))
                return None
            self._last_activity = loop.time()
            self._deliver(data)

    def _deliver(self, data: str | bytes) -> None:
        if self._listeners["message"]:
            self._emit("message", MessageEvent(data))
            return
        self._inbox.append(data)
        readers, self._inbox_readers = self._inbox_readers, []
        for reader in readers:
            if not reader.done():
                reader.set_result(None)

    async def _write(self, conn: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake_event()
        while not self._draining and conn.state is State.OPEN:
            if self._restart is not None and not self._final:
                # reconnect(): what is still queued goes to the next connection.
                await conn.close(*self._restart)
                return
            if self._outgoing:
                item = self._outgoing[0]
                # The state is OPEN and send() writes before its first await, so even when it
                # raises (the connection broke while draining) the message was handed over.
                with contextlib.suppress(TransportClosed):
                    await conn.send(item.data)
                if self._outgoing and self._outgoing[0] is item:
                    self._outgoing.popleft()
                    self._outgoing_bytes -= item.size
                self._last_activity = loop.time()
                if item.waiter is not None and not item.waiter.done():
                    item.waiter.set_result(None)
                continue
            if self._final:
                await conn.close(*self._close_request)
                return
            wake.clear()
            await wake.wait()

    async def _watch_idle(self, conn: ClientConnection) -> None:
        assert self._idle_timeout is not None
        loop = asyncio.get_running_loop()
        while conn.state is State.OPEN and not self._final:
            remaining = self._last_activity + self._idle_timeout - loop.time()
            if remaining > 0:
                await asyncio.sleep(remaining)
                continue
            if self._outgoing or len(self._inbox) >= INBOX_HIGH:
                # Not idle: waiting for the network or for the application to read.
                self._last_activity = loop.time()
                continue
            self._idle_closing = True
            self._ready_state = Client.CONNECTING
            logger.debug("closing the idle connection to %s", self._where)
            await conn.close(1000, IDLE_REASON)
            return

    # -- ending --------------------------------------------------------------------------------

    def _unconnected_close_event(self) -> CloseEvent:
        code, reason = self._close_request
        return CloseEvent(code, reason, not self._outgoing)

    def _closed_error(self) -> ConnectionClosed:
        if self._failure is not None:
            failure = ConnectFailed(str(self._failure), self._failure.url, self._failure.attempts)
            failure.__cause__ = self._failure.__cause__
            return failure
        return ConnectionClosed(f"the client for {self._where} is closing or closed")

    def _finish(self, event: CloseEvent, error: ConnectFailed | None = None) -> None:
        """The client is CLOSED: fail whoever waits, then the "error" and "close" events."""
        self._final = True
        self._task = None
        self._ready_state = Client.CLOSED
        dropped = len(self._outgoing)
        items, self._outgoing = self._outgoing, deque()
        self._outgoing_bytes = 0
        for item in items:
            if item.waiter is not None and not item.waiter.done():
                item.waiter.set_exception(self._closed_error())
        if dropped:
            logger.info(
                "%d message(s) to %s dropped unsent: the client closed", dropped, self._where
            )
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        readers, self._inbox_readers = self._inbox_readers, []
        for reader in readers:
            if not reader.done():
                reader.set_result(None)
        if self._closed is not None:
            self._closed.set()
        if error is not None:
            self._emit("error", ErrorEvent(error))
        self._emit("close", event)
        if self._reopen_when_closed:  # reconnect() during close(), or from a listener of it
            self._reopen()

    # -- events --------------------------------------------------------------------------------

    def _emit(self, kind: str, event: Any) -> None:
        for listener, is_async in list(self._listeners[kind]):
            try:
                result = listener(event)
            except Exception:
                logger.exception("exception in a client %s listener (%s)", kind, self._where)
                continue
            if is_async or inspect.isawaitable(result):
                assert result is not None
                try:
                    task = asyncio.get_running_loop().create_task(self._await(result, kind))
                except RuntimeError:  # close() outside a running loop
                    if inspect.iscoroutine(result):
                        result.close()
                    logger.warning("async %s listener not run: no event loop", kind)
                    continue
                self._listener_tasks.add(task)
                task.add_done_callback(self._listener_tasks.discard)

    async def _await(self, result: Awaitable[None], kind: str) -> None:
        try:
            await result
        except Exception:
            logger.exception("exception in a client %s listener (%s)", kind, self._where)

    def _wake_event(self) -> asyncio.Event:
        if self._wake_writer is None:
            self._wake_writer = asyncio.Event()
        return self._wake_writer

    def _room_event(self) -> asyncio.Event:
        if self._inbox_room is None:
            self._inbox_room = asyncio.Event()
        return self._inbox_room

    def _stop_event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
            if self._final:
                self._stop.set()
        return self._stop

    def _interrupt_event(self) -> asyncio.Event:
        if self._interrupt is None:
            self._interrupt = asyncio.Event()
        return self._interrupt

    def _closed_event(self) -> asyncio.Event:
        if self._closed is None:
            self._closed = asyncio.Event()
            if self._ready_state == Client.CLOSED:
                self._closed.set()
        return self._closed

    # The camelCase names of the WebSocket surface, as partysocket and Cloudflare spell them.
    addEventListener = add_event_listener
    removeEventListener = remove_event_listener
    readyState = ready_state
    bufferedAmount = buffered_amount
    bufferedMessages = buffered_messages
    backoffDelay = backoff_delay
    sendAsync = send_async
    waitClosed = wait_closed

    def __repr__(self) -> str:
        state = ("CONNECTING", "OPEN", "CLOSING", "CLOSED")[self._ready_state]
        return f"<Client {state} {self._where}>"
