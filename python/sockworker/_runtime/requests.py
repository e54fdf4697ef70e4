"""HTTP requests (SPEC §2.1): each request the core hands over is labelled with its account,
admitted by the billing hook, answered by the Worker's ``fetch``, and counted; a 101 with a
socket is checked and handed back to the core as an accepted WebSocket."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable
from typing import Any, cast

from .. import _native
from ..errors import CpuLimitExceeded, ResponseError, WallLimitExceeded
from ..http import Request, Response
from .access import LoggedReply
from .cluster import CLUSTER_PATH
from .host import ObjectHost, accepted_here
from .remote import Accepted
from .services import Services
from .streaming import Streams

logger = logging.getLogger("sockworker")

_PLAIN = [("content-type", b"text/plain; charset=utf-8")]


class ExecutionContext:
    """The ``ctx`` argument of a Worker's ``fetch``. Cloudflare's names ``waitUntil`` and
    ``passThroughOnException`` are the same methods."""

    __slots__ = ("_services",)

    def __init__(self, services: Services) -> None:
        self._services = services

    def wait_until(self, awaitable: Awaitable[Any]) -> None:
        """Keeps work running after the response is sent; its exceptions are logged."""
        self._services.spawn(awaitable, "wait_until")

    waitUntil = wait_until

    def pass_through_on_exception(self) -> None:
        """Accepted for code ported from Cloudflare; there is no origin to pass through to."""

    passThroughOnException = pass_through_on_exception


class Requests:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.ctx = ExecutionContext(services)
        self.streams = Streams(services.loop)

    def on_request(
        self,
        reply: _native.PendingReply,
        method: str,
        target: str,
        headers: list[tuple[str, bytes]],
        body: bytes,
        peer: str,
        feed: _native.RequestFeed | None,
    ) -> None:
        request = Request._from_core(
            method, target, headers, body, peer, None if feed is None else self.streams.feed(feed)
        )
        services = self.services
        app = services.app
        nodes = services.nodes
        if nodes is not None and request.path == CLUSTER_PATH:
            # Another node's link: not billed, not admitted, not the Worker's.
            self._answer(reply, request, nodes.accept(request), None)
            return
        # (Not the links: they are the cluster's own traffic.)
        logged: LoggedReply | None = None
        if app.access_log:
            logged = LoggedReply(reply, method, request.path, len(body))
            reply = cast(_native.PendingReply, logged)
        if app.metrics_path is not None and request.path == app.metrics_path:
            # The operator's endpoint: not billed, not admitted.
            text = app.meter._prometheus().encode()
            reply.respond(200, [("content-type", b"text/plain; version=0.0.4")], text)
            return
        slot: _native.Slot | None = None
        if services.metering.on:
            try:
                account = app.account(request) if app.account is not None else "default"
                if not isinstance(account, str):
                    raise TypeError(f"App(account=...) must return a str, not {account!r}")
                refusal = app.billing.admit(request, account) if app.billing is not None else None
            except Exception:
                logger.exception("exception labelling or admitting %s %s", method, request.url)
                reply.respond(500, _PLAIN, b"Internal Server Error")
                return
            if refusal is not None:
                # Refused before anything is counted: no request, no connection.
                self._answer(reply, request, refusal, None)
                return
            slot = services.metering.worker_slot(account)
            services.server.relabel(slot)
            if logged is not None:
                logged.account = account
        handler = app.fetch
        if handler is None:
            self._count(slot, None)
            reply.respond(404, _PLAIN, b"Not Found")
            return
        try:
            result = handler(request, app.env, self.ctx)
        except Exception as error:
            self._fail(reply, request, slot, error)
            return
        if inspect.isawaitable(result):
            services.spawn(self._answer_later(reply, request, result, slot), "fetch")
        else:
            self._answer(reply, request, result, slot)

    async def _answer_later(
        self,
        reply: _native.PendingReply,
        request: Request,
        result: Awaitable[Response],
        slot: _native.Slot | None,
    ) -> None:
        try:
            response = await result
        except Exception as error:
            self._fail(reply, request, slot, error)
            return
        self._answer(reply, request, response, slot)

    @staticmethod
    def _count(slot: _native.Slot | None, response: object) -> None:
        """One request for the Worker, unless it answered with a socket it accepted itself
        (that is one connection, counted by the core when the 101 goes out)."""
        if slot is not None and not accepted_here(response, slot):
            slot.add(_native.UNIT_REQUESTS, 1)

    def _fail(
        self,
        reply: _native.PendingReply,
        request: Request,
        slot: _native.Slot | None,
        error: BaseException,
    ) -> None:
        self._count(slot, None)
        self._answer_error(reply, request, error)

    @staticmethod
    def _answer_error(reply: _native.PendingReply, request: Request, error: BaseException) -> None:
        if isinstance(error, CpuLimitExceeded):
            logger.error("fetch for %s %s exceeded its CPU limit", request.method, request.url)
            reply.respond(503, _PLAIN, b"Service Unavailable: CPU limit exceeded")
            return
        if isinstance(error, WallLimitExceeded):
            logger.error(
                "fetch for %s %s exceeded its wall-time limit", request.method, request.url
            )
            reply.respond(503, _PLAIN, b"Service Unavailable: time limit exceeded")
            return
        logger.error("exception in fetch for %s %s", request.method, request.url, exc_info=error)
        reply.respond(500, _PLAIN, b"Internal Server Error")

    def _answer(
        self,
        reply: _native.PendingReply,
        request: Request,
        response: object,
        slot: _native.Slot | None,
    ) -> None:
        try:
            if not isinstance(response, Response):
                raise ResponseError(
                    f"fetch must return a sockworker.Response, not {type(response).__name__}"
                )
            if response.stream is not None:
                self._stream(reply, request, response)
            elif response.websocket is None:
                reply.respond(response.status, response.headers.raw(), response.body)
            else:
                self._upgrade(reply, request, response)
        except Exception as error:
            self._fail(reply, request, slot, error)
            return
        self._count(slot, response)

    def _stream(self, reply: _native.PendingReply, request: Request, response: Response) -> None:
        if response.websocket is not None:
            raise ResponseError("a Response with a websocket has no body to stream")
        what = f"{request.method} {request.url}"

        def failed(error: BaseException) -> None:
            self._answer_error(reply, request, error)

        # A task of the request's (its steps are billed to it, as the handler's were).
        self.services.spawn(self.streams.respond(reply, response, what, failed), "a streamed body")

    def _upgrade(self, reply: _native.PendingReply, request: Request, response: Response) -> None:
        client = response.websocket
        assert client is not None
        server = client._peer
        if response.status != 101:
            raise ResponseError("a Response with a websocket must have status 101")
        if server is None:
            raise ResponseError("Response(websocket=...) takes the client end of a WebSocketPair")
        if server._handle is not None:
            raise ResponseError("this WebSocketPair was already returned in a response")
        if not server._accepted:
            raise ResponseError("call server.accept() before returning the client end")
        if not reply.is_websocket:
            raise ResponseError(
                "status 101 with a websocket answers only a WebSocket upgrade request"
            )
        headers = response.headers
        chosen = headers.get("sec-websocket-protocol")
        if chosen is not None:
            offered = [
                name.strip()
                for value in request.headers.get_all("sec-websocket-protocol")
                for name in value.split(",")
            ]
            if chosen.strip() not in offered:
                raise ResponseError(
                    f"the subprotocol {chosen!r} chosen in the 101 response was not offered by the "
                    f"client (it offered {', '.join(offered) if offered else 'none'}); the client "
                    "would fail the handshake"
                )
        if "sec-websocket-extensions" in headers:
            raise ResponseError("the core negotiates WebSocket extensions; do not set the header")
        limits = server._limits._socket_limits() if server._limits is not None else None
        handle = reply.accept_websocket(headers.raw(), server._slot, limits)
        url = "ws" + request.url.removeprefix("http")
        self.services.sockets[handle.id] = server
        server._bind(handle, self.services, url, headers.get("sec-websocket-protocol", ""))
        if isinstance(server._object, ObjectHost | Accepted):
            server._object.adopt(server, handle)
        elif isinstance(server._owner, ObjectHost):
            handle.set_owner(server._owner.native.key)
        # The 101 last: a frame the client sent with its handshake finds the socket whole.
        reply.open()
