"""What a Durable Object instance reaches through ``self.ctx`` (SPEC §2.4, §2.5): its
``DurableObjectState``, and the ``DurableObjectId`` and ``AutoResponse`` values it uses.

A new ``DurableObjectState`` is made for each instance; what it reaches (the sockets and their
tags, auto-responses, storage, the alarm) belongs to the object and survives hibernation. It
talks to the object's host in the runtime through ``StateHost``, the little it needs of it.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from . import _native
from .errors import InvalidArgument
from .storage import DurableObjectStorage, StorageHost
from .websocket import WebSocket

__all__ = ["AutoResponse", "DurableObjectId", "DurableObjectState"]

T = TypeVar("T")


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


class StateHost(StorageHost, Protocol):
    """What ``DurableObjectState`` needs of its object's host (the runtime's ``ObjectHost``)."""

    @property
    def id(self) -> DurableObjectId: ...

    @property
    def native(self) -> _native.ObjectState:
        """The object's state in the core: its sockets, auto-responses and event timeout."""
        ...

    def accept(self, ws: WebSocket, tags: list[str]) -> None:
        """Makes ``ws`` a hibernatable socket of the object once its 101 is sent."""
        ...

    def revive(self, handle: _native.SocketHandle) -> WebSocket: ...
    def sockets_elsewhere(self, tag: str | None) -> list[WebSocket]:
        """Cluster mode: the object's sockets held by other nodes (else none)."""
        ...

    def broadcast_elsewhere(
        self, message: str | bytes, tag: str | None, excluded: int | None
    ) -> int:
        """Cluster mode: one message per node holding sockets of the object; how many."""
        ...

    def auto_responses_changed(self, pairs: list[tuple[str | bytes, str | bytes]]) -> None: ...
    def block(self, awaitable: Awaitable[T]) -> asyncio.Future[T]: ...
    def track(self, awaitable: Awaitable[Any], what: str) -> None: ...


class DurableObjectState:
    """``self.ctx`` of a Durable Object instance. A new one is made for each instance; the state
    it reaches (sockets, storage, alarm) is the object's and survives hibernation."""

    def __init__(self, host: StateHost, generation: int) -> None:
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
        self._host.accept(ws, tags)

    def get_websockets(self, tag: str | None = None) -> list[WebSocket]:
        """The open hibernatable sockets (with ``tag``, if given), as fresh objects after a
        hibernation."""
        host = self._host
        sockets = [host.revive(handle) for handle in host.native.sockets(tag)]
        return sockets + host.sockets_elsewhere(tag)

    def get_tags(self, ws: WebSocket) -> list[str]:
        tags = ws._object_tags(self._host)
        if tags is None:
            raise InvalidArgument("this WebSocket was not accepted by this object")
        return tags

    def websocket_count(self, tag: str | None = None) -> int:
        """Counts the open hibernatable sockets in the core; wakes nothing."""
        host = self._host
        return host.native.count(tag) + len(host.sockets_elsewhere(tag))

    def broadcast(
        self, message: str | bytes, tag: str | None = None, exclude: WebSocket | None = None
    ) -> int:
        """Sends ``message`` to every open hibernatable socket (with ``tag``), but ``exclude``.
        The core encodes the frame once; no Python object per socket. Returns how many."""
        excluded = exclude._socket_id() if exclude is not None else None
        host = self._host
        # (A negative id is a socket held by another node, cluster mode: not the core's.)
        local = excluded if excluded is not None and excluded >= 0 else None
        count = host.native.broadcast(message, tag, local)
        return count + host.broadcast_elsewhere(message, tag, excluded)

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
        raw: list[tuple[str | bytes, str | bytes]] = [(p.request, p.response) for p in listed]
        self._host.native.set_auto_responses(raw)
        self._host.auto_responses_changed(raw)

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
        stamp = ws._auto_response_timestamp()
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
