"""What the runtime needs of the app it serves: ``AppLike`` (``sockworker.App`` is one) and
``ObjectKind`` (each of its Durable Object namespaces), and, in cluster mode, ``Routing`` (what
the runtime asks of ``cluster.Nodes``, so that its other parts need not import it). The runtime
imports neither ``app`` nor ``durable``: they sit above it and hand it these."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from .. import _native
from ..billing import BillingHook, Meter
from ..cluster import Cluster
from ..env import Env
from ..http import Request, Response
from ..limits import Limits
from ..state import DurableObjectId
from ..websocket import WebSocket


class ObjectKind(Protocol):
    """One Durable Object namespace: its binding, its class and the limits of its objects."""

    @property
    def binding(self) -> str: ...

    @property
    def cls(self) -> type[Any]:
        """Called as ``cls(state, env)`` to make an instance."""
        ...

    @property
    def limits(self) -> Limits: ...

    @property
    def socket_limits(self) -> Limits | None:
        """The limits of sockets its objects accept (None: the app's)."""
        ...


class AppLike(Protocol):
    """The configuration of the app being served."""

    @property
    def fetch(self) -> Callable[..., Any] | None: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def env(self) -> Env: ...
    @property
    def namespaces(self) -> Mapping[str, ObjectKind]: ...
    @property
    def account(self) -> Callable[..., str] | None: ...
    @property
    def billing(self) -> BillingHook | None: ...
    @property
    def meter(self) -> Meter: ...
    @property
    def metering(self) -> bool: ...
    @property
    def metrics_path(self) -> str | None: ...
    @property
    def data_dir(self) -> str | os.PathLike[str] | None: ...
    @property
    def durability(self) -> str: ...
    @property
    def allowed_origins(self) -> list[str] | None: ...
    @property
    def compression(self) -> bool: ...
    @property
    def stream_request_bodies(self) -> bool: ...
    @property
    def cluster(self) -> Cluster | None: ...


class Owner(NamedTuple):
    """Cluster mode: the node that holds an object's lease, and where it listens."""

    node: str
    address: str | None


class Routing(Protocol):
    """Cluster mode (SPEC §7): what the rest of the runtime asks of the routing between nodes
    (``cluster.Nodes``)."""

    node_id: str
    settings: Cluster

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def route(self, binding: str, object_id: str) -> Owner | None:
        """The owner of the object, or None when it is this node (its lease taken if free)."""
        ...

    def epoch(self, binding: str, object_id: str) -> int: ...
    async def forward(
        self, kind: ObjectKind, object_id: DurableObjectId, op: str, body: Any
    ) -> Any: ...
    def response(self, kind: ObjectKind, object_id: DurableObjectId, result: Any) -> Response: ...
    def accept(self, request: Request) -> Response: ...
    def relay(self, handle: _native.SocketHandle) -> WebSocket | None: ...
    def needs_gather(self, binding: str, hex_id: str, epoch: int) -> bool: ...
    async def gather(self, kind: ObjectKind, object_id: DurableObjectId) -> None: ...
    def took(self, binding: str, hex_id: str) -> None: ...
    def has_remote(self, binding: str, hex_id: str) -> bool: ...
    def remote_sockets(self, binding: str, hex_id: str, tag: str | None) -> list[Any]:
        """The object's sockets held by other nodes (handles standing in for the core's)."""
        ...

    def broadcast(
        self, binding: str, hex_id: str, data: str | bytes, tag: str | None, exclude: int | None
    ) -> int: ...
    def auto_responses_changed(
        self, binding: str, hex_id: str, pairs: list[tuple[str | bytes, str | bytes]]
    ) -> None: ...
