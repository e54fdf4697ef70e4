"""Durable Objects (SPEC §2.4): the ``DurableObject`` base class, ``env.BINDING`` (a
``DurableObjectNamespace``) and the stubs it makes. An object's events run in the runtime
(``sockworker._runtime.host``); what an instance reaches through ``self.ctx`` is in ``state``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from . import _current
from ._runtime import HANDLER_NAMES, ObjectHost, Runtime, running
from ._runtime.cluster import NotOwner
from .env import Env
from .errors import InvalidArgument, ResponseError
from .http import Headers, Request, Response
from .limits import Limits
from .state import AutoResponse, DurableObjectId, DurableObjectState

__all__ = [
    "AutoResponse",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "node_id",
    "now",
]

_BINDING = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def node_id() -> str | None:
    """Cluster mode (SPEC §7): the name of the node serving now (``--node-id``, or the default
    one); None outside cluster mode or when the app is not serving."""
    runtime = _current.serving()
    if not isinstance(runtime, Runtime) or runtime.services.nodes is None:
        return None
    return runtime.services.nodes.node_id


def now() -> float:
    """The current time in seconds since the epoch (``time.time()``)."""
    return time.time()


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
        nodes = running("reaching a Durable Object").services.nodes
        if nodes is not None:
            # (A body read as it arrives is read whole first: it may travel to another node.)
            body = await request.read()
            forwarded = await self._namespace._forward(
                self.id,
                "fetch",
                (request.method, request.url, list(request.headers.items()), body),
            )
            if forwarded is not None:
                return nodes.response(self._namespace, self.id, forwarded)
        _current.routed_object.set(f"{self._namespace.binding}:{self.id}")
        host = self._namespace._host(self.id)
        response = await host.call("fetch", request)
        if not isinstance(response, Response):
            raise ResponseError(f"{host.cls.__name__}.fetch must return a Response")
        host.returned(response)
        return response

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_") or name in HANDLER_NAMES or name in HANDLER_NAMES.values():
            raise AttributeError(f"{name!r} cannot be called through a stub")

        async def rpc(*args: Any, **kwargs: Any) -> Any:
            if running("reaching a Durable Object").services.nodes is not None:
                forwarded = await self._namespace._forward(self.id, "rpc", (name, args, kwargs))
                if forwarded is not None:
                    return forwarded[0]
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

    async def _forward(self, object_id: DurableObjectId, op: str, body: Any) -> Any:
        """Cluster mode: runs ``op`` on the node that owns the object and returns its result
        (an RPC's in a 1-tuple); None when this node owns it (the caller runs it here)."""
        nodes = running("reaching a Durable Object").services.nodes
        if nodes is None or await nodes.route_async(self.binding, str(object_id)) is None:
            return None
        try:
            result = await nodes.forward(self, object_id, op, body)
        except NotOwner:
            return None
        return (result,) if op == "rpc" else result

    def _host(self, object_id: DurableObjectId) -> ObjectHost:
        """The resident host of ``object_id``, made if the object hibernated (or never ran)."""
        return running("reaching a Durable Object").objects.host(self, object_id)
