"""The smallest sockworker app: every WebSocket message is sent back, on any path.

Run it with ``make demo`` or ``sockworker serve examples.echo:app --port 8787``.
"""

import sockworker as sw


def fetch(request: sw.Request, env: sw.Env, ctx: sw.ExecutionContext) -> sw.Response:
    if request.headers.get("upgrade", "").lower() != "websocket":
        return sw.Response("sockworker echo: connect a WebSocket to any path\n")
    client, server = sw.WebSocketPair()
    server.accept()
    server.add_event_listener("message", lambda event: server.send(event.data))
    return sw.Response(status=101, websocket=client)


app = sw.App(fetch=fetch)
