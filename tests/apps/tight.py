"""Worker with tight limits: 1 KiB messages, a 0.5 s handshake timeout, a 1.5 s idle timeout.

Routes: WS /ws (echo, plain `def` handlers throughout); anything else 404.
"""

from __future__ import annotations

from typing import Any

import sockworker as sw

MAX_MESSAGE = 1024
HANDSHAKE_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.5


def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path != "/ws":
        return sw.Response("not found", status=404)
    client, server = sw.WebSocketPair()
    server.accept()
    server.on("message", lambda event: server.send(event.data))
    return sw.Response(status=101, websocket=client)


app = sw.App(
    fetch=fetch,
    limits=sw.Limits(
        max_message_size=MAX_MESSAGE,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
    ),
)
