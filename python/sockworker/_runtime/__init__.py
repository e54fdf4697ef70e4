"""The runtime (private): what serves an app. The public modules (``app``, ``durable``,
``outgoing``) sit above it and reach it through ``running()``; it imports none of them.

Layers, each importing only those below it::

    core.py        Runtime: the native server, the lifecycle, the dispatch of each batch
    requests.py    HTTP requests to the Worker's fetch; ExecutionContext
    connecting.py  outgoing sockets being opened
    host.py        ObjectHost (one resident Durable Object) and Objects (the resident ones)
    services.py    what the parts share: app, server, loop, sockets by id, tasks
    gate.py        commits and the output gate     metering.py  slots, duration, hook flushes
    contract.py    AppLike and ObjectKind: what the runtime needs of the app
"""

from __future__ import annotations

from .. import _current
from .contract import AppLike, ObjectKind
from .core import DEFAULT_DATA_DIR, SHUTDOWN_GRACE, Runtime
from .host import HANDLER_NAMES, ObjectHost
from .requests import ExecutionContext

__all__ = [
    "DEFAULT_DATA_DIR",
    "HANDLER_NAMES",
    "SHUTDOWN_GRACE",
    "AppLike",
    "ExecutionContext",
    "ObjectHost",
    "ObjectKind",
    "Runtime",
    "running",
]


def running(what: str = "this") -> Runtime:
    """The runtime serving now; ``RuntimeError`` when the app is not serving."""
    runtime = _current.serving()
    if not isinstance(runtime, Runtime):
        raise RuntimeError(f"{what} is possible only while the app is serving")
    return runtime
