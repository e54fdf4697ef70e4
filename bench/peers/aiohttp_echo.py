"""aiohttp echo peer (uvloop): every message is sent back, on any path."""

import argparse

import uvloop
from aiohttp import WSMsgType, web


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=16 << 20, compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    port = parser.parse_args().port
    print(f"aiohttp echo listening on http://127.0.0.1:{port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, loop=uvloop.new_event_loop(), print=None)
