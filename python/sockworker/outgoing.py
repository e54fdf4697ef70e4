"""Outgoing WebSockets (SPEC §2.3): ``await sw.connect(url)`` and the fetch form; outgoing HTTP
requests: ``await sw.fetch(url)``.

An outgoing socket is an ordinary ``WebSocket`` with the standard API (listeners, ``async for``,
``send_async``). It is not tied to the request that opened it: keep it on a Durable Object or in
a module global and use it from any later event. Opened during an object's event, it keeps that
object awake (it is not hibernatable) and its traffic and events are metered to the object.
"""

from __future__ import annotations

import json as _json
import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ._runtime import running
from .errors import ConnectError, FetchError, FetchTimeout
from .http import Headers, Request, Response
from .websocket import WebSocket

__all__ = ["ConnectError", "FetchError", "FetchTimeout", "connect", "fetch"]

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


#: ``sw.fetch`` defaults: the whole exchange, each connect, the response body, redirects.
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_RESPONSE_SIZE = 32 * 1024 * 1024
MAX_REDIRECTS = 20
_NO_BODY_METHODS = {"GET", "HEAD"}
_UNSET: Any = object()


async def fetch(
    url_or_request: str | Request,
    *,
    method: str | None = None,
    headers: Mapping[str, str] | Headers | None = None,
    body: str | bytes | bytearray | memoryview | None = None,
    json: Any = _UNSET,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (Cloudflare-like; the core times it)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
    redirect: str = "follow",
    ca_file: str | None = None,
) -> Response:
    """Sends an HTTP/1.1 request to ``url_or_request`` (an ``http://``/``https://`` URL, or a
    ``Request`` whose method, headers and body are used unless given here; a space or non-ASCII
    in its path or query is percent-encoded) and returns the whole ``Response``: ``status``,
    ``headers``, ``body`` (bytes), ``url``, ``redirected``, ``ok``, ``await text()``. Any
    status, 404 or 500 too, is a response, not an exception.

    ``body`` is bytes or str (UTF-8, ``text/plain;charset=UTF-8`` unless a content type is
    given); ``json=value`` sends ``value`` as JSON (``application/json``). GET and HEAD take
    no body. ``https://`` trusts the system's CA certificates, or only those in ``ca_file``.
    ``redirect="follow"`` follows up to 20 redirects (303, and 301/302 after a POST, turn into
    a GET; ``Authorization`` is dropped when the origin changes); ``"manual"`` returns the 3xx.
    The response body is not decoded (no gzip): ask for none with ``accept-encoding``.

    Raises ``FetchTimeout`` when the whole exchange takes over ``timeout`` seconds or a
    connect over ``connect_timeout``; ``FetchError`` when refused, the host is unknown, TLS
    fails, the connection closes early, the body is over ``max_response_size`` bytes or
    there are too many redirects (the message names the URL); ``InvalidArgument`` for a bad
    URL, method or header (nothing is sent); ``TypeError`` for a bad argument's type.

    With ``Upgrade: websocket`` in ``headers``, opens a WebSocket instead and returns
    ``Response(status=101, websocket=ws)``; call ``ws.accept()`` before using it (errors:
    ``ConnectError``; ``timeout``, ``max_response_size`` and ``redirect`` do not apply)."""
    if isinstance(url_or_request, Request):
        url = url_or_request.url
        method = url_or_request.method if method is None else method
        if headers is None:
            headers = url_or_request.headers
        if body is None and json is _UNSET and url_or_request.body:
            body = url_or_request.body
    elif isinstance(url_or_request, str):
        url = url_or_request
    else:
        raise TypeError(
            f"fetch takes a URL (str) or a Request, not {type(url_or_request).__name__}"
        )
    given = headers if isinstance(headers, Headers) else Headers(headers)
    if given.get("upgrade", "").lower() == "websocket":
        return await _fetch_websocket(url, given, ca_file)
    method = (method or "GET").upper()
    # A copy, every value of a repeated header on its own line: the caller's are left as they are.
    given = Headers([(name, value) for name in given for value in given.get_all(name)])
    data = _body(method, body, json, given)
    if redirect not in ("follow", "manual"):
        raise ValueError(f'redirect is "follow" or "manual", not {redirect!r}')
    for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
        if not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise ValueError(f"{name} is a number of seconds > 0, not {value!r}")
    if not isinstance(max_response_size, int) or max_response_size < 0:
        raise ValueError(f"max_response_size is a number of bytes >= 0, not {max_response_size!r}")
    response: Response = await running("sending an HTTP request").outgoing.fetch(
        _encoded(url),
        method,
        [(name, value) for name in given for value in given.get_all(name)],
        data,
        float(timeout),
        float(min(connect_timeout, timeout)),
        max_response_size,
        MAX_REDIRECTS if redirect == "follow" else None,
        _path(ca_file),
    )
    return response


# What stays as it is in a path, and in a query (RFC 3986's characters, and "%" of an escape).
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _encoded(url: str) -> str:
    """``url`` with its path and query percent-encoded where HTTP needs it (a space, non-ASCII),
    as a browser sends them; escapes already there are kept. A URL that does not split is left
    for the core to refuse."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    path, query = quote(parts.path, safe=_PATH_SAFE), quote(parts.query, safe=_QUERY_SAFE)
    if (path, query) == (parts.path, parts.query):
        return url
    return urlunsplit(parts._replace(path=path, query=query))


def _body(
    method: str, body: str | bytes | bytearray | memoryview | None, value: Any, headers: Headers
) -> bytes:
    """The request body as bytes, its content type added to ``headers`` when implied."""
    if value is not _UNSET:
        if body is not None:
            raise TypeError("give body or json, not both")
        body = _json.dumps(value)
        if "content-type" not in headers:
            headers["content-type"] = "application/json"
    if body is None:
        return b""
    if method in _NO_BODY_METHODS:
        raise TypeError(f"a {method} request has no body")
    if isinstance(body, str):
        if "content-type" not in headers:
            headers["content-type"] = "text/plain;charset=UTF-8"
        return body.encode("utf-8")
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise TypeError(f"a fetch body is str, bytes or None, not {type(body).__name__}")


async def _fetch_websocket(url: str, given: Headers, ca_file: str | None) -> Response:
    protocols = [p.strip() for p in given.get("sec-websocket-protocol", "").split(",") if p.strip()]
    extra = [
        (name, value) for name, value in given.items() if name.lower() not in _HANDSHAKE_HEADERS
    ]
    ws: WebSocket = await running("opening an outgoing WebSocket").outgoing.connect(
        url, protocols, extra, accepted=False, ca_file=_path(ca_file)
    )
    return Response(status=101, websocket=ws)
