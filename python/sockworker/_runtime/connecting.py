"""Outgoing sockets being opened (SPEC §2.3): ``sw.connect`` asks the core, and the socket is
bound, billed to and kept by the code that opened it, in the batch that reports it open. And
outgoing HTTP requests (``sw.fetch``): the core does the exchange, the caller awaits its
response, and each counts as a subrequest of the code that made it."""

from __future__ import annotations

import asyncio

from .. import _native
from ..errors import ConnectError, FetchError, FetchTimeout, InvalidArgument
from ..http import Headers, Response
from ..websocket import CloseCode, WebSocket
from .host import ObjectHost, Objects
from .services import Services


class Outgoing:
    def __init__(self, services: Services, objects: Objects) -> None:
        self.services = services
        self.objects = objects
        # Sockets being opened: token -> (future, url, slot, owner, accepted).
        self.connecting: dict[
            int,
            tuple[asyncio.Future[WebSocket], str, _native.Slot | None, ObjectHost | None, bool],
        ] = {}
        self.next_token = 1
        # HTTP requests in flight: token -> future of their response.
        self.fetching: dict[int, asyncio.Future[Response]] = {}
        self.stopped = False

    async def connect(
        self,
        url: str,
        protocols: list[str],
        headers: list[tuple[str, str]],
        accepted: bool,
        ca_file: str | None = None,
    ) -> WebSocket:
        """Opens an outgoing socket billed to, and kept by, the code running now."""
        services = self.services
        slot = services.metering.current_slot()
        owner = self.objects.of_slot(slot)
        token, self.next_token = self.next_token, self.next_token + 1
        future: asyncio.Future[WebSocket] = services.loop.create_future()
        self.connecting[token] = (future, url, slot, owner, accepted)
        services.server.connect(url, protocols, headers, slot, token, ca_file)
        return await future

    def on_connected(
        self,
        token: int,
        handle: _native.SocketHandle | None,
        protocol: str,
        error: str | None,
    ) -> None:
        future, url, slot, owner, accepted = self.connecting.pop(token)
        if handle is None:
            if not future.done():
                future.set_exception(ConnectError(error or "connect failed"))
            return
        if future.done():  # the caller gave up (cancelled): nobody will use the socket
            handle.close(CloseCode.GOING_AWAY, "going away")
            return
        # Bound now, in the batch that opened it, so no message of it can come unclaimed.
        ws = WebSocket._outgoing(slot, accepted)
        self.services.sockets[handle.id] = ws
        ws._bind(handle, self.services, url, protocol)
        if owner is not None:
            owner.keep(ws)
            handle.set_owner(owner.native.key)
        future.set_result(ws)

    async def fetch(
        self,
        url: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,  # noqa: ASYNC109 (the core times the exchange, on the I/O side)
        connect_timeout: float,
        max_response_size: int,
        max_redirects: int | None,
        ca_file: str | None,
    ) -> Response:
        """Sends an HTTP request; counted as a subrequest of the code running now."""
        if self.stopped:
            raise FetchError(f"{method} {url}: the server stopped")
        services = self.services
        slot = services.metering.current_slot()
        if slot is not None:
            slot.add(_native.UNIT_SUBREQUESTS, 1)
        token, self.next_token = self.next_token, self.next_token + 1
        future: asyncio.Future[Response] = services.loop.create_future()
        self.fetching[token] = future
        try:
            services.server.fetch(
                url,
                method,
                headers,
                body,
                token,
                timeout,
                connect_timeout,
                max_response_size,
                max_redirects,
                ca_file,
            )
            return await future
        except asyncio.CancelledError:
            # The caller gave up: the core drops the exchange and closes its connection now.
            services.server.cancel_fetch(token)
            raise
        finally:
            self.fetching.pop(token, None)

    def on_fetched(
        self,
        token: int,
        answer: tuple[int, list[tuple[str, bytes]], bytes, str, bool] | None,
        failure: tuple[str, str] | None,
    ) -> None:
        future = self.fetching.pop(token, None)
        if future is None or future.done():  # the caller gave up (cancelled)
            return
        if answer is not None:
            status, raw, body, url, redirected = answer
            response = Response(body, status=status, headers=Headers._from_raw(raw))
            response.url = url
            response.redirected = redirected
            future.set_result(response)
            return
        kind, message = failure or ("connect", "fetch failed")
        error: Exception
        if kind == "timeout":
            error = FetchTimeout(message)
        elif kind == "invalid":
            error = InvalidArgument(message)
        else:
            error = FetchError(message)
        future.set_exception(error)

    def stop(self) -> None:
        self.stopped = True
        for future, *_ in self.connecting.values():
            if not future.done():
                future.set_exception(ConnectError("the server stopped"))
        for waiting in self.fetching.values():
            if not waiting.done():
                waiting.set_exception(FetchError("the server stopped"))
