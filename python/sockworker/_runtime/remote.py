"""Sockets that stay where they were accepted while their object lives on another node
(cluster mode, SPEC §7).

- On the node that holds a socket for an object owned elsewhere, the socket is an ordinary core
  socket of the object's core state there (tags, attachment, auto-responses, hibernation: all in
  the core, no Python object while idle). Its events go to the owner through a ``Relay``.
- On the owner, the socket is a ``RemoteHandle`` in the place of a ``_native.SocketHandle``:
  a ``WebSocket`` made on it works as usual, and what the object does with it (send, close,
  attachment) is sent to the node that holds it.

``Info`` is what the holding node says of a socket with each of its events, so that the owner
(also a new one, after a failover) knows it without asking.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .. import _native

if TYPE_CHECKING:
    from ..websocket import WebSocket
    from .contract import ObjectKind, Owner

_tokens = itertools.count(1)


class Nodes(Protocol):
    """What the sockets of this module need of the cluster's routing (``cluster.Nodes``)."""

    def out(self, node: str, op: tuple[Any, ...]) -> None:
        """Queues ``op`` for the node that holds a socket."""
        ...

    def socket_event(self, relay: Relay, ws: WebSocket, name: str, args: tuple[Any, ...]) -> None:
        """Sends an event of a socket held here to its object's owner."""
        ...

    def adopt(self, accepted: Accepted, ws: WebSocket, handle: _native.SocketHandle) -> None:
        """The 101 of a socket accepted for another node's object went out."""
        ...


class Info(NamedTuple):
    """A socket held by another node, as it describes it."""

    socket_id: int
    tags: list[str]
    url: str
    protocol: str
    extensions: str
    attachment: bytes | None

    @classmethod
    def of(cls, handle: _native.SocketHandle) -> Info:
        return cls(
            handle.id,
            handle.tags,
            handle.url,
            handle.protocol,
            handle.extensions,
            handle.attachment,
        )


#: An object, as the links name it: (binding, hex id, the name the id was made from).
ObjectRef = tuple[str, str, str | None]


class RemoteHandle:
    """On the owner: one socket of one of its objects, held by node ``node``. Its ``id`` is
    negative (it shares the socket tables with the core's ids, which are positive)."""

    __slots__ = (
        "attachment",
        "closed",
        "extensions",
        "id",
        "node",
        "nodes",
        "obj",
        "protocol",
        "queued",
        "socket_id",
        "tags",
        "url",
    )

    buffered_amount = 0
    high_water = 1 << 62
    auto_response_timestamp = None

    def __init__(
        self,
        nodes: Nodes,
        node: str,
        obj: tuple[str, str],
        tags: list[str],
        url: str,
        protocol: str,
        extensions: str = "",
        socket_id: int | None = None,
        attachment: bytes | None = None,
    ) -> None:
        self.id = -next(_tokens)
        self.nodes = nodes
        self.node = node
        self.obj = obj
        self.tags = tags
        self.url = url
        self.protocol = protocol
        self.extensions = extensions
        self.socket_id = socket_id
        self.attachment = attachment
        # What the object did before the holding node named the socket (right after the 101).
        self.queued: list[tuple[Any, ...]] = []
        self.closed = False

    def _out(self, op: tuple[Any, ...]) -> None:
        if self.socket_id is None:
            self.queued.append(op)
        else:
            self.nodes.out(self.node, op)

    def bound(self, socket_id: int) -> None:
        """The holding node accepted the socket under ``socket_id``."""
        self.socket_id = socket_id
        queued, self.queued = self.queued, []
        for op in queued:
            self.nodes.out(self.node, (op[0], socket_id, *op[2:]))

    def send(self, data: str | bytes) -> int:
        if self.closed:
            return _native.SEND_DROPPED
        self._out(("send", self.socket_id, data if isinstance(data, str) else bytes(data)))
        return _native.SEND_QUEUED

    def close(self, code: int, reason: str) -> bool:
        if self.closed:
            return False
        self._out(("close", self.socket_id, code, reason))
        return True

    def set_attachment(self, attachment: bytes | None) -> None:
        self.attachment = attachment
        self._out(("attach", self.socket_id, attachment))

    def set_paused(self, paused: bool) -> None:
        """(Reading is paused on the holding node by its own inbox; nothing to do here.)"""

    def request_drain(self) -> bool:
        return False

    def refresh(self, info: Info) -> None:
        self.tags = info.tags
        self.attachment = info.attachment


class Relay:
    """On a node holding sockets of an object owned elsewhere: where those sockets' events go
    (``ObjectEvents``). One per event: it is not kept. ``owner``: the owner as routed for this
    event (None: route when it is sent)."""

    __slots__ = ("kind", "nodes", "obj", "owner")

    def __init__(
        self, nodes: Nodes, kind: ObjectKind, obj: ObjectRef, owner: Owner | None = None
    ) -> None:
        self.nodes = nodes
        self.kind = kind
        self.obj = obj
        self.owner = owner

    def socket_message(self, ws: WebSocket, data: str | bytes) -> None:
        self.nodes.socket_event(self, ws, "ws_message", (data,))

    def socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self.nodes.socket_event(self, ws, "ws_close", (code, reason, was_clean))

    def socket_error(self, ws: WebSocket, error: BaseException) -> None:
        self.nodes.socket_event(self, ws, "ws_error", (str(error),))


class Accepted(Relay):
    """A socket the owner accepted for one of its objects, while the 101 goes out here: once
    the core has it, it joins the object's core state here and the owner learns its id."""

    __slots__ = ("auto_responses", "owner_node", "tags", "token")

    def __init__(
        self,
        nodes: Nodes,
        kind: ObjectKind,
        obj: ObjectRef,
        owner: str,
        token: int,
        tags: list[str],
        auto_responses: list[tuple[str | bytes, str | bytes]],
    ) -> None:
        super().__init__(nodes, kind, obj)
        self.owner_node = owner
        self.token = token
        self.tags = tags
        self.auto_responses = auto_responses

    def adopt(self, ws: WebSocket, handle: _native.SocketHandle) -> None:
        self.nodes.adopt(self, ws, handle)
