"""websockets echo peer (uvloop): every message is sent back, on any path."""

import argparse
import asyncio

import uvloop
from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def main(port: int) -> None:
    async with serve(echo, "127.0.0.1", port, compression=None, max_size=16 << 20):
        print(f"websockets echo listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    uvloop.run(main(parser.parse_args().port))
