"""CPU accounting of async handlers (SPEC §3): every resumption of an event's coroutine is one
*step*, measured by the core with the thread's CPU clock; time spent waiting between steps is
not charged. The task that runs an event (and every task its code creates) runs its coroutine
through ``Metered`` (in the core), which measures each step where it runs it.

Synchronous handlers are measured per batch of events in the core (``Server.drain``/``flush``),
without anything here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from . import _native

#: A coroutine whose steps are charged to a slot and held to its per-event CPU limit across
#: steps: ``server.metered(coro, slot)``. Past the limit the watchdog raises
#: ``CpuLimitExceeded`` inside the step; if the coroutine swallows it, it is thrown in again at
#: each later resumption until the coroutine ends. Each step is one call into the core.
Metered = _native.Metered
Coroutine.register(Metered)


def task_factory(server: _native.Server | None, made: Callable[[asyncio.Task[Any]], None]) -> Any:
    """A loop task factory: with ``server`` (metering on), a task created while an event runs is
    charged to that event's slot; ``made`` is told of every task."""

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if server is not None and not isinstance(coro, Metered):
            slot = server.current_slot()
            if slot is not None:
                coro = server.metered(coro, slot)
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made(task)
        return task

    return factory
