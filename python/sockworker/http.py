"""HTTP requests and responses as a Worker's ``fetch`` sees them (SPEC §2.1)."""

from __future__ import annotations

import json as _json
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from .websocket import WebSocket

__all__ = ["Headers", "Request", "Response"]

HeadersInit = Mapping[str, str] | Iterable[tuple[str, str]] | None


class Headers(Mapping[str, str]):
    """Case-insensitive, multi-valued HTTP headers, a ``Mapping[str, str]``: ``headers[name]``
    joins repeated values with ", ", ``headers.get(name, default)``, ``name in headers``;
    ``headers[name] = value`` replaces. Built from a mapping or from (name, value) pairs."""

    __slots__ = ("_items",)

    def __init__(self, init: HeadersInit = None) -> None:
        self._items: dict[str, list[str]] = {}
        if init is None:
            return
        pairs = init.items() if isinstance(init, Mapping) else init
        for name, value in pairs:
            self.append(name, value)

    @classmethod
    def _from_raw(cls, raw: list[tuple[str, bytes]]) -> Headers:
        headers = cls()
        items = headers._items
        for name, value in raw:
            items.setdefault(name, []).append(value.decode("latin-1"))
        return headers

    def append(self, name: str, value: str) -> None:
        """Adds a value to those of ``name``."""
        self._items.setdefault(name.lower(), []).append(str(value))

    def __setitem__(self, name: str, value: str) -> None:
        self._items[name.lower()] = [str(value)]

    def __getitem__(self, name: str) -> str:
        return ", ".join(self._items[name.lower()])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order (``[]`` if absent)."""
        return list(self._items.get(name.lower(), ()))

    # Cloudflare's (the Fetch standard's) names, for code ported from Workers.
    getAll = get_all

    def has(self, name: str) -> bool:
        """``name in headers``."""
        return name in self

    def set(self, name: str, value: str) -> None:
        """``headers[name] = value``."""
        self[name] = value

    def delete(self, name: str) -> None:
        """Removes every value of ``name`` (nothing if absent)."""
        self._items.pop(name.lower(), None)

    def raw(self) -> list[tuple[str, bytes]]:
        """The headers as (lowercase name, Latin-1 bytes) pairs, as they go on the wire."""
        return [(n, v.encode("latin-1")) for n, vs in self._items.items() for v in vs]

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


class Request:
    """An HTTP request, as ``fetch`` receives it (or as built for ``stub.fetch``).

    Attributes: ``method``, ``url`` (``http://HOST/path?query``), ``path``, ``query_string``,
    ``headers`` (``Headers``), ``body`` (bytes), ``client`` (the peer, ``"ip:port"``). The body
    has been read by the core before the handler runs (at most ``Limits.max_body_size`` bytes;
    a larger body is answered 413 by the core)."""

    __slots__ = ("_query", "body", "client", "headers", "method", "path", "query_string", "url")

    def __init__(
        self,
        method: str,
        url: str,
        headers: Headers | None = None,
        body: bytes = b"",
        client: str | None = None,
    ) -> None:
        self.method = method.upper()
        self.url = url
        parts = urlsplit(url)
        self.path = parts.path or "/"
        self.query_string = parts.query
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.client = client
        self._query: Mapping[str, str] | None = None

    @classmethod
    def _from_core(
        cls, method: str, target: str, raw: list[tuple[str, bytes]], body: bytes, client: str
    ) -> Request:
        headers = Headers._from_raw(raw)
        host = headers.get("host", "localhost")
        return cls(method, f"http://{host}{target}", headers, body, client)

    @property
    def query(self) -> Mapping[str, str]:
        """The query parameters (the first value of each name)."""
        if self._query is None:
            values: dict[str, str] = {}
            for name, value in parse_qsl(self.query_string, keep_blank_values=True):
                values.setdefault(name, value)
            self._query = MappingProxyType(values)
        return self._query

    @property
    def queryString(self) -> str:
        """The camelCase name of ``query_string``."""
        return self.query_string

    async def text(self) -> str:
        """The body decoded as UTF-8 (``UnicodeDecodeError`` if it is not)."""
        return self.body.decode("utf-8")

    async def json(self) -> Any:
        """The body parsed as JSON (``json.JSONDecodeError`` if it is not)."""
        return _json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"


class Response:
    """An HTTP response, or with ``status=101`` and ``websocket=client`` a WebSocket upgrade.

    ``body`` is str (sent as UTF-8, with ``text/plain; charset=utf-8`` unless a content type is
    given), bytes or None. ``headers`` is a mapping, a list of pairs or a ``Headers``.
    ``Response(status=101, websocket=client)`` answers a WebSocket upgrade with the client end of
    a ``WebSocketPair``; add ``headers={"sec-websocket-protocol": name}`` to select a subprotocol
    the client offered (``request.headers.get("sec-websocket-protocol")`` lists them). Returning
    a WebSocket for a request that is not a valid upgrade, with a status other than 101, or
    before ``server.accept()`` is a handler error: 500, and the reason is logged.

    A response ``sw.fetch`` returns also has ``url`` (the URL it came from, the last one after
    redirects) and ``redirected`` (a redirect was followed); ``ok`` and ``await text()`` read it.
    """

    __slots__ = ("body", "headers", "redirected", "status", "url", "websocket")

    def __init__(
        self,
        body: str | bytes | None = None,
        status: int = 200,
        headers: HeadersInit | Headers = None,
        websocket: WebSocket | None = None,
        *,
        webSocket: WebSocket | None = None,
    ) -> None:
        """``webSocket`` is Cloudflare's name of ``websocket``: give one or the other."""
        if webSocket is not None:
            if websocket is not None:
                raise TypeError("give websocket or webSocket (the same argument), not both")
            websocket = webSocket
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise ValueError(f"status must be an int from 100 to 999, not {status!r}")
        self.status = status
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        if isinstance(body, str):
            self.body: bytes = body.encode("utf-8")
            if "content-type" not in self.headers:
                self.headers["content-type"] = "text/plain; charset=utf-8"
        elif body is None:
            self.body = b""
        elif isinstance(body, bytes | bytearray | memoryview):
            self.body = bytes(body)
        else:
            raise TypeError(f"a Response body is str, bytes or None, not {type(body).__name__}")
        self.websocket = websocket
        self.url = ""
        self.redirected = False

    @property
    def webSocket(self) -> WebSocket | None:
        """Cloudflare's name of ``websocket``."""
        return self.websocket

    @property
    def ok(self) -> bool:
        """The status is 2xx."""
        return 200 <= self.status <= 299

    async def text(self) -> str:
        """The body decoded as UTF-8 (``UnicodeDecodeError`` if it is not). To parse it as JSON:
        ``json.loads(response.body)`` (``Response.json(value)`` makes a response)."""
        return self.body.decode("utf-8")

    @classmethod
    def json(cls, value: Any, status: int = 200, headers: HeadersInit = None) -> Response:
        """A response whose body is ``value`` as JSON (``content-type: application/json``)."""
        response = cls(_json.dumps(value), status=status, headers=headers)
        response.headers["content-type"] = "application/json"
        return response

    def __repr__(self) -> str:
        return f"<Response {self.status}{' websocket' if self.websocket is not None else ''}>"
