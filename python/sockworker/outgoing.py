"""Outgoing WebSockets (SPEC §2.3): ``await sw.connect(url)`` and the fetch form.

An outgoing socket is an ordinary ``WebSocket`` with the standard API (listeners, ``async for``,
``send_async``). It is not tied to the request that opened it: keep it on a Durable Object or in
a module global and use it from any later event. Opened during an object's event, it keeps that
object awake (it is not hibernatable) and its traffic and events are metered to the object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ._runtime import running
from .errors import ConnectError
from .http import Headers, Response
from .websocket import WebSocket

__all__ = ["ConnectError", "connect", "fetch"]

# Headers the client handshake writes itself.
_HANDSHAKE_HEADERS = {
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
}


async def connect(
    url: str,
    protocols: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
    *,
    ca_file: str | None = None,
) -> WebSocket:
    """Opens a WebSocket to ``url`` (``ws://`` or ``wss://``); returns it accepted and open.
    ``wss://`` trusts the system's CA certificates, or only those in ``ca_file`` (PEM).

    Raises ``ConnectError`` when it cannot be opened (refused, unknown host, TLS, timeout, an
    answer other than 101), ``TypeError`` for a bad argument."""
    if isinstance(protocols, str):
        protocols = [protocols]
    if not all(isinstance(p, str) and p for p in protocols):
        raise TypeError("protocols are non-empty strings")
    extra = [
        (str(name), str(value))
        for name, value in (headers or {}).items()
        if str(name).lower() not in _HANDSHAKE_HEADERS
    ]
    ws: WebSocket = await running("opening an outgoing WebSocket").outgoing.connect(
        url, list(protocols), extra, accepted=True, ca_file=_path(ca_file)
    )
    return ws


def _path(ca_file: str | None) -> str | None:
    return None if ca_file is None else os.fspath(ca_file)


async def fetch(
    url: str,
    *,
    headers: Mapping[str, str] | Headers | None = None,
    ca_file: str | None = None,
) -> Response:
    """The fetch form: with ``Upgrade: websocket`` in ``headers``, opens a WebSocket and returns
    ``Response(status=101, websocket=ws)``; call ``ws.accept()`` before using it.

    Plain HTTP requests are not supported yet (``NotImplementedError``)."""
    given = headers if isinstance(headers, Headers) else Headers(headers)
    if given.get("upgrade", "").lower() != "websocket":
        raise NotImplementedError(
            "sw.fetch opens WebSockets only (pass headers={'upgrade': 'websocket'}); "
            "plain HTTP requests are not supported yet"
        )
    protocols = [p.strip() for p in given.get("sec-websocket-protocol", "").split(",") if p.strip()]
    extra = [
        (name, value) for name, value in given.items() if name.lower() not in _HANDSHAKE_HEADERS
    ]
    ws: WebSocket = await running("opening an outgoing WebSocket").outgoing.connect(
        url, protocols, extra, accepted=False, ca_file=_path(ca_file)
    )
    return Response(status=101, websocket=ws)
