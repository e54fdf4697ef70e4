"""The app of the memory benchmark (bench/memory.py): sockets that sit idle, and what holds them.

/rooms       the sockets spread over 100 rooms in turn, each a Durable Object that accepts them
             (hibernatable), echoes, and hibernates after 0.5 s: the cost of a hibernated socket
/echo        the standard API (`server.accept()`, a listener), like examples/echo.py: the cost
             of an idle socket that keeps its Python objects
/memory      JSON: sockets accepted so far, rooms resident now, and the allocators' figures
             (jemalloc's totals and size classes, glibc's mallinfo2, Python's allocated blocks)
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import weakref

import sockworker as sw
from sockworker import _native  # the allocator's statistics: a measuring tool, not the API

ROOMS = 100
_accepted = 0
_joining = 0
_resident: weakref.WeakSet[Room] = weakref.WeakSet()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _glibc() -> dict[str, int]:
    """glibc's malloc (Python's objects over 512 bytes, pymalloc's arenas, libraries)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {
        "in_use": info.uordblks + info.hblkhd,
        "free": info.fordblks,
        "heap": info.arena,
        "mmapped": info.hblkhd,
    }


class Room(sw.DurableObject):
    limits = sw.Limits(hibernate_after=0.5)

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        _resident.add(self)

    def fetch(self, request: sw.Request) -> sw.Response:
        global _accepted
        client, server = sw.WebSocketPair()
        self.ctx.accept_websocket(server)
        _accepted += 1
        return sw.Response(status=101, websocket=client)

    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        ws.send(message)


def memory() -> dict[str, object]:
    gc.collect()
    # A build without the statistics (before they were added) reports zeros.
    stats = getattr(_native, "allocator_stats", lambda: (0,) * 5)
    classes = getattr(_native, "allocator_size_classes", list)
    allocated, active, resident, metadata, mapped = stats()
    return {
        "accepted": _accepted,
        "resident_rooms": len(_resident),
        "jemalloc": {
            "allocated": allocated,
            "active": active,
            "resident": resident,
            "metadata": metadata,
            "mapped": mapped,
            "classes": classes(),
        },
        "glibc": _glibc(),
        "python_blocks": sys.getallocatedblocks(),
        "python_objects": len(gc.get_objects()),
    }


async def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    global _accepted, _joining
    path = request.path
    if path == "/memory":
        return sw.Response(json.dumps(memory()), headers={"content-type": "application/json"})
    if path == "/rooms":
        _joining += 1
        return await env.ROOM.get_by_name(f"r{_joining % ROOMS}").fetch(request)
    if path == "/echo":
        client, server = sw.WebSocketPair()
        server.accept()
        server.add_event_listener("message", lambda event: server.send(event.data))
        _accepted += 1
        return sw.Response(status=101, websocket=client)
    return sw.Response("not found", status=404)


app = sw.App(fetch=fetch, durable_objects={"ROOM": Room})
