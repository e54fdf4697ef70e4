"""sockworker: Cloudflare-style Workers and WebSockets for Python, on a Rust core.

Everything a user needs is importable from here; ``sockworker._native`` is private.
"""

from __future__ import annotations

from .app import App, Env, ExecutionContext
from .billing import BillingHook, Meter, Pricing, UsageRecord
from .cluster import Cluster
from .durable import (
    AutoResponse,
    DurableObject,
    DurableObjectId,
    DurableObjectNamespace,
    DurableObjectState,
    DurableObjectStub,
    node_id,
    now,
)
from .errors import (
    ClusterError,
    ConnectError,
    ConnectionClosed,
    CpuLimitExceeded,
    FetchError,
    FetchTimeout,
    InvalidArgument,
    LimitExceeded,
    ProtocolError,
    RequestBodyError,
    ResponseError,
    ServerStartError,
    SockworkerError,
    StorageError,
    WallLimitExceeded,
)
from .http import Headers, Request, Response
from .limits import Limits
from .outgoing import connect, fetch
from .storage import AlarmInfo, DurableObjectStorage, SqlCursor, SqlStorage
from .websocket import CloseCode, CloseEvent, ErrorEvent, MessageEvent, WebSocket, WebSocketPair

#: Cloudflare's name of ``AutoResponse`` (``ctx.setWebSocketAutoResponse(pair)``).
WebSocketRequestResponsePair = AutoResponse

__all__ = [
    "AlarmInfo",
    "App",
    "AutoResponse",
    "BillingHook",
    "CloseCode",
    "CloseEvent",
    "Cluster",
    "ClusterError",
    "ConnectError",
    "ConnectionClosed",
    "CpuLimitExceeded",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStorage",
    "DurableObjectStub",
    "Env",
    "ErrorEvent",
    "ExecutionContext",
    "FetchError",
    "FetchTimeout",
    "Headers",
    "InvalidArgument",
    "LimitExceeded",
    "Limits",
    "MessageEvent",
    "Meter",
    "Pricing",
    "ProtocolError",
    "Request",
    "RequestBodyError",
    "Response",
    "ResponseError",
    "ServerStartError",
    "SockworkerError",
    "SqlCursor",
    "SqlStorage",
    "StorageError",
    "UsageRecord",
    "WallLimitExceeded",
    "WebSocket",
    "WebSocketPair",
    "WebSocketRequestResponsePair",
    "connect",
    "fetch",
    "node_id",
    "now",
]
