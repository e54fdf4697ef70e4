"""Storage commits and the output gate, as the Python side sees them (SPEC §6): writes of one
loop iteration share one commit, and a result waits here until what it depends on is durable."""

from __future__ import annotations

import asyncio

from .. import _native
from ..errors import StorageError


class Gate:
    """Schedules commits and holds results at the output gate, by token."""

    def __init__(self, server: _native.Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.waiters: dict[int, asyncio.Future[bool]] = {}
        self.next_token = 1
        self.scheduled = False

    def schedule_commit(self) -> None:
        """Something was written: commit at the start of the next loop iteration (the end of a
        batch of events commits anyway), so writes of one iteration share one commit."""
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.commit)

    def commit(self) -> None:
        self.scheduled = False
        self.server.commit()

    async def released(self, owner: int) -> None:
        """Waits until what was sent (and written) before is durable: how a result of object
        ``owner`` passes the output gate. Raises ``StorageError`` when its commit failed."""
        token = self.next_token
        self.next_token += 1
        if self.server.hold_token(owner, token) is None:
            return
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self.waiters[token] = waiter
        if not await waiter:
            raise StorageError(
                "a storage commit failed; the object was reset and its result dropped"
            )

    def on_released(self, token: int, committed: bool) -> None:
        """The core's answer for ``token``: passed the gate, or its commit failed."""
        waiter = self.waiters.pop(token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(committed)

    def stop(self) -> None:
        """The server stopped: nothing held will be released."""
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_result(False)
        self.waiters.clear()
