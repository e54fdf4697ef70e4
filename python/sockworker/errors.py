"""The exceptions sockworker raises, all under one base, ``SockworkerError``.

Each also subclasses the standard exception whose meaning it shares, so ``except ValueError``
and ``except ConnectionError`` keep working::

    SockworkerError(Exception)
     ├── InvalidArgument(SockworkerError, ValueError)   a value out of range (close code, reason)
     ├── ResponseError(SockworkerError, RuntimeError)   a handler's answer cannot be sent
     ├── LimitExceeded(SockworkerError)   a configured limit would be passed (sockets per object)
     │    ├── CpuLimitExceeded   an event used more CPU than Limits.cpu_ms (raised inside it)
     │    └── WallLimitExceeded   an event held the loop longer than Limits.wall_ms (likewise)
     ├── StorageError(SockworkerError)   storage failed: bad SQL, a full disk, a corrupt file,
     │                                   a failed commit, or storage used after a reset
     ├── ConnectionClosed(SockworkerError, ConnectionError)   the WebSocket is closing or closed
     ├── ProtocolError(SockworkerError, ConnectionError)   the peer broke RFC 6455 (event.error)
     ├── ServerStartError(SockworkerError, OSError)   the server could not bind or start
 ├── ConnectError(SockworkerError, ConnectionError)   an outgoing WebSocket could not be opened
 ├── FetchError(SockworkerError, ConnectionError)   an outgoing HTTP request (sw.fetch) failed
 │    └── FetchTimeout(FetchError, TimeoutError)   ... because its timeout passed
     └── ClusterError(SockworkerError, ConnectionError)   cluster mode: an event could not reach
                                      the node that owns its object
"""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "ConnectError",
    "ConnectionClosed",
    "CpuLimitExceeded",
    "FetchError",
    "FetchTimeout",
    "InvalidArgument",
    "LimitExceeded",
    "ProtocolError",
    "RequestBodyError",
    "ResponseError",
    "ServerStartError",
    "SockworkerError",
    "StorageError",
    "WallLimitExceeded",
]


class SockworkerError(Exception):
    """The base of every sockworker exception."""


class InvalidArgument(SockworkerError, ValueError):
    """An argument is out of the range the API allows."""


class ResponseError(SockworkerError, RuntimeError):
    """A handler's answer cannot be sent (answered twice, or a WebSocket for a plain request)."""


class RequestBodyError(SockworkerError, OSError):
    """A request body read as it arrives (``App(stream_request_bodies=True)``) cannot be read
    (further): it is larger than ``Limits.max_body_size``, the client took longer than
    ``Limits.handshake_timeout`` to send it, or the client went away. If the handler had not
    answered yet, the core has answered (413, 408 or 400)."""


class LimitExceeded(SockworkerError):
    """A configured limit would be passed (for example hibernatable sockets per object)."""


class CpuLimitExceeded(LimitExceeded):
    """An event used more CPU time than ``Limits.cpu_ms``. The core's watchdog raises it inside
    the running handler (also in a loop that never awaits); the instance is then reset, and an
    HTTP event answers 503."""

    def __init__(self, message: str = "the event used more CPU time than Limits.cpu_ms") -> None:
        super().__init__(message)


class WallLimitExceeded(LimitExceeded):
    """An event (or one step of an async one) held the event loop longer than
    ``Limits.wall_ms``: every other socket and request waited meanwhile. Raised inside it by the
    watchdog, at the next bytecode it runs (a blocking call in C, ``time.sleep`` say, is not cut
    short: the exception comes when it returns); then as for ``CpuLimitExceeded``."""

    def __init__(self, message: str = "the event held the loop longer than Limits.wall_ms") -> None:
        super().__init__(message)


class StorageError(SockworkerError):
    """Durable Object storage failed: SQLite's message for bad SQL, a full disk or a corrupt
    database file; a commit that failed (the object was reset and what it sent since its last
    commit was dropped); or storage used by an instance that was reset or hibernated."""


class ConnectionClosed(SockworkerError, ConnectionError):
    """The WebSocket is closing or closed."""


class ProtocolError(SockworkerError, ConnectionError):
    """The peer violated the WebSocket protocol; the socket was closed with the code given."""


class ServerStartError(SockworkerError, OSError):
    """The server could not bind its address or start its threads."""


class ConnectError(SockworkerError, ConnectionError):
    """An outgoing WebSocket could not be opened: refused, unknown host, timeout, or a server
    that answered something other than 101 (the message says which, with the status)."""


class FetchError(SockworkerError, ConnectionError):
    """An outgoing HTTP request (``sw.fetch``) got no whole response: refused, unknown host, a
    TLS failure, a connection closed before the response was complete, a response body over
    ``max_response_size``, or more than 20 redirects. The message names the URL and says which.
    An answer with any status (404, 500) is a response, not this error."""


class FetchTimeout(FetchError, TimeoutError):
    """``sw.fetch`` did not get its whole response within ``timeout`` seconds (redirects
    included), or could not connect within ``connect_timeout``."""


class ClusterError(SockworkerError, ConnectionError):
    """Cluster mode (SPEC §7): an event could not reach the node that owns its object (the owner
    died and its lease has not expired yet, a link closed, or the cluster's PostgreSQL is
    unreachable). Nothing was done on the owner unless it says otherwise; retrying is safe for an
    event the object handles idempotently."""
