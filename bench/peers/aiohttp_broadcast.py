"""aiohttp broadcast peer (uvloop): a message goes to every other socket on the same path."""

import argparse
from collections import defaultdict

import uvloop
from aiohttp import WSMsgType, web

rooms: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)


async def member(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=16 << 20, compress=False)
    await ws.prepare(request)
    room = rooms[request.path]
    room.add(ws)
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                for other in list(room):
                    if other is not ws:
                        if msg.type == WSMsgType.BINARY:
                            await other.send_bytes(msg.data)
                        else:
                            await other.send_str(msg.data)
    finally:
        room.discard(ws)
    return ws


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    app = web.Application()
    app.router.add_get("/{tail:.*}", member)
    port = parser.parse_args().port
    print(f"aiohttp broadcast listening on http://127.0.0.1:{port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, loop=uvloop.new_event_loop(), print=None)
