"""HTTP requests and responses as a Worker's ``fetch`` sees them (SPEC §2.1)."""

from __future__ import annotations

import json as _json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from .websocket import WebSocket

__all__ = ["Headers", "Request", "Response"]

HeadersInit = Mapping[str, str] | Iterable[tuple[str, str]] | None
#: A streamed body: an async iterator (or a sync one) of bytes or str chunks.
BodyChunks = AsyncIterable[bytes | str] | Iterable[bytes | str]

#: The size of the pieces ``Request.stream()`` yields of a body read whole.
STREAM_PIECE = 64 * 1024


class BodyFeed(Protocol):
    """Where a request body read as it arrives comes from (the runtime's)."""

    async def read(self) -> bytes | None:
        """The next piece, ``None`` at the end; ``RequestBodyError`` when it cannot be read."""
        ...


class _Taken:
    """``Request._feed`` once ``stream()`` has begun reading the body."""


_TAKEN = _Taken()


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
    ``headers`` (``Headers``), ``body`` (bytes), ``client`` (the peer, ``"ip:port"``).

    By default the core has read the body before the handler runs (at most
    ``Limits.max_body_size`` bytes; a larger body is answered 413 by the core), and
    ``stream()`` yields it in pieces. With ``App(stream_request_bodies=True)`` a request with a
    body reaches the handler as soon as its head has arrived: ``await read()``, ``text()`` or
    ``json()`` wait for the whole body, ``stream()`` yields its pieces as they arrive, and
    ``body`` raises ``RuntimeError`` until the body has been read."""

    __slots__ = (
        "_feed",
        "_query",
        "body",
        "client",
        "headers",
        "method",
        "path",
        "query_string",
        "url",
    )

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
        self._feed: BodyFeed | _Taken | None = None
        self.client = client
        self._query: Mapping[str, str] | None = None

    @classmethod
    def _from_core(
        cls,
        method: str,
        target: str,
        raw: list[tuple[str, bytes]],
        body: bytes,
        client: str,
        feed: BodyFeed | None = None,
    ) -> Request:
        headers = Headers._from_raw(raw)
        host = headers.get("host", "localhost")
        if feed is None:
            return cls(method, f"http://{host}{target}", headers, body, client)
        # (A class of its own, whose body is a property: plain requests keep a plain attribute.)
        request = _StreamedRequest(method, f"http://{host}{target}", headers, b"", client)
        request._feed = feed
        return request

    async def read(self) -> bytes:
        """The whole body (waits for it when it is read as it arrives; ``RequestBodyError`` if
        it cannot be, such as past ``Limits.max_body_size``)."""
        feed = self._feed
        if feed is None:
            return self.body
        if isinstance(feed, _Taken):
            raise RuntimeError("the body of this request was taken by stream()")
        self._feed = _TAKEN
        pieces = []
        while (piece := await feed.read()) is not None:
            pieces.append(piece)
        body = self.body = b"".join(pieces)
        return body

    #: Cloudflare's name of ``read`` (it answers bytes here).
    arrayBuffer = read

    async def stream(self) -> AsyncIterator[bytes]:
        """The body in pieces: as they arrive from the client with
        ``App(stream_request_bodies=True)`` (once: the body is not kept), else slices of at
        most 64 KiB of the body the core has read whole. ``RequestBodyError`` when the body
        cannot be read further (past ``Limits.max_body_size``, too slow, the client gone)."""
        feed = self._feed
        if feed is None:
            body = self.body
            for start in range(0, len(body), STREAM_PIECE):
                yield body[start : start + STREAM_PIECE]
            return
        if isinstance(feed, _Taken):
            raise RuntimeError("the body of this request was already taken by stream() or read()")
        self._feed = _TAKEN
        while (piece := await feed.read()) is not None:
            yield piece

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
        return (await self.read()).decode("utf-8")

    async def json(self) -> Any:
        """The body parsed as JSON (``json.JSONDecodeError`` if it is not)."""
        return _json.loads(await self.read())

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"


_BODY: Any = Request.__dict__["body"]  # (the slot's descriptor)


class _StreamedRequest(Request):
    """A request whose body is read as it arrives (``stream_request_bodies``)."""

    __slots__ = ()

    @property
    def body(self) -> bytes:
        """The whole body, once ``await read()`` (or ``text()``, ``json()``) has read it;
        ``RuntimeError`` before that, or once ``stream()`` has taken it."""
        feed = self._feed
        if feed is not None:
            how = "was taken by stream()" if feed is _TAKEN else "has not been read yet"
            raise RuntimeError(
                f"the body of this request is read as it arrives (stream_request_bodies) and {how}:"
                " await request.read() (or text(), json()) before using request.body"
            )
        body: bytes = _BODY.__get__(self, Request)
        return body

    @body.setter
    def body(self, value: bytes) -> None:
        _BODY.__set__(self, value)
        self._feed = None


async def _chunks_of(chunks: Iterable[bytes | str]) -> AsyncIterator[bytes | str]:
    """A sync iterable as an async iterator (each step runs on the loop: keep them short)."""
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class Response:
    """An HTTP response, or with ``status=101`` and ``websocket=client`` a WebSocket upgrade.

    ``body`` is str (sent as UTF-8, with ``text/plain; charset=utf-8`` unless a content type is
    given), bytes or None; or an async iterator (an async generator) or a sync iterable of
    bytes/str chunks, *streamed*: each chunk is sent as it is produced (chunked
    transfer-encoding unless a ``content-length`` header is given), the next one pulled once
    the connection has room for it. A streamed response keeps its iterator in ``stream`` (and
    ``body`` is ``b""``). ``headers`` is a mapping, a list of pairs or a ``Headers``.
    ``Response(status=101, websocket=client)`` answers a WebSocket upgrade with the client end of
    a ``WebSocketPair``; add ``headers={"sec-websocket-protocol": name}`` to select a subprotocol
    the client offered (``request.headers.get("sec-websocket-protocol")`` lists them). Returning
    a WebSocket for a request that is not a valid upgrade, with a status other than 101, or
    before ``server.accept()`` is a handler error: 500, and the reason is logged.

    A response ``sw.fetch`` returns also has ``url`` (the URL it came from, the last one after
    redirects) and ``redirected`` (a redirect was followed); ``ok`` and ``await text()`` read it.
    """

    __slots__ = ("body", "headers", "redirected", "status", "stream", "url", "websocket")

    def __init__(
        self,
        body: str | bytes | BodyChunks | None = None,
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
        self.stream: AsyncIterator[bytes | str] | None = None
        if isinstance(body, str):
            self.body: bytes = body.encode("utf-8")
            if "content-type" not in self.headers:
                self.headers["content-type"] = "text/plain; charset=utf-8"
        elif body is None:
            self.body = b""
        elif isinstance(body, bytes | bytearray | memoryview):
            self.body = bytes(body)
        elif isinstance(body, AsyncIterable):
            self.body = b""
            self.stream = aiter(body)
        elif isinstance(body, Iterable) and not isinstance(body, Mapping):
            self.body = b""
            self.stream = _chunks_of(body)
        else:
            raise TypeError(
                "a Response body is str, bytes, None, or an (async) iterator of bytes/str chunks, "
                f"not {type(body).__name__}"
            )
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
