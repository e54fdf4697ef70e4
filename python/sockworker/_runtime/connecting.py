"""Outgoing sockets being opened (SPEC §2.3): ``sw.connect`` asks the core, and the socket is
bound, billed to and kept by the code that opened it, in the batch that reports it open."""

from __future__ import annotations

import asyncio

from .. import _native
from ..errors import ConnectError
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

    def stop(self) -> None:
        for future, *_ in self.connecting.values():
            if not future.done():
                future.set_exception(ConnectError("the server stopped"))
