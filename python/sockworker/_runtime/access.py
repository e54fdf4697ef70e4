"""The access log (``--access-log``, ``App(access_log=True)``): one record per HTTP request
answered and per accepted WebSocket closed, to the logger ``sockworker.access``.

Python writes both: it knows the account and the object, and both happen once per request or
socket on the application thread. What only the core knows of a socket (its messages and bytes
each way, how long it was open) it counts on the socket itself while the log is on, and hands
over when the socket closes: the per-message path has nothing to do for the log. Each record
carries its fields as the attribute ``access`` (a dict), which ``--log-format json`` puts in
the JSON line.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

from .. import _current, _native

logger = logging.getLogger("sockworker.access")


def _object_of(slot: _native.Slot | None) -> str | None:
    if slot is None or slot.namespace is None:
        return None
    return f"{slot.namespace}:{slot.object_id}"


def request(
    method: str,
    path: str,
    status: int,
    seconds: float,
    bytes_in: int,
    bytes_out: int,
    account: str | None,
    routed: str | None,
) -> None:
    """One HTTP request answered (``routed``: the Durable Object whose stub's fetch the
    Worker called, if any)."""
    fields: dict[str, Any] = {
        "kind": "http",
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "account": account,
        "object": routed,
    }
    logger.info(
        "%s %s %d %.1fms in=%dB out=%dB account=%s object=%s",
        method,
        path,
        status,
        seconds * 1000,
        bytes_in,
        bytes_out,
        account or "-",
        routed or "-",
        extra={"access": fields},
    )


def websocket_closed(
    handle: _native.SocketHandle | None,
    url: str | None,
    code: int,
    slot: _native.Slot | None,
    object_name: str | None,
) -> None:
    """One accepted WebSocket closed (``handle``'s traffic was counted by the core)."""
    traffic = handle.traffic() if handle is not None else None
    if traffic is None:
        return
    messages_in, messages_out, bytes_in, bytes_out, seconds = traffic
    fields: dict[str, Any] = {
        "kind": "websocket",
        "path": urlsplit(url).path or "/" if url is not None else None,
        "close_code": code,
        "duration_ms": round(seconds * 1000, 3),
        "messages_in": messages_in,
        "messages_out": messages_out,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "account": slot.account if slot is not None else None,
        "object": _object_of(slot) or object_name,
    }
    logger.info(
        "WS %s closed %d %.1fms messages in=%d out=%d bytes in=%d out=%d account=%s object=%s",
        fields["path"],
        code,
        seconds * 1000,
        messages_in,
        messages_out,
        bytes_in,
        bytes_out,
        fields["account"] or "-",
        fields["object"] or "-",
        extra={"access": fields},
    )


class LoggedReply:
    """A request's reply that writes its access record when it is given (whichever way the
    request ends: answered, refused, failed, or upgraded)."""

    __slots__ = ("_reply", "account", "body_bytes", "method", "path", "started")

    def __init__(
        self, reply: _native.PendingReply, method: str, path: str, body_bytes: int
    ) -> None:
        self._reply = reply
        self.method = method
        self.path = path
        self.body_bytes = body_bytes
        self.started = time.monotonic()
        #: Set once the request's account is known.
        self.account: str | None = None

    @property
    def is_websocket(self) -> bool:
        return self._reply.is_websocket

    def _log(self, status: int, bytes_out: int) -> None:
        request(
            self.method,
            self.path,
            status,
            time.monotonic() - self.started,
            self.body_bytes,
            bytes_out,
            self.account,
            _current.routed_object.get(),
        )

    def respond(self, status: int, headers: list[tuple[str, bytes]], body: bytes) -> None:
        self._reply.respond(status, headers, body)
        self._log(status, len(body))

    def accept_websocket(
        self,
        headers: list[tuple[str, bytes]],
        slot: _native.Slot | None = None,
        limits: _native.SocketLimits | None = None,
    ) -> _native.SocketHandle:
        return self._reply.accept_websocket(headers, slot, limits)

    def open(self) -> None:
        self._reply.open()
        self._log(101, 0)
