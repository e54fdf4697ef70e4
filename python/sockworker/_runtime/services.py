"""What every part of the runtime shares for one run of an app: the app, the native server,
the loop, the sockets with a Python object by id, the background tasks, the meter and the
output gate. Each part is handed this, not the runtime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from .. import _native
from ..websocket import WebSocket
from .contract import AppLike, Routing
from .gate import Gate
from .metering import Metering

logger = logging.getLogger("sockworker")
T = TypeVar("T")


class Services:
    def __init__(
        self, app: AppLike, server: _native.Server, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.app = app
        self.server = server
        self.loop = loop
        # The sockets that have a Python object now (a hibernated object's have none).
        self.sockets: dict[int, WebSocket] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.metering = Metering(app, server, loop)
        self.gate = Gate(server, loop)
        #: Cluster mode's routing (``cluster.Nodes``), else None.
        self.nodes: Routing | None = None

    def spawn(self, awaitable: Awaitable[Any], what: str) -> None:
        """Runs ``awaitable`` as a task of the app; its exception is logged."""
        task = self.loop.create_task(as_coroutine(awaitable))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("exception in a background task", exc_info=error)

    def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()


async def as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
