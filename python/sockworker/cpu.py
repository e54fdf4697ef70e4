"""CPU accounting of async handlers (SPEC §3): every resumption of an event's coroutine is one
*step*, measured by the core with the thread's CPU clock; time spent waiting between steps is
not charged. The task that runs an event (and every task its code creates) runs its coroutine
through ``Metered``, which tells the core where a step begins and ends.

Synchronous handlers are measured per batch of events in the core (``Server.drain``/``flush``),
without anything here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from . import _native
from .errors import CpuLimitExceeded


class Metered(Coroutine[Any, Any, Any]):
    """A coroutine whose steps are charged to ``slot`` and held to its per-event CPU limit.

    Past the limit the watchdog raises ``CpuLimitExceeded`` inside the step; if the coroutine
    swallows it, it is thrown in again at each later resumption until the coroutine ends."""

    __slots__ = ("_coro", "_limit", "_over", "_server", "_slot", "_used")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], slot: _native.Slot, server: _native.Server
    ) -> None:
        self._coro = coro
        self._slot = slot
        self._server = server
        self._limit = slot.cpu_limit_ns
        self._used = 0
        self._over = False

    def send(self, value: Any) -> Any:
        if self._over:
            return self._step(self._coro.throw, CpuLimitExceeded())
        return self._step(self._coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._step(self._coro.throw, typ)
        return self._step(self._coro.throw, typ, val, tb)

    def _step(self, resume: Any, *args: Any) -> Any:
        limit = self._limit
        budget = None if limit is None else max(limit - self._used, 0)
        measured = self._server.step_begin(self._slot, budget)
        try:
            return resume(*args)
        finally:
            if measured:
                used, interrupted = self._server.step_end()
                self._used += used
                if interrupted or (limit is not None and self._used > limit):
                    self._over = True

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> Metered:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def __repr__(self) -> str:
        return f"<Metered {self._coro!r} for {self._slot!r}>"


def task_factory(server: _native.Server | None, made: Callable[[asyncio.Task[Any]], None]) -> Any:
    """A loop task factory: with ``server`` (metering on), a task created while an event runs is
    charged to that event's slot; ``made`` is told of every task."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if server is not None and not isinstance(coro, Metered):
            slot = server.current_slot()
            if slot is not None:
                coro = Metered(coro, slot, server)
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made(task)
        return task

    return factory
