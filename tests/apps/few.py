"""Worker that admits at most three connections to the whole server.

Routes: WS /ws (echo); anything else 404.
"""

from __future__ import annotations

from typing import Any

import sockworker as sw

MAX_CONNECTIONS = 3


def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path != "/ws":
        return sw.Response("not found", status=404)
    client, server = sw.WebSocketPair()
    server.accept()
    server.on("message", lambda event: server.send(event.data))
    return sw.Response(status=101, websocket=client)


app = sw.App(fetch=fetch, limits=sw.Limits(max_connections=MAX_CONNECTIONS))
