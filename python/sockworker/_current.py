"""The runtime serving now (one per process): the one place every module finds it.

The runtime sets itself here when it starts and clears itself when it stops. Modules below the
runtime (sockets, CPU accounting) see it through ``Serving``, the little they need of it;
modules above it use ``sockworker._runtime.running()``, which returns the runtime itself.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

from . import _native


class Serving(Protocol):
    """What the lower modules need of the runtime serving now."""

    def current_slot(self) -> _native.Slot | None:
        """The meter slot of the code running now, or None (metering off, or nothing runs)."""
        ...


_serving: Serving | None = None


def serving() -> Serving | None:
    """The runtime serving now, or None."""
    return _serving


def set_serving(runtime: Serving | None) -> None:
    global _serving
    _serving = runtime


def current_slot() -> _native.Slot | None:
    """The meter slot of the code running now (an event, an async step), or None when nothing
    is metered."""
    runtime = _serving
    return runtime.current_slot() if runtime is not None else None


#: The Durable Object the running request was routed to (``"BINDING:id"``), set by a stub's
#: ``fetch`` in the Worker's task, read by the access log once the Worker has answered.
routed_object: ContextVar[str | None] = ContextVar("routed_object", default=None)
